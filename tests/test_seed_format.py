"""The seed contract (:mod:`maptools.maps.seed`): maps the original toolchain reads as they are, by default."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from maptools import quantize, read_quantinfo, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.errors import QuantizationFailed
from maptools.examples import SMALL_CNN_SHAPES, export_onnx
from maptools.maps.seed import check_seed
from maptools.simulate import IntegerSimulator
from maptools_flows.cli import app
from tests import seed_consumer

#: A stand-in for the original toolchain's class, as its module defines it, in a package of that name.
_PROTO = '''
class OperatorQuantConfig:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
'''

_READ = '''
import json, pickle, sys
import numpy, torch
import maptools.core.proto as proto
assert proto.__file__.startswith(sys.argv[1]), proto.__file__   # the stand-in, not this package
info = pickle.load(open(sys.argv[2] + "/quantinfo.pkl", "rb"))
params = pickle.load(open(sys.argv[2] + "/quantparams.pkl", "rb"))
out = {}
for name, cfg in info.items():
    a = cfg.__dict__
    assert type(cfg) is proto.OperatorQuantConfig and a["name"] == name
    row = {k: type(a[k]).__name__ for k in ("name", "op_type", "io_bits", "io_min", "io_max", "input_scale",
                                            "output_scale") if a[k] is not None}
    if "weight_scale" in a:
        row["weight_scale"] = [type(a["weight_scale"]).__name__, str(a["weight_scale"].dtype), a["weight_scale"].dim()]
        row.update({k: type(a[k]).__name__ for k in ("weight_bits", "weight_min", "weight_max")})
    out[name] = [a["op_type"], row]
print(json.dumps({"info": out, "params": {k: None if v is None else str(v.dtype) for k, v in params.items()}}))
'''


def _original(map_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Unpickle a map's pickles in a fresh interpreter that has torch and numpy, a stand-in
    ``maptools.core.proto`` and not this package (``-S``: no site, so no editable install)."""
    standin = tmp_path / "original"
    (standin / "maptools" / "core").mkdir(parents=True, exist_ok=True)
    for init in (standin / "maptools" / "__init__.py", standin / "maptools" / "core" / "__init__.py"):
        init.write_text("")
    (standin / "maptools" / "core" / "proto.py").write_text(_PROTO)
    site = sysconfig.get_paths()["purelib"]
    code = f"import sys; sys.path[:0] = [{str(standin)!r}, {site!r}]\n" + _READ
    return subprocess.run([sys.executable, "-S", "-c", code, str(standin), str(map_dir)], capture_output=True,
                          text=True, timeout=120)


def test_the_documented_call_writes_what_the_original_unpickles(small_result, tmp_path) -> None:
    assert small_result.profile.value == "seed" and small_result.settings.profile.value == "seed"
    manifest = json.loads((small_result.map_dir / "manifest.json").read_text())
    assert manifest["profile"] == "seed" and manifest["settings"]["activation_sign"] == "signed"
    assert check_seed("small", small_result.output_root) == []
    run = _original(small_result.map_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    info = read_quantinfo("small", small_result.output_root)
    assert set(seen["info"]) == set(info)
    conv = next(row for op_type, row in seen["info"].values() if op_type == "Conv")
    assert conv == {"name": "str", "op_type": "str", "io_bits": "int", "io_min": "int", "io_max": "int",
                    "input_scale": "float", "output_scale": "float", "weight_scale": ["Tensor", "torch.float32", 1],
                    "weight_bits": "int", "weight_min": "int", "weight_max": "int"}
    kinds = {key.rsplit("_", 2)[1] + "_" + key.rsplit("_", 1)[1]: dtype for key, dtype in seen["params"].items()
             if dtype is not None}
    assert kinds == {"conv_weight": "int8", "conv_bias": "int32", "gemm_weight": "float32", "gemm_bias": "float32"}
    # an extended map is refused loudly there, never read wrong
    extended = quantize(SMALL_CNN_SHAPES, "cpu", _model(small_result), mapname="ext",
                        calib_steps=8, output_root=tmp_path, error_steps=0, profile="extended")
    assert extended.profile.value == "extended"
    refused = _original(extended.map_dir, tmp_path)
    assert refused.returncode != 0 and "maptools.quantinfo" in refused.stderr
    assert any(v.rule == 0 for v in check_seed("ext", tmp_path))


def _model(result) -> Path:
    return Path(json.loads((result.map_dir / "manifest.json").read_text())["model"]["path"])


@pytest.mark.parametrize("fixture", ["small_result", "resnet_result"])
def test_a_reference_consumer_of_the_seed_pickles_agrees(fixture, request) -> None:
    """One clamp per operator, no requantization along edges: within one step of the integer simulation."""
    result = request.getfixturevalue(fixture)
    root = result.output_root
    convert(result.mapname, output_root=root)
    graph = read_graph(result.mapname, root)
    shape = next(iter(graph.inputs.values()))
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    ours = IntegerSimulator(graph, read_quantparams(result.mapname, root)).run({next(iter(graph.inputs)): x}, keep=True)
    theirs = seed_consumer.run(result.map_dir, x)
    compared = 0
    for tensor, codes in ours.codes.items():
        got, scale = theirs[tensor]
        assert scale == pytest.approx(ours.scales[tensor]), tensor
        assert np.mean(np.abs(got - codes) <= 1) >= 0.98, tensor
        compared += 1
    assert compared >= 5
    for name, value in ours.outputs.items():
        ref = theirs[name][0]
        # the planners' bar for the original's own simulator is 1.5% (measured here: 1e-5)
        assert np.linalg.norm(ref - value) <= 0.015 * np.linalg.norm(value), name


def _clipped_gain(tmp_path: Path) -> Path:
    """A Conv whose output a Clip(0, 0.001) bounds: its requantization ratio is far above 2^7."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip"),
         helper.make_node("Conv", ["y", "w2"], ["output"], name="conv2", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 20).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(0.001, np.float32), "hi")])
    path = tmp_path / "gain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_map_the_contract_cannot_represent_is_written_extended_or_refused(tmp_path) -> None:
    path = _clipped_gain(tmp_path)
    shapes = {"input": [1, 3, 8, 8]}
    result = quantize(shapes, "cpu", path, mapname="gain", calib_steps=8, output_root=tmp_path, error_steps=0)
    assert result.settings.profile.value == "seed" and result.profile.value == "extended"
    assert any("seed contract cannot represent this map" in n and "rule 3" in n for n in result.notes)
    violations = check_seed("gain", tmp_path)
    assert {v.rule for v in violations} >= {0, 3} and any(v.where == "conv" for v in violations)
    cli = CliRunner().invoke(app, ["check-seed", "gain", "--output-root", str(tmp_path)])
    assert cli.exit_code == 1 and "rule 3, conv: requantization ratio" in cli.output
    with pytest.raises(QuantizationFailed, match=r"seed contract cannot represent.*Fix: quantize with "
                                                 r"profile='extended'"):
        quantize(shapes, "cpu", path, mapname="strict", calib_steps=8, output_root=tmp_path, strict=True)
    assert not (tmp_path / "mapsave" / "strict").exists()
    ok = CliRunner().invoke(app, ["quantize", str(path), "--mapname", "ext", "--profile", "extended",
                                  "--calib-steps", "8", "--output-root", str(tmp_path)])
    assert ok.exit_code == 0, ok.output


_GRID_KEEPING = {"Relu", "MaxPool", "Flatten", "Reshape", "Clip", "GlobalMaxPool", "Transpose", "Squeeze", "Unsqueeze",
                 "Slice", "Resize", "Concat"}


def _inputs_quantized(model: onnx.ModelProto) -> list[str]:
    """Crossbar operators whose data input does not come from a DequantizeLinear (through grid-keeping ops)."""
    producer = {t: n for n in model.graph.node for t in n.output}
    bad = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        source = producer.get(node.input[0])
        while source is not None and source.op_type in _GRID_KEEPING:
            source = producer.get(source.input[0])
        if source is None or source.op_type != "DequantizeLinear":
            bad.append(node.name)
    return bad


@pytest.fixture(scope="module")
def small_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet18 at 64x64: a stem Relu -> MaxPool that also feeds the first residual adder."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return export_onnx(resnet18(weights=None), tmp_path_factory.mktemp("r") / "r18.onnx", {"input": [1, 3, 64, 64]})


@pytest.mark.parametrize(("sign", "shared", "policy"), [
    (sign, shared, policy) for sign, shared, policy in itertools.product(("signed", "auto"), (False, True),
                                                                         ("float", "pow2"))])
def test_every_crossbar_input_is_quantized_in_the_export(sign, shared, policy, small_resnet, tmp_path) -> None:
    profile = "seed" if sign == "signed" and shared else "extended"
    result = quantize({"input": [1, 3, 64, 64]}, "cpu", small_resnet, mapname="r", calib_steps=8,
                      output_root=tmp_path, error_steps=0, activation_sign=sign, shared_scales=shared,
                      scale_policy=policy, profile=profile)
    assert _inputs_quantized(onnx.load(str(result.quant_model_path))) == []
