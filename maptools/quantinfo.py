"""Per-operator quantization configs: the contract with conversion, mapping and simulation.

``quantinfo.pkl`` maps operator name -> :class:`QuantConfig`; ``quantparams.pkl`` maps
``<op>_conv_weight`` / ``<op>_conv_bias`` (``_gemm_`` for Gemm) -> integer arrays.
Both have JSON/NPZ twins that need no pickle at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maptools.placement import WEIGHTED_OP_TYPES

__all__ = ["QuantConfig", "Requant", "WEIGHTED_OP_TYPES", "param_key", "quantinfo_to_json", "quantinfo_from_json"]


@dataclass(frozen=True)
class Requant:
    """One requantization as integer hardware applies it: ``round_half_even(acc * multiplier / 2**shift)``.

    One ``(multiplier, shift)`` per output channel (or a single pair). ``multiplier`` has at most
    ``bits`` bits and no factor of two left in it (1 where the scale ratio is a power of two: a
    pure shift); a negative ``shift`` is a left shift. ``ratio`` is the float ratio it stands for.
    """

    multiplier: tuple[int, ...]
    shift: tuple[int, ...]
    bits: int
    ratio: tuple[float, ...]

    @property
    def shift_only(self) -> bool:
        return all(m == 1 for m in self.multiplier)

    def to_json(self) -> dict[str, Any]:
        return {"multiplier": list(self.multiplier), "shift": list(self.shift), "bits": self.bits,
                "ratio": list(self.ratio)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Requant:
        return cls(tuple(data["multiplier"]), tuple(data["shift"]), int(data["bits"]), tuple(data["ratio"]))


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of one operator. Symmetric: every offset is zero, so none is stored.

    A real value ``x`` is stored as the integer ``clip(round(x / scale), min, max)``.

    Attributes:
        op_type: ONNX operator type (``Conv``, ``Relu``, ``Add`` ...).
        io_bits: bits of the operator's activation inputs and outputs.
        io_min, io_max: integer range of its first activation input (e.g. -128, 127 for 8 bits; 0, 255
            for an unsigned one); see ``output_range`` and ``input_ranges`` for each tensor.
        input_scale: scale of the first activation input (None if it stays float).
        output_scale: scale of the output (None if it stays float). For a Conv fused with
            the activation after it, this is the activation's output scale.
        weight_bits, weight_min, weight_max: Conv/Gemm weight bits and integer range.
        weight_scale: Conv/Gemm weight scales, one per output channel
            (a single value when quantized per tensor), float32.
        input_scales: scales of every activation input in order (Add, Concat have several).
        output_range: integer range of the output (``None``: ``(io_min, io_max)``, as in maps
            written before unsigned activations).
        input_ranges: integer range of every activation input in order (empty: ``io_min, io_max``).
        requant: every requantization the operator applies, by stage (empty in maps written before 0.4):
            ``input<i>`` (activation input ``i`` from its producer's scale to this operator's input scale),
            ``align1`` (an Add's second input onto the first's scale), ``concat<i>`` (a Concat input onto
            the output scale), ``output`` (accumulator or input codes to the output scale) and
            ``output/<count>`` (an average pool's window sums of ``count`` elements).
    """

    op_type: str
    io_bits: int
    io_min: int
    io_max: int
    input_scale: float | None
    output_scale: float | None
    weight_bits: int | None = None
    weight_min: int | None = None
    weight_max: int | None = None
    weight_scale: np.ndarray | None = None
    input_scales: tuple[float | None, ...] = field(default=())
    output_range: tuple[int, int] | None = None
    input_ranges: tuple[tuple[int, int], ...] = field(default=())
    requant: dict[str, Requant] = field(default_factory=dict)

    @property
    def out_range(self) -> tuple[int, int]:
        """``(lo, hi)`` of the output codes."""
        return tuple(self.output_range) if self.output_range is not None else (self.io_min, self.io_max)

    def in_range(self, index: int) -> tuple[int, int]:
        """``(lo, hi)`` of activation input ``index``'s codes."""
        return tuple(self.input_ranges[index]) if index < len(self.input_ranges) else (self.io_min, self.io_max)

    @property
    def has_weights(self) -> bool:
        return self.weight_scale is not None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["weight_scale"] = None if self.weight_scale is None else self.weight_scale.astype(float).tolist()
        data["input_scales"] = list(self.input_scales)
        data["output_range"] = None if self.output_range is None else list(self.output_range)
        data["input_ranges"] = [list(r) for r in self.input_ranges]
        data["requant"] = {stage: r.to_json() for stage, r in self.requant.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantConfig:
        values = dict(data)
        if values.get("weight_scale") is not None:
            values["weight_scale"] = np.asarray(values["weight_scale"], dtype=np.float32)
        values["input_scales"] = tuple(values.get("input_scales", ()))
        if values.get("output_range") is not None:
            values["output_range"] = tuple(values["output_range"])
        values["input_ranges"] = tuple(tuple(r) for r in values.get("input_ranges", ()))
        values["requant"] = {stage: Requant.from_json(r) for stage, r in values.get("requant", {}).items()}
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantConfig):
            return NotImplemented
        mine, theirs = self.to_json(), other.to_json()
        return mine == theirs

    __hash__ = None  # type: ignore[assignment]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, giving fields that older maps lack their defaults."""
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(self) if f.name not in state}
        self.__dict__.update({**defaults, **state})


def param_key(op_name: str, op_type: str, kind: str) -> str:
    """Key of a quantparams entry: ``<op>_conv_weight``, ``<op>_gemm_bias``, ``<op>_convtranspose_weight`` ..."""
    return f"{op_name}_{WEIGHTED_OP_TYPES[op_type]}_{kind}"


def quantinfo_to_json(quantinfo: dict[str, QuantConfig]) -> dict[str, Any]:
    return {name: cfg.to_json() for name, cfg in quantinfo.items()}


def quantinfo_from_json(data: dict[str, Any]) -> dict[str, QuantConfig]:
    return {name: QuantConfig.from_json(cfg) for name, cfg in data.items()}
