"""Choosing where PPQ runs."""

from __future__ import annotations

import torch

from maptools.errors import DeviceError

__all__ = ["resolve_device", "DEVICES"]

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> str:
    """Map ``cpu``/``cuda``/``cuda:N``/``auto`` to a device PPQ can use here, or raise DeviceError."""
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={device!r} was requested but CUDA is not available on this machine.",
                "pass device='cpu', or device='auto' to use a GPU only when one is present.",
            )
        if ":" in name:
            index = name.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise DeviceError(f"device={device!r} names a GPU this machine does not have "
                                  f"({torch.cuda.device_count()} visible).", "pass device='cuda' or 'cuda:0'.")
        return name
    raise DeviceError(f"unknown device {device!r}.", "pass 'cpu', 'cuda' or 'auto'.")
