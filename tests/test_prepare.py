"""Preparing models as shipped: fixed dims, opset 13 both ways, PPQ-ready rewrites, checked in onnxruntime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maptools.errors import InputShapeError, ModelError
from maptools.prepare import opset_report, prepare_model
from maptools.stages import prepare_onnx


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, list], outputs: dict[str, list], opset: int,
           inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _types(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_operators_newer_than_13_are_rewritten_and_checked(tmp_path) -> None:
    """Opset 18: HardSwish, LayerNormalization, Reduce* with axes as an input, Split by num_outputs, Shape slices."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("HardSwish", ["x"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("ReduceMean", ["n", "axes"], ["m"], keepdims=1),
        helper.make_node("Split", ["n"], ["a", "b"], axis=3, num_outputs=2),
        helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "m"], ["y"]),
        helper.make_node("Shape", ["y"], ["s"], start=1, end=3),
    ]
    model = _model(nodes, {"x": ["batch", 2, 4, 8]}, {"y": ["batch", 2, 4, 4]}, 18,
                   {"gamma": rng.standard_normal(8).astype(np.float32), "beta": rng.standard_normal(8).astype(np.float32),
                    "axes": np.asarray([2, 3], dtype=np.int64)})
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.INT64, [2]))
    source = _save(model, tmp_path / "new.onnx")
    assert opset_report(model) == ({"HardSwish": 1, "LayerNormalization": 1, "ReduceMean": 1, "Split": 1, "Shape": 1},
                                   [])
    done = prepare_model(source, tmp_path / "prepared.onnx", {"x": [3, 2, 4, 8]}, simplify=False)
    prepared = onnx.load(str(done.path))
    assert (done.source_opset, done.opset) == (18, 13) and prepared.opset_import[0].version == 13
    types = _types(done.path)
    assert "HardSwish" not in types and "LayerNormalization" not in types
    assert types["HardSigmoid"] == 1 and types["Sqrt"] == 1 and types["Slice"] == 1
    assert done.max_rel_diff < 1e-5  # checked against the original in onnxruntime
    assert any("opset 18 -> 13" in s and "HardSwish x1" in s for s in done.steps)
    assert all(n.name for n in prepared.graph.node) and len({n.name for n in prepared.graph.node}) == len(
        prepared.graph.node)


def test_an_rms_normalization_of_opset_23_is_written_in_opset_13(tmp_path) -> None:
    """torch's nn.RMSNorm exported at opset 23 (dynamo) is RMSNormalization, which opset 13 lacks: the model stayed
    at opset 23, its conversion left out. It is written as a mean of squares, Sqrt and Div, as onnxruntime's
    SimplifiedLayerNormalization is, and checked against the original."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("RMSNormalization", ["r", "scale"], ["y"], axis=-2, epsilon=1e-3)]
    model = _model(nodes, {"x": [1, 3, 4, 8]}, {"y": [1, 3, 4, 8]}, 23,
                   {"scale": rng.standard_normal((4, 8)).astype(np.float32)})
    done = prepare_model(_save(model, tmp_path / "rms.onnx"), tmp_path / "p.onnx", {"x": [1, 3, 4, 8]},
                         simplify=False, strict=True)
    assert (done.source_opset, done.opset) == (23, 13) and done.max_rel_diff < 1e-5
    types = _types(done.path)
    assert "RMSNormalization" not in types and types["Sqrt"] == 1 and types["Div"] == 1


def test_old_opsets_are_upgraded_and_dims_fixed(tmp_path) -> None:
    nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[1]), helper.make_node("Relu", ["u"], ["y"])]
    model = _model(nodes, {"x": [-1, 4]}, {"y": [-1, 1, 4]}, 11)
    done = prepare_model(_save(model, tmp_path / "old.onnx"), tmp_path / "p.onnx", {"x": [2, 4]})
    assert done.opset == 13 and "input dims fixed to x=[2, 4]" in done.steps
    dims = onnx.load(str(done.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 4]
    # a declared size is a placeholder where the model runs at another: Relu does
    wider = prepare_model(tmp_path / "old.onnx", tmp_path / "wide.onnx", {"x": [2, 5]})
    assert [d.dim_value for d in onnx.load(str(wider.path)).graph.input[0].type.tensor_type.shape.dim] == [2, 5]
    # ... and a constraint where it does not: a MatMul's weight fixes the features
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    weighted = _model(nodes, {"x": [-1, 4]}, {"y": [-1, 3]}, 11, {"w": np.ones((4, 3), np.float32)})
    with pytest.raises(InputShapeError, match=r"axis 1 is fixed to 4 in the model.*Fix: .*x=\[2, 4\]"):
        prepare_model(_save(weighted, tmp_path / "mm.onnx"), tmp_path / "p2.onnx", {"x": [2, 5]})
    assert not (tmp_path / "p2.onnx").exists()


def test_batchnorm_bias_and_identity_become_what_ppq_expects(tmp_path) -> None:
    rng = np.random.default_rng(1)
    c = 4
    bn = {f"{k}{i}": v for i in (1, 2) for k, v in (("g", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)),
                                                   ("m", rng.standard_normal(c)), ("v", rng.uniform(0.5, 2, c)))}
    inits = {k: v.astype(np.float32) for k, v in bn.items()}
    inits["w"] = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    inits["bias"] = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g1", "b1", "m1", "v1"], ["bn1"]),  # folds into the Conv
        helper.make_node("Add", ["bn1", "bias"], ["biased"]),  # folds into the Conv's bias
        helper.make_node("Relu", ["biased"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"]),
        helper.make_node("BatchNormalization", ["i", "g2", "b2", "m2", "v2"], ["y"]),  # alone: Mul + Add
    ]
    model = _model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, c, 8, 8]}, 13, inits)
    done = prepare_model(_save(model, tmp_path / "bn.onnx"), tmp_path / "p.onnx", {"x": [1, 3, 8, 8]},
                         simplify=False)
    assert _types(done.path) == {"Conv": 1, "Relu": 1, "Mul": 1, "Add": 1}
    assert "1 BatchNormalization folded into Conv/Gemm" in done.steps
    assert "1 BatchNormalization replaced by a per-channel Mul + Add" in done.steps
    assert done.max_rel_diff < 1e-5


def test_a_dropout_goes_unless_its_mask_is_read(tmp_path: Path) -> None:
    """An inference Dropout declaring a mask nothing reads (Caffe2, old torch) is removed; one whose mask is an
    output stays."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Dropout", ["r"], ["d", "m1"]),
             helper.make_node("Dropout", ["d"], ["y", "m2"])]
    model = _model(nodes, {"x": [1, 4]}, {"y": [1, 4]}, 13)
    model.graph.output.append(helper.make_tensor_value_info("m2", TensorProto.BOOL, [1, 4]))
    done = prepare_model(_save(model, tmp_path / "dropout.onnx"), tmp_path / "p.onnx", {"x": [1, 4]}, simplify=False)
    kept = [n for n in onnx.load(str(done.path)).graph.node if n.op_type == "Dropout"]
    assert [list(n.output) for n in kept] == [["y", "m2"]]
    assert "1 Identity/Dropout removed" in done.steps


def test_prepared_cache_is_keyed_on_shapes_and_checked(tmp_path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    source = _save(_model(nodes, {"x": ["n", 4]}, {"y": ["n", 4]}, 13), tmp_path / "dyn.onnx")
    one = prepare_onnx(source, {"x": [1, 4]}, root=tmp_path)
    two = prepare_onnx(source, {"x": [2, 4]}, root=tmp_path)
    assert one.path != two.path and one.sha256 != two.sha256 and one.source_sha256 == two.source_sha256
    assert prepare_onnx(source, {"x": [2, 4]}, root=tmp_path) == two  # a lookup
    two.path.write_bytes(two.path.read_bytes()[:-3])  # a damaged cache entry is prepared again
    again = prepare_onnx(source, {"x": [2, 4]}, root=tmp_path)
    assert again.sha256 == two.sha256 and again.path.read_bytes() != b""
    assert [d.dim_value for d in onnx.load(str(again.path)).graph.input[0].type.tensor_type.shape.dim] == [2, 4]


def test_foreign_and_control_flow_models_are_refused(tmp_path) -> None:
    odd = _model([helper.make_node("Frob", ["x"], ["y"], domain="com.example")], {"x": [1, 4]}, {"y": [1, 4]}, 13)
    odd.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError, match=r"onnxruntime cannot load the model.*com\.example:Frob"):
        prepare_model(_save(odd, tmp_path / "odd.onnx"), tmp_path / "p.onnx", {"x": [1, 4]})
    assert not (tmp_path / "p.onnx").exists()


def test_a_prepared_model_is_not_prepared_again(tmp_path) -> None:
    """The flow prepares in its own task, then quantize gets the prepared file: it is copied as it is."""
    import onnx as onnx_

    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    source = _save(_model(nodes, {"x": ["n", 4]}, {"y": ["n", 4]}, 17), tmp_path / "src.onnx")
    first = prepare_model(source, tmp_path / "once.onnx", {"x": [2, 4]})
    again = prepare_model(first.path, tmp_path / "twice.onnx", {"x": [2, 4]})
    assert again.path.read_bytes() == first.path.read_bytes()
    assert (again.steps, again.source_opset) == (first.steps, 17)
    record = {p.key: p.value for p in onnx_.load(str(first.path)).metadata_props}
    assert "maptools.prepared" in record
    other = prepare_model(first.path, tmp_path / "other.onnx", {"x": [2, 4]}, simplify=False)  # other options
    assert other.path.read_bytes() != first.path.read_bytes() and other.source_opset == 13


def test_a_device_form_that_breaks_the_check_is_left_out_alone(tmp_path, monkeypatch) -> None:
    """Where writing operators in their device form changes the outputs beyond the check (float rounding a deep
    network amplifies), the model is prepared again without those forms only: onnxsim, the PPQ-ready rewrites
    and explicit pads stay. The minimal level keeps explicit pads too: PPQ's own SAME padding lost a row and a
    column of a 2x2 kernel's output (PP-OCRv6's detector)."""
    import maptools.prepare as prepare_module
    from maptools.prepare.rewrites import _mean_as_pool
    from tests.exporters import IDIOMS

    def drifting(ctx) -> int:  # the real rewrite, then a GlobalAveragePool that computes something else
        count = _mean_as_pool(ctx)
        for node in ctx.graph.node:
            if node.op_type == "GlobalAveragePool":
                node.op_type = "GlobalMaxPool"
        return count

    model, shapes = IDIOMS["squeeze_excite_mean"]()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [3, 3]), helper.make_attribute("strides", [2, 2]),
                           helper.make_attribute("auto_pad", "SAME_UPPER")])
    source = _save(model, tmp_path / "se.onnx")
    monkeypatch.setattr(prepare_module, "_mean_as_pool", drifting)
    done = prepare_model(source, tmp_path / "p.onnx", shapes)
    assert done.steps[0].startswith("preparation (full) gave a model that failed the check")
    assert len(done.fallbacks) == 1 and "auto_pad made explicit pads" in "; ".join(done.steps)
    kinds = _types(done.path)
    assert kinds["ReduceMean"] == 2 and not kinds["GlobalMaxPool"]
    minimal, steps, _ = prepare_module.prepare(model, shapes, level="minimal")
    assert "1 auto_pad made explicit pads" in steps
    assert all(a.name != "auto_pad" for n in minimal.graph.node for a in n.attribute)
    constants, shapes = IDIOMS["constant_weights"]()  # PPQ reads a 1-element Constant node as a scalar
    minimal, steps, _ = prepare_module.prepare(constants, shapes, level="minimal")
    assert any(s.endswith("Constant nodes folded into initializers") for s in steps)
    assert "Constant" not in {n.op_type for n in minimal.graph.node}


def test_a_batch_norm_behind_an_operator_without_shape_inference_broadcasts_over_its_rank(tmp_path: Path) -> None:
    """A BatchNormalization on a 5-D tensor behind a contrib operator (ONNX shape inference gives no rank): its
    per-channel form takes the rank onnxruntime gives ([C, 1, 1, 1], where a 4-D [C, 1, 1] had been assumed and
    the model failed preparation), and the model prepares in full."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + rng.random(3)).astype(np.float32), n) for n in ("g", "v")]
    inits += [numpy_helper.from_array(rng.random(3).astype(np.float32), n) for n in ("b", "m")]
    graph = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["h"], domain="com.microsoft", name="gelu"),
         helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn")], "bn5",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    prepared = prepare_model(_save(model, tmp_path / "bn5.onnx"), tmp_path / "out.onnx", {"x": [1, 3, 2, 4, 4]})
    assert not prepared.fallbacks, prepared.fallbacks
    out = onnx.load(str(prepared.path))
    assert "1 BatchNormalization replaced by a per-channel Mul + Add" in prepared.steps
    assert {tuple(i.dims) for i in out.graph.initializer} == {(3, 1, 1, 1)}


def test_a_loop_body_keeps_the_weights_it_reads_from_around_it(tmp_path: Path) -> None:
    """torch.jit.script's while loop: the body's convolution reads its weight from the outer graph. A rewrite
    elsewhere (a spatial ReduceMean written as GlobalAveragePool) drops unused initializers; the body's weight is
    used, and the prepared model runs."""
    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [helper.make_node("Conv", ["y_in", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y_out"]),
         helper.make_node("Less", ["i", "two"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(  # (a condition from the data: onnxsim cannot unroll the loop)
        [helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0, name="peak"),
         helper.make_node("Greater", ["peak", "floor"], ["go"], name="go"),
         helper.make_node("Loop", ["", "go", "x"], ["y"], body=body, name="loop"),
         helper.make_node("ReduceMean", ["y"], ["z"], axes=[2, 3], keepdims=0, name="mean")], "looped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.float32(-9.0), "floor"),
         numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    prepared = prepare_model(_save(model, tmp_path / "loop.onnx"), tmp_path / "out.onnx", {"x": [1, 4, 8, 8]})
    assert "1 spatial ReduceMean written as GlobalAveragePool" in prepared.steps, prepared.steps
    assert not prepared.fallbacks, prepared.fallbacks
    assert {"w", "two"} <= {i.name for i in onnx.load(str(prepared.path)).graph.initializer}


def test_a_sequence_inside_the_model_keeps_its_type(tmp_path: Path) -> None:
    """``SplitToSequence -> SequenceAt`` inside a model: where shapes come from one onnxruntime run (its list of
    arrays), the sequence is not recorded as a tensor, and the prepared model runs."""
    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["seq"], axis=1, name="split"),
         helper.make_node("SequenceAt", ["seq", "one"], ["part"], name="at"),
         helper.make_node("Relu", ["part"], ["y"], name="relu")], "sequenced",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(1, np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    prepared = prepare_model(_save(model, tmp_path / "seq.onnx"), tmp_path / "out.onnx", {"x": [1, 3, 4, 4]})
    out = onnx.load(str(prepared.path))
    assert all(vi.type.WhichOneof("value") == "sequence_type" for vi in out.graph.value_info if vi.name == "seq")
    assert prepared.max_abs_diff < 1e-6


def test_a_model_of_ml_operators_alone_has_no_opset_to_convert(tmp_path: Path) -> None:
    """onnxmltools' tree ensembles import ai.onnx.ml alone: there is no standard operator to bring to opset 13,
    and preparation leaves nothing out (it had tried to convert 'from opset 1' and recorded the failure)."""
    graph = helper.make_graph(
        [helper.make_node("LinearClassifier", ["x"], ["label", "prob"], domain="ai.onnx.ml", name="linear",
                          coefficients=np.random.default_rng(0).standard_normal(12).tolist(),
                          intercepts=[0.0, 0.1, -0.1], classlabels_ints=[0, 1, 2], post_transform="SOFTMAX")],
        "trees", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    prepared = prepare_model(_save(model, tmp_path / "ml.onnx"), tmp_path / "out.onnx", {"x": [1, 4]})
    assert not prepared.fallbacks, prepared.fallbacks
    assert prepared.max_abs_diff == 0.0


def test_a_recurrence_left_as_an_operator_keeps_the_other_device_forms(tmp_path: Path) -> None:
    """The level after ``full`` keeps LSTM and GRU operators (a long recurrence written out can drift from
    onnxruntime's fused one past the check) and every other device form: the head's MatMul by a constant is still
    the Gemm the crossbar takes. ``full`` writes the recurrence out."""
    from maptools.prepare import prepare
    from tests.conftest import lstm_head_onnx

    path = lstm_head_onnx(tmp_path / "head.onnx", steps=6, hidden=8)
    kinds = {level: Counter(n.op_type for n in prepare(onnx.load(str(path)), {"x": [1, 6, 16]}, level=level)[0]
                            .graph.node) for level in ("full", "no recurrent forms", "no device forms")}
    assert kinds["full"]["LSTM"] == 0 and kinds["full"]["Gemm"] > 6
    assert kinds["no recurrent forms"]["LSTM"] == 1 and kinds["no recurrent forms"]["Gemm"] == 1
    assert kinds["no recurrent forms"]["MatMul"] == kinds["no recurrent forms"]["Expand"] == 0  # (onnxsim ran)


def test_a_recurrence_too_long_to_write_out_says_so(tmp_path: Path) -> None:
    """An LSTM past the cap stays one operator, and the prepared steps say why (the note had blamed something
    else)."""
    from maptools.prepare import prepare
    from maptools.prepare.recurrent import MAX_WRITTEN
    from tests.conftest import lstm_head_onnx

    steps = MAX_WRITTEN // 14 + 2
    path = lstm_head_onnx(tmp_path / "long.onnx", steps=steps, hidden=8)
    model, done, _ = prepare(onnx.load(str(path)), {"x": [1, steps, 16]})
    assert Counter(n.op_type for n in model.graph.node)["LSTM"] == 1
    assert any(f"left as one operator, on the host: {steps} steps x 1 direction(s) written out would be "
               f"{14 * steps} operators (at most {MAX_WRITTEN})" in step for step in done), done


def test_the_prepare_stage_checks_with_the_calibration_folders_integer_inputs(tmp_path) -> None:
    """A pitch id indexing a table from 48: the flows' prepare stage, given the calibration folder, runs its
    checks on the first sample's ids (0/1 index out of range), and keys its cache on them."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "table")
    base = numpy_helper.from_array(np.array(48, np.int64), "base")
    nodes = [helper.make_node("Sub", ["pitch", "base"], ["index"]),
             helper.make_node("Gather", ["table", "index"], ["rows"]), helper.make_node("Add", ["rows", "x"], ["y"])]
    model = _model(nodes, {"pitch": [4], "x": [4, 8]}, {"y": [4, 8]}, 13)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    model.graph.initializer.extend([table, base])
    source = _save(model, tmp_path / "pitch.onnx")
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, low in enumerate((48, 50)):
        np.savez(folder / f"{i}.npz", pitch=np.arange(low, low + 4, dtype=np.int64),
                 x=np.zeros((4, 8), np.float32))
    with pytest.raises(ModelError, match="own declared input shapes.*Gather.*pass calibration data"):
        prepare_onnx(source, {"pitch": [4], "x": [4, 8]}, root=tmp_path / "random")
    done = prepare_onnx(source, {"pitch": [4], "x": [4, 8]}, root=tmp_path, calib=folder)
    assert done.path.is_file()
    assert prepare_onnx(source, {"pitch": [4], "x": [4, 8]}, root=tmp_path, calib=folder) == done  # a lookup
    (folder / "0.npz").unlink()  # other ids: another key
    assert prepare_onnx(source, {"pitch": [4], "x": [4, 8]}, root=tmp_path, calib=folder).path != done.path


def test_the_prepare_stage_takes_a_resizes_scales_from_the_calibration_folder(tmp_path) -> None:
    """A float input of rank 1 read as a Resize's scales (MMDeploy's SRCNN): the flows' prepare stage, given the
    calibration folder, runs its checks on the first sample's scales (random ones are negative, which Resize
    refuses), as quantize does with calibset."""
    nodes = [helper.make_node("Resize", ["x", "roi", "factor"], ["y"], mode="nearest")]
    model = _model(nodes, {"x": [1, 2, 4, 4], "factor": [4]}, {"y": None}, 11,
                   {"roi": np.zeros(0, np.float32)})
    source = _save(model, tmp_path / "up.onnx")
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "0.npz", x=np.ones((1, 2, 4, 4), np.float32), factor=np.array([1, 1, 2, 2], np.float32))
    shapes = {"x": [1, 2, 4, 4], "factor": [4]}
    with pytest.raises(ModelError, match="Resize.*pass calibration data"):
        prepare_onnx(source, shapes, root=tmp_path / "random")
    done = prepare_onnx(source, shapes, root=tmp_path, calib=folder)
    assert done.path.is_file() and done.max_abs_diff == 0.0


def test_an_identity_a_branch_reads_is_removed_in_the_branch_too(tmp_path) -> None:
    """An If branch reads, from outside, the output of an Identity that preparation removes: the branch reads
    the Identity's input instead (it read a name no node wrote, which onnxruntime refuses), also without onnxsim."""
    then = helper.make_graph([helper.make_node("Mul", ["tx", "two"], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Relu", ["tx"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Identity", ["x"], ["tx"]), helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
             helper.make_node("Greater", ["top", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    model = _model(nodes, {"x": [2, 4]}, {"y": [2, 4]}, 13)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                                    numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    done = prepare_model(_save(model, tmp_path / "branch.onnx"), tmp_path / "p.onnx", {"x": [2, 4]}, simplify=False)
    assert "Identity" not in _types(done.path) and done.max_abs_diff == 0.0


def _selected_by_data(path: Path) -> Path:
    """Conv -> Relu -> the values over 0.5 picked by NonZero + Gather, plus a bias Expanded to their count: the output's
    size follows the data (as a detector's boxes after its score threshold)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=0), helper.make_node("Greater", ["f", "thr"], ["m"]),
             helper.make_node("NonZero", ["m"], ["nz"]), helper.make_node("Gather", ["nz", "one"], ["idx"], axis=0),
             helper.make_node("Gather", ["f", "idx"], ["sel"], axis=1), helper.make_node("Shape", ["sel"], ["shp"]),
             helper.make_node("Expand", ["bias", "shp"], ["b2"]), helper.make_node("Add", ["sel", "b2"], ["y"])]
    consts = [weight, numpy_helper.from_array(np.array(0.5, np.float32), "thr"),
              numpy_helper.from_array(np.array(1, np.int64), "one"),
              numpy_helper.from_array(np.ones(1, np.float32), "bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_size_the_data_sets_is_left_open(tmp_path: Path) -> None:
    """A tensor after NonZero has the size of one input's selection: preparation recorded the size one random run
    gave it in ``value_info``, and the prepared model (and quant_model.onnx) then failed on any input selecting
    another count (torchvision's Mask R-CNN was refused; its Faster R-CNN, 0 boxes on noise, failed on photos). Its
    dims stay open; the operator graph takes that run's sizes for its costs."""
    import onnxruntime as ort

    from maptools import convert, quantize, simulate

    path = _selected_by_data(tmp_path / "select.onnx")
    rng = np.random.default_rng(42)
    xs = [rng.standard_normal((1, 1, 4, 4)).astype(np.float32) * s for s in (0.3, 1.0, 3.0)]
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = [original.run(None, {"x": x})[0] for x in xs]
    assert len({e.shape for e in expected}) == 3
    for calibset in (None, [{"x": x} for x in xs] * 3):  # random samples; real ones, each selecting another count
        result = quantize({"x": [1, 1, 4, 4]}, "cpu", path, mapname="select", calibset=calibset, calib_steps=8,
                          output_root=tmp_path)
    prepared = ort.InferenceSession(str(result.map_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for x, e in zip(xs, expected):
        np.testing.assert_allclose(prepared.run(None, {"x": x})[0], e, rtol=1e-5, atol=1e-5)
    quantized = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"])
    convert("select", output_root=tmp_path)
    for x in xs:
        ours = quantized.run(None, {"x": x})[0]
        np.testing.assert_allclose(simulate("select", {"x": x}, output_root=tmp_path).outputs["y"], ours, atol=0.05)
