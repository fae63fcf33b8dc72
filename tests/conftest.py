"""Shared fixtures: models built in code, quantized once per test session."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, resnet18_onnx, small_cnn_onnx
from maptools.quantization import QuantizationResult, quantize


@pytest.fixture(scope="session")
def small_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_cnn_onnx(tmp_path_factory.mktemp("models") / "small_cnn.onnx")


@pytest.fixture(scope="session")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resnet18_onnx(tmp_path_factory.mktemp("models") / "simp-resnet18.onnx")


@pytest.fixture(scope="session")
def small_result(small_cnn: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizationResult:
    return quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="small", calib_steps=16,
                    output_root=tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="session")
def resnet_result(resnet18: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizationResult:
    return quantize(RESNET18_SHAPES, "cpu", resnet18, mapname="resnet18", calib_steps=32,
                    output_root=tmp_path_factory.mktemp("out"))


def initializers(model_path: Path) -> dict[str, object]:
    """{node name: (node, {input name: numpy initializer})} of an ONNX model."""
    model = onnx.load(str(model_path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: (n, [inits.get(x) for x in n.input]) for n in model.graph.node}
