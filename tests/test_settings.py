"""Each quantization option is defined once (``QuantSettings``) and reachable from the Python API, the
command line, the flow and the sweep, with the same checks and messages everywhere."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maptools_flows.quantize_model import quantize_model
from maptools_flows.sweep import Grid, SweepConfig, run_sweep
from maptools_flows.sweep_config import _DEDICATED
from maptools.maps.artifacts import read_quantinfo
from maptools.cli import app
from maptools.errors import SettingsError
from maptools.quantization import quantize
from maptools.settings import QuantSettings
from tests.test_sweep import config

SHAPES = {"input": [1, 3, 32, 32]}


def test_every_setting_is_described_and_reachable_from_api_cli_flow_and_sweep() -> None:
    api = inspect.signature(quantize).parameters
    help_text = " ".join(CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "300"}).stdout.split())
    flow = quantize_model.parameters.properties
    for name, field in QuantSettings.model_fields.items():
        assert field.description, name
        assert name in api, f"quantize() has no {name}"
        assert f"--{name.replace('_', '-')}" in help_text, f"the CLI has no --{name.replace('_', '-')}"
        assert name in flow, f"the quantize-model flow has no {name}"
        assert flow[name]["description"].startswith(field.description), name  # the UI shows the field's text
        if name in _DEDICATED:  # an axis of its own (bits, algorithms, ...), or the sweep config's seed
            axis = _DEDICATED[name].split()[0]
            assert axis in Grid.model_fields or axis in SweepConfig.model_fields, name
        else:
            assert Grid(bits=[8], settings={name: [field.default]}).settings == {name: [field.default]}
    with pytest.raises(ValueError, match="with the grid's 'bits' axis"):
        Grid(bits=[8], settings={"weight_bits": [4]})
    with pytest.raises(ValueError, match="is not a quantization setting"):
        Grid(bits=[8], settings={"colour": ["red"]})


def test_settings_object_and_keywords_are_one_call(small_cnn, tmp_path) -> None:
    settings = QuantSettings(weight_bits=6, activation_bits=8, calib_steps=8, scale_policy="pow2")
    result = quantize(SHAPES, "cpu", small_cnn, mapname="s", settings=settings, output_root=tmp_path, error_steps=0)
    assert result.settings == settings
    info = read_quantinfo("s", tmp_path)
    assert all(math.frexp(c.output_scale)[0] == 0.5 for c in info.values() if c.output_scale is not None)
    # a keyword that agrees with settings is fine; one that disagrees is named
    quantize(SHAPES, "cpu", small_cnn, mapname="s", settings=settings, calib_steps=8, output_root=tmp_path,
             error_steps=0)
    with pytest.raises(SettingsError, match="keyword.*per_channel.*disagree"):
        quantize(SHAPES, "cpu", small_cnn, mapname="s", settings=settings, per_channel=False, output_root=tmp_path)
    assert settings.replace(weight_bits=4).weight_bits == 4
    with pytest.raises(SettingsError, match=r"multiplier_bits=40 is not supported.*8 to 31"):
        settings.replace(multiplier_bits=40)


def test_sweep_varies_any_setting(prefect_server, dask_cluster, small_cnn, tmp_path: Path) -> None:
    result = run_sweep(config(small_cnn, tmp_path, dask_cluster, bits=[8], algorithms=["minmax"],
                              settings={"scale_policy": ["float", "pow2"], "multiplier_bits": [16, 40]}))
    rows = {(r["settings"], r["status"]): r for r in result.rows}
    assert len(result.rows) == 4
    done = [r for r in result.rows if r["status"] == "completed"]
    assert len(done) == 2 and {r["mapname"] for r in done} == {
        "cnn-w8-pc-minmax-n8-scale_policy_float-multiplier_bits_16",
        "cnn-w8-pc-minmax-n8-scale_policy_pow2-multiplier_bits_16"}
    pow2 = read_quantinfo("cnn-w8-pc-minmax-n8-scale_policy_pow2-multiplier_bits_16", tmp_path)
    assert all(math.frexp(c.output_scale)[0] == 0.5 for c in pow2.values() if c.output_scale is not None)
    failed = [r for (s, status), r in rows.items() if status == "failed"]
    assert len(failed) == 2 and all("multiplier_bits=40 is not supported" in r["error"] for r in failed)
