"""The ``design-sweep`` flow: bit widths x per-channel x calibration algorithms x sample counts x any other
quantization setting x models (the config and its points: :mod:`maptools_flows.sweep_config`; the table,
plots and artifacts: :mod:`maptools_flows.sweep_report`).

Each grid point is one ``sweep-point`` task, fanned out on Dask through ``prefect-dask``'s
``DaskTaskRunner`` (a local cluster by default, or an existing cluster by address). A point runs
the quantization flow's own ``run-quantization`` task under its own mapname (content-cached, so
a rerun or a grown grid recomputes only what is new), then ``evaluate-map`` (output error of
PPQ's simulation against the float model, also cached). With crossbar axes (``xbar``, ``cell_bits``,
``adc_bits``), each quantized point is then converted and simulated on every crossbar
(``simulate-crossbar``, cached on the map's content and the spec): one more row each. Results go
to a CSV and a JSON table, plots, and Prefect artifacts under ``<output_root>/sweeps/<name>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect_dask import DaskTaskRunner

from maptools_flows.crossbar import MapContent, convert_map, simulate_crossbar, simulate_device
from maptools_flows.results import ensure_result_storage
from maptools_flows.server import local_api
from maptools_flows.sweep_config import COLUMNS, DeviceRuns, Grid, ModelSpec, SweepConfig, SweepPoint, load_config
from maptools_flows.sweep_report import SweepResult, _point, display_table, plot_sweep, publish
from maptools_flows.tasks import EvaluationSpec, build_calibset, evaluate_quantized, prepare_model, run_quantization
from maptools.maps.artifacts import output_location
from maptools.errors import SettingsError, SweepConfigError
from maptools.evaluation import OutputError, weight_memory_bytes
from maptools.crossbar.evaluation import CrossbarError, DeviceEvaluation
from maptools.examples import EXAMPLE_PREFIX
from maptools.crossbar.mapping import CrossbarSpec
from maptools.quantization import QuantizationResult
from maptools.stages import CalibrationSpec, PreparedOnnx, located

__all__ = ["SweepConfig", "ModelSpec", "Grid", "SweepPoint", "SweepResult", "SweepConfigError", "load_config",
           "design_sweep", "run_sweep", "task_runner_for", "COLUMNS", "display_table", "plot_sweep"]


# --- points on the workers -------------------------------------------------------------------------------

def _use_worker_gpu(device: str) -> None:
    """On a local multi-GPU cluster, worker k computes on GPU k (the device string, and so the cache key, stays)."""
    if device not in ("cuda", "auto") or os.environ.get("CUDA_VISIBLE_DEVICES"):
        return
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return
    import torch

    if isinstance(name, int) and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(name % torch.cuda.device_count())


def _worker() -> str | None:
    """Address of the Dask worker running this point (None outside Dask)."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


def _failure(state: Any) -> str:
    error = state.result(raise_on_failure=False)
    return " ".join(str(error).split()) if isinstance(error, BaseException) else str(state.message)


@task(name="sweep-point", task_run_name="point-{mapname}")
def sweep_point(point: SweepPoint, mapname: str, model: PreparedOnnx, calibration: CalibrationSpec,
                input_shapes: dict[str, list[int]], device: str, seed: int, output_root: str,
                evaluation: EvaluationSpec, crossbars: list[dict[str, Any]], devices: DeviceRuns | None = None
                ) -> list[dict[str, Any]]:
    """One grid point: run-quantization (cached on content) then evaluate-map, then simulate-crossbar for
    each crossbar point; rows, the quantized point's first. A failure becomes a row."""
    started = time.perf_counter()
    _use_worker_gpu(device)
    where = _worker()
    try:
        settings = point.quant_settings(seed)
    except SettingsError as e:
        return [point.row(status="failed", cached=False, error=str(e), worker=where,
                          seconds=round(time.perf_counter() - started, 3))]
    args = dict(model=model, calibration=calibration, input_shapes=input_shapes, mapname=mapname, device=device,
                settings=settings, output_root=output_root)
    state = run_quantization(**args, return_state=True)
    if not state.is_completed():
        return [point.row(status="failed", cached=False, error=_failure(state), worker=where,
                          seconds=round(time.perf_counter() - started, 3))]
    result: QuantizationResult = state.result()
    cached = state.name == "Cached"
    here = located(result) if cached else result
    if here is not None:
        result = here
    else:
        state = run_quantization.with_options(refresh_cache=True)(**args, return_state=True)
        if not state.is_completed():
            return [point.row(status="failed", cached=False, error=_failure(state), worker=where,
                              seconds=round(time.perf_counter() - started, 3))]
        result, cached = state.result(), False
    estate = evaluate_quantized(result, evaluation, return_state=True)
    common = dict(
        cached=cached and estate.name == "Cached", worst_snr=result.errors.worst, worst_layer=result.errors.worst_layer,
        median_snr=result.errors.median, quantize_seconds=round(result.seconds.get("total", 0.0), 3),
        weight_bytes=weight_memory_bytes(result.mapname, result.output_root),
        artifact_bytes=sum(p.stat().st_size for p in result.artifacts.values() if p.is_file()),
        map_dir=str(result.map_dir), worker=where,
    )
    if not estate.is_completed():
        return [point.row(status="failed", error=f"evaluation: {_failure(estate)}",
                          seconds=round(time.perf_counter() - started, 3), **common)]
    ev: OutputError = estate.result()
    rows = [point.row(status="completed", rel_l2=ev.rel_l2, cosine=ev.cosine, top1_agreement=ev.top1_agreement,
                      accuracy=ev.accuracy, float_accuracy=ev.float_accuracy, verified=ev.verified,
                      seconds=round(time.perf_counter() - started, 3), **common)]
    if crossbars:
        rows += _crossbar_rows(point, result, evaluation, crossbars, {**common, "cached": None}, devices)
    return rows


def _crossbar_rows(point: SweepPoint, result: QuantizationResult, evaluation: EvaluationSpec,
                   crossbars: list[dict[str, Any]], common: dict[str, Any], devices: DeviceRuns | None = None
                   ) -> list[dict[str, Any]]:
    """The quantized point on each crossbar (simulate-crossbar, cached on the map's content and the spec), and on
    each device of ``devices`` (simulate-device)."""
    rows = []
    cstate = convert_map(result.mapname, str(result.output_root), return_state=True)
    for spec_axes in crossbars:
        started = time.perf_counter()
        more = {k: v for k, v in spec_axes.items() if k not in ("xbar", "cell_bits", "adc_bits", "adc_range")}
        axes = {**{k: v for k, v in spec_axes.items() if k not in more},
                "crossbar": json.dumps(more, default=str) if more else None}
        if not cstate.is_completed():
            rows.append(point.row(status="failed", error=f"conversion: {_failure(cstate)}", **common, **axes))
            continue
        try:
            spec = CrossbarSpec.from_xbar(**spec_axes)
        except SettingsError as e:
            rows.append(point.row(status="failed", error=" ".join(str(e).split()), **common, **axes))
            continue
        state = simulate_crossbar(cstate.result(), spec, evaluation, return_state=True)
        if not state.is_completed():
            rows.append(point.row(status="failed", error=f"crossbar: {_failure(state)}", **common, **axes))
            continue
        xe: CrossbarError = state.result()
        rows.append(point.row(status="completed", rel_l2=xe.rel_l2, cosine=xe.cosine, top1_agreement=xe.top1_agreement,
                              accuracy=xe.accuracy, float_accuracy=xe.float_accuracy, verified=True,
                              arrays=xe.arrays, utilization=xe.utilization, integer_rel_l2=xe.integer_rel_l2,
                              integer_agreement=xe.integer_agreement, energy_uj=xe.energy_pj / 1e6,
                              latency_us=xe.latency_ns / 1e3,
                              seconds=round(time.perf_counter() - started, 3),
                              **{**common, "cached": state.name == "Cached"}, **axes))
        if devices is not None:
            rows += _device_rows(point, cstate.result(), spec, evaluation, devices, common, axes)
    return rows


def _device_rows(point: SweepPoint, content: MapContent, spec: CrossbarSpec, evaluation: EvaluationSpec,
                 devices: DeviceRuns, common: dict[str, Any], axes: dict[str, Any]) -> list[dict[str, Any]]:
    """One crossbar point on each device: a row per read time, each metric's mean over the trials (and its std)."""
    rows = []
    for device_axes in devices.axes:
        started = time.perf_counter()
        label = json.dumps(device_axes, default=str)
        try:
            model = DeviceRuns.model(device_axes)
        except SettingsError as e:
            rows.append(point.row(status="failed", error=" ".join(str(e).split()), device=label, **common, **axes))
            continue
        state = simulate_device(content, spec, model, evaluation, devices.trials, devices.times, return_state=True)
        if not state.is_completed():
            rows.append(point.row(status="failed", error=f"device: {_failure(state)}", device=label, **common,
                                  **axes))
            continue
        de: DeviceEvaluation = state.result()
        for p in de.points:
            rows.append(point.row(
                status="completed", rel_l2=p.rel_l2[0], rel_l2_std=p.rel_l2[1],
                top1_agreement=None if p.top1_agreement is None else p.top1_agreement[0],
                accuracy=None if p.accuracy is None else p.accuracy[0],
                accuracy_std=None if p.accuracy is None else p.accuracy[1], float_accuracy=de.float_accuracy,
                verified=True, device=label, time_s=p.time, trials=p.trials,
                seconds=round(time.perf_counter() - started, 3), **{**common, "cached": state.name == "Cached"},
                **axes))
    return rows


# --- the flow ------------------------------------------------------------------------------------------

def _model_file(spec: ModelSpec) -> str:
    """The model path, or ``example:<name>`` (prepare-model exports it once under ``<root>/onnx_models/``)."""
    return spec.path if spec.path is not None else f"{EXAMPLE_PREFIX}{spec.example}"


def _uses_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return False


@flow(name="design-sweep", task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                                                     "processes": True, "host": "127.0.0.1",
                                                                     "dashboard_address": None}))
def design_sweep(config: SweepConfig) -> SweepResult:
    """Quantize every model at every grid point in parallel on Dask and compare the results.

    Points already computed (same model bytes, calibration data, settings and code) come from the
    cache. A point with a bad setting is a ``failed`` row carrying maptools' message.
    """
    logger = get_run_logger()
    ensure_result_storage()
    started = time.perf_counter()
    root = output_location(config.output_root)
    gpu = _uses_gpu(config.device)
    if gpu:
        _require_gpu_workers()
    points = config.points()
    logger.info("design sweep %r: %d quantizations of %d model(s), each evaluated on %d crossbar(s)", config.name,
                len(points), len(config.models), len(config.grid.crossbars()))
    rows: dict[int, list[dict[str, Any]]] = {}
    futures: list[tuple[int, SweepPoint, Any]] = []
    for spec in config.models:
        mine = [(i, p) for i, p in enumerate(points) if p.model == spec.label]
        shapes = spec.shapes()
        try:
            model = prepare_model(_model_file(spec), shapes, config.simplify, str(root), spec.calib)
        except Exception as e:  # the model itself is unusable: every point of it fails with the reason
            for i, p in mine:
                rows[i] = [p.row(status="failed", cached=False, error=f"model: {' '.join(str(e).split())}")]
            continue
        calib = None if spec.calib in (None, "random") else spec.calib  # (by default its held-out samples: keyed)
        evaluation = EvaluationSpec.of(spec.eval_set or calib, config.eval_samples, config.eval_seed)
        calibrations: dict[int, Any] = {}
        for i, p in mine:
            if p.calib_samples not in calibrations:
                calibrations[p.calib_samples] = build_calibset(spec.calib, shapes, p.calib_samples, config.seed,
                                                               return_state=True)
            cstate = calibrations[p.calib_samples]
            if not cstate.is_completed():
                rows[i] = [p.row(status="failed", cached=False, error=f"calibration: {_failure(cstate)}")]
                continue
            annotation = {"resources": {"GPU": 1}} if gpu else {}
            with _annotate(annotation):
                future = sweep_point.submit(p, p.mapname, model, cstate.result(), shapes, config.device, config.seed,
                                            str(root), evaluation, config.grid.crossbars(),
                                            config.grid.device_runs())
            futures.append((i, p, future))
    for i, p, future in futures:
        try:
            rows[i] = future.result()
        except Exception as e:  # the worker died or the task crashed outside the point's own error handling
            rows[i] = [p.row(status="failed", cached=False, error=" ".join(str(e).split()) or type(e).__name__)]
    table = [row for i in range(len(points)) for row in rows[i]]
    result = publish(config, root, table, time.perf_counter() - started)
    done = sum(r["status"] == "completed" for r in table)
    logger.info("design sweep %r: %d/%d rows completed (%d from cache) in %.1f s; table %s", config.name, done,
                len(table), sum(bool(r["cached"]) for r in table), result.seconds, result.csv_path)
    for row in table:
        logger.info("%s: %s", _point(row), f"error {100 * row['rel_l2']:.2f}% vs float" if row["rel_l2"] is not None
                    else f"{row['status']}: {row['error']}")
    return result


def _require_gpu_workers() -> None:
    """A GPU sweep's points ask for a ``GPU`` resource: fail now if no worker has one (they would wait forever)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None)
    if not isinstance(runner, DaskTaskRunner):
        return
    workers = runner.client.scheduler_info(n_workers=-1).get("workers", {})
    if not any(w.get("resources", {}).get("GPU") for w in workers.values()):
        raise SweepConfigError(f"device is a GPU but none of the {len(workers)} Dask worker(s) at "
                               f"{runner.client.scheduler.address} has a GPU resource.",
                               "start each worker with --resources GPU=1 (one worker per GPU), or use device: cpu.")


@contextlib.contextmanager
def _annotate(annotation: dict[str, Any]) -> Any:
    if not annotation:
        yield
        return
    import dask

    with dask.annotate(**annotation):
        yield


def task_runner_for(config: SweepConfig) -> DaskTaskRunner:
    """A DaskTaskRunner on ``config.dask_address``, or a loopback LocalCluster of ``config.workers`` workers.

    With a GPU device the local cluster gets one worker per GPU (at most ``workers``), each
    holding a ``GPU`` resource that a point takes, so one point runs per GPU at a time. Workers of
    an existing cluster must be started with ``--resources GPU=1`` for a GPU sweep.
    """
    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    kwargs: dict[str, Any] = {"n_workers": config.workers, "threads_per_worker": 1, "processes": True,
                              "host": "127.0.0.1", "dashboard_address": None}
    if _uses_gpu(config.device):
        import torch

        gpus = torch.cuda.device_count()
        if gpus < 1:
            raise SweepConfigError(f"device={config.device!r} but no GPU is visible here.", "use device: cpu.")
        kwargs.update(n_workers=min(config.workers, gpus), resources={"GPU": 1})
    return DaskTaskRunner(cluster_kwargs=kwargs)


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run :func:`design_sweep` on the task runner the config asks for.

    Without ``PREFECT_API_URL`` the temporary local Prefect server is started here, before the
    cluster, and its address handed to the flow's settings, so Dask workers (other processes)
    report to the same server instead of each starting their own. A cluster on other machines
    needs a real server: set ``PREFECT_API_URL`` to one they can reach.
    """
    runner = design_sweep.with_options(task_runner=task_runner_for(config))
    with local_api():
        return runner(config)

