"""Outlier channels of a lookup table's output, rescaled into the convolution that reads them
(:mod:`maptools.quantization.equalize`): the same float function, a finer grid for the other channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
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


def _depthwise_model(activation: str = "Relu", extra_reader: bool = False) -> onnx.ModelProto:
    """conv (output channels 0.05x-10x apart) -> activation -> depthwise conv (undoing that spread, as a folded
    batch norm does) -> relu -> pointwise conv."""
    rng = np.random.default_rng(5)
    gain = np.ones((16, 1, 1, 1), np.float32)
    gain[[2, 9]], gain[[4, 5, 12]] = 10.0, 0.05
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)) * 0.4 * gain, "b1": rng.standard_normal(16) * 0.1,
             "dw": rng.standard_normal((16, 1, 3, 3)) * 0.5 / gain, "w3": rng.standard_normal((4, 16, 1, 1)) * 0.25}
    act = [helper.make_node("Clip", ["a", "lo", "hi"], ["h"], name="act")] if activation == "Clip" else \
        [helper.make_node(activation, ["a"], ["h"], name="act")]
    inits.update({"lo": np.float32(0), "hi": np.float32(6)} if activation == "Clip" else {})
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]), *act,
             helper.make_node("Conv", ["h", "dw"], ["d"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="head")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:  # the activation's output is also read by a full convolution
        inits["w4"] = rng.standard_normal((4, 16, 1, 1)) * 0.25
        nodes.append(helper.make_node("Conv", ["h", "w4"], ["z"], name="side"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    weights = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _channel_peaks(model: onnx.ModelProto, tensor: str, xs: list[np.ndarray]) -> np.ndarray:
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.max([np.abs(session.run([tensor], {"x": x})[0]).max(axis=(0, 2, 3)) for x in xs], axis=0)


def _equalized(model: onnx.ModelProto, tensor: str) -> tuple[onnx.ModelProto, list[str], np.ndarray, np.ndarray]:
    """``model`` equalized in place on 4 samples: a copy of it before, the steps, and ``tensor``'s channel peaks
    before and after."""
    original = onnx.ModelProto.FromString(model.SerializeToString())
    xs = _samples(4, 0)
    before = _channel_peaks(original, tensor, xs)
    steps = equalize_channels(model, [{"x": x} for x in xs])
    return original, steps, before, _channel_peaks(model, tensor, xs)


def test_a_depthwise_input_gets_its_channels_equal_ranges_exactly_in_float() -> None:
    model = _depthwise_model()
    original, steps, before, after = _equalized(model, "h")
    assert len(steps) == 1 and steps[0].startswith("1 input(s) of depthwise convolutions (h)"), steps
    assert before.max() / np.median(before) > 5 and before.max() / before.min() > 100  # 0.05x and 10x
    assert np.isclose(after.max(), before.max(), rtol=1e-5)  # the largest channel is left where it was
    assert np.median(after) > 0.9 * after.max()  # every channel scaled up to it ...
    assert after.min() > 0.99 * 16 * before.min()  # ... the quiet ones by at most DEPTHWISE_GAIN
    assert len(model.graph.node) == len(original.graph.node)  # folded into weights: no operator added
    new = _samples(3, 1)
    assert _rel(_run(model, new), _run(original, new)) < 1e-5


def test_depthwise_equalization_leaves_what_it_cannot_fold() -> None:
    """A tensor also read by a full convolution would move that convolution's grid: it is left as it is (with no
    adder among its links it is no residual stream either; preparation records every tensor's shape)."""
    model = onnx.shape_inference.infer_shapes(_depthwise_model(extra_reader=True))
    before = model.SerializeToString()
    assert equalize_channels(model, [{"x": x} for x in _samples(4, 0)]) == []
    assert model.SerializeToString() == before


def test_a_relu6_before_a_depthwise_convolution_gets_its_quiet_channels_scaled_up(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """MobileNetV2's Relu6 (a Clip): most channels reach the bound of 6, so the median channel is near the
    largest, but the quiet ones (0.05x) get a few codes of the tensor's one grid (a TFLite hand landmark model:
    landmarks 11.7% off float, NNCF's per-channel grid 2.2%). Scaled up, each channel still clips at 6 where the
    exact form clips at 6k, past the grid's range: the float model is the same on the calibration samples, and
    the quantization error is lower."""
    model = _depthwise_model("Clip")
    original, steps, before, after = _equalized(model, "h")
    assert np.median(before) > 0.5 * before.max() and before.min() < 0.05 * before.max()
    assert len(steps) == 1 and steps[0].startswith("1 input(s) of depthwise convolutions (h)"), steps
    assert after.min() > 0.99 * min(16 * before.min(), before.max()) and after.max() <= 6.0
    xs = _samples(4, 0)  # (the calibration samples: beyond their ranges a scaled channel clips at 6, not 6k)
    assert _rel(_run(model, xs), _run(original, xs)) < 1e-5
    errors = _errors_with_and_without_gain(original, tmp_path, monkeypatch)
    assert errors["with"] < 0.7 * errors["without"], errors


def _errors_with_and_without_gain(model: onnx.ModelProto, tmp_path: Path, monkeypatch, setting: str = "DEPTHWISE_GAIN",
                                  values: tuple[float, float] = (1.0, 16.0)) -> dict[str, float]:
    """``model`` quantized with ``setting`` at ``values`` (off: nothing scaled; on): the output error against float
    of each."""
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    calib = [{"x": torch.from_numpy(x)} for x in _samples(16, 3)]
    xs = _samples(8, 4)
    reference = _run(path, xs)
    errors = {}
    for name, gain in zip(("without", "with"), values):
        monkeypatch.setattr(f"maptools.quantization.equalize.{setting}", gain)
        result = quantize({"x": [1, 3, 16, 16]}, "cpu", path, mapname=name, calibset=calib, calib_steps=16,
                          output_root=tmp_path, error_steps=0, algorithm="percentile")
        errors[name] = _rel(_run(result.quant_model_path, xs), reference)
    return errors


def test_depthwise_equalization_lowers_the_quantization_error(tmp_path: Path, monkeypatch) -> None:
    errors = _errors_with_and_without_gain(_depthwise_model(), tmp_path, monkeypatch)
    assert errors["with"] < 0.7 * errors["without"], errors


def test_a_lookup_table_read_by_depthwise_convolutions_gets_its_channels_one_range(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A hard-swish (a table: no scale passes through it) read only by a depthwise convolution (PP-LCNet): a
    per-channel Mul joins the table and scales every channel up to the largest one's range (at most
    DEPTHWISE_GAIN), the depthwise weights scaled back; the same float function, a lower quantization error."""
    model = _depthwise_model("HardSwish")
    original = onnx.ModelProto.FromString(model.SerializeToString())
    xs = _samples(4, 0)
    steps = equalize_channels(model, [{"x": x} for x in xs])
    assert len(steps) == 1 and steps[0].startswith("h: ") and "rescaled into depthwise" in steps[0], steps
    after = _channel_peaks(model, "h_equalized", xs)
    assert np.median(after) > 0.9 * after.max()
    new = _samples(3, 1)
    assert _rel(_run(model, new), _run(original, new)) < 1e-5
    errors = _errors_with_and_without_gain(original, tmp_path, monkeypatch)
    assert errors["with"] < 0.7 * errors["without"], errors


def test_a_channel_that_is_always_zero_keeps_its_gain_without_a_warning() -> None:
    """A dead depthwise channel (silabs-mltk's TENet keyword spotters have several) keeps gain 1; numpy's 'overflow
    encountered in divide' printed on every such model, from a quotient np.where then discarded."""
    import warnings

    from maptools.quantization.equalize import DEPTHWISE_GAIN, _gain_to_top

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gains = _gain_to_top(np.array([0.0, 0.5, 20.0, 4.0]))
    assert gains.tolist() == [1.0, DEPTHWISE_GAIN, 1.0, 5.0]


def _blaze_model() -> onnx.ModelProto:
    """BlazeFace's blocks: a stream ``x`` (conv -> relu, output channels 0.05x-10x apart) through two residual blocks
    (``relu(x + pointwise(depthwise(x)))``, the pointwise convolutions sharing one bias), a max pool whose channels a
    zero Pad widens beside a strided block, and a 1x1 head reading the stream: the depthwise convolutions' inputs are
    also read by the adders."""
    rng = np.random.default_rng(7)
    gain = np.ones((8, 1, 1, 1))
    gain[[1, 6]], gain[[2, 5]] = 10.0, 0.05
    inits = {"w0": rng.standard_normal((8, 3, 3, 3)) * 0.4 * gain, "b0": rng.standard_normal(8) * 0.1 * gain.ravel(),
             "pads": np.array([0, 0, 0, 0, 0, 8, 0, 0], np.int64), "wh": rng.standard_normal((4, 16, 1, 1)) * 0.25,
             "pb": np.random.default_rng(8).standard_normal(8) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["s0"])]
    x, channels = "s0", 8
    for i, stride in enumerate((1, 1, 2)):
        inits[f"dw{i}"] = rng.standard_normal((channels, 1, 3, 3)) * 0.5
        width = 16 if stride == 2 else channels
        inits[f"pw{i}"] = rng.standard_normal((width, channels, 1, 1)) * 0.5 / np.sqrt(channels)
        bias = ["pb"] if width == 8 else []  # (one bias the first two pointwise convolutions share, as tf2onnx writes)
        nodes += [helper.make_node("Conv", [x, f"dw{i}"], [f"d{i}"], group=channels, pads=[1, 1, 1, 1],
                                   strides=[stride, stride]),
                  helper.make_node("Conv", [f"d{i}", f"pw{i}", *bias], [f"p{i}"])]
        skip = x
        if stride == 2:
            nodes += [helper.make_node("MaxPool", [x], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
                      helper.make_node("Pad", ["pooled", "pads"], ["widened"])]
            skip, channels = "widened", 16
        nodes += [helper.make_node("Add", [skip, f"p{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"s{i + 1}"])]
        x = f"s{i + 1}"
    nodes.append(helper.make_node("Conv", [x, "wh"], ["y"]))
    weights = [numpy_helper.from_array(np.asarray(v, np.int64 if k == "pads" else np.float32), k)
               for k, v in inits.items()]
    graph = helper.make_graph(nodes, "blaze", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))


def test_a_residual_stream_read_by_depthwise_convolutions_gets_its_channels_one_range(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Where the depthwise convolutions' inputs are a residual stream (BlazeFace: read by the adders too, so the
    single-tensor rule cannot scale them), every tensor of the stream takes one scale per channel: the convolutions
    computing it scale their rows, those reading it (depthwise, and the head) their inputs, through Relu, the adders,
    the max pool and the Pad of channels. The same float function; a lower quantization error."""
    model = _blaze_model()
    original, steps, before, after = _equalized(model, "s1")
    assert len(steps) == 1 and steps[0].startswith("1 residual stream(s) read by depthwise convolutions"), steps
    assert np.isclose(after.max(), before.max(), rtol=1e-5) and after.min() > 2 * before.min()
    new = _samples(3, 1)
    assert _rel(_run(model, new), _run(original, new)) < 1e-5
    errors = _errors_with_and_without_gain(original, tmp_path, monkeypatch)
    assert errors["with"] < 0.9 * errors["without"], errors  # (measured: 4.87% -> 3.84%)


def _quiet_channels_model(quiet: float) -> onnx.ModelProto:
    """conv -> relu -> 1x1 head conv, as mediapipe's back-camera face detector's classifier reads its features: one
    channel of the relu's output reaches 10, the other fifteen ``quiet`` times that, and the head weights them in
    inverse proportion (its weights on the quiet channels are large)."""
    rng = np.random.default_rng(7)
    gain = np.full((16, 1, 1, 1), quiet, np.float32)
    gain[0] = 1.0
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)) * 2.0 * gain, "b1": rng.standard_normal(16) * 0.2 * gain.ravel(),
             "w2": rng.standard_normal((4, 16, 1, 1)) * 0.25 / gain.reshape(1, 16, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "quiet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_quiet_channels_read_by_a_full_convolution_are_balanced_against_its_weights(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Quiet channels on one grid with a loud one fall within a step or two, and the head's large weights on them
    multiply that noise: each channel's range is balanced against the weights reading it (SmoothQuant's square
    root), in the convolution computing it and the one reading it; the same float function, a far lower error."""
    model = _quiet_channels_model(0.01)
    original, steps, before, after = _equalized(model, "r")
    assert len(steps) == 1 and steps[0].startswith("1 input(s) of convolutions (r) with quiet"), steps
    assert "balanced" in steps[0], steps
    assert np.median(after) / after.max() > 10 * np.median(before) / before.max()  # the quiet channels take the grid
    xs = _samples(3, 1)
    assert _rel(_run(model, xs), _run(original, xs)) < 1e-5
    errors = _errors_with_and_without_gain(original, tmp_path, monkeypatch, "DENSE_RATIO", (float("inf"), 2.0))
    assert errors["with"] < 0.3 * errors["without"], errors


@pytest.mark.parametrize("quiet", [1.0, 0.2])
def test_channels_not_quiet_read_by_a_full_convolution_are_left_alone(quiet: float) -> None:
    """Like ranges, or uneven ones (5x: the noise estimate alone would balance them) whose median channel still
    spans steps of the grid: left as they are (on real models' tensors of 2-7x the balance cost accuracy)."""
    model = _quiet_channels_model(quiet)
    original = model.SerializeToString()
    assert equalize_channels(model, [{"x": x} for x in _samples(4, 0)]) == []
    assert model.SerializeToString() == original
