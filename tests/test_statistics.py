"""Calibration statistics computed inside onnxruntime give the artifacts PPQ's own forward gives."""

from __future__ import annotations

import pytest

from maptools import quantize
from maptools.quantization.ppq_adapter import calibration as _ppq
from maptools.examples import SMALL_CNN_SHAPES


@pytest.mark.parametrize("algorithm, batch, in_onnxruntime", [
    ("percentile", 16, [True]), ("minmax", 16, [True]), ("mse", 1, [True, True]), ("kl", 1, [True, True]),
    ("mse", 16, [True, False])])
def test_onnxruntime_statistics_equal_ppq_forward(branchy_cnn, tmp_path, monkeypatch, algorithm, batch,
                                                  in_onnxruntime) -> None:
    """Every observer's statistics come out of onnxruntime where PPQ's forward would have computed them, with
    byte-identical artifacts: mse's and kl's histograms (their second pass) only where PPQ would calibrate one
    sample at a time (else its batched forward is the faster)."""
    monkeypatch.setitem(_ppq._BATCH, "cpu", batch)
    used: list[bool] = []
    build = _ppq.Statistics.build.__func__

    def recording(cls, *args):
        statistics = build(cls, *args)
        used.append(statistics is not None)
        return statistics

    monkeypatch.setattr(_ppq.Statistics, "build", classmethod(recording))
    fast = quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="fast", calib_steps=16, output_root=tmp_path,
                    algorithm=algorithm, error_steps=0)
    assert used == in_onnxruntime
    monkeypatch.setattr(_ppq.Statistics, "build", classmethod(lambda cls, *args: None))
    torch_path = quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="torch", calib_steps=16,
                          output_root=tmp_path, algorithm=algorithm, error_steps=0)
    for name in ("quantinfo.json", "quantparams.npz", "quant_model.onnx"):
        assert fast.sha256[name] == torch_path.sha256[name], name


def test_passes_inside_ppq_keep_its_forward(branchy_cnn, tmp_path, monkeypatch) -> None:
    """PPQ's equalization changes the weights before calibrating: only its own forward sees them."""
    used: list[bool] = []
    build = _ppq.Statistics.build.__func__
    monkeypatch.setattr(_ppq.Statistics, "build",
                        classmethod(lambda cls, *args: used.append(build(cls, *args) is not None)))
    quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="eq", calib_steps=16, output_root=tmp_path,
             algorithm="mse", optimization="equalization", error_steps=0)
    assert used and not any(used)


@pytest.mark.parametrize("numel, m, chunked", [(16 * 80 * 80, 11, True), (3 * 1000, 3, True), (96, 1, False),
                                               (7 * 13 * 13, 2, False), (1 << 16, 200, True),
                                               (1 << 16, 700, False)])
def test_tail_through_chunks_is_exact(numel, m, chunked) -> None:
    """The m extreme values of each row, through the chunk extremes, equal a full sort's (ties included)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    x = np.random.default_rng(numel).standard_normal((3, numel)).astype(np.float32)
    x[0, : 5 * m] = x[0].max()  # the largest value repeated across chunks
    x[1, -5 * m:] = x[1].min()
    x[2, ::97] = 0.5  # many ties inside the tail
    for largest in (True, False):
        graph = onnx.helper.make_graph([], "tail", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                          ["batch", numel])], [])
        graph.node.extend(_ppq.tail_nodes(graph, "x", numel, m, largest, "y"))
        graph.output.append(onnx.helper.make_empty_tensor_value_info("y"))
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        expected = np.sort(x, axis=1)[:, ::-1][:, :m] if largest else np.sort(x, axis=1)[:, :m]
        assert np.array_equal(got, expected)
    assert (_ppq.chunk_count(numel, m) is not None) == chunked
