"""Calibration data: re-iterable, streamed, validated sample by sample.

A calibration set yields ``{input_name: tensor}`` dicts, one per calibration batch, and can be
iterated more than once (PPQ's histogram observers take two passes). Nothing here keeps a list
of all tensors: samples are produced or loaded when iterated and dropped after use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from maptools.errors import CalibrationError
from maptools.onnx_model import ModelInput

__all__ = ["CalibrationSet", "RandomCalibration", "SampleCalibration", "ValidatedCalibration",
           "resolve_calibration", "MIN_SAMPLES"]

MIN_SAMPLES = 8


class CalibrationSet:
    """Base of calibration sources: ``len()``, repeatable ``iter()``, and a JSON description."""

    kind = "abstract"

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Small JSON-able description (kind, count, and what identifies the content)."""
        return {"kind": self.kind, "count": len(self)}

    def content_hash(self) -> str:
        """sha256 over every sample's names, shapes, dtypes and bytes (one streamed pass)."""
        digest = hashlib.sha256()
        for sample in self:
            for name in sorted(sample):
                t = sample[name].detach().cpu().contiguous()
                digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
                digest.update(t.numpy().tobytes())
        return digest.hexdigest()


class RandomCalibration(CalibrationSet):
    """Seeded standard-normal samples; sample ``i`` depends only on ``(seed, i)``."""

    kind = "random"

    def __init__(self, shapes: Mapping[str, Sequence[int]], count: int, seed: int = 0) -> None:
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.count = count
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.count):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            yield {name: torch.randn(shape, generator=gen) for name, shape in self.shapes.items()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed, "shapes": {k: list(v) for k, v in self.shapes.items()}}

    def content_hash(self) -> str:
        return hashlib.sha256(repr(sorted(self.describe().items())).encode()).hexdigest()


class SampleCalibration(CalibrationSet):
    """A user's sized, re-iterable collection of ``{input_name: tensor | ndarray}`` dicts."""

    kind = "samples"

    def __init__(self, samples: Sequence[Mapping[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for sample in self.samples:
            yield sample  # type: ignore[misc]  # checked by ValidatedCalibration


class ValidatedCalibration(CalibrationSet):
    """Checks every sample of ``source`` against the model inputs as it streams past.

    Names, shapes, dtype and finiteness are checked; the error names the sample index.
    At most ``limit`` samples are yielded.
    """

    def __init__(self, source: CalibrationSet, inputs: Sequence[ModelInput],
                 shapes: Mapping[str, tuple[int, ...]], limit: int | None = None) -> None:
        self.source = source
        self.inputs = {i.name: i for i in inputs}
        self.shapes = dict(shapes)
        self.limit = len(source) if limit is None else min(limit, len(source))
        self.kind = source.kind

    def __len__(self) -> int:
        return self.limit

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index, sample in enumerate(self.source):
            if index >= self.limit:
                return
            yield self._check(index, sample)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "used": self.limit}

    def _check(self, index: int, sample: Any) -> dict[str, torch.Tensor]:
        where = f"calibration sample {index}"
        if not isinstance(sample, Mapping):
            raise CalibrationError(f"{where} is a {type(sample).__name__}, not a dict of input name -> tensor.",
                                   f"yield dicts like {{{next(iter(self.inputs))!r}: tensor}}.")
        if set(sample) != set(self.inputs):
            raise CalibrationError(f"{where} has keys {sorted(sample)} but the model's inputs are "
                                   f"{sorted(self.inputs)}.", "key each tensor by its model input name.")
        out: dict[str, torch.Tensor] = {}
        for name, value in sample.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, torch.Tensor):
                raise CalibrationError(f"{where}[{name!r}] is a {type(value).__name__}, not a tensor.",
                                       "pass torch tensors or numpy arrays.")
            want_dtype = torch.from_numpy(np.zeros(0, self.inputs[name].dtype)).dtype
            if value.dtype != want_dtype:
                raise CalibrationError(f"{where}[{name!r}] has dtype {value.dtype}, the model expects {want_dtype}.",
                                       f"convert it, e.g. tensor.to({want_dtype}).")
            if tuple(value.shape) != self.shapes[name]:
                raise CalibrationError(f"{where}[{name!r}] has shape {list(value.shape)}, expected "
                                       f"{list(self.shapes[name])} (from input_shapes).",
                                       "make every sample match input_shapes, batch axis included.")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CalibrationError(f"{where}[{name!r}] contains NaN or inf.",
                                       "clean the data or drop that sample.")
            out[name] = value
        return out


def resolve_calibration(calibset: Any, shapes: Mapping[str, tuple[int, ...]], calib_steps: int,
                        seed: int) -> CalibrationSet:
    """Turn what the user passed as ``calibset`` into a CalibrationSet (not yet validated)."""
    if calibset is None:
        return RandomCalibration(shapes, calib_steps, seed)
    if isinstance(calibset, CalibrationSet):
        return calibset
    if isinstance(calibset, Sequence) and not isinstance(calibset, (str, bytes)):
        return SampleCalibration(calibset)
    if isinstance(calibset, Iterable) and iter(calibset) is calibset:
        raise CalibrationError("calibset is a one-shot iterator (e.g. a generator); PPQ reads the data more than once.",
                               "pass a list, or a re-iterable object such as a torch DataLoader.")
    raise CalibrationError(f"calibset of type {type(calibset).__name__} is not supported.",
                           "pass None (seeded random data) or a list of {input_name: tensor} dicts.")
