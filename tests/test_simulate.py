"""Integer re-simulation from quantinfo + quantparams alone, checked against PPQ's simulation.

Agreement figures (printed with ``pytest -s``):

* top-1: argmax of the integer simulation's logits vs PPQ's, per input;
* per layer: each operator run on PPQ's own input codes; the output codes must be within one step
  of PPQ's on >= 99.9% of elements (this isolates each layer's arithmetic);
* end to end: the same, with every operator fed by the integer simulation itself (differences of
  one step compound through deep random-weight networks, so this is reported, not bounded).

``MAPTOOLS_AGREEMENT_SAMPLES`` sets the number of random ResNet18 inputs (default 4; the closing
figures used 200).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maptools import quantize, read_quantinfo, read_quantparams
from maptools.cli import app
from maptools.conversion import GRAPH_FILE, convert, read_graph
from maptools.errors import ArtifactError, ConversionError, InputShapeError, SettingsError
from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx
from maptools.requant import RequantMode, fixed_point, requantize
from maptools.settings import QuantSettings
from maptools.simulate import IntegerSimulator, QTensor, simulate

RESNET_SAMPLES = int(os.environ.get("MAPTOOLS_AGREEMENT_SAMPLES", "4"))


# --- requantization ------------------------------------------------------------------------------------

def test_fixed_point_multiplier_matches_float() -> None:
    gen = torch.Generator().manual_seed(0)
    multipliers = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-12, 0, generator=gen))
    m0, shift = fixed_point(multipliers)
    assert torch.all((m0 >= 2**30) & (m0 < 2**31))
    assert torch.allclose(m0 * torch.pow(2.0, -shift.double()), multipliers, rtol=2**-30, atol=0)
    acc = torch.randint(-(2**16), 2**16, (2000, 64), generator=gen, dtype=torch.int64)
    as_float = requantize(acc, multipliers[:, None], -(2**31), 2**31 - 1, RequantMode.FLOAT)
    as_fixed = requantize(acc, multipliers[:, None], -(2**31), 2**31 - 1, RequantMode.FIXED)
    assert (as_float != as_fixed).float().mean() < 1e-4 and (as_float - as_fixed).abs().max() <= 1


@pytest.mark.parametrize("mode", list(RequantMode))
def test_requantize_rounds_half_to_even_and_clamps(mode) -> None:
    acc = torch.tensor([1, 3, 5, -1, -3, 7, 1000, -1000])
    out = requantize(acc, 0.5, -128, 127, mode)
    assert out.tolist() == [0, 2, 2, 0, -2, 4, 127, -128]


# --- agreement with PPQ --------------------------------------------------------------------------------

@dataclass
class Agreement:
    samples: int = 0
    top1_same: int = 0
    local: dict[str, list[int]] = field(default_factory=dict)  # tensor -> [elements, within one step]
    chained: dict[str, list[int]] = field(default_factory=dict)

    @staticmethod
    def _fraction(table: dict[str, list[int]]) -> float:
        return sum(w for _, w in table.values()) / sum(n for n, _ in table.values())

    @property
    def top1(self) -> float:
        return self.top1_same / self.samples

    @property
    def local_within_one(self) -> float:
        return self._fraction(self.local)

    @property
    def chained_within_one(self) -> float:
        return self._fraction(self.chained)

    def worst(self, table: dict[str, list[int]]) -> tuple[str, float]:
        name = min(table, key=lambda k: table[k][1] / table[k][0])
        return name, table[name][1] / table[name][0]

    def line(self, label: str) -> str:
        local, chained = self.worst(self.local), self.worst(self.chained)
        return (f"{label}: {self.samples} inputs, top-1 agreement {self.top1:.2%}; within one step per layer "
                f"{self.local_within_one:.5%} (worst {local[0]} {local[1]:.4%}); end to end "
                f"{self.chained_within_one:.4%} (worst {chained[0]} {chained[1]:.3%})")


def _codes(value: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(value.astype(np.float32) / np.float32(scale)), lo, hi)


def _count(table: dict[str, list[int]], name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    row = table.setdefault(name, [0, 0])
    row[0] += ours.size
    row[1] += int((np.abs(ours - theirs) <= 1).sum())


def compare_with_ppq(sim: IntegerSimulator, ppq_graph, batches: list[np.ndarray],
                     agreement: Agreement | None = None) -> Agreement:
    """Run both simulations on every batch and count agreement per layer and at the top-1 output."""
    agreement = agreement or Agreement()
    graph = sim.graph
    out_cfg = {t: graph.node(n)["quant"] for n in graph.operators() for t in graph.node(n)["outputs"]}
    (out_name,) = graph.outputs
    for x in batches:
        ppq = {"input": x, **ppq_graph.tensor_values({"input": torch.from_numpy(x)})}
        ours = sim.run({"input": x}, keep=True)
        for tensor, codes in ours.codes.items():
            cfg = out_cfg[tensor]
            _count(agreement.chained, tensor, codes, _codes(ppq[tensor], ours.scales[tensor], *cfg.out_range))

        def ppq_input(t: str) -> torch.Tensor | QTensor:
            cfg = out_cfg.get(t)
            if cfg is None or cfg.output_scale is None or t not in ours.codes:  # an input or a float tensor
                return torch.from_numpy(ppq[t])
            codes = _codes(ppq[t], cfg.output_scale, *cfg.out_range)
            return QTensor(torch.from_numpy(codes).double(), cfg.output_scale)

        for name in sim.order:  # each operator on PPQ's input codes
            node = graph.node(name)
            for tensor, out in zip(node["outputs"], sim.step(name, [ppq_input(t) for t in node["inputs"]])):
                if isinstance(out, QTensor):
                    cfg = node["quant"]
                    theirs = _codes(ppq[tensor], out.scale, *cfg.out_range)
                    _count(agreement.local, tensor, out.codes.numpy(), theirs)
        agreement.samples += len(x)
        agreement.top1_same += int((ours.outputs[out_name].argmax(1) == ppq[out_name].argmax(1)).sum())
    return agreement


def _ppq_graph(map_dir: Path, calibration, steps: int, info: dict):
    """PPQ's quantized graph of the map's (prepared) model rebuilt with quantize()'s settings; it must give
    the same quantinfo."""
    from maptools.quantization import ppq_adapter as _ppq

    chosen = json.loads((map_dir / "manifest.json").read_text())["settings"]  # (what auto chose)
    graph = _ppq.quantize_graph(map_dir / "model.onnx", calibration, steps, next(iter(calibration)),
                                QuantSettings(calib_steps=steps, algorithm=chosen["algorithm"],
                                              optimization=chosen["optimization"]), "cpu")
    assert graph.quantinfo() == info
    return graph


def test_trained_cnn_agreement(trained_cnn, tmp_path, one_thread) -> None:
    from tests.trained_cnn import digits

    model, images, labels = trained_cnn
    path = small_cnn_onnx(tmp_path / "digits.onnx", model=model)
    calib = [{"input": x[None]} for x in digits(seed=0)[0][:32]]
    quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="digits", calibset=calib, calib_steps=32, output_root=tmp_path)
    convert("digits", output_root=tmp_path)
    graph = read_graph("digits", tmp_path)
    ppq_graph = _ppq_graph(tmp_path / "mapsave" / "digits", calib, 32, read_quantinfo("digits", tmp_path))
    batches = np.array_split(images.numpy().astype(np.float32), 8)
    sim = IntegerSimulator(graph, read_quantparams("digits", tmp_path))
    started = time.perf_counter()
    agreement = compare_with_ppq(sim, ppq_graph, batches)
    seconds = time.perf_counter() - started
    ours = np.concatenate([sim.run({"input": b}).outputs["output"] for b in batches]).argmax(1)
    accuracy = float((ours == labels.numpy()).mean())
    print(agreement.line("trained SmallCNN (digits test set)") + f"; integer accuracy {accuracy:.1%}; {seconds:.1f} s")
    assert agreement.samples == len(labels) > 400
    assert agreement.top1 >= 0.99
    assert agreement.local_within_one >= 0.999 and agreement.chained_within_one >= 0.999
    assert accuracy > 0.85


def test_resnet18_agreement(resnet18, resnet_result, one_thread) -> None:
    from maptools.calibration import RandomCalibration

    root = resnet_result.output_root
    convert("resnet18", output_root=root)
    calib = RandomCalibration({"input": (1, 3, 224, 224)}, 32)
    ppq_graph = _ppq_graph(resnet_result.map_dir, calib, 32, read_quantinfo("resnet18", root))
    sim = IntegerSimulator(read_graph("resnet18", root), read_quantparams("resnet18", root))
    rng = np.random.default_rng(2024)
    batches = [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(RESNET_SAMPLES)]
    started = time.perf_counter()
    agreement = compare_with_ppq(sim, ppq_graph, batches)
    print(agreement.line("ResNet18 (random weights, random inputs)") + f"; {time.perf_counter() - started:.1f} s")
    assert agreement.local_within_one >= 0.999
    assert min(w / n for n, w in agreement.local.values()) >= 0.999
    assert agreement.top1 >= 0.75  # random-weight logits are flat; the per-layer criterion rules


def test_branchy_agreement(branchy_cnn, branchy_result, one_thread) -> None:
    from maptools.calibration import RandomCalibration

    root = branchy_result.output_root
    convert("branchy", output_root=root)
    graph = read_graph("branchy", root)
    assert [graph.node(n)["part"] for n in graph.operators()].count("host") == 0
    assert (graph.node("/Mul")["role"], graph.node("/Sigmoid")["role"]) == ("lut", "gate")  # x * sigmoid(x)
    calib = RandomCalibration({"input": (1, 3, 32, 32)}, 16)
    ppq_graph = _ppq_graph(branchy_result.map_dir, calib, 16, read_quantinfo("branchy", root))
    for mode in RequantMode:
        sim = IntegerSimulator(graph, read_quantparams("branchy", root), requant=mode)
        rng = np.random.default_rng(5)
        agreement = compare_with_ppq(sim, ppq_graph, [rng.standard_normal((8, 3, 32, 32), dtype=np.float32)])
        print(agreement.line(f"branchy CNN, requant {mode.value}"))
        assert agreement.local_within_one >= 0.999 and agreement.chained_within_one >= 0.999
        assert agreement.top1 >= 7 / 8


# --- the simulate step: inputs, artifacts, CLI -------------------------------------------------------------

def test_simulate_inputs_and_errors(small_result, resnet_result, tmp_path) -> None:
    root = small_result.output_root
    convert("small", output_root=root)
    result = simulate("small", "random", output_root=root, batch=3)
    assert result.outputs["output"].shape == (3, 10) and result.batch == 3 and result.seconds_per_sample > 0
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", input=x)
    from_npy = simulate("small", tmp_path / "x.npy", output_root=root).outputs["output"]
    np.testing.assert_array_equal(from_npy, simulate("small", tmp_path / "x.npz", output_root=root).outputs["output"])
    fixed = simulate("small", {"input": x}, output_root=root, requant="fixed").outputs["output"]
    # the head's output stays float (only the host reads it): fixed-point requantization moves a few
    # codes by one step on the way there
    assert read_quantinfo("small", root)["/head/head.2/Gemm"].output_scale is None
    assert np.abs(fixed - from_npy).max() <= 0.05 * np.abs(from_npy).max()
    with pytest.raises(InputShapeError, match=r"\[2, 3, 16, 16\].*\[N, 3, 32, 32\]"):
        simulate("small", {"input": x[:, :, :16, :16]}, output_root=root)
    with pytest.raises(InputShapeError, match="NaN"):
        simulate("small", {"input": np.full_like(x, np.nan)}, output_root=root)
    with pytest.raises(InputShapeError, match="does not exist"):
        simulate("small", tmp_path / "missing.npy", output_root=root)
    with pytest.raises(InputShapeError, match="do not match the model's inputs"):
        simulate("small", {"image": x}, output_root=root)
    # quantparams from another model
    graph = read_graph("small", root)
    with pytest.raises(ArtifactError, match="another model"):
        IntegerSimulator(graph, read_quantparams("resnet18", resnet_result.output_root))
    with pytest.raises(SettingsError, match="requant='round'"):
        IntegerSimulator(graph, read_quantparams("small", root), requant="round")
    graph.meta["quantized"] = False
    with pytest.raises(ConversionError, match="no quantinfo"):
        IntegerSimulator(graph, read_quantparams("small", root))


def test_cli_convert_and_simulate(small_result, tmp_path) -> None:
    import shutil

    shutil.copytree(small_result.map_dir, tmp_path / "mapsave" / "small")
    (tmp_path / "mapsave" / "small" / GRAPH_FILE).unlink(missing_ok=True)
    runner = CliRunner()
    missing = runner.invoke(app, ["simulate", "--mapname", "small", "--output-root", str(tmp_path)])
    assert missing.exit_code == 2 and "maptools convert --mapname small" in missing.output
    done = runner.invoke(app, ["convert", "--mapname", "small", "--output-root", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "13 operators (13 device, 0 host), 13 edges" in done.output.replace("\n", " ")
    assert (tmp_path / "mapsave" / "small" / GRAPH_FILE).is_file()
    out = tmp_path / "out.npz"
    ran = runner.invoke(app, ["simulate", "--mapname", "small", "--output-root", str(tmp_path), "--input", "random",
                              "--requant", "fixed", "--save", str(out)])
    assert ran.exit_code == 0, ran.output
    assert "output [1, 10]" in ran.output and np.load(out)["output"].shape == (1, 10)
    bad = runner.invoke(app, ["simulate", "--mapname", "small", "--output-root", str(tmp_path), "--input", "nope.npy"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    wrong = runner.invoke(app, ["convert", "--mapname", "small", "--output-root", str(tmp_path), "--model",
                                str(tmp_path / "nope.onnx")])
    assert wrong.exit_code == 2 and "does not exist" in wrong.output
