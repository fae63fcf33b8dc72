"""End to end on a real Prefect server (loopback): deploy, a worker, `prefect deployment run --watch`,
the cache across runs, and the event-triggered downstream deployment. Every process started is stopped."""

from __future__ import annotations

import importlib
import importlib.util
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from maptools.crossbar.mapping import CrossbarSpec
from maptools.maps.artifacts import verify_map
from maptools.settings import QuantSettings
from tests import servers

PARAMS = ["-p", "onnx_path=example:small_cnn", "-p", 'input_shapes={"input": [1, 3, 32, 32]}',
          "-p", "calib_steps=8", "-p", "device=cpu"]


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A `prefect server start` on 127.0.0.1 with its own PREFECT_HOME, and a process worker."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**servers.prefect_env(home), "MAPTOOLS_HOME": str(home / "maps")}
    logs = home / "logs"
    logs.mkdir()
    procs = [servers.start_prefect_server(env, logs)]
    try:
        _prefect(env, "work-pool", "create", "maptools", "--type", "process")
        _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        procs.append(servers.start(env, logs / "worker.log", *servers.PREFECT, "worker", "start", "--pool", "maptools"))
        yield env
    finally:
        for proc in reversed(procs):
            servers.stop(proc)


_prefect, _client, _flow_runs = servers.prefect, servers.client, servers.flow_runs


def _quantization_state(env: dict[str, str], flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with _client(env) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="run-quantization")))
    return runs[0].state.name


def test_deployment_run_caches_and_triggers_downstream(prefect_env) -> None:
    maps = Path(prefect_env["MAPTOOLS_HOME"]) / "mapsave"
    started = time.monotonic()
    run = _prefect(prefect_env, "deployment", "run", "quantize-model/quantize", *PARAMS, "-p", "mapname=e2e",
                   "--watch", "--watch-interval", "1", "--watch-timeout", "300")
    cold = time.monotonic() - started
    assert "Completed" in run.stdout
    manifest = verify_map(maps / "e2e")
    assert manifest["mapname"] == "e2e" and manifest["calib_steps_used"] == 8

    started = time.monotonic()
    _prefect(prefect_env, "deployment", "run", "quantize-model/quantize", *PARAMS, "-p", "mapname=e2e",
             "--watch", "--watch-interval", "1", "--watch-timeout", "300")
    cached = time.monotonic() - started
    first, second = sorted(_flow_runs(prefect_env, "quantize"), key=lambda r: r.created)[-2:]
    assert _quantization_state(prefect_env, first.id) == "Completed"
    assert _quantization_state(prefect_env, second.id) == "Cached"
    print(f"\ndeployment run -> Completed: cold {cold:.1f} s, cached {cached:.1f} s")

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        downstream = [r for r in _flow_runs(prefect_env, "simulate-on-quantized") if r.state and r.state.is_final()]
        if len(downstream) >= 2:
            break
        time.sleep(2)
    upstream_ids = {p.parameters["upstream_run"] for p in downstream}
    assert {f"prefect.flow-run.{first.id}", f"prefect.flow-run.{second.id}"} <= upstream_ids
    assert all(r.state.is_completed() for r in downstream), [r.state.message for r in downstream]
    with _client(prefect_env) as client:
        result = client.read_flow_run(downstream[0].id).state.result()
    assert result["mapname"] == "e2e" and result["simulation"]["outputs"]["output"]["shape"] == [4, 10]
    # the downstream stage also mapped the map onto crossbars and simulated it there (256x256, 8-bit ADC)
    assert result["crossbars"]["arrays"] > 0 and result["crossbars"]["error"]["samples"] == 4
    assert "crossbar_map.json" in verify_map(maps / "e2e")["artifacts"]


def test_pipeline_deployment_quantizes_maps_and_simulates(prefect_env) -> None:
    run = _prefect(prefect_env, "deployment", "run", "quantize-map-simulate/quantize-map-simulate", *PARAMS,
                   "-p", "mapname=pipe", "-p", "xbar=64x64", "-p", "adc_bits=12", "-p", "samples=4",
                   "--watch", "--watch-interval", "1", "--watch-timeout", "300")
    assert "Completed" in run.stdout
    manifest = verify_map(Path(prefect_env["MAPTOOLS_HOME"]) / "mapsave" / "pipe")
    assert {"quantinfo.pkl", "operator_graph.json", "crossbar_map.json"} <= set(manifest["artifacts"])
    (flow_run,) = _flow_runs(prefect_env, "quantize-map-simulate")
    with _client(prefect_env) as client:
        result = client.read_flow_run(flow_run.id).state.result()
    assert result.crossbars.crossbars.spec.rows == 64 and result.crossbars.error.integer_rel_l2 == 0.0
    assert result.quantization.mapname == "pipe" and result.crossbars.error.samples == 4


def test_example_deployment_is_scheduled_but_paused(prefect_env) -> None:
    with _client(prefect_env) as client:
        example = client.read_deployment_by_name("quantize-model/resnet18-example")
        downstream = client.read_deployment_by_name("simulate-quantized-run/simulate-on-quantized")
        pipeline = client.read_deployment_by_name("quantize-map-simulate/quantize-map-simulate")
    assert pipeline.parameters["xbar"] == "256x256" and downstream.parameters["adc_bits"] == 8
    assert [s.schedule.cron for s in example.schedules] == ["0 2 * * *"]
    assert not any(s.active for s in example.schedules)
    assert example.parameters["onnx_path"] == "example:resnet18"
    assert example.work_pool_name == downstream.work_pool_name == "maptools"


def test_bad_parameter_fails_the_run_with_the_core_message(prefect_env) -> None:
    run = _prefect(prefect_env, "deployment", "run", "quantize-model/quantize", *PARAMS, "-p", "mapname=../escape",
                   "--watch", "--watch-interval", "1", "--watch-timeout", "300", check=False)
    assert run.returncode != 0 and "Failed" in run.stdout + run.stderr
    failed = max(_flow_runs(prefect_env, "quantize"), key=lambda r: r.created)
    assert failed.state.is_failed() and "plain folder name" in failed.state.message


def _served() -> dict[str, Any]:
    """deployments/serve.py's deployments by name (the script loaded as a module, nothing served)."""
    loader = importlib.util.spec_from_file_location("serve", servers.ROOT / "deployments" / "serve.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return {d.name: d for d in module.deployments()}


def test_deployment_parameters_are_valid_flow_parameters_and_serve_matches_prefect_yaml() -> None:
    """Each parameter prefect.yaml sets is a parameter of its flow, of the flow's type and bounds; the ones that
    set a QuantSettings or CrossbarSpec field are valid values of it; serve.py serves the same deployments with
    the same effective parameters."""
    deployments = yaml.safe_load((servers.ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    served = _served()
    assert sorted(served) == sorted(d["name"] for d in deployments)
    for deployment in deployments:
        module, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(flow.fn, include_extras=True)
        params = deployment.get("parameters", {})
        for key, value in params.items():
            assert key in hints, f"{deployment['name']}: {key} is not a parameter of {name}"
            TypeAdapter(hints[key]).validate_python(value)
        QuantSettings(**{k: v for k, v in params.items() if k in QuantSettings.model_fields})
        CrossbarSpec.from_xbar(params.get("xbar", "256x256"),
                               **{k: v for k, v in params.items() if k in CrossbarSpec.model_fields})
        defaults = {k: v["default"] for k, v in flow.parameters.properties.items() if "default" in v}
        assert {**defaults, **params} == {**defaults, **served[deployment["name"]].parameters}, deployment["name"]
