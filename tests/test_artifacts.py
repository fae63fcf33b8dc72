"""The artifacts' contents: configs, integer weights, int32 biases, the QDQ model, the manifest."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from maptools import quantize, read_manifest, read_quantinfo, read_quantparams
from maptools.maps.artifacts import safe_load_pickle, sha256_file, verify_map
from maptools.evaluation import EvaluationSet, evaluate_map
from maptools.errors import UnsafePickleError
from maptools.quantinfo import QuantConfig, quantinfo_from_json
from tests.conftest import initializers, lstm_head_onnx

RESULTS = ["small_result", "resnet_result"]


@pytest.fixture(params=RESULTS)
def result(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


def test_one_config_per_quantized_operator(result) -> None:
    info = read_quantinfo(result.map)
    types = {c.op_type for c in info.values()}
    assert {"Conv", "Relu", "Add", "MaxPool", "Gemm"} <= types
    assert "GlobalAveragePool" in types or "ReduceMean" in types
    head = next(n for n, c in info.items() if c.op_type == "Gemm")
    assert info[head].output_scale is None  # the logits only leave the device: they stay float
    for name, cfg in info.items():
        assert isinstance(cfg, QuantConfig)
        # the seed profile (the default): one signed range per operator
        assert cfg.io_bits == 8 and (cfg.io_min, cfg.io_max) == (-128, 127)
        assert cfg.out_range == (-128, 127) and cfg.in_range(0) == (cfg.io_min, cfg.io_max), name
        assert name == head or cfg.output_scale is not None and cfg.output_scale > 0, name
        assert cfg.input_scale is not None and cfg.input_scale > 0, name
        assert all(s is not None and s > 0 for s in cfg.input_scales), name
        if cfg.op_type in {"Conv", "Gemm"}:
            assert cfg.weight_bits == 8 and (cfg.weight_min, cfg.weight_max) == (-128, 127)
            assert cfg.weight_scale.dtype == np.float32 and np.all(cfg.weight_scale > 0)


def test_every_conv_has_per_channel_scales_and_quantized_input(resnet_result, resnet18) -> None:
    info = read_quantinfo(resnet_result.map)
    nodes = initializers(resnet18)
    convs = [n for n, (node, _) in nodes.items() if node.op_type == "Conv"]
    assert len(convs) == 20 and set(convs) <= set(info)
    for name in convs:
        out_channels = nodes[name][1][1].shape[0]
        assert info[name].weight_scale.shape == (out_channels,)
    # the ResNet trap: the stem's MaxPool output must reach layer1.0.conv1 quantized
    assert info["/layer1/layer1.0/conv1/Conv"].input_scale == pytest.approx(info["/maxpool/MaxPool"].output_scale)


def test_integer_weights_and_int32_biases(result, request) -> None:
    model = request.getfixturevalue("small_cnn" if result.mapname == "small" else "resnet18")
    info = read_quantinfo(result.map)
    params = read_quantparams(result.map)
    nodes = initializers(model)
    weighted = [n for n, c in info.items() if c.op_type in {"Conv", "Gemm"}]
    assert len(params) == 2 * len(weighted)
    for name in weighted:
        cfg = info[name]
        kind = cfg.op_type.lower()
        w_int, b_int = params[f"{name}_{kind}_weight"], params[f"{name}_{kind}_bias"]
        _, (_, w_float, b_float) = nodes[name]
        assert w_int.shape == w_float.shape and np.issubdtype(w_int.dtype, np.integer)
        assert w_int.min() >= cfg.weight_min and w_int.max() <= cfg.weight_max
        scale = cfg.weight_scale.astype(np.float64).reshape([-1] + [1] * (w_float.ndim - 1))
        assert np.all(np.abs(w_int * scale - w_float) <= scale / 2 + 1e-6)
        assert b_int.dtype == np.int32
        expected = np.rint(b_float.astype(np.float64) / (cfg.input_scale * cfg.weight_scale.astype(np.float64)))
        np.testing.assert_array_equal(b_int, expected.astype(np.int32))


def test_json_and_npz_twins_match_pickles(small_result) -> None:
    root = small_result.output_root
    info = read_quantinfo("small", root)
    assert quantinfo_from_json(json.loads((small_result.map_dir / "quantinfo.json").read_text())) == info
    params = read_quantparams("small", root)
    with np.load(small_result.map_dir / "quantparams.npz") as npz:
        assert set(npz.files) == {k for k, v in params.items() if v is not None}
        for key in npz.files:
            np.testing.assert_array_equal(npz[key], params[key])


def test_manifest_hashes_every_artifact(small_result, small_cnn) -> None:
    manifest = read_manifest(small_result.map)
    assert manifest["model"]["sha256"] == sha256_file(small_cnn) == small_result.model_sha256
    assert verify_map(small_result.map_dir) == manifest
    assert manifest["settings"]["weight_bits"] == 8 and manifest["calibration"]["kind"] == "random"
    assert {"ppq", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert set(small_result.sha256) <= set(manifest["artifacts"])  # later stages (convert) may add theirs
    for name, digest in manifest["artifacts"].items():
        assert sha256_file(small_result.map_dir / name) == digest == small_result.sha256.get(name, digest)


def test_error_report_covers_every_conv_and_gemm(result) -> None:
    report = json.loads((result.map_dir / "error_report.json").read_text())["per_layer"]
    info = read_quantinfo(result.map)
    assert set(report) == {n for n, c in info.items() if c.op_type in {"Conv", "Gemm"}}
    assert all(0 <= v < 0.1 for v in report.values())
    assert result.errors.per_layer == report


def test_output_error_is_quant_models_on_the_first_calibration_samples(small_cnn, tmp_path) -> None:
    rng = np.random.default_rng(3)
    samples = [{"input": rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)} for _ in range(12)]
    result = quantize({"input": [1, 3, 32, 32]}, "cpu", small_cnn, mapname="out", calibset=samples, calib_steps=12,
                      algorithm="percentile", error_steps=5, output_root=tmp_path)
    expected = evaluate_map(result.map, evaluation=EvaluationSet(samples[:5]))
    measured = result.errors.outputs
    assert measured is not None and measured.samples == 5 and measured.source == "the first 5 calibration samples"
    assert measured.rel_l2 == pytest.approx(expected.rel_l2, rel=1e-5) and 0 < measured.rel_l2 < 0.2
    assert measured.per_output == pytest.approx(expected.per_output, rel=1e-5)
    assert measured.top1_agreement == expected.top1_agreement
    report = json.loads((result.map_dir / "error_report.json").read_text())["outputs"]
    assert report["rel_l2"] == measured.rel_l2 and result.to_json()["output_error"] == measured.to_dict()
    skipped = quantize({"input": [1, 3, 32, 32]}, "cpu", small_cnn, mapname="out", calibset=samples, calib_steps=12,
                       algorithm="percentile", error_steps=0, output_root=tmp_path)
    assert skipped.errors.outputs is None and skipped.errors.per_layer == {}


def test_onnxruntime_matches_ppq_simulation(small_cnn) -> None:
    """Rebuild PPQ's graph with the same settings and compare its simulation with onnxruntime."""
    from maptools.quantization import ppq_adapter as _ppq
    from maptools.calibration import RandomCalibration
    from maptools.settings import QuantSettings

    settings = QuantSettings(calib_steps=16, algorithm="percentile")
    calib = RandomCalibration({"input": (1, 3, 32, 32)}, 16)
    graph = _ppq.quantize_graph(small_cnn, calib, 16, next(iter(calib)), settings, "cpu")
    path = small_cnn.with_name("qdq.onnx")
    path.write_bytes(graph.qdq_model())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(123)
    for _ in range(8):
        x = torch.randn(1, 3, 32, 32, generator=gen)
        ppq_out = graph.run({"input": x})["output"].ravel()
        ort_out = session.run(None, {"input": x.numpy()})[0].ravel()
        cosine = float(np.dot(ppq_out, ort_out) / (np.linalg.norm(ppq_out) * np.linalg.norm(ort_out)))
        assert cosine >= 0.999


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "attention_net"])
def test_error_report_in_onnxruntime_matches_ppqs_analysis(name, tmp_path) -> None:
    """The report measured by onnxruntime on the QDQ model is PPQ's graphwise SNR (same operators, same
    4096 seeded positions per row), up to the rounding differences of the two executions."""
    from maptools.quantization import ppq_adapter as _ppq  # first: its shims let ppq import
    from maptools.quantization.reference import LCG_STATES
    from maptools.calibration import RandomCalibration
    from maptools.prepare import prepare_model
    from maptools.settings import QuantSettings
    from maptools.zoo import ZOO, export_zoo_model
    from ppq.utils.fetch import generate_indexer

    for numel in (7, 96, 4096, 1 << 20):
        assert np.array_equal(LCG_STATES % numel, generate_indexer(4096, numel, seed=10086).numpy())
    shapes = {"input": ZOO[name].input_shape}
    model = prepare_model(export_zoo_model(name, tmp_path / "m.onnx"), tmp_path / "p.onnx", shapes).path
    calib = RandomCalibration(shapes, 16)
    graph = _ppq.quantize_graph(model, calib, 16, next(iter(calib)), QuantSettings(algorithm="percentile"),
                                "cpu")
    ours = graph.error_report(calib, steps=8, qdq=graph.qdq_model())
    theirs = graph.error_report(calib, steps=8)
    assert list(ours) == list(theirs) and len(ours) >= 7  # attention_net: Gemms PPQ made of MatMuls, one row a token
    ratio = np.array([ours[k] / theirs[k] for k in theirs])
    # the executions differ by a quantization step here and there; on a 10-value output one such step moves the
    # SNR by up to 40% (mobilenet's last Gemm: 12% over 8 samples); a wrong tensor or row count is off by 10x
    assert np.median(np.abs(ratio - 1)) < 0.01 and np.all(np.abs(ratio - 1) < 0.25), dict(zip(theirs, ratio))


def test_a_single_logit_near_zero_is_not_read_as_a_lost_signal(tmp_path) -> None:
    """A head of one logit (a hand detector's presence score) whose float value is zero on a sample: that sample's
    own noise/signal ratio explodes, so the report pools such an output's powers over the samples (what
    ``quant_model.onnx`` loses on them) and no note calls the head's signal lost."""
    from tests.exporters import _Builder

    b = _Builder(3)
    logit = b.head(b.op("Relu", [b.conv(b.op("Relu", [b.conv("input", 3, 8)]), 8, 16)]), 16, classes=1)
    model = b.model({"input": [1, 3, 16, 16]}, [logit], 13)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    bias = next(i for i in model.graph.initializer if i.name == model.graph.node[-1].input[2])
    first = ort.InferenceSession(model.SerializeToString()).run(None, calib[0])[0]
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) - first[0], bias.name))
    onnx.save(model, tmp_path / "m.onnx")
    result = quantize({"input": [1, 3, 16, 16]}, "cpu", tmp_path / "m.onnx", mapname="m", calibset=calib,
                      calib_steps=8, error_steps=8, algorithm="percentile", output_root=tmp_path)
    expected = np.array([ort.InferenceSession(model.SerializeToString()).run(None, c)[0] for c in calib], np.float64)
    got = np.array([ort.InferenceSession(str(result.quant_model_path)).run(None, c)[0] for c in calib], np.float64)
    assert abs(expected[0]).max() < 1e-5 and np.any(got != expected)  # the first sample's logit is zero in float
    head = model.graph.node[-1].name
    assert result.errors.per_layer[head] == pytest.approx(((got - expected) ** 2).sum() / (expected ** 2).sum(),
                                                          rel=1e-3, abs=1e-7)
    assert not any("lose their signal" in n for n in result.notes), result.notes


def test_quant_model_runs_in_onnxruntime(resnet_result) -> None:
    session = ort.InferenceSession(str(resnet_result.quant_model_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)})[0]
    assert out.shape == (1, 1000) and np.all(np.isfinite(out))


def test_same_seed_gives_identical_artifacts(small_cnn, small_result, tmp_path) -> None:
    from maptools import quantize

    again = quantize({"input": [1, 3, 32, 32]}, "cpu", small_cnn, mapname="small", calib_steps=16,
                     output_root=tmp_path)
    assert read_quantinfo("small", tmp_path) == read_quantinfo(small_result.map)
    for name in ("quantinfo.pkl", "quantparams.pkl", "quantparams.npz"):
        assert again.sha256[name] == small_result.sha256[name]
    other = quantize({"input": [1, 3, 32, 32]}, "cpu", small_cnn, mapname="other", calib_steps=16, seed=1,
                     output_root=tmp_path)
    assert other.sha256["quantinfo.pkl"] != small_result.sha256["quantinfo.pkl"]


def test_unpickler_refuses_foreign_classes(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"conv": Evil()}))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        safe_load_pickle(path)
    path.write_bytes(pickle.dumps({"x": np.arange(3), "c": QuantConfig("Relu", 8, -128, 127, 0.1, 0.1)}))
    assert safe_load_pickle(path)["c"].op_type == "Relu"


def test_concurrent_writers_of_one_map_never_interleave(small_cnn, tmp_path) -> None:
    import threading

    from maptools import quantize

    results = {}

    def write(seed: int) -> None:
        results[seed] = quantize({"input": [1, 3, 32, 32]}, "cpu", small_cnn, mapname="shared", calib_steps=8,
                                 seed=seed, output_root=tmp_path)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1, 2]
    manifest = verify_map(tmp_path / "mapsave" / "shared")  # every file from the same run
    assert manifest["artifacts"] == results[manifest["settings"]["seed"]].sha256
    entries = sorted(p.name for p in (tmp_path / "mapsave").iterdir())
    versions = [e for e in entries if e.startswith(".shared.v-")]
    assert "shared" in entries and len(versions) == 2  # the current version and the one before
    assert not [e for e in entries if "incomplete" in e or ".link-" in e]
    # each run's own version, while kept, holds exactly that run's files
    kept = [r for r in results.values() if r.version_dir.is_dir()]
    assert len(kept) == 2
    for r in kept:
        assert {n: sha256_file(r.version_dir / n) for n in r.sha256} == r.sha256


def test_same_inputs_give_byte_identical_artifacts(small_cnn, resnet_result, tmp_path) -> None:
    """PPQ names the tensors its exporter adds from a process-wide counter; the export renames them in
    order of use, so a second run (the counter moved on) writes the same bytes."""
    from maptools.examples import SMALL_CNN_SHAPES

    first = quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="a", calib_steps=8, output_root=tmp_path)
    second = quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="b", calib_steps=8, output_root=tmp_path)
    assert first.sha256 == second.sha256


def test_a_weight_every_step_reads_is_written_once(tmp_path) -> None:
    """A written-out LSTM's steps read one recurrent weight; PPQ copies it for each step's Gemm. The map holds it
    once: one initializer in quant_model.onnx (which still runs), one array in quantparams.pkl."""
    from collections import Counter

    path = lstm_head_onnx(tmp_path / "head.onnx", steps=12, hidden=32)
    result = quantize({"x": [1, 12, 16]}, "cpu", path, mapname="head", calib_steps=8, output_root=tmp_path)
    qdq = onnx.load(str(result.quant_model_path))
    steps = [n for n in qdq.graph.node if n.op_type == "Gemm" and "_recurrent" in n.name]
    assert len(steps) == 11
    contents = Counter((t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes())
                       for t in qdq.graph.initializer)
    assert contents.most_common(1)[0][1] == 1  # no tensor twice
    readers = Counter(name for n in qdq.graph.node for name in n.input)
    assert max(readers[t.name] for t in qdq.graph.initializer if tuple(t.dims) == (128, 32)) >= 11
    x = np.random.default_rng(0).standard_normal((1, 12, 16)).astype(np.float32)
    out = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    float_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.linalg.norm(out[0] - float_out[0]) < 0.1 * np.linalg.norm(float_out[0])

    params = safe_load_pickle(result.map_dir / "quantparams.pkl", seed=True)
    weights = [params[f"{n.name}_gemm_weight"] for n in steps]
    assert all(w is weights[0] for w in weights)  # one object: the pickle holds it once
    twins = read_quantparams(result.map)
    assert all(np.array_equal(twins[f"{n.name}_gemm_weight"], twins[f"{steps[0].name}_gemm_weight"]) for n in steps)
    unique = sum(a.nbytes for a in {id(a): a for a in params.values() if isinstance(a, np.ndarray)}.values())
    assert (result.map_dir / "quantparams.pkl").stat().st_size < 1.2 * unique


def test_one_copy_each_keeps_inputs_and_subgraph_reads(tmp_path) -> None:
    """Equal initializers become one; one that is a graph input (IR < 4) or that a subgraph reads keeps its name,
    and the model computes the same."""
    from onnx import TensorProto, helper, numpy_helper

    from maptools.onnx_model import one_copy_each

    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    inits = [numpy_helper.from_array(w, name) for name in ("w1", "w2", "w3", "w_in", "w_sub")]
    branch = helper.make_graph([helper.make_node("MatMul", ["y2", "w_sub"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["y2"], ["c"])], "else", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"]), helper.make_node("MatMul", ["y1", "w2"], ["y2"]),
         helper.make_node("MatMul", ["y2", "w3"], ["y3"]), helper.make_node("MatMul", ["y3", "w_in"], ["y4"]),
         helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=other),
         helper.make_node("Add", ["y4", "z"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    feed = {"x": np.ones((1, 4), np.float32), "cond": np.array(True)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert one_copy_each(model) == 2
    assert [t.name for t in model.graph.initializer] == ["w1", "w_in", "w_sub"]
    assert [n.input[1] for n in model.graph.node[:4]] == ["w1", "w1", "w1", "w_in"]
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(before[0], after[0])


def test_rows_shorter_than_the_fetches_come_whole_and_weighted() -> None:
    """The per-layer report reads 4096 seeded positions a row; a row of 96 (a token Gemm's: MaxViT's had 25088 rows)
    is fetched whole, 96 values instead of 4096 copies of them (its gathered form took 411 MB a sample, and 16
    kept samples ran a quantization out of memory), weighted by how often PPQ's positions hit each value: the same
    SNR as the gathered copy."""
    from onnx import TensorProto, helper

    from maptools.quantization.reference import LCG_STATES, fetch_name, fetch_nodes, fetch_weights

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [500, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [500, 96])])
    nodes, inits, outputs = fetch_nodes({"y": 96})
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.output.extend(outputs)
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 96)).astype(np.float32)
    rows = session.run([fetch_name("y")], {"x": x})[0]
    assert rows.shape == (500, 96) and fetch_weights(4096) is None
    noisy = rows + 0.1 * rng.standard_normal(rows.shape)
    w = fetch_weights(96)
    weighted = (((noisy - rows) ** 2 * w).sum(axis=1) / ((rows ** 2 * w).sum(axis=1) + 1e-7)).mean()
    gathered_y, gathered_x = (np.take(a, LCG_STATES % 96, axis=1) for a in (rows, noisy))
    assert gathered_y.shape == (500, 4096)
    gathered = (((gathered_x - gathered_y) ** 2).sum(axis=1) / ((gathered_y ** 2).sum(axis=1) + 1e-7)).mean()
    assert abs(weighted - gathered) < 1e-6 * gathered  # (summed in another order)
