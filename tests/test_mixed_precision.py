"""``bit_width='auto'``: per-layer widths under a budget, and every stage following them."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from maptools import quantize, read_quantinfo, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.errors import BudgetError, SettingsError
from maptools.evaluation import weight_memory_bytes
from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx
from maptools.crossbar.mapping import CrossbarSpec, map_graph
from maptools.quantization.mixed_precision import Budget
from maptools.quantinfo import param_key
from maptools.simulate import IntegerSimulator
from tests.agreement import layer_agreement

BUDGET = 0.15  # relative L2 of the digits CNN's logits; W8A8 measures about 0.10



@pytest.fixture
def digits_model(trained_cnn, tmp_path):
    from tests.trained_cnn import digits

    model, images, labels = trained_cnn
    path = small_cnn_onnx(tmp_path / "digits.onnx", model=model)
    calib = [{"input": x[None]} for x in digits(seed=0)[0][:32]]
    return path, calib, images, labels


def test_auto_meets_an_error_budget_with_fewer_bits_and_every_stage_follows(digits_model, tmp_path,
                                                                            one_thread) -> None:
    from maptools.quantization import ppq_adapter as _ppq

    path, calib, images, labels = digits_model
    result = quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="auto", calibset=calib, calib_steps=32,
                      output_root=tmp_path, error_steps=0, bit_width="auto", profile="extended",
                 budget={"output_error": BUDGET})
    report = result.mixed_precision
    assert report["error"] <= BUDGET and report["uniform_error"] <= BUDGET
    assert report["average_weight_bits"] < 8 and report["average_input_bits"] < 8
    assert report["weight_bytes"] < report["uniform_weight_bytes"]
    chosen = {layer["name"]: (layer["weight_bits"], layer["input_bits"]) for layer in report["layers"]}
    assert len(chosen) == 5 and any(w < 8 for w, _ in chosen.values())
    manifest = json.loads((result.map_dir / "manifest.json").read_text())
    assert manifest["mixed_precision"]["error"] == report["error"]
    assert {k: tuple(v) for k, v in manifest["settings"]["layer_bits"].items()} == {
        n: b for n, b in chosen.items() if b != (8, 8)}

    info, params = read_quantinfo("auto", tmp_path), read_quantparams("auto", tmp_path)
    for name, (wbits, ibits) in chosen.items():
        cfg = info[name]
        assert cfg.weight_bits == wbits and cfg.in_range(0)[1] - cfg.in_range(0)[0] + 1 == 2**ibits
        weight = params[param_key(name, cfg.op_type, "weight")]
        assert weight.min() >= -(2 ** (wbits - 1)) and weight.max() <= 2 ** (wbits - 1) - 1
    assert weight_memory_bytes("auto", tmp_path) == report["weight_bytes"]

    convert("auto", output_root=tmp_path)
    graph = read_graph("auto", tmp_path)
    mapped = map_graph(graph, params, CrossbarSpec(rows=64, cols=64, cell_bits=2))
    assert {layer.name: (layer.weight_bits, layer.input_bits) for layer in mapped.layers} == chosen
    ppq_graph = _ppq.quantize_graph(result.map_dir / "model.onnx", calib, 32, calib[0], result.settings, "cpu")
    assert ppq_graph.quantinfo() == info
    sim = IntegerSimulator(graph, params, requant="fixed")
    x = images[:64].numpy().astype(np.float32)
    agreement = layer_agreement(sim, graph, ppq_graph, x[:32])
    assert min(agreement.values()) >= 0.999, agreement
    session = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"])
    exported = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    simulated = sim.run({"input": x}).outputs["output"]
    assert (exported.argmax(1) == simulated.argmax(1)).mean() >= 0.98


def test_auto_under_a_weight_memory_budget(digits_model, tmp_path) -> None:
    path, calib, _, _ = digits_model
    result = quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="small", calibset=calib, calib_steps=32,
                      output_root=tmp_path, error_steps=0, bit_width="auto", profile="extended",
                 budget={"weight_bytes": 6000})
    report = result.mixed_precision
    assert weight_memory_bytes("small", tmp_path) == report["weight_bytes"] <= 6000 < report["uniform_weight_bytes"]
    assert report["average_input_bits"] == 8  # a memory budget narrows weights only


def test_unreachable_budgets_say_why_and_write_nothing(digits_model, tmp_path) -> None:
    path, calib, _, _ = digits_model
    with pytest.raises(BudgetError, match=r"output_error <= 0.001.*layers that stop it most: /") as caught:
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="tight", calibset=calib, calib_steps=32,
                 output_root=tmp_path, error_steps=0, bit_width="auto", profile="extended",
                 budget={"output_error": 0.001})
    assert "allow output_error >=" in caught.value.fix
    with pytest.raises(BudgetError, match="weight_bytes=100.*at 2 bits they take"):
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="tight", calibset=calib, calib_steps=32,
                 output_root=tmp_path, error_steps=0, bit_width="auto", profile="extended",
                 budget={"weight_bytes": 100})
    assert not (tmp_path / "mapsave" / "tight").exists()
    for bad in ({}, {"output_error": 0.1, "weight_bytes": 10}, {"output_error": -1}, {"bits": 4},
                {"weight_bytes": 10, "weight_choices": (1, 4)}):
        with pytest.raises(SettingsError):
            Budget.of(bad)
    with pytest.raises(SettingsError, match="applies to bit_width='auto' only"):
        quantize(SMALL_CNN_SHAPES, "cpu", path, calibset=calib, output_root=tmp_path, budget={"output_error": 0.1})
    with pytest.raises(SettingsError, match="not crossbar layers"):
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="bad", calibset=calib, output_root=tmp_path,
                 layer_bits={"/Add": (4, 4)}, profile="extended")
    # the seed profile reads every activation at one width
    with pytest.raises(SettingsError, match=r"bit_width='auto'.*Fix: pass profile='extended'"):
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="bad", calibset=calib, output_root=tmp_path,
                 bit_width="auto", budget={"output_error": 0.1})
    # with neither given, one error names both (it had named the budget, then, once given, the profile)
    with pytest.raises(SettingsError, match=r"needs a budget, and a profile.*Fix: pass profile='extended' and a "):
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="bad", calibset=calib, output_root=tmp_path, bit_width="auto")
    with pytest.raises(SettingsError, match=r"layer_bits .*Fix: pass profile='extended'"):
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="bad", calibset=calib, output_root=tmp_path,
                 layer_bits={"/stem/stem.0/Conv": (4, 4)})
