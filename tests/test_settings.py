"""Each quantization option is defined once (``QuantSettings``) and reachable from the Python API, the
command line, the flow and the sweep, with the same checks and messages everywhere."""

from __future__ import annotations

import inspect
import math
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.markup import escape

from maptools_flows.quantize_model import quantize_model
from maptools_flows.sweep import Grid, SweepConfig, run_sweep
from maptools_flows.pipeline import map_and_simulate
from maptools_flows.sweep_config import CROSSBAR_AXES, DEDICATED_AXES
from maptools.maps.artifacts import read_quantinfo
from maptools.cli import app
from maptools.crossbar.mapping import CrossbarSpec
from maptools.errors import SettingsError
from maptools.quantization import quantize
from maptools.settings import QuantSettings, field_bounds, field_choices
from tests.test_sweep import config

SHAPES = {"input": [1, 3, 32, 32]}


def _cli_bounds(option: Any) -> dict[str, int]:
    return {k: v for k, v in (("ge", option.min), ("le", option.max)) if v is not None}


def _cli_choices(option: Any) -> tuple[str, ...]:
    kind = option.type_descriptor.annotation
    return tuple(e.value for e in kind) if isinstance(kind, type) and issubclass(kind, Enum) else ()


def _flow_choices(schema: dict[str, Any]) -> tuple[str, ...]:
    """The values a flow parameter's form offers (of a nullable one too)."""
    return tuple(value for part in (schema, *schema.get("anyOf", ())) for value in part.get("enum", ()))


def _cli_options(command: str) -> dict[str, Any]:
    """The options of one ``maptools`` command by their long names (each of them, for an option with aliases)."""
    params = typer.main.get_command(app).commands[command].params
    return {opt.lstrip("-"): param for param in params for opt in (*param.opts, *param.secondary_opts)
            if opt.startswith("--")}


def test_every_setting_is_described_and_reachable_from_api_cli_flow_and_sweep() -> None:
    api = inspect.signature(quantize).parameters
    cli = _cli_options("quantize")
    flow = quantize_model.parameters.properties
    for name, field in QuantSettings.model_fields.items():
        assert field.description, name
        assert name in api, f"quantize() has no {name}"
        option = cli.get(name.replace("_", "-"))
        assert option is not None, f"the CLI has no --{name.replace('_', '-')}"
        assert option.help.startswith(escape(field.description)), name  # the field's text, bounds and choices
        assert _cli_bounds(option) == field_bounds(QuantSettings, name), name
        assert _cli_choices(option) == field_choices(QuantSettings, name), name
        assert name in flow, f"the quantize-model flow has no {name}"
        assert flow[name]["description"].startswith(field.description), name  # the UI shows the field's text
        assert _flow_choices(flow[name]) == field_choices(QuantSettings, name), name
        if name in DEDICATED_AXES:  # an axis of its own (bits, algorithms, ...), or the sweep config's seed
            axis = DEDICATED_AXES[name].split()[0]
            assert axis in Grid.model_fields or axis in SweepConfig.model_fields, name
        else:
            assert Grid(bits=[8], settings={name: [field.default]}).settings == {name: [field.default]}
    with pytest.raises(ValueError, match="with the grid's 'bits' axis"):
        Grid(bits=[8], settings={"weight_bits": [4]})
    with pytest.raises(ValueError, match="is not a quantization setting"):
        Grid(bits=[8], settings={"colour": ["red"]})


def test_every_crossbar_field_is_described_and_reachable_from_cli_flow_and_sweep() -> None:
    """The crossbar spec's fields (``rows`` and ``cols`` as ``xbar``), likewise: the CLI's map command, the
    map-and-simulate flow (its form) and the sweep's axes show the field's description and take its values."""
    cli = _cli_options("map")
    flow = map_and_simulate.parameters.properties
    for name, field in CrossbarSpec.model_fields.items():
        assert field.description, name
        if name in ("rows", "cols"):
            assert "xbar" in cli and "xbar" in flow and Grid(bits=[8], xbar=["64x64"], adc_bits=[8]).xbar == ["64x64"]
            continue
        option = cli[name.replace("_", "-")]
        assert option.help.startswith(escape(field.description)) and _cli_bounds(option) == field_bounds(
            CrossbarSpec, name), name
        assert flow[name]["description"].startswith(field.description), name
        assert _flow_choices(flow[name]) == field_choices(CrossbarSpec, name), name
        if name in CROSSBAR_AXES:
            assert name in Grid.model_fields, name
        else:
            assert Grid(bits=[8], crossbar={name: [field.default]}).crossbar == {name: [field.default]}


def test_settings_object_and_keywords_are_one_call(small_cnn, tmp_path) -> None:
    settings = QuantSettings(weight_bits=6, activation_bits=8, calib_steps=8, scale_policy="pow2")
    result = quantize(SHAPES, "cpu", small_cnn, mapname="s", settings=settings, output_root=tmp_path, error_steps=0)
    assert result.settings == settings.replace(algorithm="percentile")  # auto's choice on random data
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
