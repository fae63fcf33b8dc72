"""The operator graph: parsing, shapes and attributes, quantinfo attached and checked, split, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import networkx as nx
import onnx
import onnx.helper as oh
import pytest

from maptools import read_quantinfo
from maptools.maps.artifacts import verify_map
from maptools.conversion import DEVICE, GRAPH_FILE, OperatorGraph, build_graph, convert, read_graph
from maptools.errors import ArtifactError, ConversionError, ModelError


def _in_edges(graph: OperatorGraph, name: str) -> list[tuple[str, str, int]]:
    """(producer, tensor, index) of an operator's incoming edges, in input order."""
    edges = sorted(graph.graph.in_edges(name, data=True), key=lambda e: e[2]["index"])
    return [(u, d["tensor"], d["index"]) for u, _, d in edges]


def test_resnet18_graph(resnet18) -> None:
    g = build_graph(resnet18)
    types = Counter(d["op_type"] for _, d in g.graph.nodes(data=True))
    assert types == {"Conv": 20, "Relu": 17, "Add": 8, "MaxPool": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert g.graph.number_of_nodes() == 49 and g.graph.number_of_edges() == 56  # 48 chain edges + 8 residuals
    assert g.inputs == {"input": [1, 3, 224, 224]} and g.outputs == {"output": [1, 1000]}
    order = g.operators()
    assert order[0] == "/conv1/Conv" and order[-1] == "/fc/Gemm" and nx.is_directed_acyclic_graph(g.graph)
    stem = g.node("/conv1/Conv")
    assert stem["attrs"] == {"kernel": [7, 7], "strides": [2, 2], "dilations": [1, 1], "pads": [3, 3, 3, 3],
                             "groups": 1, "in_channels": 3, "out_channels": 64, "bias": True}
    assert stem["output_shapes"] == [[1, 64, 112, 112]] and list(stem["params"].values()) == [[64, 3, 7, 7], [64]]
    pool = g.node("/maxpool/MaxPool")
    assert pool["attrs"] == {"kernel": [3, 3], "strides": [2, 2], "dilations": [1, 1], "pads": [1, 1, 1, 1],
                             "ceil_mode": 0}
    assert pool["output_shapes"] == [[1, 64, 56, 56]]
    assert g.node("/layer4/layer4.1/relu_1/Relu")["output_shapes"] == [[1, 512, 7, 7]]
    assert g.node("/fc/Gemm")["attrs"]["in_features"] == 512 and g.node("/Flatten")["output_shapes"] == [[1, 512]]
    # residual Add: the block's conv2 first, the shortcut second, as in the ONNX node
    assert _in_edges(g, "/layer1/layer1.0/Add") == [
        ("/layer1/layer1.0/conv2/Conv", "/layer1/layer1.0/conv2/Conv_output_0", 0),
        ("/maxpool/MaxPool", "/maxpool/MaxPool_output_0", 1)]
    for u, v, d in g.graph.edges(data=True):
        assert d["shape"] == g.node(u)["output_shapes"][0] == g.node(v)["input_shapes"][d["index"]]
    assert {d["part"] for _, d in g.graph.nodes(data=True)} == {DEVICE}


def test_branchy_graph_with_concat(branchy_cnn) -> None:
    g = build_graph(branchy_cnn)
    assert g.graph.number_of_nodes() == 16  # the two Constant nodes of Clip are folded into constants
    assert g.graph.number_of_edges() == 18
    concat = next(n for n, d in g.graph.nodes(data=True) if d["op_type"] == "Concat")
    assert [u for u, _, _ in _in_edges(g, concat)] == ["/b1/b1.1/Relu", "/b2/b2.1/Clip", "/b3/b3.2/LeakyRelu"]
    assert g.node(concat)["input_shapes"] == [[1, 8, 32, 32]] * 3
    assert g.node(concat)["output_shapes"] == [[1, 24, 32, 32]] and g.node(concat)["attrs"] == {"axis": 1}
    assert g.node("/b2/b2.1/Clip")["attrs"] == {"min": 0.0, "max": 6.0}
    assert g.node("/b3/b3.0/AveragePool")["attrs"]["count_include_pad"] == 1
    assert g.node("/b3/b3.2/LeakyRelu")["attrs"] == {"alpha": pytest.approx(0.1)}
    stem_out = "/stem/stem.2/Relu"
    assert sorted(g.graph.successors(stem_out)) == ["/b1/b1.0/Conv", "/b2/b2.0/Conv", "/b3/b3.0/AveragePool"]
    # y * sigmoid(y) is a gated activation: one lookup table over y's codes, on the device
    mul = g.node("/Mul")
    assert (mul["part"], mul["role"], g.node("/Sigmoid")["role"]) == (DEVICE, "lut", "gate")
    assert _in_edges(g, "/Mul") == [("/Concat", "/Concat_output_0", 0), ("/Sigmoid", "/Sigmoid_output_0", 1)]
    assert g.node("/Concat")["role"] == "concat" and g.node("/b1/b1.0/Conv")["role"] == "crossbar"
    assert not g.host_part().graph.nodes and g.device_part().graph.number_of_nodes() == 16


def test_convert_attaches_quantinfo_and_round_trips(resnet_result) -> None:
    root = resnet_result.output_root
    result = convert("resnet18", output_root=root)
    assert (result.nodes, result.edges, result.device_ops, result.host_ops) == (49, 56, 49, 0)
    assert result.graph_path == resnet_result.map_dir / GRAPH_FILE and result.quantized
    assert verify_map(resnet_result.map_dir)  # the graph file beside the artifacts breaks nothing
    info = read_quantinfo("resnet18", root)
    graph = read_graph("resnet18", root)
    for name, data in graph.graph.nodes(data=True):
        assert data["quant"] == info[name]
        if data["op_type"] == "Conv":
            assert data["quant"].weight_scale.shape == (data["attrs"]["out_channels"],)
    # JSON round trip: the file reloads to an identical graph and re-serialises to the same text
    text = result.graph_path.read_text()
    again = OperatorGraph.from_json(json.loads(text))
    assert again.to_json() == graph.to_json() == json.loads(text)
    assert nx.utils.graphs_equal(again.graph, graph.graph) and list(again.graph.edges(keys=True)) == list(
        graph.graph.edges(keys=True))
    assert not list(resnet_result.map_dir.glob("*.incomplete"))


def test_attach_reports_missing_and_foreign_configs(small_cnn, small_result) -> None:
    info = read_quantinfo("small", small_result.output_root)
    conv = "/block/block.0/Conv"
    missing = {k: v for k, v in info.items() if k not in (conv, "/head/head.2/Gemm", "/Add")}
    with pytest.raises(ConversionError, match="3 device operator") as e:
        build_graph(small_cnn).attach_quantinfo(missing)
    assert all(name in str(e.value) for name in (conv, "/head/head.2/Gemm", "/Add"))
    with pytest.raises(ConversionError, match="quantization config: /block/block.0/Conv \\(no weight scales\\)"):
        build_graph(small_cnn).attach_quantinfo({**info, conv: dataclasses.replace(info[conv], weight_scale=None)})
    # the adder's inputs meet on its output grid: an edited map without one is refused here, not by simulate
    assert info["/Add"].output_scale is not None
    with pytest.raises(ConversionError, match=r"/Add \(no output scale.*Fix: quantize the model"):
        build_graph(small_cnn).attach_quantinfo({**info, "/Add": dataclasses.replace(info["/Add"], output_scale=None)})
    with pytest.raises(ConversionError, match="does not have: /other/Conv.*another model"):
        build_graph(small_cnn).attach_quantinfo({**info, "/other/Conv": info[conv]})
    with pytest.raises(ConversionError, match="disagree"):
        build_graph(small_cnn).attach_quantinfo({**info, conv: dataclasses.replace(info[conv], op_type="Gemm")})


def test_unsupported_operators_are_listed(tmp_path) -> None:
    """Any standard ONNX operator converts (it runs on the host), as does one of another domain; names that
    are no operator of the default domain are listed in one error."""
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    standard = [oh.make_node("Relu", ["x"], ["a"], name="relu"), oh.make_node("LRN", ["a"], ["b"], name="lrn", size=3),
                oh.make_node("Erf", ["b"], ["y"], name="erf")]
    model = oh.make_model(oh.make_graph(standard, "g", [x], [y]), opset_imports=[oh.make_opsetid("", 13)])
    g = build_graph(model)
    assert [g.node(n)["part"] for n in ("relu", "lrn", "erf")] == ["host"] * 3  # no crossbar work before them
    odd = [oh.make_node("Relu", ["x"], ["a"], name="relu"), oh.make_node("Frobnicate", ["a"], ["b"], name="frob"),
           oh.make_node("Softsign", ["b"], ["y"], name="soft", domain="")]
    model = oh.make_model(oh.make_graph(odd, "g", [x], [y]), opset_imports=[oh.make_opsetid("", 13)])
    with pytest.raises(ConversionError, match=r"1 operator\(s\): frob \(Frobnicate\): not an ONNX operator at opset "
                                              r"13.*standard ONNX"):
        build_graph(model)
    # an operator of another domain that onnxruntime runs (a contrib operator) is host work
    contrib = [oh.make_node("Relu", ["x"], ["a"], name="relu"),
               oh.make_node("Gelu", ["a"], ["y"], name="gelu", domain="com.microsoft")]
    model = oh.make_model(oh.make_graph(contrib, "g", [x], [y]), opset_imports=[
        oh.make_opsetid("", 13), oh.make_opsetid("com.microsoft", 1)])
    g = build_graph(model)
    assert g.node("gelu")["part"] == "host" and g.node("gelu")["op_type"] == "Gelu"


def _copy_map(result, root: Path) -> Path:
    shutil.copytree(result.map_dir, root / "mapsave" / result.mapname)
    return root / "mapsave" / result.mapname


def test_convert_checks_model_and_artifacts(small_result, resnet_result, resnet18, tmp_path) -> None:
    with pytest.raises(ModelError, match="not the model map 'small' was quantized from"):
        convert("small", resnet18, output_root=small_result.output_root)
    with pytest.raises(ModelError, match="does not exist"):
        convert("small", tmp_path / "gone.onnx", output_root=small_result.output_root)
    with pytest.raises(ModelError, match="is a folder, not an ONNX model file"):
        convert("small", tmp_path, output_root=small_result.output_root)
    with pytest.raises(ArtifactError, match="manifest.json does not exist"):
        convert("nothing-here", output_root=tmp_path)
    folder = _copy_map(small_result, tmp_path)
    (folder / "quantparams.pkl").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        convert("small", output_root=tmp_path)


def test_read_graph_refuses_a_graph_of_other_artifacts(small_result, resnet_result, tmp_path) -> None:
    convert("resnet18", output_root=resnet_result.output_root)
    convert("small", output_root=small_result.output_root)  # its graph is registered in its manifest
    folder = _copy_map(small_result, tmp_path)
    (folder / GRAPH_FILE).unlink(missing_ok=True)
    with pytest.raises(ArtifactError, match="convert --mapname small"):
        read_graph("small", tmp_path)
    shutil.copy(resnet_result.map_dir / GRAPH_FILE, folder / GRAPH_FILE)
    # the graph is registered in the manifest: another map's graph fails its hash
    with pytest.raises(ArtifactError, match="operator_graph.json does not match the sha256"):
        read_graph("small", tmp_path)


def test_every_stage_takes_the_map_a_quantization_returned(small_result, tmp_path) -> None:
    """``result.map`` (a MapRef: name and output root) is all a later stage needs: no paths to take apart."""
    from maptools import MapRef, SettingsError, evaluate_map, read_manifest
    from maptools.simulate import simulate

    ref = small_result.map
    assert ref == MapRef("small", small_result.output_root) and str(ref) == "small"
    assert read_quantinfo(ref) == read_quantinfo("small", small_result.output_root)
    assert read_manifest(ref)["mapname"] == "small"
    converted = convert(ref)
    assert converted.mapname == "small" and read_graph(ref).meta["mapname"] == "small"
    assert simulate(ref, "random").outputs["output"].shape == (1, 10)
    assert evaluate_map(ref, samples=2).rel_l2 < 0.5
    with pytest.raises(SettingsError, match="referenced at"):
        read_quantinfo(ref, tmp_path)  # one root, not two
    assert read_quantinfo(ref, small_result.output_root) == read_quantinfo(ref)


def test_a_host_operator_with_large_attributes_is_recorded_by_size(tmp_path) -> None:
    """A tree ensemble (LightGBM through onnxmltools: every node of every tree an attribute element) runs from
    the model on the host: the operator graph records its large attributes' sizes, not their values (a 194 MB
    model gave a 348 MB graph and minutes of conversion), and the map still simulates it."""
    import numpy as np
    import onnxruntime as ort

    from maptools import quantize
    from maptools.simulate import simulate

    trees, features = 3000, 8
    rng = np.random.default_rng(0)
    node = oh.make_node(
        "TreeEnsembleRegressor", ["x"], ["y"], domain="ai.onnx.ml", n_targets=1,
        nodes_treeids=np.repeat(np.arange(trees), 3).tolist(), nodes_nodeids=[0, 1, 2] * trees,
        nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"] * trees,
        nodes_featureids=np.stack([rng.integers(0, features, trees), np.zeros(trees, int), np.zeros(trees, int)],
                                  1).ravel().tolist(),
        nodes_values=rng.standard_normal(3 * trees).tolist(), nodes_truenodeids=[1, 0, 0] * trees,
        nodes_falsenodeids=[2, 0, 0] * trees, target_treeids=np.repeat(np.arange(trees), 2).tolist(),
        target_nodeids=[1, 2] * trees, target_ids=[0] * (2 * trees), target_weights=rng.standard_normal(2 * trees).tolist())
    graph = oh.make_graph([node], "trees", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, features])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 1])])
    path = tmp_path / "trees.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13), oh.make_opsetid("ai.onnx.ml", 1)]), str(path))
    result = quantize({"x": [1, features]}, "cpu", path, mapname="trees", calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    convert(result.map)
    assert (result.map_dir / GRAPH_FILE).stat().st_size < 100_000
    (stored,) = json.loads((result.map_dir / GRAPH_FILE).read_text())["nodes"]
    assert stored["attrs"] == {"n_targets": 1} and stored["part"] == "host"
    x = rng.standard_normal((1, features)).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(simulate(result.map, {"x": x}).outputs["y"], reference, atol=1e-5)
