"""Quantization settings: typed, validated, serialisable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from maptools.errors import SettingsError

__all__ = ["CalibrationAlgorithm", "ActivationSign", "Optimization", "ScalePolicy", "Profile", "QuantSettings",
           "MIN_CALIB_STEPS", "MAX_CALIB_STEPS", "MULTIPLIER_BITS"]

MIN_CALIB_STEPS = 8
MAX_CALIB_STEPS = 512
#: Bits of the requantization multipliers recorded in quantinfo (and used by the fixed-point simulation).
MULTIPLIER_BITS = 31


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


class ActivationSign(str, Enum):
    """Integer range of activations: always signed, or unsigned where the producer cannot be negative."""

    SIGNED = "signed"  # [-2^(b-1), 2^(b-1) - 1] everywhere
    AUTO = "auto"  # [0, 2^b - 1] after Relu, Clip(min >= 0), Sigmoid, HardSigmoid and what only moves those


class Optimization(str, Enum):
    """A PPQ correction or reconstruction pass run after calibration (or, for equalization, before)."""

    NONE = "none"
    BIAS_CORRECTION = "bias-correction"  # per output channel: the mean output error of each layer, block by block
    EQUALIZATION = "equalization"  # cross-layer weight equalization between consecutive crossbar layers
    LSQ = "lsq"  # learned step size: scales (and weights' rounding) trained block by block against float outputs
    FAST_BIAS_CORRECTION = "fast-bias-correction"  # each crossbar layer's mean output shift on float inputs, once

    @property
    def needs_real_data(self) -> bool:
        """Whether the pass fits its result to the calibration data (then random data would mislead it)."""
        return self in (Optimization.BIAS_CORRECTION, Optimization.LSQ, Optimization.FAST_BIAS_CORRECTION)

    @property
    def in_ppq(self) -> bool:
        """Whether the pass runs inside PPQ's pipeline (the others run after it, on the quantized graph)."""
        return self in (Optimization.BIAS_CORRECTION, Optimization.EQUALIZATION, Optimization.LSQ)


class ScalePolicy(str, Enum):
    """Which values a scale may take."""

    FLOAT = "float"  # any positive float: requantization multiplies by an integer and shifts
    POW2 = "pow2"  # powers of two only: requantization is a shift (average pools still divide by their count)


class Profile(str, Enum):
    """Whose contract a map follows."""

    SEED = "seed"  # the original toolchain's: signed ranges, one scale along every edge and at every adder,
    # its pickle classes (see maptools.seed)
    EXTENDED = "extended"  # this package's: unsigned ranges where they help, per-input requantization records


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
        activation_sign: ``auto`` (unsigned where the producer cannot be negative; the ``extended``
            profile's default, which measured more accurate) or ``signed`` ranges everywhere (the
            ``seed`` profile's, the only one it allows); zero offsets either way.
        optimization: a PPQ correction pass (see :class:`Optimization`).
        scale_policy: ``float`` (default) or ``pow2``: every weight and activation scale a power of two.
        shared_scales: the activation inputs of every device Add and Concat arrive on one scale, so
            neither is requantized before the adder (or concatenation); always so in the ``seed`` profile.
        multiplier_bits: bits of the requantization multipliers recorded in quantinfo (8..31).
        layer_bits: per crossbar operator (Conv, ConvTranspose, Gemm) ``{name: (weight_bits, input_bits)}``:
            its weights' width, and the width it reads its activation input at (requantized from the
            producer's grid where the two differ); what ``bits='auto'`` chooses (``extended`` only).
        profile: ``seed`` (default): the map follows the original toolchain's contract
            (:mod:`maptools.seed`), which its downstream reads as it is; ``extended``: this package's
            richer semantics, which only this package's downstream reads. ``activation_sign`` and
            ``shared_scales`` default to the profile's (``signed`` and ``True`` for ``seed``, ``auto``
            and ``False`` for ``extended``).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    algorithm: CalibrationAlgorithm = CalibrationAlgorithm.PERCENTILE
    calib_steps: int = 32
    seed: int = 0
    activation_sign: ActivationSign | None = None
    optimization: Optimization = Optimization.NONE
    scale_policy: ScalePolicy = ScalePolicy.FLOAT
    shared_scales: bool | None = None
    multiplier_bits: int = MULTIPLIER_BITS
    layer_bits: tuple[tuple[str, int, int], ...] = ()
    profile: Profile = Profile.SEED

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "profile", Profile(self.profile))
        except ValueError:
            raise SettingsError(f"unknown profile {self.profile!r}.", "use 'seed' (the original toolchain's "
                                "contract, the default) or 'extended'.") from None
        seed = self.profile is Profile.SEED
        if self.activation_sign is None:
            object.__setattr__(self, "activation_sign", ActivationSign.SIGNED if seed else ActivationSign.AUTO)
        if self.shared_scales is None:
            object.__setattr__(self, "shared_scales", seed)
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
        for name, kind in (("activation_sign", ActivationSign), ("optimization", Optimization),
                           ("scale_policy", ScalePolicy)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                choices = ", ".join(k.value for k in kind)
                raise SettingsError(f"unknown {name} {getattr(self, name)!r}.", f"use one of: {choices}.") from None
        for name in ("per_channel", "shared_scales"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name}={getattr(self, name)!r} is not a bool.", "pass True or False.")
        if isinstance(self.multiplier_bits, bool) or not isinstance(self.multiplier_bits, int) or not (
                8 <= self.multiplier_bits <= MULTIPLIER_BITS):
            raise SettingsError(f"multiplier_bits={self.multiplier_bits!r} is not supported.",
                                f"use an integer from 8 to {MULTIPLIER_BITS} (the default).")
        if self.scale_policy is ScalePolicy.POW2 and self.optimization is Optimization.LSQ:
            raise SettingsError("optimization='lsq' learns the scales, and scale_policy='pow2' fixes them to powers "
                                "of two (PPQ then trains no scale at all).",
                                "use optimization='bias-correction' or 'none' with pow2, or scale_policy='float'.")
        layers = []
        for entry in (self.layer_bits.items() if isinstance(self.layer_bits, dict) else self.layer_bits):
            try:
                name, wbits, abits = (entry[0], *entry[1]) if len(entry) == 2 else entry
            except (TypeError, ValueError):
                raise SettingsError(f"layer_bits entry {entry!r} is not (name, weight_bits, input_bits).",
                                    "pass {crossbar operator name: (weight_bits, input_bits)}.") from None
            for value in (wbits, abits):
                if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                    raise SettingsError(f"layer_bits[{name!r}] = {(wbits, abits)!r}: bits must be integers 2..8.",
                                        "pick widths from 2 to 8 for each operator.")
            layers.append((str(name), wbits, abits))
        object.__setattr__(self, "layer_bits", tuple(sorted(layers)))
        if seed:
            self._check_seed()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SettingsError(f"seed={self.seed!r} is not a non-negative integer.", "pass e.g. seed=0.")

    def _check_seed(self) -> None:
        """The settings the seed contract cannot express (see :mod:`maptools.seed`)."""
        if self.activation_sign is not ActivationSign.SIGNED:
            raise SettingsError(f"activation_sign={self.activation_sign.value!r}: the seed profile's downstream "
                                "reads one signed range per operator.",
                                "pass profile='extended' for unsigned ranges, or drop activation_sign.")
        if not self.shared_scales:
            raise SettingsError("shared_scales=False: the seed profile's downstream adds codes without "
                                "requantizing, so every adder's inputs must share one scale.",
                                "pass profile='extended' to requantize before adders, or drop shared_scales.")
        if self.layer_bits:
            raise SettingsError("layer_bits (and bit_width='auto'): the seed profile's downstream reads every "
                                "activation at one width.", "pass profile='extended' for per-layer widths.")

    @property
    def unsigned_activations(self) -> bool:
        """Whether unsigned ranges apply: ``auto``, and an observer that handles them (PPQ's kl is signed only)."""
        return self.activation_sign is ActivationSign.AUTO and self.algorithm is not CalibrationAlgorithm.KL

    def bits_of(self, op_name: str) -> tuple[int, int]:
        """``(weight_bits, input_bits)`` of one crossbar operator."""
        for name, wbits, abits in self.layer_bits:
            if name == op_name:
                return wbits, abits
        return self.weight_bits, self.activation_bits

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("algorithm", "activation_sign", "optimization", "scale_policy", "profile"):
            data[name] = getattr(self, name).value
        data["layer_bits"] = {name: [w, a] for name, w, a in self.layer_bits}
        return data
