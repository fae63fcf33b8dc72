"""Outlier channels of a lookup table's output, rescaled into the convolution that reads them
(:mod:`maptools.quantization.equalize`): the same float function, a finer grid for the other channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools import quantize
from maptools.quantization.equalize import equalize_channels


def _affine_model() -> onnx.ModelProto:
    """conv -> hard-swish -> per-channel affine (2 of 16 channels ten times the others) -> conv -> conv."""
    rng = np.random.default_rng(2)
    gain = np.ones((16, 1, 1), np.float32)
    gain[[3, 11]] = 12.0
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)) * 0.4, "w2": rng.standard_normal((16, 16, 1, 1)) * 0.25,
             "w3": rng.standard_normal((4, 16, 1, 1)) * 0.25, "gain": gain, "shift": rng.standard_normal((16, 1, 1)) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["a"], ["h"], name="hswish"),
             helper.make_node("Mul", ["h", "gain"], ["g"], name="gain"),
             helper.make_node("Add", ["g", "shift"], ["s"], name="shift"),
             helper.make_node("Conv", ["s", "w2"], ["b"], name="conv2"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _samples(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(count)]


def _run(model: onnx.ModelProto | Path, xs: list[np.ndarray]) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x})[0] for x in xs])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_outlier_channels_are_rescaled_exactly_in_float() -> None:
    model = _affine_model()
    original = onnx.ModelProto.FromString(model.SerializeToString())
    steps = equalize_channels(model, [{"x": x} for x in _samples(4, 0)])
    assert len(steps) == 1 and steps[0].startswith("s: ") and "rescaled into conv2" in steps[0], steps
    factor = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "s_equalizer").ravel()
    assert sorted(np.argsort(factor)[:2]) == [3, 11] and factor.max() == 1.0  # the outliers shrink most
    xs = _samples(3, 1)
    assert _rel(_run(model, xs), _run(original, xs)) < 1e-5
    # channels without outliers (conv2's output, read through a fused Relu) are left alone
    assert [n.name for n in model.graph.node if n.op_type == "Mul"] == ["gain", "s_equalize"]


def test_equalization_lowers_the_quantization_error(tmp_path: Path, monkeypatch) -> None:
    """The same model quantized with and without the rescaling: the output error against float falls."""
    path = tmp_path / "affine.onnx"
    onnx.save(_affine_model(), str(path))
    calib = [{"x": torch.from_numpy(x)} for x in _samples(16, 3)]
    xs = _samples(8, 4)
    reference = _run(path, xs)
    errors = {}
    for name, ratio in (("without", float("inf")), ("with", 4.0)):
        monkeypatch.setattr("maptools.quantization.equalize.OUTLIER_RATIO", ratio)
        result = quantize({"x": [1, 3, 16, 16]}, "cpu", path, mapname=name, calibset=calib, calib_steps=16,
                          output_root=tmp_path, error_steps=0)
        errors[name] = _rel(_run(result.quant_model_path, xs), reference)
        assert any("rescaled" in step for step in result.prepared["steps"]) is (name == "with")
    assert errors["with"] < 0.8 * errors["without"], errors
