"""The map stage: tiling and slicing counts, and the crossbar simulation against the integer one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from maptools import quantize, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.errors import ArtifactError, SettingsError
from maptools.crossbar.mapping import CROSSBAR_FILE, CrossbarSimulator, CrossbarSpec, map_crossbars, map_graph
from maptools.simulate import IntegerSimulator, simulate


def test_counts_match_a_hand_computation(conv_maps) -> None:
    spec = CrossbarSpec(rows=32, cols=32, cell_bits=2, adc_bits=8)
    result = map_graph(read_graph("dense", conv_maps), read_quantparams("dense", conv_maps), spec)
    conv = next(layer for layer in result.layers if layer.name == "conv")
    # rows 20*3*3 = 180 -> 6 blocks of 32; 40 columns x 4 slices (8 bits / 2) x 2 (differential) = 320 -> 10
    assert (conv.rows, conv.cols, conv.slices, conv.physical_cols) == (180, 40, 4, 320)
    assert (conv.row_blocks, conv.col_blocks, conv.arrays) == (6, 10, 60)
    assert conv.cells_used == 180 * 320 and conv.utilization == pytest.approx(57600 / (60 * 1024))
    # a signed 8-bit input: 7 bits one at a time and the sign bit: 8 cycles per product, 64 products
    assert (conv.input_signed, conv.input_steps, conv.mvms, conv.cycles) == (True, 8, 64, 512)
    assert conv.psum_worst == 32 * 3 * 1 and conv.adc_bits_needed == 7 and len(conv.tiles) == 60
    head = next(layer for layer in result.layers if layer.name == "head")  # reads the unsigned Relu output
    assert (head.input_signed, head.input_steps, head.rows, head.arrays) == (False, 8, 40, 2 * 1)
    offset = map_graph(read_graph("dense", conv_maps), read_quantparams("dense", conv_maps),
                       CrossbarSpec(rows=32, cols=32, cell_bits=4, encoding="offset"))
    conv = next(layer for layer in offset.layers if layer.name == "conv")
    assert (conv.slices, conv.physical_cols, conv.col_blocks, conv.arrays) == (2, 80, 3, 18)
    assert offset.arrays == sum(layer.arrays for layer in offset.layers) and offset.to_json()["totals"]["arrays"] == 20


def test_layers_holding_the_same_weights_share_their_arrays(tmp_path) -> None:
    """An unrolled loop's iterations (tf2onnx's ``while`` running one convolution twice) hold the same integer
    weights: the second reads the first's arrays (layers run one after another), so they count once in the
    arrays, cells and area, and with non-ideal cells both read the same cells."""
    import onnx

    from maptools.crossbar.cost import COST_PRESETS, array_um2
    from maptools.crossbar.device import DeviceModel
    from tests.exporters import IDIOMS

    model, shapes = IDIOMS["tf_while_loop"]()
    onnx.save(model, str(tmp_path / "loop.onnx"))
    quantize(shapes, "cpu", tmp_path / "loop.onnx", mapname="loop", calib_steps=8, output_root=tmp_path, error_steps=0)
    convert("loop", output_root=tmp_path)
    graph, quantparams = read_graph("loop", tmp_path), read_quantparams("loop", tmp_path)
    spec = CrossbarSpec(rows=32, cols=32, cell_bits=2)
    result = map_graph(graph, quantparams, spec)
    shared = [layer for layer in result.layers if layer.shares]
    assert len(shared) == 1 and shared[0].name.endswith("iteration1") and shared[0].shares.endswith("iteration0")
    owner = next(layer for layer in result.layers if layer.name == shared[0].shares)
    assert shared[0].arrays == owner.arrays > 0
    assert result.arrays == sum(layer.arrays for layer in result.layers) - owner.arrays
    assert result.cells_used == sum(layer.cells_used for layer in result.layers) - owner.cells_used
    cost = result.cost
    assert cost.area_mm2 * 1e6 == pytest.approx(result.arrays * array_um2(spec, COST_PRESETS["isaac"])
                                                + cost.tiles * cost.tile_um2)
    assert next(c for c in cost.layers if c.name == shared[0].name).total_pj > 0  # it still computes
    simulator = CrossbarSimulator(graph, quantparams, spec, device=DeviceModel(programming_noise=0.05))
    simulator.run({"x": np.random.default_rng(0).standard_normal(shapes["x"]).astype(np.float32)})
    assert {name for name, _ in simulator._states} == {owner.name, *(layer.name for layer in result.layers
                                                                     if layer.name not in (owner.name, shared[0].name))}
    # the simulator holds their matrix and its stored blocks once (an OCR's LSTM unrolled 256 steps had held 256
    # copies: 6.5 GB to map one sample)
    assert simulator.matrices[shared[0].name] is simulator.matrices[owner.name]
    assert {key[0] for key in simulator._weights} == {layer.name for layer in result.layers if not layer.shares}


def test_depthwise_wastes_most_of_an_array(conv_maps) -> None:
    result = map_graph(read_graph("depthwise", conv_maps), read_quantparams("depthwise", conv_maps),
                       CrossbarSpec(rows=32, cols=32, cell_bits=2))
    conv = next(layer for layer in result.layers if layer.name == "conv")
    assert (conv.groups, conv.rows, conv.cols, conv.arrays) == (16, 9, 1, 16)
    assert conv.utilization == pytest.approx(9 * 8 / 1024)  # 7% of each array


@pytest.mark.parametrize("encoding", ["differential", "offset"])
def test_lossless_crossbar_equals_the_integer_simulation(encoding, trained_cnn, tmp_path) -> None:
    from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx

    model, images, labels = trained_cnn
    path = small_cnn_onnx(tmp_path / "digits.onnx", model=model)
    calib = [{"input": images[i:i + 1]} for i in range(16)]
    quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="d", calibset=calib, calib_steps=16, output_root=tmp_path)
    convert("d", output_root=tmp_path)
    graph, params = read_graph("d", tmp_path), read_quantparams("d", tmp_path)
    x = images.numpy()[:128]  # every tensor of 128 test digits, code for code
    reference = IntegerSimulator(graph, params).run({"input": x}, keep=True)
    spec = CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=12, encoding=encoding)
    crossbar = CrossbarSimulator(graph, params, spec, collect_psums=True).run({"input": x}, keep=True)
    assert reference.codes.keys() == crossbar.codes.keys()
    for tensor, codes in reference.codes.items():
        np.testing.assert_array_equal(codes, crossbar.codes[tensor], err_msg=tensor)
    np.testing.assert_allclose(crossbar.outputs["output"], reference.outputs["output"], rtol=0, atol=0)
    # a 4-bit ADC saturates partial sums: the network computes something else
    coarse = CrossbarSimulator(graph, params, CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=4,
                                                           encoding=encoding)).run({"input": x})
    assert (coarse.outputs["output"].argmax(1) != reference.outputs["output"].argmax(1)).mean() > 0.05
    # the fast path (bit by bit only where a partial sum may saturate) reads what the full one reads
    for adc_bits in (4, 6):
        lossy = CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=adc_bits, encoding=encoding)
        fast = CrossbarSimulator(graph, params, lossy).run({"input": x[:64]}).outputs["output"]
        full = CrossbarSimulator(graph, params, lossy, collect_histograms=True).run({"input": x[:64]}).outputs["output"]
        np.testing.assert_array_equal(fast, full)


def test_lossless_crossbar_equals_the_integer_simulation_on_resnet18(resnet_result) -> None:
    torch.set_num_threads(1)
    root = resnet_result.output_root
    convert("resnet18", output_root=root)
    graph, params = read_graph("resnet18", root), read_quantparams("resnet18", root)
    x = np.random.default_rng(3).standard_normal((4, 3, 224, 224)).astype(np.float32)
    reference = IntegerSimulator(graph, params).run({"input": x}, keep=True)
    # every partial sum read bit by bit and slice by slice, by a 10-bit ADC (worst case 256 * 3 = 768)
    spec = CrossbarSpec(rows=256, cols=256, cell_bits=2, adc_bits=10)
    crossbar = CrossbarSimulator(graph, params, spec, collect_psums=True).run({"input": x}, keep=True)
    assert all(np.array_equal(reference.codes[t], crossbar.codes[t]) for t in reference.codes)


def test_map_crossbars_writes_a_registered_file_and_refuses_bad_specs(conv_maps, tmp_path) -> None:
    result = map_crossbars("dense", CrossbarSpec(rows=32, cols=32, cell_bits=2, adc_bits=8), output_root=conv_maps)
    from maptools.maps.artifacts import MapFolder

    version = MapFolder("dense", conv_maps).open()
    assert CROSSBAR_FILE in version.verify()["artifacts"]
    data = json.loads(version.file(CROSSBAR_FILE).read_text())
    assert data["totals"]["arrays"] == result.arrays == 62
    assert all(layer["psum_observed"] is not None and layer["psum_observed"] <= layer["psum_worst"]
               for layer in data["layers"])
    assert result.notes == data["notes"] == []  # an 8-bit ADC reads 32 rows of 2-bit cells whole
    # a 4-bit one saturates, and the map says so (it had said nothing while a network's outputs went wrong)
    narrow = map_crossbars("dense", CrossbarSpec(rows=32, cols=32, cell_bits=2, adc_bits=4), output_root=conv_maps)
    over = [layer for layer in narrow.layers if layer.adc_bits_observed > 4]
    assert over and len(narrow.notes) == 1 and narrow.notes[0].startswith(
        f"{len(over)} of {len(narrow.layers)} layers saturate their ADCs"), narrow.notes
    assert f"adc_bits={max(layer.adc_bits_observed for layer in over)}" in narrow.notes[0]
    assert json.loads(MapFolder("dense", conv_maps).open().file(CROSSBAR_FILE).read_text())["notes"] == narrow.notes
    assert map_crossbars("dense", CrossbarSpec(rows=32, cols=32, cell_bits=2, adc_bits=4, adc_range="calibrated"),
                         output_root=conv_maps).notes == []
    for bad in (dict(rows=100), dict(cols=0), dict(adc_bits=0), dict(cell_bits=9), dict(encoding="twos")):
        with pytest.raises(SettingsError):
            CrossbarSpec(**bad)
    with pytest.raises(SettingsError, match="budget is 10"):
        map_crossbars("dense", CrossbarSpec(rows=32, cols=32, max_arrays=10), output_root=conv_maps)
    quantize({"input": [1, 20, 8, 8]}, "cpu", conv_maps / "dense.onnx", mapname="raw", calib_steps=8,
             output_root=tmp_path)
    with pytest.raises(ArtifactError, match="convert --mapname raw"):
        map_crossbars("raw", CrossbarSpec(), output_root=tmp_path)
    assert math.isfinite(result.utilization)


def _reference_mvm(x: np.ndarray, matrix: np.ndarray, wbits: int, ibits: int, signed: bool, spec: CrossbarSpec,
                   steps: tuple[int, ...]) -> np.ndarray:
    """A crossbar layer written out loop by loop (one row block, differential): per input bit and cell slice,
    each column's partial sum read by an ADC in that slice's step, then shifted and added."""
    limit = 2 ** spec.adc_bits - 1
    u = np.where(x < 0, x + 2 ** ibits, x) if signed else x
    out = np.zeros((x.shape[0], matrix.shape[1]))
    for sign, part in ((1, np.clip(matrix, 0, None)), (-1, np.clip(-matrix, 0, None))):
        for t in range(ibits):
            bit = (u >> t) & 1
            chunk_weight = -(2 ** t) if signed and t == ibits - 1 else 2 ** t
            for k, start in enumerate(range(0, wbits, spec.cell_bits)):
                cells = (part >> start) & (2 ** spec.cell_bits - 1)
                psum = bit @ cells
                step = steps[k] if steps else 1
                read = np.minimum(np.floor(psum / step + 0.5), limit) * step
                out += sign * chunk_weight * (2 ** start) * read
    return out


def test_a_calibrated_adc_range_reads_each_slice_in_power_of_two_steps(trained_cnn, tmp_path) -> None:
    from maptools.crossbar.mapping import adc_shifts
    from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx

    model, images, labels = trained_cnn
    path = small_cnn_onnx(tmp_path / "digits.onnx", model=model)
    quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="d", calibset=[{"input": images[i:i + 1]} for i in range(16)],
             calib_steps=16, output_root=tmp_path)
    convert("d", output_root=tmp_path)
    graph, params = read_graph("d", tmp_path), read_quantparams("d", tmp_path)
    calibration, x = {"input": images[:16].numpy()}, images[16:144].numpy()
    spec = CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=4, adc_range="calibrated")
    shifts = adc_shifts(graph, params, spec, calibration)
    assert shifts and all(len(s) == 4 for s in shifts.values())  # 8-bit weights in 2-bit cells: 4 slices
    # the least significant slices get the coarsest steps, the most significant the finest
    assert all(s[0] >= s[-1] for s in shifts.values())

    # the simulator reads exactly what a loop-by-loop crossbar reads, on the head (32 rows: one block)
    sim = spec.simulator(graph, params, calibration=calibration)
    assert sim.adc_shifts == shifts
    head = next(n for n in graph.operators() if graph.node(n)["op_type"] == "Gemm")
    cfg = graph.node(head)["quant"]
    codes = IntegerSimulator(graph, params).run({"input": x[:16]}, keep=True).codes[graph.node(head)["inputs"][0]]
    lo, hi = cfg.in_range(0)
    ibits = int(math.ceil(math.log2(hi - lo + 1)))
    got = sim._mvm(head, torch.from_numpy(codes.astype(np.int64))[None], cfg)[0].numpy()
    matrix = sim.matrices[head][0].numpy()
    want = _reference_mvm(codes.astype(np.int64), matrix, int(cfg.weight_bits), ibits, lo < 0, spec,
                          tuple(2 ** k for k in shifts.get(head, ())))
    np.testing.assert_array_equal(got, want)
    # simulate() fits the ADC range to the user's calibration inputs too (it had fitted it to random ones only)
    fitted = simulate("d", {"input": x[:8]}, output_root=tmp_path, crossbar=spec, calibration=calibration)
    np.testing.assert_array_equal(fitted.outputs["output"], sim.run({"input": x[:8]}).outputs["output"])
    with pytest.raises(SettingsError, match="crossbar= only"):
        simulate("d", {"input": x[:8]}, output_root=tmp_path, calibration=calibration)

    # a 4-bit ADC over 64 rows of 2-bit cells: the full range saturates, the calibrated one keeps the network
    reference = IntegerSimulator(graph, params).run({"input": x}).outputs["output"].argmax(1)
    agree = {}
    full = CrossbarSimulator(graph, params, CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=4))
    for adc_range, simulator in (("full", full), ("calibrated", sim)):
        agree[adc_range] = (simulator.run({"input": x}).outputs["output"].argmax(1) == reference).mean()
    assert agree["calibrated"] > 0.85 and agree["calibrated"] > agree["full"] + 0.2, agree
    # an ADC that reads every partial sum needs no step: the integer path, code for code
    wide = CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=12, adc_range="calibrated")
    assert adc_shifts(graph, params, wide, calibration) == {}
    with pytest.raises(SettingsError, match="adc_range"):
        CrossbarSpec(adc_range="auto")


def test_each_stage_reads_one_version_of_the_map(conv_maps, monkeypatch) -> None:
    """simulate, map_crossbars and evaluate_crossbar resolve the map's current version once and read every file
    from it, so a rewrite in between cannot hand one stage files of two versions."""
    from maptools import MapRef, evaluate_crossbar, simulate
    from maptools.maps.folder import MapFolder

    opened: list[str] = []
    real_open = MapFolder.open
    monkeypatch.setattr(MapFolder, "open", lambda self: opened.append(self.mapname) or real_open(self))
    ref, spec = MapRef("dense", conv_maps), CrossbarSpec(rows=32, cols=32, cell_bits=2, adc_bits=6)
    for stage in (lambda: simulate(ref, "random"), lambda: evaluate_crossbar(ref, spec, samples=2)):
        opened.clear()
        stage()
        assert opened == ["dense"], opened
    opened.clear()
    map_crossbars(ref, spec)
    assert opened.count("dense") == 2, opened  # the read, and the write's own check of what it was based on
