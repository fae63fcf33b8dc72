"""Requantization: integer accumulators to the next layer's integer codes.

``q = clamp(round_half_even(acc * M), lo, hi)`` with ``M = in_scale * weight_scale / out_scale``
(per output channel, or per element). Two ways to apply ``M``:

* ``float``: multiply in float64, as a reference;
* ``fixed``: ``M = m0 * 2**-shift`` with an integer ``m0`` of at most 31 bits, then an integer
  multiply and a rounding right shift, as hardware does. Rounding is half to even, like PPQ's
  ``torch.round``. quantinfo records every ``(m0, shift)`` a map needs (:func:`to_hardware`, a
  :class:`~maptools.quantinfo.Requant` per stage); the fixed-point simulation uses those.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maptools.errors import ArtifactError, ConversionError
from maptools.opgraph import OperatorGraph
from maptools.placement import Role
from maptools.quantinfo import QuantConfig, Requant
from maptools.settings import MULTIPLIER_BITS

__all__ = ["RequantMode", "fixed_point", "to_hardware", "requantize", "quantize", "record_requant", "KERNELS",
           "MULTIPLIER_BITS"]


class RequantMode(str, Enum):
    """How the requantization multiplier is applied."""

    FLOAT = "float"
    FIXED = "fixed"


def fixed_point(multiplier: torch.Tensor, bits: int = MULTIPLIER_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m0, shift)`` int64 tensors with ``multiplier ~= m0 * 2**-shift`` and ``2**(bits-1) <= m0 < 2**bits``.

    ``multiplier`` must be positive.
    """
    mantissa, exponent = torch.frexp(multiplier.to(torch.float64))  # multiplier = mantissa * 2**exponent
    m0 = torch.round(mantissa * 2.0**bits).to(torch.int64)
    carry = m0 == 2**bits
    m0 = torch.where(carry, m0 // 2, m0)
    shift = bits - exponent.to(torch.int64) - carry.to(torch.int64)
    return m0, shift


def to_hardware(ratio: Sequence[float] | np.ndarray, bits: int = MULTIPLIER_BITS) -> Requant:
    """The :class:`Requant` a hardware requantizer applies for these float ratios (one per channel, or one).

    Factors of two are moved from the multiplier into the shift (an exact change): a power-of-two
    ratio becomes multiplier 1 and a shift.
    """
    ratios = np.asarray(ratio, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(ratios) & (ratios > 0)):
        raise ArtifactError(f"a requantization ratio is not a positive number: {ratios[:4].tolist()}.",
                            "re-run quantize; the map's scales are broken.")
    m0, shift = fixed_point(torch.from_numpy(ratios), bits)
    twos = torch.log2((m0 & -m0).to(torch.float64)).round().to(torch.int64)  # trailing zero bits of m0
    m0, shift = m0 >> twos, shift - twos
    return Requant(tuple(int(v) for v in m0), tuple(int(v) for v in shift), bits, tuple(float(v) for v in ratios))


def _shift_round_half_even(product: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``round_half_even(product / 2**shift)`` in int64 (a shift <= 0 is an exact left shift; huge shifts give 0)."""
    big, left = shift >= 63, shift <= 0
    right = torch.clamp(shift, 1, 62)
    q = torch.bitwise_right_shift(product, right)  # floor
    rest = product - torch.bitwise_left_shift(q, right)
    half = torch.bitwise_left_shift(torch.ones_like(right), right - 1)
    q = q + ((rest > half) | ((rest == half) & (q % 2 == 1))).to(torch.int64)
    q = torch.where(left, torch.bitwise_left_shift(product, torch.clamp(-shift, 0, 62)), q)
    return torch.where(big, torch.zeros_like(q), q)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor | float, lo: int, hi: int,
               mode: RequantMode = RequantMode.FLOAT, recorded: Requant | None = None) -> torch.Tensor:
    """Codes ``clamp(round_half_even(acc * multiplier), lo, hi)`` as float64 holding integers.

    ``acc`` holds integers (any float or int dtype, |acc| < 2**32); ``multiplier`` broadcasts
    against it (a scalar, or per channel shaped for broadcasting). In ``fixed`` mode ``recorded``
    (quantinfo's :class:`Requant` for this step) supplies ``(m0, shift)``; it must stand for
    ``multiplier``, else ArtifactError.
    """
    m = torch.as_tensor(multiplier, dtype=torch.float64)
    if RequantMode(mode) is RequantMode.FLOAT:
        out = torch.round(acc.to(torch.float64) * m)
    else:
        if recorded is None:
            m0, shift = fixed_point(m)
        else:
            ratio = np.asarray(recorded.ratio)
            if ratio.size != m.numel() or not np.allclose(ratio, m.reshape(-1).numpy(), rtol=1e-9, atol=0):
                raise ArtifactError("quantinfo's requantization parameters do not match its scales.",
                                    "re-run quantize for this map (quantinfo was edited or comes from another map).")
            m0 = torch.tensor(recorded.multiplier, dtype=torch.int64).reshape(m.shape)
            shift = torch.tensor(recorded.shift, dtype=torch.int64).reshape(m.shape)
        out = _shift_round_half_even(acc.to(torch.int64) * m0, shift).to(torch.float64)
    return torch.clamp(out, lo, hi)


def quantize(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """Float values to codes on ``scale`` (float32 arithmetic and half-even rounding, as PPQ)."""
    return torch.clamp(torch.round(x.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)), lo, hi).to(
        torch.float64)


# --- what each integer kernel requantizes ----------------------------------------------------------

#: The integer simulation's kernels (method names of :class:`maptools.simulate.IntegerSimulator`) by operator
#: type, for the roles computed in integer arithmetic; methods, so a subclass (the crossbar simulation) can
#: replace one. :func:`record_requant` records the requantizations each of them applies.
KERNELS: dict[tuple[str, str], str] = {
    ("Conv", Role.CROSSBAR.value): "_conv", ("ConvTranspose", Role.CROSSBAR.value): "_conv_transpose",
    ("Gemm", Role.CROSSBAR.value): "_gemm", ("Add", Role.ADD.value): "_add", ("Sub", Role.ADD.value): "_add",
    ("Concat", Role.CONCAT.value): "_concat",
    ("MaxPool", Role.MOVE.value): "_maxpool", ("AveragePool", Role.AVGPOOL.value): "_avgpool",
    ("GlobalAveragePool", Role.AVGPOOL.value): "_global_avgpool", ("Relu", Role.LUT.value): "_relu",
}


def avgpool_args(name: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """torch ``avg_pool2d`` arguments of an ONNX AveragePool (2-D, no dilation, symmetric pads)."""
    kernel, strides, dilations, pads = attrs["kernel"], attrs["strides"], attrs["dilations"], attrs["pads"]
    if len(kernel) != 2 or any(d != 1 for d in dilations) or pads[:2] != pads[2:]:
        raise ConversionError(f"{name}: only 2-D AveragePool without dilation and with symmetric pads is "
                              "supported.", "re-export the model with a plain 2-D average pool.")
    return dict(kernel_size=kernel, stride=strides, padding=pads[:2], ceil_mode=bool(attrs["ceil_mode"]),
                count_include_pad=bool(attrs["count_include_pad"]))


def window_counts(spatial: list[int], args: Mapping[str, Any]) -> torch.Tensor:
    """How many elements each average-pool window divides by, shaped ``[1, 1, *output]``."""
    ones = torch.ones([1, 1, *spatial], dtype=torch.float64)
    return torch.round(F.avg_pool2d(ones, divisor_override=1, **args) / F.avg_pool2d(ones, **args))


def record_requant(graph: OperatorGraph, quantinfo: Mapping[str, QuantConfig], bits: int) -> dict[str, QuantConfig]:
    """``quantinfo`` with every requantization the integer simulation applies recorded per stage.

    ``graph`` is the operator graph of the map's model (quantinfo attached or not); the stages and
    ratios mirror :data:`KERNELS`, so the fixed-point simulation runs on exactly these numbers.
    """
    producer = {t: name for name in graph.operators() for t in graph.node(name)["outputs"]}

    def produced_scale(name: str | None) -> float | None:  # the scale of the codes an operator hands on
        cfg = quantinfo.get(name or "")
        if cfg is None:
            return None
        if cfg.output_scale is not None:
            return cfg.output_scale
        node = graph.node(name)
        moves = node["role"] == Role.MOVE.value or (node["op_type"], node["role"]) == ("Relu", Role.LUT.value)
        return cfg.input_scales[0] if moves and cfg.input_scales else None

    recorded: dict[str, QuantConfig] = {}
    for name, cfg in quantinfo.items():
        node = graph.node(name)
        scales, out = list(cfg.input_scales), cfg.output_scale
        ratios: dict[str, Any] = {}
        for i, tensor in enumerate(node["inputs"]):
            arriving, wanted = produced_scale(producer.get(tensor)), scales[i] if i < len(scales) else None
            if arriving is not None and wanted is not None and arriving != wanted:
                ratios[f"input{i}"] = [arriving / wanted]
        kernel = KERNELS.get((node["op_type"], node["role"]))
        s0 = scales[0] if scales else None
        if out is not None and s0 is not None:
            if kernel in ("_conv", "_conv_transpose", "_gemm") and cfg.weight_scale is not None:
                in_scale = node["attrs"]["alpha"] * s0 if kernel == "_gemm" else s0
                ratios["output"] = in_scale * cfg.weight_scale.astype(np.float64) / out
            elif kernel == "_add":
                if len(scales) > 1 and scales[1] is not None and scales[1] != s0:
                    ratios["align1"] = [scales[1] / s0]
                ratios["output"] = [s0 / out]
            elif kernel == "_concat":
                ratios.update({f"concat{i}": [s / out] for i, s in enumerate(scales) if s is not None and s != out})
            elif kernel == "_avgpool":
                counts = window_counts(node["input_shapes"][0][2:], avgpool_args(name, node["attrs"]))
                ratios.update({f"output/{int(c)}": [s0 / (out * c)] for c in torch.unique(counts).tolist()})
            elif kernel == "_global_avgpool":
                ratios["output"] = [s0 / (out * math.prod(node["input_shapes"][0][2:]))]
            elif (kernel in ("_maxpool", "_relu") or node["role"] == Role.MOVE.value) and out != s0:
                ratios["output"] = [s0 / out]
        recorded[name] = dataclasses.replace(
            cfg, requant={stage: to_hardware(r, bits) for stage, r in ratios.items()})
    return recorded
