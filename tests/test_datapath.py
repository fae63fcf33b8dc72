"""Hardware-constrained quantization: power-of-two scales, shared Add/Concat scales, and the
requantization multipliers and shifts quantinfo records for the hardware (and the simulation uses)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from maptools import quantize, read_quantinfo, read_quantparams
from maptools.maps.artifacts import QUANTINFO_JSON
from maptools.calibration import RandomCalibration
from maptools.conversion import convert, read_graph
from maptools.errors import ArtifactError, SettingsError
from maptools.examples import SMALL_CNN_SHAPES, export_onnx, small_cnn_onnx
from maptools.quantinfo import QuantConfig, quantinfo_from_json
from maptools.settings import QuantSettings
from maptools.simulate import IntegerSimulator, simulate
from tests.agreement import layer_agreement



def _pow2(scale: float) -> bool:
    return scale > 0 and math.frexp(scale)[0] == 0.5


def _digits_map(trained_cnn, root: Path, name: str, **options):
    from tests.trained_cnn import digits

    model, images, labels = trained_cnn
    path = small_cnn_onnx(root / f"{name}.onnx", model=model)
    calib = [{"input": x[None]} for x in digits(seed=0)[0][:32]]
    result = quantize(SMALL_CNN_SHAPES, "cpu", path, mapname=name, calibset=calib, calib_steps=32, output_root=root,
                      error_steps=0, **options)
    convert(name, output_root=root)
    return result, calib


def test_pow2_and_shared_scales_are_exact_and_simulate_with_shifts_only(trained_cnn, tmp_path, one_thread) -> None:
    from maptools.quantization import ppq_adapter as _ppq

    _, images, labels = trained_cnn
    result, calib = _digits_map(trained_cnn, tmp_path, "pow2", scale_policy="pow2", shared_scales=True)
    info = read_quantinfo("pow2", tmp_path)
    scales = [s for cfg in info.values() for s in (cfg.output_scale, *cfg.input_scales) if s is not None]
    weights = [float(s) for cfg in info.values() if cfg.weight_scale is not None for s in cfg.weight_scale]
    assert len(scales) > 20 and len(weights) > 80 and all(_pow2(s) for s in scales + weights)
    stages = [r for cfg in info.values() for r in cfg.requant.values()]
    assert stages and all(r.shift_only for r in stages)  # every requantization is a shift
    add = info["/Add"]
    assert add.input_scales[0] == add.input_scales[1]
    assert not [s for s in add.requant if s != "output"]  # no input requantized before the adder
    assert json.loads((result.map_dir / "manifest.json").read_text())["settings"]["scale_policy"] == "pow2"

    graph = read_graph("pow2", tmp_path)
    params = read_quantparams("pow2", tmp_path)
    fixed = IntegerSimulator(graph, params, requant="fixed")
    exact = IntegerSimulator(graph, params, requant="float")
    x = images[:96].numpy().astype(np.float32)
    ours, reference = fixed.run({"input": x}, keep=True), exact.run({"input": x}, keep=True)
    for tensor, codes in reference.codes.items():  # shifts are exact: fixed point equals float64 code for code
        assert np.array_equal(ours.codes[tensor], codes), tensor
    settings = QuantSettings(calib_steps=32, scale_policy="pow2", shared_scales=True,
                             algorithm=result.settings.algorithm,  # (what quantize chose)
                             optimization=result.settings.optimization)
    ppq_graph = _ppq.quantize_graph(result.map_dir / "model.onnx", calib, 32, calib[0], settings, "cpu")
    assert ppq_graph.quantinfo() == info
    agreement = layer_agreement(fixed, graph, ppq_graph, x[:32])
    assert min(agreement.values()) >= 0.999, agreement
    accuracy = float((ours.outputs["output"].argmax(1) == labels[:96].numpy()).mean())
    assert accuracy > 0.8


def test_shared_scales_on_a_concat(branchy_cnn, tmp_path, one_thread) -> None:
    from maptools.quantization import ppq_adapter as _ppq

    result = quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="shared", calib_steps=16, output_root=tmp_path,
                      error_steps=0, shared_scales=True)
    info = read_quantinfo("shared", tmp_path)
    (concat,) = [n for n, c in info.items() if c.op_type == "Concat"]
    cfg = info[concat]
    assert len(set(cfg.input_scales)) == 1 and cfg.input_scales[0] == cfg.output_scale
    assert not cfg.requant  # the branches' codes are concatenated as they are
    convert("shared", output_root=tmp_path)
    graph, params = read_graph("shared", tmp_path), read_quantparams("shared", tmp_path)
    calib = RandomCalibration({"input": (1, 3, 32, 32)}, 16)
    ppq_graph = _ppq.quantize_graph(result.map_dir / "model.onnx", calib, 16, next(iter(calib)),
                                    QuantSettings(calib_steps=16, shared_scales=True, algorithm="percentile"), "cpu")
    assert ppq_graph.quantinfo() == info
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    for mode in ("float", "fixed"):
        agreement = layer_agreement(IntegerSimulator(graph, params, requant=mode), graph, ppq_graph, x)
        assert min(agreement.values()) >= 0.999, (mode, agreement)

    quantize(SMALL_CNN_SHAPES, "cpu", branchy_cnn, mapname="pow2", calib_steps=16, output_root=tmp_path,
             error_steps=0, shared_scales=True, scale_policy="pow2")
    pow2 = read_quantinfo("pow2", tmp_path)
    # the average pool divides by 9: the one multiplier that cannot be a shift
    (pool,) = [c for c in pow2.values() if c.op_type == "AveragePool"]
    assert list(pool.requant) == ["output/9"] and not pool.requant["output/9"].shift_only
    assert all(r.shift_only for c in pow2.values() if c.op_type != "AveragePool" for r in c.requant.values())


def test_recorded_requantization_is_what_the_simulation_uses(small_cnn, tmp_path) -> None:
    root = tmp_path
    quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m12", calib_steps=16, output_root=root, error_steps=0,
             multiplier_bits=12, profile="extended")
    info = read_quantinfo("m12", root)
    twin = quantinfo_from_json(json.loads((root / "mapsave" / "m12" / QUANTINFO_JSON).read_text()))
    assert twin == info
    stages = {(name, stage): r for name, cfg in info.items() for stage, r in cfg.requant.items()}
    assert ("/stem/stem.0/Conv", "output") in stages and ("/Add", "output") in stages
    assert ("/Add", "input0") in stages  # separate scales: the max pool's codes are requantized before the adder
    for r in stages.values():
        m, shift, ratio = np.array(r.multiplier), np.array(r.shift), np.array(r.ratio)
        assert r.bits == 12 and np.all((m < 2**12) & ((m % 2 == 1)))
        assert np.all(np.abs(m * 2.0 ** -shift.astype(float) - ratio) <= ratio * 2.0**-12)

    convert("m12", output_root=root)
    graph, params = read_graph("m12", root), read_quantparams("m12", root)
    x = RandomCalibration({"input": (4, 3, 32, 32)}, 1, seed=5)
    x = next(iter(x))["input"].numpy()
    fixed = IntegerSimulator(graph, params, requant="fixed").run({"input": x}, keep=True)
    conv = graph.node("/stem/stem.0/Conv")
    cfg = conv["quant"]
    r = cfg.requant["output"]
    changed = dataclasses.replace(r, multiplier=tuple(m + 64 for m in r.multiplier))
    conv["quant"] = dataclasses.replace(cfg, requant={**cfg.requant, "output": changed})
    tampered = IntegerSimulator(graph, params, requant="fixed").run({"input": x}, keep=True)
    out = conv["outputs"][0]
    assert not np.array_equal(tampered.codes[out], fixed.codes[out])  # the recorded multiplier is the one used
    conv["quant"] = dataclasses.replace(cfg, requant={**cfg.requant, "output": dataclasses.replace(
        r, ratio=tuple(v * 1.01 for v in r.ratio))})
    with pytest.raises(ArtifactError, match="requantization parameters do not match"):
        IntegerSimulator(graph, params, requant="fixed").run({"input": x})


def test_a_relu_after_an_adder_keeps_the_adders_grid(small_result, small_cnn, tmp_path) -> None:
    """A residual block's ``Add -> Relu`` rounds once, as ``Conv -> Relu`` does: the adder writes the Relu's grid
    (unsigned in the extended profile). Each had its own grid, a few percent apart, so the Relu requantized every
    code a second time (zoo RegNetX: 5.5% output error, 3.3% with one grid)."""
    seed = read_quantinfo(small_result.map)
    assert seed["/Add"].output_scale == seed["/Relu"].input_scale == seed["/Relu"].output_scale
    assert (seed["/Add"].io_min, seed["/Add"].io_max) == (-128, 127)  # the seed contract's one signed range
    quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="ext", calib_steps=16, output_root=tmp_path,
             profile="extended")
    extended = read_quantinfo("ext", tmp_path)
    assert extended["/Add"].out_range == extended["/Relu"].out_range == (0, 255)
    assert extended["/Add"].output_scale == extended["/Relu"].input_scale == extended["/Relu"].output_scale
    assert not extended["/Relu"].requant  # codes pass the Relu unchanged


class _OutlierSum(torch.nn.Module):
    """``d(relu(a(x) + b(x)))`` where one channel of the sum is 40x the others: an outlier the prepared model
    divides out after the Relu (a lookup table), so the Relu's own output stays float."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 3, padding=1)
        self.d = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.weight[0] *= 40

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.a(x) + self.b(x)))


def test_an_adder_before_a_float_relu_keeps_its_own_grid(tmp_path) -> None:
    """The Relu's grid is the adder's only where the Relu's output is quantized (open_nsfw: a Relu inside such a
    table left the adder without an output scale, and ``simulate`` failed on it)."""
    torch.manual_seed(0)
    model = export_onnx(_OutlierSum(), tmp_path / "gated.onnx", SMALL_CNN_SHAPES)
    quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="gated", calib_steps=8, output_root=tmp_path)
    add = next(c for c in read_quantinfo("gated", tmp_path).values() if c.op_type == "Add")
    assert add.output_scale is not None
    convert("gated", output_root=tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    simulated = simulate("gated", {"input": x}, output_root=tmp_path).outputs["output"]
    session = ort.InferenceSession(str(tmp_path / "mapsave" / "gated" / "quant_model.onnx"),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    assert np.linalg.norm(simulated - expected) <= 0.02 * np.linalg.norm(expected)


def test_pow2_with_lsq_and_shared_scales_without_joins(tmp_path) -> None:
    with pytest.raises(SettingsError, match="lsq.*pow2|pow2.*lsq"):
        QuantSettings(scale_policy="pow2", optimization="lsq")
    with pytest.raises(SettingsError, match="scale_policy"):
        QuantSettings(scale_policy="log")
    chain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    model = export_onnx(chain.eval(), tmp_path / "chain.onnx", SMALL_CNN_SHAPES)
    result = quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="chain", calib_steps=8, output_root=tmp_path,
                      error_steps=0, shared_scales=True, profile="extended")
    assert any("no Add or Concat" in note for note in result.notes)


def test_quantinfo_pickled_before_requant_records_loads(small_result) -> None:
    import pickle

    from maptools.maps.artifacts import safe_load_pickle

    info = read_quantinfo(small_result.map)
    name, cfg = next(iter(info.items()))
    old = {k: v for k, v in cfg.__dict__.items() if k != "requant"}  # a 0.3 map's QuantConfig state
    legacy = QuantConfig.__new__(QuantConfig)
    legacy.__setstate__(old)
    assert legacy.requant == {} and legacy.op_type == cfg.op_type
    path = small_result.output_root / "legacy.pkl"
    path.write_bytes(pickle.dumps({name: legacy}))
    assert safe_load_pickle(path)[name].requant == {}
