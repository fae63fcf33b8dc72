"""Degrading instead of failing: operators kept on the host in float (on record, as asked or where PPQ
fails at them), preparation steps left out, and ``strict`` turning either into the error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from maptools import quantize, read_quantinfo
from maptools.conversion import convert, read_graph
from maptools.errors import ModelError, QuantizationFailed, SettingsError
from maptools.simulate import simulate
from maptools_flows.cli import app
from tests.exporters import IDIOMS, resize_model

SHAPES = {"x": [1, 3, 16, 16]}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _with_trilu(tmp_path: Path) -> Path:
    """A Conv and a Trilu (opset 14, no opset-13 form): the opset conversion has to be left out."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.full(108, 0.1, np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                               helper.make_node("Trilu", ["c"], ["y"], name="tri")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16, 16])], [w])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), tmp_path / "trilu.onnx")


def test_preparation_leaves_a_step_out_unless_strict(tmp_path) -> None:
    path = _with_trilu(tmp_path)
    result = quantize(SHAPES, "cpu", path, mapname="tri", calib_steps=8, output_root=tmp_path, error_steps=0)
    left = result.prepared["fallbacks"]
    assert len(left) == 1 and left[0].startswith("converting to opset 13 skipped") and "tri (Trilu)" in left[0]
    assert any(n.startswith("preparation left out: converting to opset 13") for n in result.notes)
    assert set(read_quantinfo("tri", tmp_path)) == {"conv"}  # the crossbar layer still quantizes
    with pytest.raises(ModelError, match=r"left steps out: converting to opset 13 skipped.*Trilu.*Fix: prepare "
                                         r"without strict=True"):
        quantize(SHAPES, "cpu", path, mapname="strict", calib_steps=8, output_root=tmp_path, strict=True)
    assert not (tmp_path / "mapsave" / "strict").exists()
    cli = CliRunner().invoke(app, ["quantize", str(path), "-s", "x=1,3,16,16", "--mapname", "strict", "--strict",
                                   "--calib-steps", "8", "--output-root", str(tmp_path)])
    assert cli.exit_code == 2 and cli.output.startswith("error: preparing") and "Traceback" not in cli.output


def test_keep_on_host_is_recorded_and_every_stage_follows(tmp_path) -> None:
    model, shapes = IDIOMS["leaky_max_min"]()
    path = _save(model, tmp_path / "m.onnx")
    full = quantize(shapes, "cpu", path, mapname="full", calib_steps=8, output_root=tmp_path, error_steps=0)
    convs = [n for n, cfg in read_quantinfo("full", tmp_path).items() if cfg.op_type == "Conv"]
    middle = convs[1]
    kept = quantize(shapes, "cpu", path, mapname="kept", calib_steps=8, output_root=tmp_path, error_steps=0,
                    keep_on_host=[middle])
    report = kept.placement
    assert report.fallbacks == {middle: "kept on the host as asked (keep_on_host)"}
    assert report.host_ops[middle] == report.fallbacks[middle]
    assert report.device_macs < full.placement.device_macs == report.total_macs == full.placement.total_macs
    assert middle not in read_quantinfo("kept", tmp_path)
    manifest = json.loads((kept.map_dir / "manifest.json").read_text())
    assert manifest["placement"]["fallbacks"] == report.fallbacks
    convert("kept", output_root=tmp_path)
    assert read_graph("kept", tmp_path).node(middle)["part"] == "host"
    x = {"x": np.random.default_rng(0).standard_normal(shapes["x"]).astype(np.float32)}
    assert np.all(np.isfinite(simulate("kept", x, output_root=tmp_path).outputs[model.graph.output[0].name]))
    # an already-prepared model is read through a hard link, never written: recording the host operator replaced
    # the scratch copy, and the prepared file the map holds is the user's file plus that record
    prepared = tmp_path / "prepared.onnx"
    prepared.write_bytes((full.map_dir / "model.onnx").read_bytes())
    before = prepared.read_bytes()
    linked = quantize(shapes, "cpu", prepared, mapname="linked", calib_steps=8, output_root=tmp_path, error_steps=0,
                      keep_on_host=middle)  # one name as a string: that operator (it was split into letters)
    assert prepared.read_bytes() == before and prepared.stat().st_nlink == 1
    assert linked.placement.fallbacks == report.fallbacks and linked.sha256["model.onnx"] != full.sha256["model.onnx"]
    with pytest.raises(SettingsError, match=r"keep_on_host names operators the prepared model does not have: "
                                            r"nope"):
        quantize(shapes, "cpu", path, mapname="bad", calib_steps=8, output_root=tmp_path, keep_on_host=["nope"])
    assert not (tmp_path / "mapsave" / "bad").exists()


def test_a_ppq_failure_names_the_operator_it_arose_at(tmp_path) -> None:
    """PPQ's own Resize kernel cannot take a Resize by ``sizes`` alone (scales absent): the error names
    that operator, which is what keeps it on the host; maptools runs it in onnxruntime instead."""
    from maptools.quantization import ppq_adapter as _ppq

    model, shapes = resize_model("nearest", "asymmetric", "floor", by_sizes=True)
    path = _save(model, tmp_path / "resize.onnx")
    result = quantize(shapes, "cpu", path, mapname="resize", calib_steps=8, output_root=tmp_path, error_steps=0)
    assert not result.placement.fallbacks  # the failing kernel was switched to onnxruntime while tracing
    prepared = result.map_dir / "model.onnx"
    graph = _ppq.load_ppq_graph(prepared, onnx.load(str(prepared)))
    resize = next(op for op in graph.operations.values() if op.type == "Resize")
    resize.platform = _ppq.TargetPlatform.TRT_INT8
    executor = _ppq.TorchExecutor(graph=graph, device="cpu")
    feed = {"x": torch.zeros(shapes["x"])}
    with pytest.raises(QuantizationFailed, match=rf"PPQ failed while running the model at {resize.name} "
                                                 r"\(Resize\).*NoneType") as caught:
        with _ppq.ppq_step("running the model"):
            executor.forward(inputs=feed)  # PPQ's kernel, outside the tracing probe
    assert caught.value.operator == resize.name


def test_the_kernel_check_a_group_of_operators_at_a_time_switches_the_same(tmp_path, monkeypatch) -> None:
    """PPQ's kernels are checked against onnxruntime's tensors of one sample; a model whose tensors take more than
    ``CHECK_BYTES`` (torchvision's mvit_v2_s: 10.9 GiB, killed beyond 15 GB) is checked a group of operators at a
    time, one onnxruntime run each: the same kernels go to onnxruntime (here two uneven average pools)."""
    from maptools.quantization import ppq_adapter

    model, shapes = IDIOMS["uneven_average_pools"]()
    path = _save(model, tmp_path / "pools.onnx")
    check, grouped = ppq_adapter._float_check, ppq_adapter._grouped
    switched: list[list[str]] = []
    groups: list[int] = []
    monkeypatch.setattr(ppq_adapter, "_float_check", lambda *a, **k: switched.append(check(*a, **k)) or switched[-1])
    monkeypatch.setattr(ppq_adapter, "_grouped", lambda *a: groups.append(len(grouped(*a))) or grouped(*a))
    for budget in (ppq_adapter.CHECK_BYTES, 1):
        monkeypatch.setattr(ppq_adapter, "CHECK_BYTES", budget)
        quantize(shapes, "cpu", path, mapname=f"b{budget}", calib_steps=8, output_root=tmp_path, error_steps=0,
                 algorithm="minmax")
    assert len(switched) == 2 and len(switched[0]) == 2 and switched[0] == switched[1]
    assert groups[0] == 1 and groups[-1] > 4  # every operator its own group


def test_a_model_kept_on_the_host_whole_has_an_empty_error_report(tmp_path) -> None:
    """Every operator on the host (here kept there on purpose, as onnxruntime's int8 exports are): nothing on the
    device to measure, so the per-layer report is empty, and no note claims PPQ failed."""
    model, shapes = IDIOMS["leaky_max_min"]()
    path = _save(model, tmp_path / "m.onnx")
    probe = quantize(shapes, "cpu", path, mapname="probe", calib_steps=8, output_root=tmp_path, error_steps=0)
    every = [n.name for n in onnx.load(str(probe.map_dir / "model.onnx")).graph.node]
    result = quantize(shapes, "cpu", path, mapname="host", calib_steps=8, output_root=tmp_path, keep_on_host=every)
    assert result.placement.device_ops == 0 and result.errors.per_layer == {}
    assert not [n for n in result.notes if "error report" in n], result.notes
    assert read_quantinfo("host", tmp_path) == {}


@pytest.mark.parametrize("follows", [True, False])
def test_an_already_quantized_model_is_named_so_and_its_work_counted(follows: bool, tmp_path) -> None:
    """onnxruntime's dynamic quantization (DynamicQuantizeLinear + MatMulInteger, as text2tashkeel and
    ddddocr ship) comes back to a float MatMul on the crossbars; where the rewrite cannot follow it (the scale
    applied another way), the integer matmul stays: matrix work the crossbars do not get, and the result says
    why."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.integers(-127, 128, (64, 32)).astype(np.int8), "wq"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "wz"),
             onnx.numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    graph = helper.make_graph([
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="quantize"),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"], name="matmul"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["xs", "ws"] if follows else ["ws", "ws"], ["s"], name="scale"),
        helper.make_node("Mul", ["accf", "s"], ["y"], name="dequantize")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "q.onnx")
    result = quantize({"x": [8, 64]}, "cpu", path, mapname="q", calib_steps=8, output_root=tmp_path, error_steps=0)
    assert result.placement.total_macs == 8 * 64 * 32
    assert result.placement.crossbar_coverage == (1.0 if follows else 0.0)
    assert any(n.startswith("the model is quantized already (DynamicQuantizeLinear, MatMulInteger)")
               for n in result.notes) != follows, result.notes
    assert any(s.startswith("the model is quantized: rewritten as float (1 MatMulInteger)")
               for s in result.prepared["steps"]) == follows


def test_operators_calibration_drives_to_nan_stay_on_the_host(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """A diffusion model's noise level goes through a Log before its embedding: random calibration samples are
    negative half the time, so the embedding's two layers have no finite range. They stay on the host, both after
    one more PPQ run (a NaN reaches every operator after its source: a U-Net's every block), and the note says why
    and what to pass, where it had ended the run with a broken requantization ratio; strict makes it the error."""
    rng = np.random.default_rng(3)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, s, (rng.standard_normal(s) * 0.3).astype(np.float32).ravel())
             for n, s in (("w", [4, 3, 3, 3]), ("e", [8, 1]), ("f", [8, 8]))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Log", ["sigma"], ["level"], name="log"),
         helper.make_node("Gemm", ["level", "e"], ["hidden"], name="embed", transB=1),
         helper.make_node("Gemm", ["hidden", "f"], ["embedding"], name="project", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16]),
         helper.make_tensor_value_info("sigma", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "embedding")], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "log.onnx")
    shapes = {"x": [1, 3, 16, 16], "sigma": [1, 1]}
    with caplog.at_level("WARNING", logger="maptools.quantization.api"):
        result = quantize(shapes, "cpu", path, mapname="log", calib_steps=8, output_root=tmp_path, error_steps=0)
    assert result.placement.fallbacks.keys() == {"embed", "project"}, result.placement
    assert caplog.text.count("quantizing again") == 1
    assert any("no finite range" in n and "pass real samples as calibset" in n for n in result.notes), result.notes
    with pytest.raises(QuantizationFailed, match="no finite range"):
        quantize(shapes, "cpu", path, mapname="strict", calib_steps=8, output_root=tmp_path, error_steps=0,
                 strict=True)
