"""Versions of the packages that decide a quantization result (recorded in manifests and cache keys)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__", "package_versions"]

__version__ = "0.2.0"

_PACKAGES = ("maptools", "ppq", "torch", "onnx", "onnxruntime", "onnxsim", "numpy", "protobuf")


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
