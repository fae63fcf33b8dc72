"""Quantization settings: typed, validated, serialisable."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal, Self, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maptools.errors import SettingsError

__all__ = ["Settings", "CalibrationAlgorithm", "ActivationSign", "Optimization", "ScalePolicy", "Profile",
           "QuantSettings", "MIN_CALIB_STEPS", "MAX_CALIB_STEPS", "MULTIPLIER_BITS", "FBC_SAMPLES", "field_bounds",
           "field_choices"]

MIN_CALIB_STEPS = 8
MAX_CALIB_STEPS = 512
#: Bits of the requantization multipliers recorded in quantinfo (and used by the fixed-point simulation).
MULTIPLIER_BITS = 31
#: Calibration samples the fast bias correction averages over (the first ones).
FBC_SAMPLES = 32


class CalibrationAlgorithm(str, Enum):
    """How activation ranges are chosen from the calibration data."""

    PERCENTILE = "percentile"
    MINMAX = "minmax"
    KL = "kl"
    MSE = "mse"
    AUTO = "auto"  # percentile and mse both (and each bias-corrected); the model nearest float on the calibration data

    @property
    def passes(self) -> int:
        """How many times PPQ reads the calibration data: its kl (histogram) and mse observers read it twice."""
        return {CalibrationAlgorithm.KL: 2, CalibrationAlgorithm.MSE: 2}.get(self, 1)

    @property
    def candidates(self) -> tuple[CalibrationAlgorithm, ...]:
        """The algorithms a quantization calibrates with (auto: the two whose choice measured best on real models)."""
        return (CalibrationAlgorithm.PERCENTILE, CalibrationAlgorithm.MSE) if self is CalibrationAlgorithm.AUTO \
            else (self,)


class ActivationSign(str, Enum):
    """Integer range of activations: always signed, or unsigned where the producer cannot be negative."""

    SIGNED = "signed"  # [-2^(b-1), 2^(b-1) - 1] everywhere
    AUTO = "auto"  # [0, 2^b - 1] after Relu, Clip(min >= 0), Sigmoid, HardSigmoid and what only moves those, and
    # for a graph input none of the first 8 calibration samples holds a negative value of


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
    # its pickle classes (see maptools.maps.seed)
    EXTENDED = "extended"  # this package's: unsigned ranges where they help, per-input requantization records


_BITS = dict(ge=2, le=8, strict=True)


class Settings(BaseModel):
    """Base of maptools' typed settings (:class:`QuantSettings`, the crossbar spec): frozen, unknown keys
    refused, and a bad value a :class:`~maptools.errors.SettingsError` naming the field, what it takes and the
    fix. Each field's description and bounds are the one definition the CLI, the flows and the docs show."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _settings_error(type(self), e) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a new one."""
        return type(self)(**{**self.model_dump(), **changes})


def field_bounds(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The ``ge``/``le``/``gt`` bounds of one field of ``model`` (what a CLI option or a flow parameter repeats)."""
    return {kind: getattr(m, kind) for m in model.model_fields[name].metadata for kind in ("ge", "le", "gt")
            if type(m).__name__.lower() == kind}


def field_choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The values a field of enum or ``Literal`` type takes (``()`` for any other field)."""
    for kind in (model.model_fields[name].annotation, *get_args(model.model_fields[name].annotation)):
        if isinstance(kind, type) and issubclass(kind, Enum):
            return tuple(str(e.value) for e in kind)
        if get_origin(kind) is Literal:
            return tuple(str(v) for v in get_args(kind))
    return ()


class QuantSettings(Settings):
    """Everything besides model and data that decides the quantized result: the one definition of every
    quantization option, with its bounds and meaning (the Python API, the command line, the flow and the
    sweep take their options from these fields; the manifest records :meth:`to_dict`).

    Quantization is always symmetric with zero offsets (what a CIM crossbar needs). ``activation_sign``
    and ``shared_scales`` default to the profile's (``signed`` and ``True`` for ``seed``, ``auto`` and
    ``False`` for ``extended``). A bad value raises :class:`~maptools.errors.SettingsError` naming the
    field, what it takes, and the fix.
    """

    weight_bits: int = Field(8, **_BITS, description="Bits of Conv/Gemm weights (2-8).")
    activation_bits: int = Field(8, **_BITS, description="Bits of activations: operator inputs and outputs (2-8).")
    per_channel: bool = Field(True, strict=True, description="One weight scale per output channel (true) or one "
                                                             "per weight tensor (false).")
    algorithm: CalibrationAlgorithm = Field(
        CalibrationAlgorithm.AUTO, title="calibration algorithm",
        description="How activation ranges are set from the calibration data: auto (the default) calibrates with "
                    "percentile and with mse, tries each with the fast bias correction too (where optimization is "
                    "none), and keeps the model whose outputs are nearest the float model's on the calibration "
                    "samples (about 3x percentile's time; random data: percentile); percentile clips "
                    "outliers, minmax keeps them (fastest), kl and mse search for the least loss (they read the "
                    "data twice).")
    calib_steps: int = Field(32, ge=MIN_CALIB_STEPS, le=MAX_CALIB_STEPS, strict=True,
                             description=f"Calibration samples PPQ reads ({MIN_CALIB_STEPS}-{MAX_CALIB_STEPS}).")
    seed: int = Field(0, ge=0, strict=True, description="Seed of random calibration data and of torch during "
                                                        "calibration; the same seed gives identical artifacts.")
    activation_sign: ActivationSign | None = Field(
        None, description="signed ranges everywhere (the seed profile's, the only one it allows), or auto: unsigned "
                          "[0, 2^b-1] where the producer cannot be negative, or for a graph input never negative on "
                          "the first calibration samples (the extended profile's default); zero offsets either way. "
                          "Null: the profile's.")
    optimization: Optimization = Field(
        Optimization.NONE, description="A PPQ correction pass: bias-correction, lsq and fast-bias-correction fit "
                                       "the calibration data (real data only); equalization rescales consecutive "
                                       "layers.")
    scale_policy: ScalePolicy = Field(ScalePolicy.FLOAT, description="float scales, or pow2: every weight and "
                                                                     "activation scale a power of two (requantization "
                                                                     "is a shift).")
    shared_scales: bool | None = Field(
        None, strict=True, description="One scale on all activation inputs of each device Add and Concat, so neither "
                                       "is requantized before the adder (always so in the seed profile). Null: the "
                                       "profile's.")
    multiplier_bits: int = Field(MULTIPLIER_BITS, ge=8, le=MULTIPLIER_BITS, strict=True,
                                 description=f"Bits of the requantization multipliers recorded in quantinfo "
                                             f"(8-{MULTIPLIER_BITS}).")
    layer_bits: tuple[tuple[str, Annotated[int, Field(**_BITS)], Annotated[int, Field(**_BITS)]], ...] = Field(
        (), description="Per crossbar operator (Conv, ConvTranspose, Gemm) {name: [weight_bits, input_bits]}: its "
                        "weights' width and the width it reads its input at (what bit_width=auto chooses; extended "
                        "profile only).")
    profile: Profile = Field(Profile.SEED, description="seed: quantinfo.pkl/quantparams.pkl in the original "
                                                       "toolchain's contract (signed, shared scales); extended: this "
                                                       "package's richer semantics, which only its downstream reads.")

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, values: Any) -> Any:
        """``layer_bits`` as sorted ``(name, weight_bits, input_bits)``; the profile's defaults filled in."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        layers = values.get("layer_bits") or ()
        if isinstance(layers, Mapping):
            layers = [(name, *bits) if isinstance(bits, (list, tuple)) else (name, bits) for name, bits in layers.items()]
        if isinstance(layers, (list, tuple)):
            values["layer_bits"] = tuple(sorted((tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)
                                                 for entry in layers), key=lambda entry: str(entry[0])))
        try:
            seed = Profile(values.get("profile", Profile.SEED)) is Profile.SEED
        except ValueError:
            return values  # the field's own check names it
        if values.get("activation_sign") is None:
            values["activation_sign"] = ActivationSign.SIGNED if seed else ActivationSign.AUTO
        if values.get("shared_scales") is None:
            values["shared_scales"] = seed
        return values

    @model_validator(mode="after")
    def _consistent(self) -> QuantSettings:
        if self.scale_policy is ScalePolicy.POW2 and self.optimization is Optimization.LSQ:
            raise SettingsError("optimization='lsq' learns the scales, and scale_policy='pow2' fixes them to powers "
                                "of two (PPQ then trains no scale at all).",
                                "use optimization='bias-correction' or 'none' with pow2, or scale_policy='float'.")
        if self.profile is Profile.SEED:
            self._check_seed()
        return self

    def _check_seed(self) -> None:
        """The settings the seed contract cannot express (see :mod:`maptools.maps.seed`)."""
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

    @property
    def candidates(self) -> tuple[QuantSettings, ...]:
        """The quantizations these settings run, the one nearest float on the calibration data kept: ``auto``
        calibrates with percentile and with mse and, where ``optimization`` is ``none``, tries each calibration
        with the fast bias correction as well; any other algorithm runs once."""
        if self.algorithm is not CalibrationAlgorithm.AUTO:
            return (self,)
        passes = (Optimization.NONE, Optimization.FAST_BIAS_CORRECTION) if self.optimization is Optimization.NONE \
            else (self.optimization,)
        return tuple(self.replace(algorithm=a, optimization=o) for a in self.algorithm.candidates for o in passes)

    def samples_read(self, steps: int) -> int:
        """Calibration samples a quantization with these settings reads (a progress bar's total): each algorithm's
        passes over ``steps`` samples (a bias-corrected candidate reuses its algorithm's calibration), and each
        fast bias correction's first :data:`FBC_SAMPLES`."""
        corrections = sum(c.optimization is Optimization.FAST_BIAS_CORRECTION for c in self.candidates)
        return sum(steps * a.passes for a in {c.algorithm for c in self.candidates}) + \
            corrections * min(steps, FBC_SAMPLES)

    def bits_of(self, op_name: str) -> tuple[int, int]:
        """``(weight_bits, input_bits)`` of one crossbar operator."""
        for name, wbits, abits in self.layer_bits:
            if name == op_name:
                return wbits, abits
        return self.weight_bits, self.activation_bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the manifest records it (``layer_bits`` as ``{name: [weight_bits, input_bits]}``)."""
        data = self.model_dump(mode="json")
        data["layer_bits"] = {name: [w, a] for name, w, a in self.layer_bits}
        return data


def _settings_error(model: type[BaseModel], error: ValidationError) -> SettingsError:
    """The first problem pydantic found, as the SettingsError a user reads: the field, its value, the fix."""
    first = error.errors(include_url=False)[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, SettingsError):  # raised by a validator of ours
        return cause
    loc = first["loc"]
    name = str(loc[0]) if loc else "settings"
    value = first.get("input")
    field = model.model_fields.get(name)
    if field is None:
        return SettingsError(f"unknown setting {name!r}.", f"use one of: {', '.join(model.model_fields)}.")
    if name == "layer_bits":
        where = f" (entry {loc[1]}, item {loc[2]})" if len(loc) > 2 else ""
        return SettingsError(f"layer_bits{where}: {value!r} does not fit (operator name, weight_bits, input_bits) with "
                             "widths 2 to 8.", "pass {crossbar operator name: (weight_bits, input_bits)}, each 2 to 8.")
    choices = field_choices(model, name)
    if choices:
        return SettingsError(f"unknown {field.title or name} {value!r}.", f"use one of: {', '.join(choices)}.")
    bounds = field_bounds(model, name)
    if "ge" in bounds and "le" in bounds:
        return SettingsError(f"{name}={value!r} is not supported.",
                             f"use an integer from {bounds['ge']} to {bounds['le']}"
                             + (f" ({field.default} is the default)." if name.endswith("_bits") else "."))
    if "ge" in bounds:
        return SettingsError(f"{name}={value!r} is not an integer >= {bounds['ge']}.", f"pass e.g. {name}={field.default}.")
    if field.annotation in (bool, "bool", "bool | None") or isinstance(field.default, bool) or name == "shared_scales":
        return SettingsError(f"{name}={value!r} is not a bool.", "pass True or False.")
    return SettingsError(f"{name}={value!r}: {first['msg']}.", f"see {model.__name__}.{name}: {field.description}")
