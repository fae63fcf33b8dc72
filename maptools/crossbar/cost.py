"""Energy, latency and area of a mapped network, from a component table.

Every crossbar layer of a :class:`~maptools.crossbar.mapping.CrossbarMap` is costed from the actions its
tiles perform per inference (one matrix-vector product per output position, ``input_steps`` bit-serial
cycles each), counted from the mapping:

* **ADC**: one conversion per used column of every array, per cycle (sharing an ADC between columns
  changes the time, not the count); energy and area grow by ``adc_growth`` per bit above the table's
  reference resolution (2: the Walden figure of merit, energy per conversion step constant);
* **DAC**: one drive per used row per cycle, energy and area times ``2^dac_bits - 1`` levels over a 1-bit DAC;
* **cells**: one read per used cell per cycle; **sample and hold**, **shift-and-add** and the **output
  register**: one action per conversion; the **input register**: one bit read per used row and input bit;
* **tile**: the buffers, bus, router and tile units (eDRAM, pooling, activation), per input bit fed to the
  arrays.

A cycle lasts ``max(read_ns, cols_per_adc / adc_gsps)``: the arrays' read, or the conversions of the
columns that share an ADC. A layer's arrays work in parallel; layers run one after another (no pipeline
between layers), so the network's latency is their sum, and layers holding the same integer weights (an
unrolled loop's iterations) read one set of arrays. Area counts the arrays the map uses, each with
its periphery (``cols / cols_per_adc`` ADCs, a DAC per row, a sample-and-hold per column, a shift-and-add
per two ADCs, its share of the registers), and the tiles that hold them.

The ``isaac`` preset is the component table of ISAAC (Shafiee et al., ISCA 2016, Table I: 32 nm, 1.2 GHz,
128x128 arrays of 2-bit cells, 1-bit DACs, one 8-bit 1.28 GS/s ADC per array, 8 arrays per IMA, 12 IMAs per
tile, 168 tiles). Its energies per action are the table's powers divided by the rates of those actions at
ISAAC's peak (a 100 ns cycle): :func:`peak` of that organisation gives back the paper's totals (tile
330 mW and 0.372 mm², chip 65.8 W and 85.4 mm²), which checks this model's counts and timing, not an
independent prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from pydantic import Field

from maptools.settings import Settings

__all__ = ["ComponentTable", "COST_PRESETS", "LayerCost", "NetworkCost", "Peak", "layer_cost", "network_cost", "peak",
           "cycle_ns", "array_um2", "COMPONENTS"]

#: the components an energy breakdown names, in order
COMPONENTS = ("adc", "dac", "cells", "sample_hold", "shift_add", "input_register", "output_register", "tile")


class ComponentTable(Settings):
    """Energy per action (pJ) and area (um^2) of each component, at a reference design point."""

    name: str = Field("isaac", description="What the table describes (and its source).")
    adc_bits: int = Field(8, ge=1, le=16, description="Resolution at which the ADC figures hold.")
    adc_pj: float = Field(1.5625, gt=0, description="Energy of one ADC conversion (pJ).")
    adc_um2: float = Field(1200.0, gt=0, description="Area of one ADC (um^2).")
    adc_gsps: float = Field(1.28, gt=0, description="Conversions per nanosecond of one ADC (GS/s).")
    adc_growth: float = Field(2.0, ge=1, description="Factor of the ADC's energy and area per bit of resolution.")
    dac_pj: float = Field(0.390625, ge=0, description="Energy of one 1-bit DAC drive of a row (pJ).")
    dac_um2: float = Field(0.166015625, ge=0, description="Area of one 1-bit DAC (um^2).")
    cell_pj: float = Field(0.0018310546875, ge=0, description="Energy of one cell read (pJ).")
    cell_um2: float = Field(0.00152587890625, ge=0, description="Area of one cell (um^2).")
    read_ns: float = Field(100.0, gt=0, description="Time of one array read (ns).")
    sample_hold_pj: float = Field(0.0009765625, ge=0, description="Energy of one sample-and-hold (pJ).")
    sample_hold_um2: float = Field(0.0390625, ge=0, description="Area of one sample-and-hold, one per column (um^2).")
    shift_add_pj: float = Field(0.01953125, ge=0, description="Energy of one shift-and-add, per conversion (pJ).")
    shift_add_um2: float = Field(60.0, ge=0, description="Area of one shift-and-add unit, one per two ADCs (um^2).")
    input_register_pj: float = Field(0.12109375, ge=0, description="Energy of one input-register bit read (pJ).")
    input_register_um2: float = Field(262.5, ge=0, description="Input register area per array of `ref_rows` rows "
                                                               "(um^2).")
    output_register_pj: float = Field(0.0224609375, ge=0, description="Energy of one output-register write, per "
                                                                      "conversion (pJ).")
    output_register_um2: float = Field(96.25, ge=0, description="Output register area per array of `ref_cols` "
                                                                "columns (um^2).")
    ref_rows: int = Field(128, ge=1, description="Rows of the array the register areas are given for.")
    ref_cols: int = Field(128, ge=1, description="Columns of the array the register areas are given for.")
    tile_pj_per_bit: float = Field(0.332438151, ge=0, description="Tile buffers, bus, router and units: energy per "
                                                                  "input bit fed to the arrays (pJ).")
    tile_um2: float = Field(214900.0, ge=0, description="Area of a tile's buffers, bus, router and units (um^2).")
    arrays_per_core: int = Field(8, ge=1, description="Arrays per core (ISAAC's IMA).")
    cores_per_tile: int = Field(12, ge=1, description="Cores per tile.")
    chip_mw: float = Field(10400.0, ge=0, description="Chip-level power outside the tiles (links) (mW).")
    chip_um2: float = Field(22.88e6, ge=0, description="Chip-level area outside the tiles (um^2).")


#: Component tables by name. ``isaac``: Shafiee et al., "ISAAC: A Convolutional Neural Network Accelerator with
#: In-Situ Analog Arithmetic in Crossbars", ISCA 2016, Table I (each energy: the table's power over the action's
#: rate at peak; see the module docstring).
COST_PRESETS: dict[str, ComponentTable] = {"isaac": ComponentTable()}


class _Spec(Protocol):
    rows: int
    cols: int
    adc_bits: int
    dac_bits: int
    cols_per_adc: int


class _Layer(Protocol):
    name: str
    mvms: int
    input_steps: int
    arrays: int
    tiles: list[dict[str, int]]
    shares: str | None  # the layer whose arrays it reads: its own area is none


@dataclass(frozen=True)
class LayerCost:
    """One layer's energy per inference (pJ, by component), latency (ns) and area (um^2, its arrays; none where it
    reads another layer's)."""

    name: str
    energy_pj: dict[str, float]
    latency_ns: float
    area_um2: float

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_pj": self.total_pj}


@dataclass(frozen=True)
class NetworkCost:
    """The network's cost on the crossbars: per layer and totals (layers one after another)."""

    table: str
    layers: list[LayerCost]
    tiles: int
    tile_um2: float

    @property
    def energy_pj(self) -> dict[str, float]:
        return {c: sum(layer.energy_pj[c] for layer in self.layers) for c in COMPONENTS}

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())

    @property
    def latency_ns(self) -> float:
        return sum(layer.latency_ns for layer in self.layers)

    @property
    def area_mm2(self) -> float:
        return (sum(layer.area_um2 for layer in self.layers) + self.tiles * self.tile_um2) / 1e6

    def summary(self) -> str:
        return (f"{self.total_pj / 1e6:.3f} uJ per inference ({self.table}), latency {self.latency_ns / 1e3:.1f} us, "
                f"area {self.area_mm2:.3f} mm2 ({self.tiles} tiles)")

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "energy_pj": self.energy_pj, "total_pj": self.total_pj,
                "latency_ns": self.latency_ns, "area_mm2": self.area_mm2, "tiles": self.tiles,
                "layers": [layer.to_json() for layer in self.layers]}


def _adc_scale(table: ComponentTable, bits: int) -> float:
    return table.adc_growth ** (bits - table.adc_bits)


def cycle_ns(spec: _Spec, table: ComponentTable) -> float:
    """One bit-serial cycle: the array read, or the conversions of the columns sharing an ADC if longer."""
    return max(table.read_ns, spec.cols_per_adc / table.adc_gsps)


def array_um2(spec: _Spec, table: ComponentTable) -> float:
    """One array of ``spec`` with its periphery and its share of the core's registers."""
    adcs = math.ceil(spec.cols / spec.cols_per_adc)
    levels = 2 ** spec.dac_bits - 1
    return (spec.rows * spec.cols * table.cell_um2 + adcs * table.adc_um2 * _adc_scale(table, spec.adc_bits)
            + spec.rows * table.dac_um2 * levels + spec.cols * table.sample_hold_um2
            + adcs / 2 * table.shift_add_um2 + table.input_register_um2 * spec.rows / table.ref_rows
            + table.output_register_um2 * spec.cols / table.ref_cols)


def layer_cost(layer: _Layer, spec: _Spec, table: ComponentTable) -> LayerCost:
    """The actions of ``layer``'s tiles per inference, priced by ``table`` (see the module docstring)."""
    cycles = layer.mvms * layer.input_steps
    rows = sum(t["rows"] for t in layer.tiles)
    cols = sum(t["cols"] for t in layer.tiles)
    cells = sum(t["rows"] * t["cols"] for t in layer.tiles)
    conversions = cycles * cols
    input_bits = cycles * rows * spec.dac_bits
    energy = {"adc": conversions * table.adc_pj * _adc_scale(table, spec.adc_bits),
              "dac": cycles * rows * table.dac_pj * (2 ** spec.dac_bits - 1),
              "cells": cycles * cells * table.cell_pj,
              "sample_hold": conversions * table.sample_hold_pj,
              "shift_add": conversions * table.shift_add_pj,
              "input_register": input_bits * table.input_register_pj,
              "output_register": conversions * table.output_register_pj,
              "tile": input_bits * table.tile_pj_per_bit}
    area = 0.0 if layer.shares else layer.arrays * array_um2(spec, table)
    return LayerCost(layer.name, energy, cycles * cycle_ns(spec, table), area)


def network_cost(layers: Sequence[_Layer], spec: _Spec, table: ComponentTable) -> NetworkCost:
    """Every layer's cost, and the tiles that hold the network's arrays."""
    arrays = sum(layer.arrays for layer in layers if not layer.shares)
    tiles = math.ceil(arrays / (table.arrays_per_core * table.cores_per_tile))
    return NetworkCost(table.name, [layer_cost(layer, spec, table) for layer in layers], tiles, table.tile_um2)


@dataclass(frozen=True)
class Peak:
    """Power and area of a whole accelerator of ``tiles`` tiles, every array busy."""

    tile_mw: float
    tile_mm2: float
    chip_w: float
    chip_mm2: float


@dataclass(frozen=True)
class _FullArray:
    """One array, every cell used, for one cycle."""

    name: str
    tiles: list[dict[str, int]]
    mvms: int = 1
    input_steps: int = 1
    arrays: int = 1
    shares: str | None = None


def peak(spec: _Spec, table: ComponentTable, tiles: int) -> Peak:
    """Every array of every core of ``tiles`` tiles converting each cycle: the power and area of the chip, from
    the same per-action energies and counts as :func:`layer_cost` (compare with the paper's totals)."""
    one = layer_cost(_FullArray("peak", [{"rows": spec.rows, "cols": spec.cols}]), spec, table)
    arrays = table.arrays_per_core * table.cores_per_tile
    tile_mw = arrays * one.total_pj / cycle_ns(spec, table)  # pJ per ns = mW
    tile_um2 = arrays * array_um2(spec, table) + table.tile_um2
    return Peak(tile_mw=tile_mw, tile_mm2=tile_um2 / 1e6, chip_w=(tiles * tile_mw + table.chip_mw) / 1e3,
                chip_mm2=(tiles * tile_um2 + table.chip_um2) / 1e6)
