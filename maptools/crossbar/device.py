"""Non-ideal cells: conductance range, programming and read noise, drift and its compensation, stuck cells.

A cell that stores level ``k`` of ``L = 2^cell_bits`` is programmed to the conductance
``g = g_min + (1 - g_min) k / (L - 1)`` (in units of ``g_max``; ``1 / g_min`` is the ON/OFF ratio). Then, per
cell and trial (seeded):

* **programming**: ``g_p = max(0, g + sigma_p(g) n)``; a cell is stuck at ``g_max`` (``stuck_on``) or at
  ``g_min`` (``stuck_off``) at the given rates instead;
* **drift** ``time`` seconds after programming: ``g(t) = g_p ((t + t0) / t0)^-nu``, ``nu >= 0`` drawn per cell;
* **read**: ``g_r = max(0, g(t) + |g(t)| sigma_r n)``, one draw per cell, trial and time point (a frozen read:
  every input of an evaluation sees the same one);
* **global drift compensation** (as aihwkit's ``GlobalDriftCompensation``, per array row block): the read
  conductances scaled by ``sum g_p / sum g_r``, what a read with every input at one measures right after
  programming against now;
* the periphery subtracts the ``g_min`` baseline exactly and reads level units ``(g_r - g_min) / (1 - g_min)
  (L - 1)``; the ADC then rounds and clips those as it does ideal partial sums;
* **IR drop**, first order: the wires' resistance lowers what a cell contributes in proportion to its wire
  distance from the driver of its word line and the sense amplifier of its bit line: the read conductance
  times ``1 - ir_drop * (row + column) / (rows + cols - 2)``, its row and column within the array (row 0 next
  to the sense amplifiers, column 0 next to the drivers). ``ir_drop`` is the loss of the cell farthest from
  both. The approximation: the drop is taken with every cell conducting and every input on (the worst case),
  so it does not depend on the inputs or the other cells' states, and the wires' currents are not solved.

``model='reram'`` (the ``reram`` preset): the conductance-dependent deviation fits of Wan et al. (Nature 2022,
as aihwkit's ``ReRamWan2022NoiseModel`` implements them, for ``g_max = 40 uS``) at 1 s (programming), 1 day
and 2 days: ReRAM does not drift as PCM does, its conductances wander around their targets, so a read at
``time`` is the target plus a fresh deviation of that time's std (scaled by ``programming_noise``); between
the fitted times the polynomial's coefficients are interpolated in log time, and held beyond 2 days (an
extrapolation the data do not cover).
``model='constant'``: ``sigma_p`` is ``programming_noise`` (a fraction of ``g_max``), ``sigma_r`` is
``read_noise`` and ``nu ~ |N(drift_nu, drift_nu_sigma)|``. ``model='pcm'``: the conductance-dependent fits
of IBM's PCM devices (Nandakumar et al., ICECS 2019, as aihwkit's ``PCMLikeNoiseModel`` implements them, for
``g_max = 25 uS``, ``t0 = 20 s``, 1/f read noise over ``t_read = 250 ns``), each scaled by its field
(``1.0``: as measured).
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import torch
from pydantic import Field

from maptools.settings import Settings

__all__ = ["DeviceModel", "DEVICE_PRESETS", "CellStates"]

#: aihwkit's PCM programming-noise polynomial in uS (g in units of g_max), fitted at g_max = 25 uS
_PCM_PROG = (0.26348, 1.9650, -1.1731)
_PCM_G_MAX, _PCM_T_READ = 25.0, 250e-9
#: the ReRAM fits of Wan et al. (Nature 2022) as aihwkit's ``ReRamWan2022NoiseModel`` gives them: per time after
#: programming (s), the deviation's std in uS as a polynomial of g / g_max, fitted at g_max = 40 uS
_RERAM_SIGMA = {1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
                86400.0: (0.701, 22.086, -50.773, 47.095, -16.458),
                172800.0: (0.782, 20.274, -43.507, 37.062, -11.934)}
_RERAM_G_MAX = 40.0


class DeviceModel(Settings):
    """The cells' non-idealities (see the module docstring); every default is an ideal cell."""

    model: Literal["constant", "pcm", "reram"] = Field("constant", description="constant: the sigmas and drift "
                                                                               "exponent below as given; pcm, reram: "
                                                                               "the measured fits, each scaled by its "
                                                                               "field.")
    g_min: float = Field(0.0, ge=0.0, lt=1.0, description="Lowest conductance as a fraction of g_max (1 / the "
                                                           "ON/OFF ratio).")
    programming_noise: float = Field(0.0, ge=0.0, description="Std of a programmed conductance, a fraction of g_max "
                                                              "(pcm: the scale of the fit).")
    read_noise: float = Field(0.0, ge=0.0, description="Std of a read, a fraction of the conductance read (pcm: the "
                                                       "scale of the 1/f fit).")
    drift_nu: float = Field(0.0, ge=0.0, description="Mean drift exponent nu in g(t) = g_p ((t + t0) / t0)^-nu "
                                                     "(pcm: the scale of the fit).")
    drift_nu_sigma: float = Field(0.0, ge=0.0, description="Std of nu across cells (constant model).")
    t0: float = Field(1.0, gt=0.0, description="Seconds from programming to the reference read that drift counts "
                                               "from.")
    stuck_on: float = Field(0.0, ge=0.0, le=1.0, description="Share of cells stuck at g_max.")
    stuck_off: float = Field(0.0, ge=0.0, le=1.0, description="Share of cells stuck at g_min.")
    ir_drop: float = Field(0.0, ge=0.0, lt=1.0, description="IR drop, first order: the conductance lost by the cell "
                                                            "farthest from its driver and sense amplifier (others "
                                                            "in proportion to their wire distance).")
    compensation: bool = Field(True, description="Global drift compensation: one scale per array row block.")
    seed: int = Field(0, ge=0, description="Seed of the cells' states (trial t draws from seed and t).")

    @property
    def ideal(self) -> bool:
        """No effect on any level: the crossbar simulation then stays exact."""
        return (self.programming_noise == self.read_noise == self.drift_nu == self.stuck_on == self.stuck_off
                == self.ir_drop == 0.0)


#: published device models by name
DEVICE_PRESETS: dict[str, DeviceModel] = {
    "pcm": DeviceModel(model="pcm", programming_noise=1.0, read_noise=1.0, drift_nu=1.0, t0=20.0),
    "reram": DeviceModel(model="reram", programming_noise=1.0),
}


class CellStates:
    """One trial's programmed cells of one array row block: levels read at any time after programming.

    ``wire``: each cell's wire distance, ``(row + column) / (rows + cols - 2)`` within its array (broadcast
    against ``levels``), for the IR drop; None: no drop.
    """

    def __init__(self, levels: torch.Tensor, cell_levels: int, device: DeviceModel, key: str, trial: int,
                 wire: torch.Tensor | None = None) -> None:
        self.device, self.levels, self.key, self.trial = device, cell_levels, key, trial
        self.attenuation = None if wire is None or device.ir_drop == 0 else 1.0 - device.ir_drop * wire
        gen = _generator(device.seed, trial, key)
        d = device
        g = d.g_min + (1.0 - d.g_min) * levels.to(torch.float32) / (cell_levels - 1)  # float32: memory, not precision
        self.target = g if d.model == "reram" else None  # ReRAM's later reads deviate from the target again
        if d.model == "reram":
            sigma = d.programming_noise * _reram_sigma(g, 1.0)
            self.nu = torch.zeros_like(g)
        elif d.model == "pcm":
            sigma = d.programming_noise * _polynomial(g, _PCM_PROG) / _PCM_G_MAX
            rel = g.clamp(min=1e-7)
            mu = (-0.0155 * torch.log(rel) + 0.0244).clamp(0.049, 0.1)
            spread = (-0.0125 * torch.log(rel) - 0.0059).clamp(0.008, 0.045)
            self.nu = d.drift_nu * (mu + spread * _normal(g, gen)).abs()
        else:
            sigma = d.programming_noise
            self.nu = (d.drift_nu + d.drift_nu_sigma * _normal(g, gen)).abs()
        programmed = (g + sigma * _normal(g, gen)).clamp(min=0.0)
        u = torch.rand(g.shape, generator=gen, dtype=torch.float32)
        programmed = torch.where(u < d.stuck_on, torch.ones_like(g), programmed)
        self.stuck = u < d.stuck_on + d.stuck_off
        self.programmed = torch.where((u >= d.stuck_on) & self.stuck, torch.full_like(g, d.g_min), programmed)

    def conductances(self, time: float) -> torch.Tensor:
        """Every cell's read conductance ``time`` seconds after programming (units of g_max), compensated."""
        d = self.device
        gen = _generator(d.seed, self.trial, f"{self.key}@{time!r}")
        if self.target is not None and time > 1.0:  # ReRAM wanders: a fresh deviation of this time's std
            sigma = d.programming_noise * _reram_sigma(self.target, time)
            wandered = (self.target + sigma * _normal(self.target, gen)).clamp(min=0.0)
            drifted = torch.where(self.stuck, self.programmed, wandered)
        elif time > 0:
            drifted = self.programmed * ((time + d.t0) / d.t0) ** (-self.nu)
        else:
            drifted = self.programmed
        if d.model == "pcm":
            q = (0.0088 / (self.programmed ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
            sigma = d.read_noise * q * math.sqrt(math.log((time + d.t0 + _PCM_T_READ) / (2 * _PCM_T_READ)))
        else:
            sigma = d.read_noise
        read = (drifted + drifted.abs() * sigma * _normal(drifted, gen)).clamp(min=0.0)
        if self.attenuation is not None:
            read = read * self.attenuation
        if d.compensation and float(read.sum()) > 0:
            read = read * (self.programmed.sum() / read.sum())
        return read

    def read_levels(self, time: float) -> torch.Tensor:
        """The levels the periphery reads (the ``g_min`` baseline subtracted): ideal cells read their level."""
        d = self.device
        return (self.conductances(time) - d.g_min) / (1.0 - d.g_min) * (self.levels - 1)


def _reram_sigma(g: torch.Tensor, time: float) -> torch.Tensor:
    """The ReRAM fit's std (units of g_max) at ``time`` s after programming: coefficients interpolated in log time
    between the fitted times, held outside them."""
    times = sorted(_RERAM_SIGMA)
    at = min(max(time, times[0]), times[-1])
    hi = next(i for i, t in enumerate(times) if t >= at)
    lo = max(hi - 1, 0)
    w = 0.0 if hi == lo else (math.log(at) - math.log(times[lo])) / (math.log(times[hi]) - math.log(times[lo]))
    coeffs = [(1 - w) * a + w * b for a, b in zip(_RERAM_SIGMA[times[lo]], _RERAM_SIGMA[times[hi]])]
    return _polynomial(g, coeffs).clamp(min=0.0) / _RERAM_G_MAX


def _polynomial(g: torch.Tensor, coeffs: tuple[float, ...] | list[float]) -> torch.Tensor:
    """``sum_i coeffs[i] g^i``."""
    return sum(c * g ** i for i, c in enumerate(coeffs))  # type: ignore[return-value]


def _generator(seed: int, trial: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + trial) * 4_294_967_291 + zlib.crc32(key.encode()))
                                         % (1 << 63))


def _normal(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=gen, dtype=torch.float32)
