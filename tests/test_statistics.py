"""Calibration statistics computed inside onnxruntime give the artifacts PPQ's own forward gives."""

from __future__ import annotations

import pytest

from maptools import _ppq, quantize
from maptools.examples import SMALL_CNN_SHAPES


@pytest.mark.parametrize("algorithm", ["percentile", "minmax"])
def test_onnxruntime_statistics_equal_ppq_forward(branchy_cnn, tmp_path, monkeypatch, algorithm) -> None:
    used: list[bool] = []
    build = _ppq._Statistics.build.__func__

    def recording(cls, *args):
        statistics = build(cls, *args)
        used.append(statistics is not None)
        return statistics

    monkeypatch.setattr(_ppq._Statistics, "build", classmethod(recording))
    fast = quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="fast", calib_steps=16, output_root=tmp_path,
                    algorithm=algorithm, error_steps=0)
    assert used == [True]
    monkeypatch.setattr(_ppq._Statistics, "build", classmethod(lambda cls, *args: None))
    torch_path = quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="torch", calib_steps=16,
                          output_root=tmp_path, algorithm=algorithm, error_steps=0)
    for name in ("quantinfo.json", "quantparams.npz", "quant_model.onnx"):
        assert fast.sha256[name] == torch_path.sha256[name], name


def test_kl_and_correction_passes_keep_ppq_forward(branchy_cnn, tmp_path, monkeypatch) -> None:
    used: list[bool] = []
    build = _ppq._Statistics.build.__func__
    monkeypatch.setattr(_ppq._Statistics, "build",
                        classmethod(lambda cls, *args: used.append(build(cls, *args) is not None)))
    quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="kl", calib_steps=16, output_root=tmp_path,
             algorithm="kl", error_steps=0)
    assert used and not any(used)
