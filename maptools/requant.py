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

from collections.abc import Sequence
from enum import Enum

import numpy as np
import torch

from maptools.errors import ArtifactError
from maptools.quantinfo import Requant
from maptools.settings import MULTIPLIER_BITS

__all__ = ["RequantMode", "fixed_point", "to_hardware", "requantize", "quantize", "MULTIPLIER_BITS"]


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
