"""The map stage: crossbar tiling, bit slicing, ADC ranges and statistics of a quantized network.

:func:`map_graph` lays every crossbar operator (Conv, ConvTranspose, Gemm) of a converted map onto
arrays of ``CrossbarSpec.rows x CrossbarSpec.cols`` cells:

* the weight matrix has one row per input of the dot product (``k*k*c_in/groups`` for a
  convolution, unrolled in the order ``c, kh, kw``; ``in_features`` for a Gemm) and one column per
  output channel; a grouped or depthwise convolution maps each group as its own matrix (rows
  ``k*k*c_in/groups``, columns ``c_out/groups``), so a depthwise layer fills only ``k*k`` rows of
  an array per channel, which the utilization shows;
* a signed integer weight is stored either as a **differential** pair of columns (``w+ - w-``,
  both non-negative) or with an **offset** (``w + 2^(b-1)``, one column, the offset times the sum of
  the inputs subtracted digitally), and sliced into ``ceil(b / cell_bits)`` cells of ``cell_bits``;
* inputs enter bit-serially, ``dac_bits`` per cycle (two's complement: the top chunk of a signed
  input counts negative), so a layer takes ``ceil(input_bits / dac_bits)`` cycles per
  matrix-vector product;
* a column's **partial sum** (one array, one input chunk, one slice) is what its ADC reads: worst
  case ``rows_used x (2^cell_bits - 1) x (2^dac_bits - 1)``; ``adc_bits_needed`` is the resolution
  for a lossless readout of the worst case, and, with calibration inputs, of what was observed;
* the ADC's **range** (``CrossbarSpec.adc_range``): ``full`` reads partial sums ``0 .. 2^adc_bits - 1``
  in steps of one (larger ones saturate); ``max`` and ``calibrated`` give the ADCs of each layer's cell
  slice a step of ``2^k`` partial-sum units (a power of two, so the digital shift-and-add stays exact), the codes
  ``round(psum / 2^k)`` saturating at ``2^adc_bits - 1``: ``max`` the smallest step that reads the
  largest partial sum seen on calibration inputs, ``calibrated`` the step with the least squared
  readout error over those partial sums, each weighted by its significance (input bit x cell slice).
  Calibration runs the integer datapath exactly (lossless ADCs upstream) on the calibration inputs.

:class:`CrossbarSimulator` computes every crossbar operator through exactly those tiles (cell
slices, input chunks, per-column ADC with ``adc_bits`` and saturation, shift-and-add over slices
and chunks, digital accumulation over row blocks) and otherwise runs as the integer simulation:
with a lossless ADC it equals :class:`~maptools.simulate.IntegerSimulator` code for code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from maptools.conversion import GRAPH_FILE, OperatorGraph, graph_of
from maptools.maps.artifacts import QUANTPARAMS_NPZ, MapFolder, load_quantparams
from maptools.maps.roots import MapRef
from maptools.errors import SettingsError
from maptools.settings import Settings
from maptools.crossbar.cost import COST_PRESETS, NetworkCost, network_cost
from maptools.crossbar.device import CellStates, DeviceModel
from maptools.placement import Role
from maptools.quantinfo import QuantConfig
from maptools.requant import RequantMode
from maptools.simulate import IntegerSimulator, Value, batched_inputs, load_inputs, pad_codes

log = logging.getLogger(__name__)

__all__ = ["CrossbarSpec", "LayerMap", "CrossbarMap", "map_graph", "map_crossbars", "CrossbarSimulator",
           "observed_psums", "adc_shifts", "CROSSBAR_FILE"]

CROSSBAR_FILE = "crossbar_map.json"
_POSITIONS = 2048  # output positions per slab of the crossbar simulation
Encoding = Literal["differential", "offset"]
AdcRange = Literal["full", "max", "calibrated"]
#: calibration inputs of a calibrated ADC range when none are given: seeded random ones, held out from evaluation's
CALIBRATION_SAMPLES, CALIBRATION_SEED = 8, 1


class CrossbarSpec(Settings):
    """A crossbar array and its periphery (the one definition of every crossbar option: the CLI, the flows and the
    sweep take theirs from these fields). A bad value raises :class:`~maptools.errors.SettingsError`."""

    rows: int = Field(256, description="Word lines (cells per column) of one array, a power of two.")
    cols: int = Field(256, description="Bit lines (cells per row) of one array, a power of two.")
    cell_bits: int = Field(2, ge=1, le=8, description="Bits one cell stores (1-8).")
    adc_bits: int = Field(8, ge=1, le=32, description="Resolution of each column's ADC (1-32 bits); partial sums "
                                                      "above 2^adc_bits - 1 steps saturate.")
    dac_bits: int = Field(1, ge=1, le=8, description="Input bits applied per cycle (1-8).")
    encoding: Encoding = Field("differential", description="Signed weights as a differential pair of columns, or in "
                                                           "one column with an offset corrected digitally.")
    max_arrays: int | None = Field(None, ge=1, description="Budget of arrays for the whole network (none: no "
                                                           "limit).")
    cols_per_adc: int = Field(1, ge=1, description="Columns that share one ADC, converted one after another (a power "
                                                   "of two up to cols): fewer ADCs, longer cycles.")
    adc_range: AdcRange = Field("full", description="How each ADC's range is set: full (steps of one partial-sum "
                                                    "unit), or per layer and cell slice from calibration inputs a "
                                                    "power-of-two step: max (reads the largest partial sum) or "
                                                    "calibrated (least squared readout error).")

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, values: Any) -> Any:
        """The checks, with maptools' messages, before pydantic's (which then only confirm them)."""
        if not isinstance(values, dict):
            return values
        for name in ("rows", "cols"):
            value = values.get(name, 256)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise SettingsError(f"crossbar {name}={value!r} is not a positive power of two.",
                                    "use e.g. 64, 128, 256 or 512.")
        for name, low, high in (("cell_bits", 1, 8), ("dac_bits", 1, 8), ("adc_bits", 1, 32)):
            value = values.get(name, low)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SettingsError(f"{name}={value!r} is out of range.", f"use an integer from {low} to {high}.")
        share = values.get("cols_per_adc", 1)
        if isinstance(share, bool) or not isinstance(share, int) or share < 1 or share & (share - 1) or \
                share > values.get("cols", 256):
            raise SettingsError(f"cols_per_adc={share!r} is not a power of two up to the array's columns.",
                                "use e.g. 1 (an ADC per column), 8, or the column count (one ADC per array).")
        encoding = values.get("encoding", "differential")
        if encoding not in ("differential", "offset"):
            raise SettingsError(f"encoding={encoding!r} is unknown.", "use 'differential' or 'offset'.")
        arrays = values.get("max_arrays")
        if arrays is not None and (isinstance(arrays, bool) or not isinstance(arrays, int) or arrays < 1):
            raise SettingsError(f"max_arrays={arrays!r} is not a positive count.", "pass e.g. 64, or None.")
        adc_range = values.get("adc_range", "full")
        if adc_range not in ("full", "max", "calibrated"):
            raise SettingsError(f"adc_range={adc_range!r} is unknown.", "use 'full', 'max' or 'calibrated'.")
        return values

    def simulator(self, graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], *,
                  requant: RequantMode | str = RequantMode.FLOAT,
                  calibration: Mapping[str, np.ndarray] | None = None,
                  device: DeviceModel | None = None) -> CrossbarSimulator:
        """The simulator that computes every crossbar operator of ``graph`` through arrays of this spec (of
        ``device``'s cells: see :meth:`CrossbarSimulator.set_device`); a ``max`` or ``calibrated`` ADC range is
        calibrated first, on ideal cells, on ``calibration`` (a batch of inputs; default ``CALIBRATION_SAMPLES``
        seeded random ones)."""
        return CrossbarSimulator(graph, quantparams, self, requant=requant, device=device,
                                 adc_shifts=adc_shifts(graph, quantparams, self, calibration))

    @classmethod
    def from_xbar(cls, xbar: str, **kwargs: Any) -> CrossbarSpec:
        """A spec from ``'ROWSxCOLS'`` (e.g. ``'256x256'``) and the other fields."""
        rows, sep, cols = str(xbar).strip().lower().partition("x")
        if not sep or not rows.isdigit() or not cols.isdigit():
            raise SettingsError(f"crossbar size {xbar!r} is not ROWSxCOLS.", "write it like 256x256.")
        return cls(rows=int(rows), cols=int(cols), **kwargs)

    @property
    def xbar(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def cell_max(self) -> int:
        return 2 ** self.cell_bits - 1


@dataclass(frozen=True)
class LayerMap:
    """One crossbar operator laid onto arrays."""

    name: str
    op_type: str
    groups: int
    rows: int  # rows of one group's matrix
    cols: int  # logical output columns of one group's matrix
    weight_bits: int
    input_bits: int
    input_signed: bool
    slices: int
    physical_cols: int  # one group: cols x slices x (2 if differential)
    row_blocks: int
    col_blocks: int
    arrays: int
    cells_used: int
    utilization: float
    mvms: int  # matrix-vector products per inference (output positions)
    input_steps: int  # bit-serial cycles per product
    cycles: int  # input_steps x mvms (the arrays of a layer work in parallel)
    psum_worst: int  # largest partial sum any column can produce
    adc_bits_needed: int  # lossless for the worst case
    psum_observed: int | None = None
    adc_bits_observed: int | None = None
    adc_steps: tuple[int, ...] = ()  # per cell slice, partial-sum units per ADC code (powers of two); () all 1
    tiles: list[dict[str, int]] = field(default_factory=list)
    #: the earlier layer whose arrays hold the same integer weights, which this one reads (layers run one after
    #: another: an unrolled loop's iterations, a weight several operators share); its arrays count once
    shares: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CrossbarMap:
    """The network on crossbars: per layer, and totals."""

    spec: CrossbarSpec
    layers: list[LayerMap]

    @property
    def cost(self) -> NetworkCost:
        """Energy, latency and area per inference, priced with the ISAAC component table (see
        :mod:`maptools.crossbar.cost`)."""
        return network_cost(self.layers, self.spec, COST_PRESETS["isaac"])

    @property
    def arrays(self) -> int:
        """Arrays the network needs: a layer sharing another's weights adds none."""
        return sum(layer.arrays for layer in self.layers if layer.shares is None)

    @property
    def cells(self) -> int:
        return self.arrays * self.spec.rows * self.spec.cols

    @property
    def cells_used(self) -> int:
        return sum(layer.cells_used for layer in self.layers if layer.shares is None)

    @property
    def utilization(self) -> float:
        return self.cells_used / self.cells if self.cells else 0.0

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def notes(self) -> list[str]:
        """What the spec loses on this network as observed: under a ``full`` ADC range, the layers whose partial
        sums exceed ``2^adc_bits - 1`` and saturate."""
        over = [layer for layer in self.layers if self.spec.adc_range == "full"
                and (layer.adc_bits_observed or 0) > self.spec.adc_bits]
        if not over:
            return []
        most = max(layer.adc_bits_observed or 0 for layer in over)
        return [f"{len(over)} of {len(self.layers)} layers saturate their ADCs: their observed partial sums need up "
                f"to {most} bits, over adc_bits={self.spec.adc_bits} ({', '.join(lay.name for lay in over[:4])}"
                f"{', ...' if len(over) > 4 else ''}). Use adc_bits={most}, or adc_range='calibrated' (steps "
                "fitted to the partial sums; evaluate_crossbar measures what either loses)."]

    def to_bytes(self) -> bytes:
        """The content of ``crossbar_map.json``."""
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    def to_json(self) -> dict[str, Any]:
        return {"format": "maptools.crossbar_map/1", "spec": self.spec.model_dump(),
                "totals": {"arrays": self.arrays, "cells": self.cells, "cells_used": self.cells_used,
                           "utilization": self.utilization, "cycles": self.cycles,
                           "adc_bits_needed": max((lay.adc_bits_needed for lay in self.layers), default=0)},
                "cost": self.cost.to_json(), "notes": self.notes, "layers": [layer.to_json() for layer in self.layers]}


class _Owners:
    """The first layer to hold each integer weight matrix: a later layer with the same matrices and bits reads
    that layer's arrays (:attr:`LayerMap.shares`)."""

    def __init__(self) -> None:
        self._first: dict[tuple, str] = {}

    def owner(self, name: str, matrices: np.ndarray, bits: int) -> str:
        key = (bits, matrices.shape, hashlib.sha256(np.ascontiguousarray(matrices, np.int64).tobytes()).digest())
        return self._first.setdefault(key, name)


def _bits(value: int) -> int:
    """Bits an unsigned ADC needs to read ``0..value`` without loss."""
    return max(1, int(value).bit_length())


def weight_matrix(node: Mapping[str, Any], weight: np.ndarray) -> np.ndarray:
    """``[groups, rows, cols]`` integer matrices of a crossbar operator (rows in ``c, kh, kw`` order)."""
    op = node["op_type"]
    if op == "Gemm":
        w = weight if node["attrs"]["transB"] else weight.T  # [out, in]
        return w.T[None]
    groups = node["attrs"]["groups"]
    if op == "ConvTranspose":  # [in, out/g, k...] -> a convolution's [out, in/g, k...], flipped
        cin, cout_g = weight.shape[:2]
        w = weight.reshape(groups, cin // groups, cout_g, *weight.shape[2:]).swapaxes(1, 2)
        w = np.flip(w, axis=tuple(range(3, w.ndim))).reshape(groups * cout_g, cin // groups, *weight.shape[2:])
    else:
        w = weight
    out = w.shape[0]
    return w.reshape(groups, out // groups, -1).transpose(0, 2, 1)


def map_graph(graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], spec: CrossbarSpec,
              observed: Mapping[str, int] | None = None,
              shifts: Mapping[str, tuple[int, ...]] | None = None) -> CrossbarMap:
    """Lay every crossbar operator of ``graph`` onto ``spec`` arrays (see the module docstring).

    ``observed`` maps operator names to the largest partial sum seen on calibration inputs (see
    :func:`observed_psums`), ``shifts`` to their ADC step's power of two (see :func:`adc_shifts`).
    """
    layers, owners = [], _Owners()
    for name in graph.operators():
        node = graph.node(name)
        if node["role"] != Role.CROSSBAR.value or node["part"] != "device":
            continue
        cfg: QuantConfig = node["quant"]
        weight = IntegerSimulator._load_weights(name, node, quantparams)[0].numpy()
        if node["op_type"] == "Gemm" and not node["attrs"]["transB"]:
            weight = weight.T  # undo the loader's transpose: back to the stored layout
        matrices = weight_matrix(node, weight.astype(np.int64))
        groups, rows, cols = matrices.shape
        wbits = int(cfg.weight_bits or 8)
        owner = owners.owner(name, matrices, wbits)
        lo, hi = cfg.in_range(0)
        ibits = int(math.ceil(math.log2(hi - lo + 1)))
        signed = lo < 0
        slices = math.ceil(wbits / spec.cell_bits)
        phys = cols * slices * (2 if spec.encoding == "differential" else 1)
        row_blocks, col_blocks = math.ceil(rows / spec.rows), math.ceil(phys / spec.cols)
        arrays = groups * row_blocks * col_blocks
        out_shape = node["output_shapes"][0]
        mvms = math.prod(out_shape[2:]) if node["op_type"] != "Gemm" else 1
        steps = input_steps(ibits, signed, spec.dac_bits)
        tiles = []
        for g in range(groups):
            for r in range(row_blocks):
                for c in range(col_blocks):
                    tiles.append({"group": g, "row_block": r, "col_block": c, "row0": r * spec.rows,
                                  "rows": min(spec.rows, rows - r * spec.rows), "col0": c * spec.cols,
                                  "cols": min(spec.cols, phys - c * spec.cols)})
        worst = min(rows, spec.rows) * spec.cell_max * (2 ** min(spec.dac_bits, ibits) - 1)
        obs = None if observed is None else observed.get(name)
        layers.append(LayerMap(
            name=name, op_type=node["op_type"], groups=groups, rows=rows, cols=cols, weight_bits=wbits,
            input_bits=ibits, input_signed=signed, slices=slices, physical_cols=phys, row_blocks=row_blocks,
            col_blocks=col_blocks, arrays=arrays, cells_used=groups * rows * phys,
            utilization=groups * rows * phys / (arrays * spec.rows * spec.cols), mvms=mvms, input_steps=steps,
            cycles=steps * mvms, psum_worst=worst, adc_bits_needed=_bits(worst), psum_observed=obs,
            adc_bits_observed=None if obs is None else _bits(obs),
            adc_steps=tuple(1 << k for k in (shifts or {}).get(name, ())), tiles=tiles,
            shares=None if owner == name else owner))
    result = CrossbarMap(spec, layers)
    if spec.max_arrays is not None and result.arrays > spec.max_arrays:
        worst = sorted(layers, key=lambda lay: -lay.arrays)[:3]
        raise SettingsError(f"the network needs {result.arrays} arrays of {spec.rows}x{spec.cols}; the budget is "
                            f"{spec.max_arrays} (largest: " + ", ".join(f"{lay.name} {lay.arrays}" for lay in worst)
                            + ").", "raise max_arrays, use larger arrays or more bits per cell.")
    return result


# --- the crossbar-level simulation ---------------------------------------------------------------------

def _chunks(codes: torch.Tensor, bits: int, signed: bool, dac_bits: int) -> list[tuple[int, torch.Tensor]]:
    """Bit-serial input chunks ``(weight, values >= 0)`` with ``codes == sum(weight * values)``.

    Unsigned codes: ``dac_bits`` at a time. Signed (two's complement): the low ``bits - 1`` bits
    that way, and the sign bit as its own cycle with weight ``-2^(bits-1)``.
    """
    u = codes.to(torch.int16 if bits < 15 else torch.int64)  # less memory to stream than int64
    if signed:
        u = torch.where(u < 0, u + (1 << bits), u)
    body = bits - 1 if signed else bits
    out = [(1 << start, (u >> start) & ((1 << min(dac_bits, body - start)) - 1))
           for start in range(0, body, dac_bits)]
    if signed:
        out.append((-(1 << (bits - 1)), (u >> (bits - 1)) & 1))
    return out


def input_steps(bits: int, signed: bool, dac_bits: int) -> int:
    """Cycles one matrix-vector product takes (see :func:`_chunks`)."""
    return math.ceil((bits - 1 if signed else bits) / dac_bits) + (1 if signed else 0)


def _slices(matrix: torch.Tensor, bits: int, cell_bits: int) -> list[tuple[int, torch.Tensor]]:
    """Cells ``(weight, values in [0, 2^cell_bits))`` of a non-negative matrix."""
    return [(1 << start, (matrix >> start) & ((1 << cell_bits) - 1)) for start in range(0, bits, cell_bits)]


class _Cells:
    """One row block of a layer as cells: per part (sign), the slices side by side; each row's largest cell."""

    def __init__(self, parts: list[tuple[int, torch.Tensor]], block: slice, wbits: int, cell_bits: int,
                 worst: int) -> None:
        sliced = [(sign, _slices(matrix[:, block], wbits, cell_bits)) for sign, matrix in parts]
        self.shifts = torch.tensor([w for w, _ in sliced[0][1]], dtype=torch.float64)  # 2^(cell_bits * k)
        self.parts = [(sign, torch.cat([c for _, c in cs], dim=2).to(torch.float32)) for sign, cs in sliced]
        self.peaks = torch.stack([c.amax(dim=2) for _, cs in sliced for _, c in cs], dim=2).amax(dim=2).float()
        # the clipped excess summed over slices is below worst * sum(shifts): float32 is exact under 2^24
        self.dtype = torch.float32 if worst * float(self.shifts.sum()) < 2 ** 24 else torch.float64


class CrossbarSimulator(IntegerSimulator):
    """The integer simulation with every crossbar operator computed through its arrays.

    Args:
        graph, quantparams, requant, model: as :class:`~maptools.simulate.IntegerSimulator`.
        spec: the crossbar.
        collect_psums: compute every block bit by bit and record each layer's largest partial sum in
            ``observed`` (what :func:`map_graph` reports as observed; one product of every position's bit planes).
        collect_histograms: also read every partial sum through the ADC one by one and record, per layer, the
            significance-weighted histogram of its partial sums in ``histograms`` (what :func:`adc_shifts`
            calibrates on); several times slower.
        adc_shifts: per layer, per cell slice, the ADC step's power of two (a step of ``2^k`` partial-sum units);
            absent: steps of one.
        device: non-ideal cells (:class:`~maptools.crossbar.device.DeviceModel`, see :meth:`set_device`).
    """

    def __init__(self, graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], spec: CrossbarSpec,
                 *, collect_psums: bool = False, collect_histograms: bool = False,
                 adc_shifts: Mapping[str, tuple[int, ...]] | None = None,
                 device: DeviceModel | None = None, **kwargs: Any) -> None:
        super().__init__(graph, quantparams, **kwargs)
        self.spec = spec
        self.device: DeviceModel | None = None
        self.trial, self.time = 0, 0.0
        self._states: dict[tuple[str, int], list[CellStates]] = {}  # one trial's cells, per row block and part
        self._read: dict[tuple[str, int], list[torch.Tensor]] = {}  # the levels they read at self.time
        self.set_device(device)
        self.collect_psums = collect_psums or collect_histograms
        self.collect_histograms = collect_histograms
        self.adc_shifts = dict(adc_shifts or {})
        self.observed: dict[str, int] = {}  # largest partial sum per layer, over every run so far
        self.histograms: dict[str, torch.Tensor] = {}  # per layer: [slice, partial sum] summed squared significance
        self.matrices: dict[str, torch.Tensor] = {}
        # per (layer whose arrays are read, row block, ...), built on first use: the stored matrix, and its cells
        # where an ADC may clip (held once for the layers sharing those arrays: an unrolled LSTM's 256 steps)
        self._weights: dict[tuple[str, int, bool], torch.Tensor] = {}  # (its products exact in float32 or not)
        self._peaks: dict[tuple[str, int], int] = {}  # the largest stored weight
        self._cells: dict[tuple[str, int, int], _Cells] = {}
        self._owner: dict[str, str] = {}  # a layer sharing another's arrays reads that layer's matrices and cells
        owners = _Owners()
        for name, (weight, _) in self.weights.items():
            node = graph.node(name)
            stored = weight.numpy()
            if node["op_type"] == "Gemm" and not node["attrs"]["transB"]:
                stored = stored.T
            matrix = weight_matrix(node, stored.astype(np.int64))
            quant = node["quant"]
            self._owner[name] = owners.owner(name, matrix, int(quant.weight_bits or 8) if quant is not None else 8)
            first = self._owner[name]
            self.matrices[name] = self.matrices[first] if first != name else torch.from_numpy(matrix.copy())

    def set_device(self, device: DeviceModel | None, trial: int = 0, time: float = 0.0) -> None:
        """Compute through ``device``'s cells of Monte Carlo ``trial``, read ``time`` seconds after programming
        (the tiling and cell slices are kept; only the cells' states are drawn again)."""
        device = None if device is None or device.ideal else device
        if (device, trial) != (self.device, self.trial):
            self._states.clear()
        if (device, trial, time) != (self.device, self.trial, self.time):
            self._read.clear()
        self.device, self.trial, self.time = device, trial, float(time)

    def _wire(self, shape: torch.Size, part: int) -> torch.Tensor:
        """Each cell's wire distance within its array, ``(row + column) / (rows + cols - 2)``: a row block's rows
        are an array's rows; the physical columns run part by part, slice by slice (as the mapping counts
        them), ``spec.cols`` to an array."""
        spec, rows, width = self.spec, shape[-2], shape[-1]
        column = (part * width + torch.arange(width)) % spec.cols
        return (torch.arange(rows)[:, None] + column[None, :]).float() / max(1, spec.rows + spec.cols - 2)

    def _levels_read(self, name: str, r0: int, cells: _Cells) -> list[torch.Tensor]:
        """Per part, the levels this row block's cells read in the current trial and time (the cells of the layer
        whose arrays it shares)."""
        name = self._owner.get(name, name)
        if (name, r0) not in self._read:
            if (name, r0) not in self._states:
                self._states[name, r0] = [CellStates(flat, 1 << self.spec.cell_bits, self.device, f"{name}/{r0}/{i}",
                                                     self.trial, self._wire(flat.shape, i))
                                          for i, (_, flat) in enumerate(cells.parts)]
            self._read[name, r0] = [state.read_levels(self.time) for state in self._states[name, r0]]
        return self._read[name, r0]

    def _mvm(self, name: str, x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        """``x [groups, N, rows]`` integer codes times the layer's matrices through the arrays: ``[groups, N, cols]``.

        Per row block (one array's rows), input chunk and cell slice, every column's partial sum is
        read by its ADC (``adc_bits``, in the layer's step, saturating), then shifted and added; row blocks
        add digitally. That equals the plain integer product plus, for every partial sum the ADC does not
        read exactly, its readout error (shifted like the sum). With a step of one, only (input chunk,
        position) pairs whose partial sums might exceed the limit (bounded by the chunk's bits times each
        row's largest cell) are computed slice by slice, and only for that correction; unless partial sums
        are being collected, every other pair is exact in the plain product.
        """
        spec, matrices = self.spec, self.matrices[name]  # [groups, rows, cols]
        wbits = int(cfg.weight_bits or 8)
        lo, hi = cfg.in_range(0)
        ibits = int(math.ceil(math.log2(hi - lo + 1)))
        offset = 0 if spec.encoding == "differential" else 1 << (wbits - 1)
        parts = [(1, matrices.clamp(min=0)), (-1, (-matrices).clamp(min=0))] if not offset \
            else [(1, matrices + offset)]
        limit = (1 << spec.adc_bits) - 1
        groups, rows, cols = matrices.shape
        acc = torch.zeros(groups, x.shape[1], cols, dtype=torch.float64)
        owner = self._owner.get(name, name)
        for r0 in range(0, rows, spec.rows):
            block = slice(r0, min(rows, r0 + spec.rows))
            worst = (block.stop - block.start) * spec.cell_max * (2 ** min(spec.dac_bits, ibits) - 1)
            if (owner, r0) not in self._peaks:  # (the parts' sum: the matrix as the cells hold it)
                self._peaks[owner, r0] = int((matrices[:, block] + offset).abs().max()) if matrices.numel() else 0
            # float32 products are exact while every sum stays below 2^24
            exact = (block.stop - block.start) * max(abs(lo), abs(hi)) * self._peaks[owner, r0] < 2 ** 24
            if (owner, r0, exact) not in self._weights:
                self._weights[owner, r0, exact] = (matrices[:, block] + offset).to(
                    torch.float32 if exact else torch.float64)
            weights, cells = self._weights[owner, r0, exact], None
            if self.collect_psums or worst > limit or any(self.adc_shifts.get(name, ())) or self.device is not None:
                if (owner, r0, worst) not in self._cells:
                    self._cells[owner, r0, worst] = _Cells(parts, block, wbits, spec.cell_bits, worst)
                cells = self._cells[owner, r0, worst]
            for n0 in range(0, x.shape[1], _POSITIONS):  # bounded memory: a slab of positions at a time
                xs = x[:, n0:n0 + _POSITIONS, block]
                out = torch.matmul(xs.to(weights.dtype), weights).to(torch.float64)
                if cells is not None:
                    read = self._levels_read(name, r0, cells) if self.device is not None else None
                    self._saturate(name, out, xs, cells, ibits, lo < 0, limit, read)
                acc[:, n0:n0 + _POSITIONS] += out
        if offset:
            acc -= offset * x.to(torch.float64).sum(dim=-1, keepdim=True)
        return acc

    def _saturate(self, name: str, out: torch.Tensor, xs: torch.Tensor, cells: _Cells, ibits: int, signed: bool,
                  limit: int, levels: list[torch.Tensor] | None = None) -> None:
        """Add to ``out [groups, n, cols]`` the ADC's readout error on the partial sums of ``xs``
        (``[groups, n, rows]``): what saturation clips off and, with a step above one, the rounding; with
        ``levels`` (per part, what non-ideal cells read), the error of reading those instead of the ideal ones."""
        groups, n, rows = xs.shape
        chunks = _chunks(xs, ibits, signed, self.spec.dac_bits)
        bits = torch.stack([c for _, c in chunks], dim=1).to(torch.float32)  # [g, T, n, rows], exact
        steps = torch.tensor([1 << k for k in self.adc_shifts.get(name, ())] or [1], dtype=torch.float32)
        coarse = bool((steps > 1).any())
        every = self.collect_histograms or coarse or levels is not None  # each partial sum is read inexactly
        if self.collect_psums and not every:  # the largest partial sum: one product of every chunk and position
            for _, flat in cells.parts:
                full = torch.bmm(bits.view(groups, -1, rows), flat)
                if full.numel():
                    self.observed[name] = max(self.observed.get(name, 0), int(full.max()))
        if every:
            t_idx, n_idx = (i.flatten() for i in torch.meshgrid(torch.arange(len(chunks)), torch.arange(n),
                                                                 indexing="ij"))
        else:
            # no partial sum of a (chunk, position) exceeds the chunk's bits times each row's largest cell
            bound = torch.bmm(bits.view(groups, -1, rows), cells.peaks[:, :, None]).view(groups, -1, n)  # [g, T, n]
            t_idx, n_idx = torch.nonzero((bound > limit).any(dim=0), as_tuple=True)
        if not len(t_idx):
            return
        picked = bits[:, t_idx, n_idx]  # [g, R, rows]
        tw = torch.tensor([w for w, _ in chunks], dtype=torch.float64)[t_idx]
        error = 0
        dtype = cells.dtype if levels is None else torch.float64
        for index, (sign, flat) in enumerate(cells.parts):
            psum = torch.bmm(picked, flat).view(groups, len(t_idx), len(cells.shifts), -1)  # [g, R, K, cols]
            if self.collect_psums and psum.numel():
                self._collect(name, psum, tw, cells.shifts)
            analog = psum if levels is None else \
                torch.bmm(picked, levels[index]).view(groups, len(t_idx), len(cells.shifts), -1)
            if coarse:  # one step per cell slice (the columns holding it): codes round(psum / step), saturating
                step = steps[None, None, :, None].to(analog.dtype)
                read = torch.floor(analog / step + 0.5).clamp_(0, limit) * step
            elif levels is not None:
                read = torch.floor(analog + 0.5).clamp_(0, limit)
            else:
                read = psum.clamp(max=limit)
            error = error + sign * torch.einsum("grkc,k->grc", (read - psum).to(dtype), cells.shifts.to(dtype))
        out.index_add_(1, n_idx, tw[None, :, None] * error.to(torch.float64))

    def _collect(self, name: str, psum: torch.Tensor, chunk_weights: torch.Tensor, shifts: torch.Tensor) -> None:
        """Record the largest partial sum of ``psum [g, R, K, cols]`` and (``collect_histograms``), per cell slice,
        its values weighted by their input chunk's squared significance."""
        top = int(psum.max())
        self.observed[name] = max(self.observed.get(name, 0), top)
        if not self.collect_histograms:
            return
        total = self.histograms.get(name, torch.zeros(len(shifts), 0, dtype=torch.float64))
        if total.shape[1] <= top:
            total = F.pad(total, (0, top + 1 - total.shape[1]))
        for w in torch.unique(chunk_weights).tolist():  # one bincount per significance: no weight tensor
            rows = psum[:, chunk_weights == w]
            for k in range(len(shifts)):
                counts = torch.bincount(rows[:, :, k].long().flatten(), minlength=total.shape[1])
                total[k] += counts.to(torch.float64) * w ** 2
        self.histograms[name] = total

    def _conv(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> Value:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]
        a = node["attrs"]
        if len(a["strides"]) != 2:
            return super()._conv(name, node, cfg, values)
        codes, padding = pad_codes(x.codes, a["pads"])
        n, c, h, w = codes.shape
        k = a["kernel"]
        cols = F.unfold(codes, k, dilation=a["dilations"], padding=padding, stride=a["strides"])  # [N, c*kh*kw, L]
        groups = a["groups"]
        cols = cols.view(n, groups, (c // groups) * k[0] * k[1], -1).permute(1, 0, 3, 2)  # [g, N, L, rows]
        g, _, length, rows = cols.shape
        out = self._mvm(name, cols.reshape(g, n * length, rows), cfg)  # [g, N*L, cols]
        out = out.view(g, n, length, -1).permute(1, 0, 3, 2).reshape(n, -1, length)
        oh = (h + 2 * padding[0] - a["dilations"][0] * (k[0] - 1) - 1) // a["strides"][0] + 1
        acc = self._accumulate(name, out.reshape(n, -1, oh, length // oh), bias)
        return self._output(acc, x.scale * self._weight_scale(cfg, acc.dim()), cfg)

    def _gemm(self, name: str, node: Mapping[str, Any], cfg: QuantConfig, values: list[Value]) -> Value:
        (x,) = self._inputs(cfg, values)
        weight, bias = self.weights[name]
        acc = self._accumulate(name, self._mvm(name, x.codes[None], cfg)[0], bias)
        w_scale = torch.from_numpy(cfg.weight_scale.astype(np.float64)).reshape(1, -1)
        return self._output(acc, node["attrs"]["alpha"] * x.scale * w_scale, cfg)


def observed_psums(graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], spec: CrossbarSpec,
                   inputs: Mapping[str, np.ndarray],
                   shifts: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """Largest partial sum per crossbar operator on ``inputs`` (a batch), read with the spec's ADC (in the
    layers' steps ``shifts``)."""
    sim = CrossbarSimulator(graph, quantparams, spec, collect_psums=True, adc_shifts=shifts)
    sim.run(inputs)
    return dict(sim.observed)


def _step_error(histogram: torch.Tensor, shift: int, limit: int) -> float:
    """Squared readout error over a significance-weighted partial-sum histogram, at a step of ``2^shift``."""
    values = torch.arange(len(histogram), dtype=torch.float64)
    step = float(1 << shift)
    read = torch.floor(values / step + 0.5).clamp(max=limit) * step
    return float((histogram * (read - values) ** 2).sum())


def _fitting(top: int, limit: int) -> int:
    """The smallest power of two ``k`` with ``limit * 2^k >= top``."""
    return max(0, math.ceil(math.log2(top / limit))) if top > limit else 0


def adc_shifts(graph: OperatorGraph, quantparams: Mapping[str, np.ndarray | None], spec: CrossbarSpec,
               calibration: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    """Per crossbar layer and cell slice (the columns holding one slice of the weights), the power of two of
    its ADCs' step for ``spec.adc_range`` (``max``: the smallest step that reads the largest partial sum;
    ``calibrated``: the least squared readout error, each partial sum weighted by its input chunk's
    significance), from the partial sums of ``calibration`` inputs (default ``CALIBRATION_SAMPLES`` seeded
    random ones) through lossless ADCs. ``full``, and layers whose every step is one: absent."""
    if spec.adc_range == "full":
        return {}
    feed = load_inputs(graph, "random" if calibration is None else calibration, seed=CALIBRATION_SEED,
                       batch=CALIBRATION_SAMPLES * batched_inputs(graph.inputs)[0])
    lossless = spec.replace(adc_bits=32, adc_range="full")
    sim = CrossbarSimulator(graph, quantparams, lossless, collect_histograms=True)
    sim.run(feed)
    limit = (1 << spec.adc_bits) - 1
    shifts = {}
    for name, histograms in sim.histograms.items():
        per_slice = []
        for histogram in histograms:
            nonzero = torch.nonzero(histogram)
            fits = _fitting(int(nonzero.max()) if len(nonzero) else 0, limit)
            per_slice.append(fits if spec.adc_range == "max" else
                             min(range(fits + 1), key=lambda k: _step_error(histogram, k, limit)))
        if any(per_slice):
            shifts[name] = tuple(per_slice)
    return shifts


def map_crossbars(mapname: str | MapRef, spec: CrossbarSpec, *, output_root: str | Path | None = None,
                  inputs: str | Path | Mapping[str, Any] | None = "random", samples: int = 2,
                  seed: int = 0, calibration: Mapping[str, np.ndarray] | None = None) -> CrossbarMap:
    """Map a converted map onto ``spec`` and register ``crossbar_map.json`` in it.

    Observed partial sums come from ``inputs`` (as :func:`maptools.simulate.load_inputs` takes:
    ``'random'`` gives ``samples`` seeded inputs, each at the map's prepared shapes, or an ``.npy``/``.npz``
    file or a dict of real samples), run through the crossbar simulation bit by bit. A ``max`` or
    ``calibrated`` ADC range is calibrated on ``calibration`` (see :func:`adc_shifts`); each layer's step is in
    ``crossbar_map.json``.

    Raises:
        ArtifactError: the map is missing, not converted, or its graph and quantparams disagree.
        SettingsError: the spec cannot hold the network (budget, cell bits above weight bits).
    """
    folder = MapFolder(mapname, output_root)
    version = folder.open()  # one version for every file read
    # the hashes this map is derived from, read first: a rewrite after this point is caught by update()
    read = {k: v for k, v in version.record().artifacts.items() if k in (GRAPH_FILE, QUANTPARAMS_NPZ)}
    graph = graph_of(version)
    params = load_quantparams(version.existing(QUANTPARAMS_NPZ))
    too_fine = [n for n in graph.operators() if graph.node(n)["role"] == Role.CROSSBAR.value
                and graph.node(n)["quant"] is not None and spec.cell_bits > int(graph.node(n)["quant"].weight_bits)]
    if too_fine:
        raise SettingsError(f"cell_bits={spec.cell_bits} exceeds the weight bits of {', '.join(too_fine[:5])}.",
                            "use cell_bits <= the weight bits (e.g. 2 or 4 for 8-bit weights).")
    # each random sample at the shapes the map was prepared for (a model whose axis 0 is not free takes its
    # prepared batch at a time)
    feed = load_inputs(graph, inputs, seed=seed, batch=samples * batched_inputs(graph.inputs)[0])
    shifts = adc_shifts(graph, params, spec, calibration)
    result = map_graph(graph, params, spec, observed_psums(graph, params, spec, feed, shifts), shifts)
    folder.update({CROSSBAR_FILE: result.to_bytes()}, {}, based_on=read)
    for note in result.notes:
        log.warning("%s", note)
    return result
