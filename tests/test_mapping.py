"""The map stage: tiling and slicing counts, and the crossbar simulation against the integer one."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools import quantize, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.errors import ArtifactError, SettingsError
from maptools.crossbar.mapping import CROSSBAR_FILE, CrossbarSimulator, CrossbarSpec, map_crossbars, map_graph
from maptools.simulate import IntegerSimulator


@pytest.fixture(scope="module")
def conv_maps(tmp_path_factory: pytest.TempPathFactory):
    """A 3x3 conv with 20 inputs and 40 outputs (its input is the signed graph input), and a depthwise one."""
    root = tmp_path_factory.mktemp("xbar")
    rng = np.random.default_rng(0)
    for name, group, cin in (("dense", 1, 20), ("depthwise", 16, 16)):
        cout = 40 if group == 1 else 16
        w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["output"], name="head")],
            "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, 8, 8])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
            [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.standard_normal((4, cout, 1, 1)).astype(np.float32), "w2")])
        path = root / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        quantize({"input": [1, cin, 8, 8]}, "cpu", path, mapname=name, calib_steps=8, output_root=root,
                 profile="extended")  # the head reads an unsigned Relu output
        convert(name, output_root=root)
    return root


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
    x = images.numpy()
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
        full = CrossbarSimulator(graph, params, lossy, collect_psums=True).run({"input": x[:64]}).outputs["output"]
        np.testing.assert_array_equal(fast, full)


def test_lossless_crossbar_equals_the_integer_simulation_on_resnet18(resnet_result) -> None:
    torch.set_num_threads(1)
    root = resnet_result.output_root
    convert("resnet18", output_root=root)
    graph, params = read_graph("resnet18", root), read_quantparams("resnet18", root)
    x = np.random.default_rng(3).standard_normal((8, 3, 224, 224)).astype(np.float32)
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
