"""Fidelity on real data: a CNN trained on scikit-learn's digits keeps its accuracy through INT8.

The model is trained in seconds (``tests/trained_cnn.py``); the images ship inside scikit-learn,
nothing is downloaded. Calibration uses training images, accuracy is measured on the held-out
test split. Three views of the quantized model are compared: the float model (torch), PPQ's
simulation of the quantized graph, and onnxruntime running the exported ``quant_model.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from maptools import read_quantinfo
from maptools.calibration import ValidatedCalibration, resolve_calibration
from maptools.examples import SMALL_CNN_SHAPES, export_onnx
from maptools.onnx_model import load_model, model_inputs
from maptools.quantization import QuantizationResult, quantize
from maptools.settings import QuantSettings

CALIB_SAMPLES = 64


@pytest.fixture(scope="module")
def digits_model(trained_cnn, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], torch.Tensor,
                                                                                   torch.Tensor, np.ndarray]:
    from tests.trained_cnn import digits

    model, test_x, test_y = trained_cnn
    path = export_onnx(model, tmp_path_factory.mktemp("digits") / "digits_cnn.onnx", SMALL_CNN_SHAPES)
    train_x = digits(seed=0)[0]  # the fixture's seed: its training split, disjoint from test_x
    calibset = [{"input": train_x[i:i + 1].contiguous()} for i in range(CALIB_SAMPLES)]
    with torch.no_grad():
        float_pred = model(test_x).argmax(1).numpy()
    return path, calibset, test_x, test_y, float_pred


@pytest.fixture(scope="module")
def int8_result(digits_model, tmp_path_factory: pytest.TempPathFactory) -> QuantizationResult:
    path, calibset, *_ = digits_model
    return quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="digits", calibset=calibset, calib_steps=CALIB_SAMPLES,
                    output_root=tmp_path_factory.mktemp("out"))


def onnxruntime_predictions(model_path: Path, images: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.array([int(sess.run(None, {name: images[i:i + 1].numpy()})[0].argmax()) for i in range(len(images))])


def ppq_simulation(model_path: Path, calibset: list[dict], bits: int, algorithm: str = "percentile",
                   optimization: str = "none") -> object:
    """PPQ's quantized graph for the same model, data and settings ``quantize`` uses (``algorithm`` and
    ``optimization``: what its default chose)."""
    from maptools.quantization import ppq_adapter as _ppq

    model = load_model(model_path)
    shapes = {k: tuple(v) for k, v in SMALL_CNN_SHAPES.items()}
    settings = QuantSettings(weight_bits=bits, activation_bits=bits, calib_steps=CALIB_SAMPLES, algorithm=algorithm,
                             optimization=optimization)
    source = resolve_calibration(calibset, shapes, CALIB_SAMPLES, 0)
    calibration = ValidatedCalibration(source, model_inputs(model), shapes, limit=CALIB_SAMPLES)
    return _ppq.quantize_graph(model_path, calibration, CALIB_SAMPLES, next(iter(calibration)), settings, "cpu")


def accuracy(pred: np.ndarray, labels: torch.Tensor) -> float:
    return float((pred == labels.numpy()).mean() * 100.0)


def test_float_model_is_trained(digits_model) -> None:
    *_, test_y, float_pred = digits_model
    assert accuracy(float_pred, test_y) > 90.0


def test_int8_top1_within_half_a_point_of_float(digits_model, int8_result) -> None:
    _, _, test_x, test_y, float_pred = digits_model
    int8_pred = onnxruntime_predictions(int8_result.quant_model_path, test_x)
    float_acc, int8_acc = accuracy(float_pred, test_y), accuracy(int8_pred, test_y)
    assert int8_acc >= float_acc - 0.5, f"INT8 {int8_acc:.2f}% vs float {float_acc:.2f}% on {len(test_y)} images"


def test_onnxruntime_agrees_with_ppq_simulation(digits_model, int8_result) -> None:
    path, calibset, test_x, _, _ = digits_model
    graph = ppq_simulation(path, calibset, bits=8, algorithm=int8_result.settings.algorithm.value,
                           optimization=int8_result.settings.optimization.value)
    # The same quantization as quantize() wrote (same model, data and settings).
    assert graph.quantinfo() == read_quantinfo(int8_result.map)
    simulated = graph.run({"input": test_x})[graph.output_names[0]].argmax(1)
    shipped = onnxruntime_predictions(int8_result.quant_model_path, test_x)
    agreement = float((simulated == shipped).mean())
    assert agreement >= 0.99, f"onnxruntime and PPQ's simulation agree on {agreement:.1%} of predictions"


def test_lower_bit_widths_degrade_gracefully(digits_model) -> None:
    """Measured by PPQ's simulation (the ONNX export is int8-only): 6 bits stays within 5 points of float."""
    path, calibset, test_x, test_y, float_pred = digits_model
    graph = ppq_simulation(path, calibset, bits=6)
    pred = graph.run({"input": test_x})[graph.output_names[0]].argmax(1)
    assert accuracy(pred, test_y) >= accuracy(float_pred, test_y) - 5.0
