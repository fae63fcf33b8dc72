"""The cost model: the ISAAC component table gives back the paper's totals, and a layer's energy and latency
follow from its tiles by hand."""

from __future__ import annotations

import json

import pytest

from maptools import read_quantparams
from maptools.conversion import read_graph
from maptools.crossbar.cost import COST_PRESETS, COMPONENTS, array_um2, peak
from maptools.crossbar.mapping import CROSSBAR_FILE, CrossbarSpec, map_crossbars, map_graph
from maptools.errors import SettingsError

ISAAC = COST_PRESETS["isaac"]
#: ISAAC's organisation: 128x128 arrays of 2-bit cells, 1-bit DACs, one 8-bit ADC per array (128 columns)
ISAAC_SPEC = CrossbarSpec(rows=128, cols=128, cell_bits=2, adc_bits=8, dac_bits=1, cols_per_adc=128)


def test_the_isaac_preset_gives_back_the_papers_totals() -> None:
    """Shafiee et al., ISCA 2016, Table I: a tile of 12 IMAs of 8 arrays draws 330 mW on 0.372 mm2; the chip of
    168 tiles (with its HyperTransport links) 65.8 W on 85.4 mm2. The model's counts and timing, priced with the
    table, must land within 10%."""
    totals = peak(ISAAC_SPEC, ISAAC, tiles=168)
    for got, paper in ((totals.tile_mw, 330.0), (totals.tile_mm2, 0.372), (totals.chip_w, 65.8),
                       (totals.chip_mm2, 85.4)):
        assert got == pytest.approx(paper, rel=0.10), (got, paper)
    # one ADC per column instead of one per array: 128x the ADCs, the same conversions in a cycle of one read
    shared = peak(ISAAC_SPEC.replace(cols_per_adc=1), ISAAC, tiles=168)
    assert shared.tile_mm2 > 10 * totals.tile_mm2 and shared.tile_mw == pytest.approx(totals.tile_mw)


def test_a_layers_energy_and_latency_follow_from_its_tiles(conv_maps) -> None:
    graph, params = read_graph("dense", conv_maps), read_quantparams("dense", conv_maps)
    spec = CrossbarSpec(rows=32, cols=32, cell_bits=2, adc_bits=8)
    mapped = map_graph(graph, params, spec)
    conv, cost = next((lay, c) for lay, c in zip(mapped.layers, mapped.cost.layers) if lay.name == "conv")
    # 180 rows x 320 physical columns on 6 x 10 arrays, 8 cycles x 64 products: every used column converts each cycle
    conversions = conv.cycles * 10 * 6 * 32
    assert cost.energy_pj["adc"] == pytest.approx(conversions * ISAAC.adc_pj)
    assert cost.energy_pj["dac"] == pytest.approx(conv.cycles * 180 * 10 * ISAAC.dac_pj)
    assert cost.energy_pj["cells"] == pytest.approx(conv.cycles * 180 * 320 * ISAAC.cell_pj)
    assert cost.latency_ns == conv.cycles * ISAAC.read_ns and cost.area_um2 == 60 * array_um2(spec, ISAAC)
    # a 4-bit ADC costs 2^-4 of the energy per conversion; sharing one ADC by 32 columns takes 32 / 1.28 ns a cycle
    small = map_graph(graph, params, spec.replace(adc_bits=4, cols_per_adc=32)).cost
    small_conv = next(c for c in small.layers if c.name == "conv")
    assert small_conv.energy_pj["adc"] == pytest.approx(cost.energy_pj["adc"] / 16)
    assert small_conv.energy_pj["dac"] == cost.energy_pj["dac"]
    assert small_conv.latency_ns == pytest.approx(conv.cycles * max(ISAAC.read_ns, 32 / ISAAC.adc_gsps))
    assert mapped.cost.total_pj == pytest.approx(sum(c.total_pj for c in mapped.cost.layers))
    assert set(cost.energy_pj) == set(COMPONENTS)


def test_crossbar_map_json_carries_the_cost_and_bad_sharing_is_refused(conv_maps) -> None:
    mapped = map_crossbars("dense", CrossbarSpec(rows=32, cols=32, cols_per_adc=8), output_root=conv_maps)
    written = json.loads((conv_maps / "mapsave" / "dense" / CROSSBAR_FILE).read_text())
    assert written["spec"]["cols_per_adc"] == 8
    assert mapped.cost.total_pj > 0 and written["cost"]["total_pj"] == pytest.approx(mapped.cost.total_pj)
    assert [lay["name"] for lay in written["cost"]["layers"]] == [lay.name for lay in mapped.layers]
    for share in (3, 64, 0):
        with pytest.raises(SettingsError, match="cols_per_adc"):
            CrossbarSpec(rows=32, cols=32, cols_per_adc=share)
