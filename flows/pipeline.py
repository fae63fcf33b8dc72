"""Chaining quantization into the downstream stages (conversion, integer re-simulation, crossbars).

* ``map-and-simulate``: a converted map onto crossbars (``map-crossbars``) and the crossbar-level
  simulation (``simulate-crossbar``), both cached on content, with table and plot artifacts;
* ``quantize-map-simulate``: the whole pipeline, ``quantize-model`` and ``map-and-simulate`` as
  subflows passing typed results;
* ``quantize-and-simulate``: ``quantize-model`` as a subflow, then the integer re-simulation;
* ``simulate-quantized-run``: a flow deployed with an event trigger on ``prefect.flow-run.Completed``
  of a quantization deployment; it receives the upstream run's id, reads that run's result, and
  simulates, maps and simulates on crossbars the map it produced.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from pydantic import Field

from maptools.errors import SettingsError
from maptools.metrics import per_output_line
from maptools_flows.credentials import AwsCredentialsBlock, credentials
from maptools_flows.crossbar import (MapAndSimulateResult, PipelineResult, convert_map, crossbar_file_current,
                                     map_crossbars_task, publish_crossbar_report, publish_device_report,
                                     simulate_crossbar, simulate_device)
from maptools_flows.params import choice, documented, setting
from maptools_flows.quantize_model import QuantizeModelResult, quantize_model
from maptools_flows.results import SERIALIZER, ensure_result_storage
from maptools_flows.tasks import EvaluationSpec, _artifact_key, _pct
from maptools.simulate import simulate as simulate_integers
from maptools.maps.artifacts import map_dir, output_location
from maptools.conversion import GRAPH_FILE, convert
from maptools.crossbar.device import DEVICE_PRESETS
from maptools.crossbar.evaluation import CrossbarError, DeviceEvaluation
from maptools.evaluation import EVAL_SEED, calibration_folder
from maptools.crossbar.mapping import CrossbarMap, CrossbarSpec
from maptools.settings import QuantSettings
from maptools.stages import has_artifact

#: the crossbar size parameter: ``rows`` and ``cols`` of :class:`CrossbarSpec` in one string
XBAR = Field(description="Crossbar size ROWSxCOLS: word lines x bit lines of one array, powers of two.")

#: the values of the CrossbarSpec fields a form offers as a drop-down
Encoding = choice(CrossbarSpec, "encoding")
AdcRange = choice(CrossbarSpec, "adc_range")
DevicePreset = Literal[tuple(DEVICE_PRESETS)]  # type: ignore[valid-type]
#: times after programming the device report reads the cells at: a second, an hour, a day, a year
DEVICE_TIMES = [1.0, 3600.0, 86400.0, 31536000.0]
#: scales of the device's programming and read noise the device report compares, at the first read time
NOISE_SCALES = (0.5, 1.0, 2.0)

__all__ = ["quantize_and_simulate", "simulate_quantized_run", "simulate_map", "map_and_simulate",
           "quantize_map_simulate", "MapAndSimulateResult", "PipelineResult"]


@task(name="publish-pipeline-report")
def publish_pipeline_report(title: str, mapname: str, rows: list[tuple[str, str]]) -> str:
    """The flow run's own summary: one row per stage with its answer, and the keys of the stages' artifacts."""
    key = _artifact_key(mapname)
    lines = [f"# {title}: `{mapname}`", "", "| stage | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             f"Details: the artifacts `{key}` (quantization, per layer: `{key}-layers`) and "
             f"`{key.replace('quant-', 'xbar-', 1)}` (crossbars) in the subflow runs."]
    return str(create_markdown_artifact("\n".join(lines), key=f"{key.replace('quant-', 'run-', 1)}",
                                        description=f"{title} of {mapname}"))


def _alone(per_output: dict[str, float]) -> str:
    """``'; per output: boxes 3.10%, scores 0.52%'`` where there are several outputs."""
    line = per_output_line(per_output)
    return f"; {line}" if line else ""


def _quantized_row(result: QuantizeModelResult) -> tuple[str, str]:
    q, e = result.quantization, getattr(result, "evaluation", None)  # a result of an earlier release has none
    agreement = "" if e is None or e.top1_agreement is None else f", top-1 agreement {_pct(e.top1_agreement)}"
    error = f"output error vs float {_pct(e.rel_l2)} (rel. L2{_alone(e.per_output)}){agreement}; " if e else ""
    return ("quantize", f"{error}W{q.settings.weight_bits}A{q.settings.activation_bits}, map `{q.map_dir}`"
                        f"{' (cached)' if result.quantization_cached else ''}")


def _crossbar_row(result: MapAndSimulateResult) -> tuple[str, str]:
    m, e = result.crossbars, result.error
    return ("crossbars", f"output error vs float {_pct(e.rel_l2)}{_alone(e.per_output)}, added by the crossbars "
                         f"{_pct(e.integer_rel_l2)} "
                         f"(rel. L2 vs the integer simulation); {m.arrays} arrays of {m.spec.xbar}, "
                         f"{100 * m.utilization:.1f}% utilization, {m.cycles:,} cycles per inference; "
                         f"{m.cost.summary()}")


@task(name="simulate-map")
def simulate_map(mapname: str, output_root: str, samples: int = 4, seed: int = 0) -> dict[str, Any]:
    """Integer re-simulation of a quantized map on seeded random inputs (converting it first if needed)."""
    if not has_artifact(mapname, output_root, GRAPH_FILE):
        convert(mapname, output_root=output_root)
    run = simulate_integers(mapname, "random", output_root=output_root, seed=seed, batch=samples)
    summary = run.to_json()
    get_run_logger().info("simulated %s on %d inputs in %.2f s", mapname, run.batch, run.seconds)
    return summary


@flow(name="map-and-simulate", persist_result=True, result_serializer=SERIALIZER)
@documented
def map_and_simulate(
    mapname: Annotated[str, Field(description="A quantized map under mapsave/ (converted here if needed).")],
    output_root: Annotated[str | None, Field(description="Where mapsave/ is (default $MAPTOOLS_HOME or the "
                                                         "working directory).")] = None,
    xbar: Annotated[str, XBAR] = "256x256",
    cell_bits: Annotated[int, setting(CrossbarSpec, "cell_bits")] = 2,
    adc_bits: Annotated[int, setting(CrossbarSpec, "adc_bits")] = 8,
    dac_bits: Annotated[int, setting(CrossbarSpec, "dac_bits")] = 1,
    encoding: Annotated[Encoding, setting(CrossbarSpec, "encoding")] = "differential",
    max_arrays: Annotated[int | None, setting(CrossbarSpec, "max_arrays")] = None,
    adc_range: Annotated[AdcRange, setting(CrossbarSpec, "adc_range",
                                                                    " Calibrated on seeded inputs.")] = "full",
    cols_per_adc: Annotated[int, setting(CrossbarSpec, "cols_per_adc")] = 1,
    device: Annotated[DevicePreset | None, Field(description="Non-ideal cells: a preset of maptools.DEVICE_PRESETS "
                                                             "(e.g. pcm, IBM's PCM statistics). Accuracy against "
                                                             "time after programming (with and without drift "
                                                             "compensation) and against the noise's scale is "
                                                             "simulated and published as plots.")] = None,
    device_trials: Annotated[int, Field(ge=2, le=1000, description="Monte Carlo trials of the device's cells.")] = 8,
    device_times: Annotated[list[float], Field(min_length=1, description="Times after programming (s) at which the "
                                                                         "cells are read.")] = DEVICE_TIMES,
    samples: Annotated[int, Field(ge=1, le=10000, description="Evaluation samples (random, or the first N of "
                                                              "eval_set).")] = 32,
    eval_set: Annotated[str | None, Field(description="Labelled .npz (labels + one array per input) or a folder of "
                                                      "samples; default: the map's calibration folder from the first "
                                                      "sample quantization did not read (seeded random inputs where "
                                                      "it was calibrated on random data).")] = None,
    eval_seed: Annotated[int, Field(ge=0, description="Seed of random evaluation inputs.")] = EVAL_SEED,
    psum_samples: Annotated[int, Field(ge=1, le=256, description="Seeded inputs for the observed partial "
                                                                 "sums.")] = 2,
    refresh: Annotated[bool, Field(description="Recompute even if cached.")] = False,
    aws_credentials: AwsCredentialsBlock = None,
) -> MapAndSimulateResult:
    """Lay a quantized map onto crossbars and simulate it there: cost (arrays, cells, cycles, ADC bits, energy,
    latency and area) and loss (output error against the float model and the lossless integer simulation)."""
    with credentials(aws_credentials):
        logger = get_run_logger()
        ensure_result_storage()
        started, seconds = time.perf_counter(), {}
        spec = CrossbarSpec.from_xbar(xbar, cell_bits=cell_bits, adc_bits=adc_bits, dac_bits=dac_bits,  # bad specs
                                      encoding=encoding, max_arrays=max_arrays, adc_range=adc_range,  # fail here
                                      cols_per_adc=cols_per_adc)
        root = str(output_location(output_root))
        content = convert_map(mapname, root)
        seconds["convert"] = time.perf_counter() - started

        t = time.perf_counter()
        state = map_crossbars_task.with_options(refresh_cache=refresh)(content, spec, psum_samples, 0,
                                                                       return_state=True)
        mapped: CrossbarMap = state.result()
        cached = state.name == "Cached"
        if cached and not crossbar_file_current(content, mapped):
            logger.warning("the cached crossbar map of %s is no longer in the map; mapping again", mapname)
            mapped, cached = map_crossbars_task.with_options(refresh_cache=True)(content, spec, psum_samples, 0), False
        seconds["map"] = time.perf_counter() - t

        t = time.perf_counter()
        evaluation = EvaluationSpec.of(eval_set or calibration_folder(mapname, root), samples, eval_seed)
        estate = simulate_crossbar.with_options(refresh_cache=refresh)(content, spec, evaluation, return_state=True)
        error: CrossbarError = estate.result()
        seconds["simulate"] = time.perf_counter() - t
        publish_crossbar_report(mapname, mapped, error, str(map_dir(mapname, root)))
        runs: dict[str, DeviceEvaluation] = {}
        noise: dict[float, DeviceEvaluation] = {}
        if device is not None:
            t = time.perf_counter()
            preset = DEVICE_PRESETS[device]
            for label, compensation in (("drift compensation on", True), ("drift compensation off", False)):
                runs[label] = simulate_device.with_options(refresh_cache=refresh)(
                    content, spec, preset.replace(compensation=compensation), evaluation, device_trials,
                    list(device_times))
            for scale in NOISE_SCALES:
                noisier = preset.replace(programming_noise=preset.programming_noise * scale,
                                         read_noise=preset.read_noise * scale)
                noise[scale] = simulate_device.with_options(refresh_cache=refresh)(
                    content, spec, noisier, evaluation, device_trials, [device_times[0]])
            publish_device_report(mapname, runs, noise)
            seconds["device"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - started
        logger.info("%s on %s crossbars: %d arrays, %.1f%% utilization, ADC %d bits: output error %.4g vs float, "
                    "%.4g vs integer", mapname, spec.xbar, mapped.arrays, 100 * mapped.utilization, adc_bits,
                    error.rel_l2, error.integer_rel_l2)
        return MapAndSimulateResult(mapname, content, mapped, error, cached and estate.name == "Cached", seconds, runs,
                                    noise)


@flow(name="quantize-map-simulate", persist_result=True, result_serializer=SERIALIZER)
@documented
def quantize_map_simulate(
    onnx_path: str,
    input_shapes: dict[str, list[int]],
    mapname: str,
    calib: str | None = None,
    calib_steps: Annotated[int, setting(QuantSettings, "calib_steps")] = 32,
    device: str = "auto",
    bit_width: Annotated[int, setting(QuantSettings, "weight_bits", " Activations take the same width.")] = 8,
    output_root: str | None = None,
    xbar: Annotated[str, XBAR] = "256x256",
    cell_bits: Annotated[int, setting(CrossbarSpec, "cell_bits")] = 2,
    adc_bits: Annotated[int, setting(CrossbarSpec, "adc_bits")] = 8,
    dac_bits: Annotated[int, setting(CrossbarSpec, "dac_bits")] = 1,
    encoding: Annotated[Encoding, setting(CrossbarSpec, "encoding")] = "differential",
    adc_range: Annotated[AdcRange, setting(CrossbarSpec, "adc_range")] = "full",
    cols_per_adc: Annotated[int, setting(CrossbarSpec, "cols_per_adc")] = 1,
    samples: Annotated[int, Field(ge=1, le=10000)] = 32,
    eval_set: str | None = None,
    aws_credentials: AwsCredentialsBlock = None,
) -> PipelineResult:
    """ONNX model to crossbar statistics and simulated error: quantize-model, then map-and-simulate, both
    measured on the same ``samples`` inputs (of ``eval_set`` where given)."""
    with credentials(aws_credentials):
        CrossbarSpec.from_xbar(xbar, cell_bits=cell_bits, adc_bits=adc_bits, dac_bits=dac_bits, encoding=encoding,
                               adc_range=adc_range, cols_per_adc=cols_per_adc)
        quantized: QuantizeModelResult = quantize_model(onnx_path, input_shapes, mapname, calib=calib,
                                                        calib_steps=calib_steps, device=device, bit_width=bit_width,
                                                        output_root=output_root, eval_samples=samples,
                                                        eval_set=eval_set, aws_credentials=aws_credentials)
        crossbars = map_and_simulate(quantized.mapname, str(quantized.quantization.output_root), xbar=xbar,
                                     cell_bits=cell_bits, adc_bits=adc_bits, dac_bits=dac_bits, encoding=encoding,
                                     adc_range=adc_range, cols_per_adc=cols_per_adc, samples=samples,
                                     eval_set=eval_set,
                                     aws_credentials=aws_credentials)
        publish_pipeline_report("Quantized, mapped and simulated", quantized.mapname,
                                [_quantized_row(quantized), _crossbar_row(crossbars)])
        return PipelineResult(quantized, crossbars)


@flow(name="quantize-and-simulate", persist_result=True, result_serializer=SERIALIZER)
@documented
def quantize_and_simulate(
    onnx_path: str,
    input_shapes: dict[str, list[int]],
    mapname: str,
    calib: str | None = None,
    calib_steps: Annotated[int, setting(QuantSettings, "calib_steps")] = 32,
    device: str = "auto",
    bit_width: Annotated[int, setting(QuantSettings, "weight_bits", " Activations take the same width.")] = 8,
    output_root: str | None = None,
    samples: Annotated[int, Field(ge=1, le=256, description="Random inputs for the simulation.")] = 4,
    aws_credentials: AwsCredentialsBlock = None,
) -> dict[str, Any]:
    """Quantize (subflow), then run the integer re-simulation on the map the subflow returned."""
    with credentials(aws_credentials):
        result: QuantizeModelResult = quantize_model(onnx_path, input_shapes, mapname, calib=calib,
                                                     calib_steps=calib_steps, device=device, bit_width=bit_width,
                                                     output_root=output_root, aws_credentials=aws_credentials)
        root = str(result.quantization.output_root)
        simulation = simulate_map(result.mapname, root, samples)
        publish_pipeline_report("Quantized and simulated", result.mapname, [_quantized_row(result), (
            "integer simulation", f"{simulation.get('batch', samples)} random inputs in "
                                  f"{simulation.get('seconds', 0.0):.2f} s")])
        return {"mapname": result.mapname, "map_dir": result.map_dir, "simulation": simulation}


def _upstream_result(upstream_run: str) -> QuantizeModelResult:
    run_id = UUID(upstream_run.removeprefix("prefect.flow-run."))
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
    if flow_run.state is None or not flow_run.state.is_completed():
        raise SettingsError(f"upstream flow run {run_id} is not Completed ({flow_run.state}).",
                            "pass the id of a quantize-model run that completed.")
    result = flow_run.state.result()
    # Workers load flows from their files, so the class object may differ from ours: check the shape.
    if type(result).__name__ != QuantizeModelResult.__name__ or not hasattr(result, "quantization"):
        raise TypeError(f"upstream flow run {run_id} returned {type(result).__name__}, not a QuantizeModelResult.")
    return result


@flow(name="simulate-quantized-run", persist_result=True, result_serializer=SERIALIZER)
@documented
def simulate_quantized_run(
    upstream_run: Annotated[str, Field(description="Flow run id of a completed quantize-model run "
                                                   "(the trigger passes {{ event.resource.id }}).")],
    samples: Annotated[int, Field(ge=1, le=256)] = 4,
    xbar: Annotated[str, XBAR] = "256x256",
    cell_bits: Annotated[int, setting(CrossbarSpec, "cell_bits")] = 2,
    adc_bits: Annotated[int, setting(CrossbarSpec, "adc_bits")] = 8,
    aws_credentials: AwsCredentialsBlock = None,
) -> dict[str, Any]:
    """Event-triggered downstream stage: simulate the map a completed quantize-model run produced, then map
    it onto crossbars and simulate it there (``map-and-simulate`` as a subflow)."""
    with credentials(aws_credentials):
        result = _upstream_result(upstream_run)
        get_run_logger().info("upstream run %s quantized map %s", upstream_run, result.mapname)
        root = str(result.quantization.output_root)
        summary = simulate_map(result.mapname, root, samples)
        crossbars = map_and_simulate(result.mapname, root, xbar=xbar, cell_bits=cell_bits, adc_bits=adc_bits,
                                     samples=samples, aws_credentials=aws_credentials)
        publish_pipeline_report(f"Simulated the map of run {upstream_run}", result.mapname,
                                [_quantized_row(result), _crossbar_row(crossbars)])
        return {"upstream_run": upstream_run, "mapname": result.mapname, "simulation": summary,
                "crossbars": crossbars.summary()}
