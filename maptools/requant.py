"""Requantization: integer accumulators to the next layer's integer codes.

``q = clamp(round_half_even(acc * M), lo, hi)`` with ``M = in_scale * weight_scale / out_scale``
(per output channel, or per element). Two ways to apply ``M``:

* ``float``: multiply in float64, as a reference;
* ``fixed``: ``M = m0 * 2**-shift`` with a 31-bit integer ``m0``, then an integer multiply and a
  rounding right shift, as hardware does. Rounding is half to even, like PPQ's ``torch.round``.
"""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["RequantMode", "fixed_point", "requantize", "quantize", "MULTIPLIER_BITS"]

MULTIPLIER_BITS = 31


class RequantMode(str, Enum):
    """How the requantization multiplier is applied."""

    FLOAT = "float"
    FIXED = "fixed"


def fixed_point(multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m0, shift)`` int64 tensors with ``multiplier ~= m0 * 2**-shift`` and ``2**30 <= m0 < 2**31``.

    ``multiplier`` must be positive and below ``2**30``.
    """
    mantissa, exponent = torch.frexp(multiplier.to(torch.float64))  # multiplier = mantissa * 2**exponent
    m0 = torch.round(mantissa * 2.0**MULTIPLIER_BITS).to(torch.int64)
    carry = m0 == 2**MULTIPLIER_BITS
    m0 = torch.where(carry, m0 // 2, m0)
    shift = MULTIPLIER_BITS - exponent.to(torch.int64) - carry.to(torch.int64)
    return m0, shift


def _shift_round_half_even(product: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``round_half_even(product / 2**shift)`` in int64 (``shift >= 1``; huge shifts give 0)."""
    big = shift >= 63
    shift = torch.clamp(shift, 1, 62)
    q = torch.bitwise_right_shift(product, shift)  # floor
    rest = product - torch.bitwise_left_shift(q, shift)
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    q = q + ((rest > half) | ((rest == half) & (q % 2 == 1))).to(torch.int64)
    return torch.where(big, torch.zeros_like(q), q)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor | float, lo: int, hi: int,
               mode: RequantMode = RequantMode.FLOAT) -> torch.Tensor:
    """Codes ``clamp(round_half_even(acc * multiplier), lo, hi)`` as float64 holding integers.

    ``acc`` holds integers (any float or int dtype, |acc| < 2**32); ``multiplier`` broadcasts
    against it (a scalar, or per channel shaped for broadcasting).
    """
    m = torch.as_tensor(multiplier, dtype=torch.float64)
    if RequantMode(mode) is RequantMode.FLOAT:
        out = torch.round(acc.to(torch.float64) * m)
    else:
        m0, shift = fixed_point(m)
        out = _shift_round_half_even(acc.to(torch.int64) * m0, shift).to(torch.float64)
    return torch.clamp(out, lo, hi)


def quantize(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """Float values to codes on ``scale`` (float32 arithmetic and half-even rounding, as PPQ)."""
    return torch.clamp(torch.round(x.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)), lo, hi).to(
        torch.float64)
