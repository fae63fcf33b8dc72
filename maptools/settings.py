"""Quantization settings: typed, validated, serialisable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from maptools.errors import SettingsError

__all__ = ["CalibrationAlgorithm", "QuantSettings", "MIN_CALIB_STEPS", "MAX_CALIB_STEPS"]

MIN_CALIB_STEPS = 8
MAX_CALIB_STEPS = 512


class CalibrationAlgorithm(str, Enum):
    """How activation ranges are chosen from the calibration data."""

    PERCENTILE = "percentile"
    MINMAX = "minmax"
    KL = "kl"
    MSE = "mse"

    @property
    def passes(self) -> int:
        """How many times PPQ reads the calibration data: its kl (histogram) and mse observers read it twice."""
        return 2 if self in (CalibrationAlgorithm.KL, CalibrationAlgorithm.MSE) else 1


@dataclass(frozen=True)
class QuantSettings:
    """Everything besides model and data that decides the quantized result.

    Quantization is always symmetric with zero offsets (what a CIM crossbar needs).

    Attributes:
        weight_bits: bits of Conv/Gemm weights, 2..8.
        activation_bits: bits of activations (operator inputs and outputs), 2..8.
        per_channel: one weight scale per output channel (True) or per tensor.
        algorithm: activation calibration algorithm.
        calib_steps: calibration batches PPQ reads, 8..512.
        seed: seed of random calibration data and of torch during calibration.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    algorithm: CalibrationAlgorithm = CalibrationAlgorithm.PERCENTILE
    calib_steps: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise SettingsError(
                    f"{name}={value!r} is not supported.", "use an integer from 2 to 8 (8 is the default)."
                )
        if isinstance(self.calib_steps, bool) or not isinstance(self.calib_steps, int) or not (
            MIN_CALIB_STEPS <= self.calib_steps <= MAX_CALIB_STEPS
        ):
            raise SettingsError(
                f"calib_steps={self.calib_steps!r} is outside PPQ's range.",
                f"use an integer from {MIN_CALIB_STEPS} to {MAX_CALIB_STEPS}.",
            )
        try:
            object.__setattr__(self, "algorithm", CalibrationAlgorithm(self.algorithm))
        except ValueError:
            choices = ", ".join(a.value for a in CalibrationAlgorithm)
            raise SettingsError(f"unknown calibration algorithm {self.algorithm!r}.", f"use one of: {choices}.") from None
        if not isinstance(self.per_channel, bool):
            raise SettingsError(f"per_channel={self.per_channel!r} is not a bool.", "pass True or False.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SettingsError(f"seed={self.seed!r} is not a non-negative integer.", "pass e.g. seed=0.")

    @property
    def exact_onnx_export(self) -> bool:
        """Whether ``quant_model.onnx`` can represent these ranges exactly (int8 QDQ only)."""
        return self.weight_bits == 8 and self.activation_bits == 8

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["algorithm"] = self.algorithm.value
        return data
