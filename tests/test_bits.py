"""Bit widths and calibration algorithms, end to end: integer value sets, ranges, output error, scales."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from maptools import quantize, read_manifest, read_quantinfo, read_quantparams
from maptools.calibration import RandomCalibration
from tests.conftest import initializers

SHAPES = {"input": (1, 3, 32, 32)}
STEPS = 8


@pytest.fixture(scope="module")
def graph_for(small_cnn: Path) -> Callable[..., object]:
    """PPQ's quantized graph of small_cnn for (bits, algorithm), built once per module."""
    from maptools.quantization import ppq_adapter as _ppq
    from maptools.settings import QuantSettings

    cache: dict[tuple[int, str], object] = {}
    calib = RandomCalibration(SHAPES, STEPS)

    def build(bits: int, algorithm: str = "percentile") -> object:
        if (bits, algorithm) not in cache:
            # signed ranges: the widths compare on one kind of grid (test_accuracy_modes covers 'auto')
            settings = QuantSettings(weight_bits=bits, activation_bits=bits, calib_steps=STEPS, algorithm=algorithm,
                                     activation_sign="signed")
            cache[bits, algorithm] = _ppq.quantize_graph(small_cnn, calib, STEPS, next(iter(calib)), settings, "cpu")
        return cache[bits, algorithm]

    return build


def output_error(graph, model: Path) -> float:
    """||quantized - float|| / ||float|| over 8 seeded inputs: PPQ's simulation vs onnxruntime's float model."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(123)
    xs = [torch.randn(*SHAPES["input"], generator=gen) for _ in range(8)]
    q = np.concatenate([graph.run({"input": x})["output"].ravel() for x in xs])
    f = np.concatenate([session.run(None, {"input": x.numpy()})[0].ravel() for x in xs])
    return float(np.linalg.norm(q - f) / np.linalg.norm(f))


def test_fewer_bits_give_coarser_integers_and_larger_error(graph_for, small_cnn) -> None:
    errors, distinct = {}, {}
    for bits in (8, 6, 4):
        graph = graph_for(bits)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        info = graph.quantinfo()
        assert all((c.io_bits, c.io_min, c.io_max) == (bits, lo, hi) for c in info.values())
        weights = [v for k, v in graph.quantparams(info).items() if k.endswith("_weight")]
        values = np.unique(np.concatenate([w.ravel() for w in weights]))
        assert values.min() >= lo and values.max() <= hi
        assert len(values) > (hi - lo + 1) // 2, f"{bits} bits use only {len(values)} weight values"
        distinct[bits] = len(values)
        # every quantized activation sits on its grid: at most 2**bits levels (a Conv's or an Add's own output
        # is not quantized where a Relu after it is: they are fused)
        outputs = {n.name: n.output[0] for n in onnx.load(str(small_cnn)).graph.node}
        gen = torch.Generator().manual_seed(5)
        values = graph.tensor_values({"input": torch.randn(4, *SHAPES["input"][1:], generator=gen)})
        gridded = [(values[outputs[n]], c.output_scale) for n, c in info.items()
                   if c.output_scale is not None and c.op_type not in ("Conv", "Add")]
        assert len(gridded) >= 5
        for value, scale in gridded:
            codes = value / scale
            np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)
            assert np.rint(codes).min() >= lo and np.rint(codes).max() <= hi
        errors[bits] = output_error(graph, small_cnn)
    assert distinct[8] > distinct[6] > distinct[4]
    assert errors[8] < errors[6] < errors[4], errors
    assert errors[8] < 0.05, errors


def test_four_bit_artifacts_and_manifest(small_cnn, tmp_path) -> None:
    result = quantize(SHAPES, "cpu", small_cnn, mapname="w4", calib_steps=STEPS, bit_width=4, algorithm="minmax",
                      output_root=tmp_path, profile="extended")
    info = read_quantinfo("w4", tmp_path)
    params = read_quantparams("w4", tmp_path)
    assert all(c.io_bits == 4 and (c.io_min, c.io_max) in {(-8, 7), (0, 15)} for c in info.values())
    assert {c.out_range for c in info.values() if c.output_scale} == {(-8, 7), (0, 15)}  # unsigned after Relu
    for name, cfg in info.items():
        if cfg.has_weights:
            w = params[f"{name}_{cfg.op_type.lower()}_weight"]
            assert (cfg.weight_bits, cfg.weight_min, cfg.weight_max) == (4, -8, 7)
            assert w.min() >= -8 and w.max() <= 7 and len(np.unique(w)) > 8
    manifest = read_manifest("w4", tmp_path)
    assert manifest["onnx_export_exact"] is True and manifest["settings"]["weight_bits"] == 4
    assert manifest["notes"] == list(result.notes)


def test_separate_weight_and_activation_bits(small_cnn, tmp_path) -> None:
    quantize(SHAPES, "cpu", small_cnn, mapname="w6a8", calib_steps=STEPS, weight_bits=6, algorithm="minmax",
             output_root=tmp_path)
    info = read_quantinfo("w6a8", tmp_path)
    assert all((c.io_min, c.io_max) in {(-128, 127), (0, 255)} for c in info.values())
    assert {(c.weight_min, c.weight_max) for c in info.values() if c.has_weights} == {(-32, 31)}


def test_algorithm_choice_changes_the_scales(graph_for) -> None:
    scales = {alg: {n: c.output_scale for n, c in graph_for(8, alg).quantinfo().items() if c.output_scale}
              for alg in ("percentile", "minmax", "kl", "mse")}
    assert len({tuple(s.values()) for s in scales.values()}) >= 3, scales
    # percentile clips the outliers that minmax keeps
    assert all(scales["percentile"][n] <= scales["minmax"][n] * (1 + 1e-6) for n in scales["minmax"])
    assert scales["percentile"] != scales["minmax"] != scales["kl"]


def test_per_tensor_weights_have_one_scale(small_cnn, tmp_path) -> None:
    quantize(SHAPES, "cpu", small_cnn, mapname="pt", calib_steps=8, per_channel=False, output_root=tmp_path)
    info, params = read_quantinfo("pt", tmp_path), read_quantparams("pt", tmp_path)
    nodes = initializers(small_cnn)
    weighted = [n for n, c in info.items() if c.op_type in {"Conv", "Gemm"}]
    assert weighted
    for name in weighted:
        cfg = info[name]
        assert cfg.weight_scale.shape == (1,)
        w_int = params[f"{name}_{cfg.op_type.lower()}_weight"]
        w_float = nodes[name][1][1]
        assert w_int.min() >= cfg.weight_min and w_int.max() <= cfg.weight_max
        assert np.abs(w_int).max() == cfg.weight_max or np.abs(w_int).max() == -cfg.weight_min
        assert np.all(np.abs(w_int * float(cfg.weight_scale[0]) - w_float) <= cfg.weight_scale[0] / 2 + 1e-6)


def test_quant_model_adds_the_biases_the_device_adds(tmp_path) -> None:
    """A bias reaches the crossbar as an int32 code at input scale x weight scale; quant_model.onnx had kept the
    float bias, 0.03% from the integer simulation at 8 bits and 1.9% at 4 on this two-Conv model with biases. It
    now adds the code times that scale, and the two agree to float rounding at every width."""
    from onnx import TensorProto, helper, numpy_helper

    from maptools import convert, simulate

    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.3, (16, 3, 3, 3)), "b1": rng.normal(0, 1.0, 16),
             "w2": rng.normal(0, 0.1, (8, 16, 3, 3)), "b2": rng.normal(0, 1.0, 8)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    path = tmp_path / "biased.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    calib = [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(12)]
    for bits in (8, 4):
        result = quantize({"x": [1, 3, 16, 16]}, "cpu", path, mapname=f"b{bits}", calibset=calib[:8], calib_steps=8,
                          output_root=tmp_path, bit_width=bits, algorithm="minmax", error_steps=0)
        convert(f"b{bits}", output_root=tmp_path)
        session = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"])
        for x in calib[8:]:
            exported, simulated = session.run(None, x)[0], simulate(f"b{bits}", x, output_root=tmp_path).outputs["y"]
            assert np.linalg.norm(exported - simulated) / np.linalg.norm(simulated) < 1e-5, bits
