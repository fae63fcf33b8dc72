"""Real-world architectures as their exporters ship them: quantize -> convert -> simulate from the raw export.

Each zoo model (:mod:`maptools.zoo`) is exported at opsets 11, 13 and 17 with a dynamic batch and
goes through the pipeline with only ``input_shapes``; the integer simulation must agree with
PPQ's simulation layer by layer, as for the hand-built models (``tests/test_simulate.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maptools import quantize, read_quantinfo, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.errors import InputShapeError, ModelError
from maptools.settings import QuantSettings
from maptools.simulate import IntegerSimulator, simulate
from maptools.zoo import ZOO, export_zoo_model
from tests.agreement import layer_agreement

OPSETS = (11, 13, 17)
CALIB = 8


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    folder = tmp_path_factory.mktemp("zoo")
    return {(name, opset): export_zoo_model(name, folder / f"{name}-{opset}.onnx", opset)
            for name in ZOO for opset in OPSETS}


@pytest.fixture(scope="module")
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shapes(name: str) -> dict[str, list[int]]:
    return {"input": list(ZOO[name].input_shape)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", list(ZOO))
def test_raw_export_quantizes_converts_and_simulates(name, opset, exports, tmp_path, one_thread) -> None:
    source = exports[name, opset]
    dims = onnx.load(str(source)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"  # as shipped: a symbolic batch
    started = time.perf_counter()
    result = quantize(_shapes(name), "cpu", source, mapname=name, calib_steps=CALIB, output_root=tmp_path)
    seconds = time.perf_counter() - started
    assert result.prepared["opset"] == 13 and result.prepared["source_opset"] == opset
    converted = convert(name, output_root=tmp_path)
    assert converted.device_ops > 0
    graph = read_graph(name, tmp_path)
    assert set(read_quantinfo(name, tmp_path)) == {n for n in graph.operators() if graph.node(n)["part"] == "device"}
    rng = np.random.default_rng(7)
    x = rng.standard_normal([2, *ZOO[name].input_shape[1:]]).astype(np.float32)
    simulated = simulate(name, {"input": x}, output_root=tmp_path).outputs
    float_model = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in float_model.get_outputs()], float_model.run(None, {"input": x})))
    assert set(simulated) == set(reference)
    errors = {k: _rel(simulated[k], reference[k]) for k in reference}
    # random weights, random calibration data: a loose bound that still catches a broken layer
    assert max(errors.values()) < 0.25, errors
    exported = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"])
    ran = exported.run(None, {"input": x[:1]})
    assert [r.shape for r in ran] == [r.shape for r in float_model.run([o.name for o in exported.get_outputs()],
                                                                      {"input": x[:1]})]
    parts = [graph.node(n)["part"] for n in graph.operators()]
    print(f"{name} opset {opset}: {len(parts)} ops ({parts.count('device')} device, {parts.count('host')} host), "
          f"quantize {seconds:.1f} s, rel. L2 error vs float {max(errors.values()):.4f}")


@pytest.mark.parametrize("name", list(ZOO))
def test_integer_simulation_agrees_with_ppq(name, exports, tmp_path, one_thread) -> None:
    """Each device operator, run on PPQ's own input codes, lands within one step of PPQ's output."""
    from maptools.quantization import ppq_adapter as _ppq
    from maptools.calibration import RandomCalibration

    shapes = _shapes(name)
    result = quantize(shapes, "cpu", exports[name, 13], mapname=name, calib_steps=CALIB, output_root=tmp_path)
    convert(name, output_root=tmp_path)
    graph = read_graph(name, tmp_path)
    sim = IntegerSimulator(graph, read_quantparams(name, tmp_path))
    calib = RandomCalibration({"input": tuple(shapes["input"])}, CALIB)
    ppq_graph = _ppq.quantize_graph(result.map_dir / "model.onnx", calib, CALIB, next(iter(calib)),
                                    QuantSettings(calib_steps=CALIB, algorithm="percentile"), "cpu")
    assert ppq_graph.quantinfo() == read_quantinfo(name, tmp_path)
    x = np.random.default_rng(3).standard_normal(shapes["input"]).astype(np.float32)
    agreement = layer_agreement(sim, graph, ppq_graph, x)
    worst = min(agreement, key=agreement.get)
    assert agreement and agreement[worst] >= 0.999, (worst, agreement[worst])
    ours, theirs = sim.run({"input": x}).outputs, ppq_graph.run({"input": torch.from_numpy(x)})
    for output in graph.outputs:
        assert _rel(ours[output], theirs[output]) < 0.05
    print(f"{name}: worst operator output {worst} {agreement[worst]:.5%} within one step of PPQ's")


def test_legacy_minus_one_dims_are_dynamic(exports, tmp_path) -> None:
    """Older exporters write a dynamic axis as dim_value -1: it is fixed from input_shapes, not refused."""
    model = onnx.load(str(exports["prelu_net", 11]))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "legacy.onnx"
    onnx.save(model, str(path))
    result = quantize({"input": [1, 3, 48, 48]}, "cpu", path, mapname="legacy", calib_steps=CALIB,
                      output_root=tmp_path)
    assert "input dims fixed to input=[1, 3, 48, 48]" in result.prepared["steps"]
    with pytest.raises(InputShapeError, match=r"axis 1 is fixed to 3.*\[1, 3, 48, 48\]"):
        quantize({"input": [1, 4, 48, 48]}, "cpu", path, mapname="legacy", output_root=tmp_path)


def test_models_that_cannot_be_prepared_fail_cleanly(exports, tmp_path) -> None:
    # a Reshape to a constant batch of 1 cannot take a batch of 2
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 2])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 2, 2])
    fixed = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["input", "shape"], ["y"], name="r")],
                                                "g", [x], [y], [shape]), opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "fixed_batch.onnx"
    onnx.save(fixed, str(path))
    with pytest.raises(MaptoolsErrorTypes, match="r|Reshape|input_shapes"):
        quantize({"input": [2, 4]}, "cpu", path, mapname="bad", output_root=tmp_path)
    assert not (tmp_path / "mapsave" / "bad").exists()
    # an operator with no opset-13 form is no bad input: the model keeps its opset and the operator the host
    tri = helper.make_model(helper.make_graph(
        [helper.make_node("Trilu", ["input"], ["y"], name="tri")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])]), opset_imports=[helper.make_opsetid("", 14)])
    path = tmp_path / "trilu.onnx"
    onnx.save(tri, str(path))
    result = quantize({"input": [4, 4]}, "cpu", path, mapname="tri", calib_steps=8, output_root=tmp_path)
    assert any("converting to opset 13 skipped" in s and "tri (Trilu): defined at opset 14" in s
               for s in result.prepared["steps"])
    assert result.placement.host_ops == {"tri": "Trilu has no device form"} and not read_quantinfo("tri", tmp_path)


MaptoolsErrorTypes = (ModelError, InputShapeError)
