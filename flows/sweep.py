"""The ``design-sweep`` flow: bit widths x per-channel x calibration algorithms x sample counts x models.

Each grid point is one ``sweep-point`` task, fanned out on Dask through ``prefect-dask``'s
``DaskTaskRunner`` (a local cluster by default, or an existing cluster by address). A point runs
the quantization flow's own ``run-quantization`` task under its own mapname (content-cached, so
a rerun or a grown grid recomputes only what is new), then ``evaluate-point`` (output error of
PPQ's simulation against the float model, also cached). With crossbar axes (``xbar``, ``cell_bits``,
``adc_bits``), each quantized point is then converted and simulated on every crossbar
(``simulate-crossbar``, cached on the map's content and the spec): one more row each. Results go
to a CSV and a JSON table, plots, and Prefect artifacts under ``<output_root>/sweeps/<name>/``.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import itertools
import json
import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maptools_flows.crossbar import convert_map, simulate_crossbar
from maptools_flows.plots import error_and_accuracy
from maptools_flows.results import ensure_result_storage
from maptools_flows.tasks import (EvaluationSpec, build_calibset, evaluate_quantized, prepare_model,
                                  run_quantization)
from maptools.artifacts import atomic_write, local_root, output_location
from maptools.artifacts import sha256_file
from maptools.errors import SettingsError, SweepConfigError
from maptools.evaluation import EVAL_SEED, OutputError, weight_memory_bytes
from maptools.crossbar_error import CrossbarError
from maptools.examples import EXAMPLE_PREFIX, EXAMPLES
from maptools.mapping import CrossbarSpec
from maptools.quantization import QuantizationResult, snr_db
from maptools.settings import QuantSettings
from maptools.store import Store, is_url, store_errors
from maptools.stages import CalibrationSpec, PreparedOnnx, located

__all__ = ["SweepConfig", "ModelSpec", "Grid", "SweepResult", "SweepConfigError", "load_config", "design_sweep",
           "run_sweep", "task_runner_for", "COLUMNS"]

# --- configuration -------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of the sweep: an ONNX file (with its input shapes) or a built-in example."""

    name: str | None = Field(None, description="Short name for mapnames and the table (default: file stem / example).")
    path: str | None = Field(None, description="ONNX model file.")
    example: Literal["small_cnn", "resnet18"] | None = Field(None, description="A built-in example model instead.")
    input_shapes: dict[str, list[int]] | None = Field(None, description="Shape of every input, e.g. "
                                                      "{input: [1, 3, 224, 224]}; default for examples.")
    calib: str | None = Field(None, description="'random' (default) or a folder of images / .npy / .npz files.")
    eval_set: str | None = Field(None, description="Labelled evaluation set: .npz with 'labels' and one array per "
                                                   "input; default: seeded random inputs.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.example is None):
            raise ValueError("give exactly one of 'path' (an ONNX file) or 'example' (small_cnn or resnet18)")
        if self.path is not None and self.input_shapes is None:
            raise ValueError("'input_shapes' is required with 'path', e.g. {input: [1, 3, 224, 224]}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_' or '-'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.example or Path(str(self.path)).stem

    def shapes(self) -> dict[str, list[int]]:
        if self.input_shapes is not None:
            return self.input_shapes
        return {k: list(v) for k, v in EXAMPLES[str(self.example)][1].items()}


#: settings the grid varies with an axis of its own
_DEDICATED = {"weight_bits": "bits", "activation_bits": "bits", "per_channel": "per_channel",
              "algorithm": "algorithms", "calib_steps": "calib_samples", "seed": "seed (the config's)"}


class Grid(_Strict):
    """The design space. Values are checked per point (a bad one fails only its points, with maptools' message)."""

    bits: list[int] = Field(min_length=1, description="Weight and activation bits (2..8).")
    per_channel: list[bool] = Field([True], min_length=1, description="Per-channel (true) / per-tensor (false).")
    algorithms: list[str] = Field(["percentile"], min_length=1, description="percentile, minmax, kl, mse.")
    calib_samples: list[int] = Field([32], min_length=1, description="Calibration samples (8..512).")
    xbar: list[str] = Field([], description="Crossbar sizes ROWSxCOLS; with adc_bits, every quantized point is "
                                            "also mapped and simulated on each crossbar.")
    cell_bits: list[int] = Field([2], min_length=1, description="Bits per cell of the crossbar points.")
    adc_bits: list[int] = Field([], description="ADC bits of the crossbar points (e.g. [4, 5, 6, 7, 8]).")
    settings: dict[str, list[Any]] = Field({}, description="More axes: any other quantization setting (a field of "
                                                           "maptools.settings.QuantSettings) and its values, e.g. "
                                                           "{scale_policy: [float, pow2]}.")

    @field_validator("settings")
    @classmethod
    def _setting_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in value.items():
            if name in _DEDICATED:
                raise ValueError(f"vary {name} with the grid's {_DEDICATED[name]!r} axis")
            if name not in QuantSettings.model_fields:
                raise ValueError(f"{name!r} is not a quantization setting (one of: "
                                 f"{', '.join(n for n in QuantSettings.model_fields if n not in _DEDICATED)})")
            if not values:
                raise ValueError(f"settings.{name} has no values")
        return value

    @model_validator(mode="after")
    def _crossbar_axes(self) -> Grid:
        if bool(self.xbar) != bool(self.adc_bits):
            raise ValueError("give both 'xbar' and 'adc_bits' for crossbar points (or neither)")
        return self

    def crossbars(self) -> list[tuple[str, int, int]]:
        """(xbar, cell_bits, adc_bits) of every crossbar point (checked when it runs)."""
        return list(itertools.product(self.xbar, self.cell_bits, self.adc_bits))


class SweepConfig(_Strict):
    """A design-space sweep: models x grid, where it runs and what it writes."""

    name: str = Field("sweep", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$",
                      description="Sweep name: folder sweeps/<name>/ and artifact keys (lowercase, digits, dashes).")
    models: list[ModelSpec] = Field(min_length=1)
    grid: Grid
    device: str = Field("cpu", description="cpu, cuda or auto; with cuda one point runs per GPU at a time.")
    seed: int = Field(0, ge=0, description="Seed of random calibration data.")
    eval_samples: int = Field(32, ge=1, le=10000, description="Evaluation samples (random inputs, or the first N "
                                                              "of a labelled set).")
    eval_seed: int = Field(EVAL_SEED, ge=0, description="Seed of random evaluation inputs (held out from calibration).")
    simplify: bool = Field(True, description="onnxsim each model while preparing it.")
    output_root: str | None = Field(None, description="Where mapsave/ and sweeps/ go (default $MAPTOOLS_HOME or the "
                                                      "working directory).")
    workers: int = Field(2, ge=1, le=256, description="Workers of the local Dask cluster (ignored with dask_address).")
    dask_address: str | None = Field(None, description="An existing Dask scheduler, e.g. tcp://host:8786.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value.strip().lower()):
            raise ValueError("use cpu, cuda, cuda:N or auto")
        return value.strip().lower()

    @model_validator(mode="after")
    def _unique_models(self) -> SweepConfig:
        labels = [m.label for m in self.models]
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)} (set 'name')")
        return self

    def points(self) -> list[SweepPoint]:
        g = self.grid
        extra = [[(name, v) for v in values] for name, values in g.settings.items()]
        return [SweepPoint(m.label, b, pc, a, n, tuple(more)) for m in self.models
                for b, pc, a, n, *more in itertools.product(g.bits, g.per_channel, g.algorithms, g.calib_samples,
                                                            *extra)]


def _summarise(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_config(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) sweep config; relative paths in it are relative to the file.

    Raises:
        SweepConfigError: a missing file, a syntax error, or bad fields (all of them, in one line).
    """
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep config {path} does not exist.", "pass a .yaml or .toml file (see "
                                                                       "examples/sweep.yaml).")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepConfigError(f"{path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'}: "
                               f"{' '.join(str(e).split())}", "fix the syntax.") from None
    if not isinstance(data, dict):
        raise SweepConfigError(f"{path} holds {type(data).__name__}, not a mapping of settings.",
                               "start from examples/sweep.yaml.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise SweepConfigError(f"{path}: {_summarise(e)}.", "see examples/sweep.yaml for the fields.") from None
    return config.model_copy(update={"models": [_resolve_paths(m, path.parent) for m in config.models],
                                     "output_root": _relative_to(config.output_root, path.parent)})


def _relative_to(value: str | None, base: Path) -> str | None:
    if value is None or value == "random" or is_url(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(model: ModelSpec, base: Path) -> ModelSpec:
    return model.model_copy(update={k: _relative_to(getattr(model, k), base) for k in ("path", "calib", "eval_set")})


# --- points and results ------------------------------------------------------------------------------

COLUMNS = ["model", "bits", "per_channel", "algorithm", "calib_samples", "settings", "mapname", "status", "cached", "rel_l2",
           "cosine", "top1_agreement", "accuracy", "float_accuracy", "worst_snr", "worst_layer", "median_snr",
           "weight_bytes", "artifact_bytes", "seconds", "quantize_seconds", "verified", "worker", "map_dir", "error",
           "xbar", "cell_bits", "adc_bits", "arrays", "utilization", "integer_rel_l2", "integer_agreement"]


@dataclass(frozen=True)
class SweepPoint:
    model: str
    bits: int
    per_channel: bool
    algorithm: str
    calib_samples: int
    settings: tuple[tuple[str, Any], ...] = ()  # the grid's other axes: (QuantSettings field, value)

    @property
    def mapname(self) -> str:
        algorithm = re.sub(r"[^A-Za-z0-9]+", "_", str(self.algorithm)) or "_"
        more = "".join(f"-{re.sub(r'[^A-Za-z0-9]+', '_', f'{n}_{v}')}" for n, v in self.settings)
        return f"{self.model}-w{self.bits}-{'pc' if self.per_channel else 'pt'}-{algorithm}-n{self.calib_samples}{more}"

    def quant_settings(self, seed: int) -> QuantSettings:
        """The point's settings (SettingsError for a value maptools refuses: only this point fails)."""
        return QuantSettings(weight_bits=self.bits, activation_bits=self.bits, per_channel=self.per_channel,
                             algorithm=self.algorithm, calib_steps=self.calib_samples, seed=seed,
                             **dict(self.settings))

    def row(self, **values: Any) -> dict[str, Any]:
        base = {c: None for c in COLUMNS}
        base.update(model=self.model, bits=self.bits, per_channel=self.per_channel, algorithm=self.algorithm,
                    calib_samples=self.calib_samples, mapname=self.mapname,
                    settings=json.dumps(dict(self.settings), default=str) if self.settings else None)
        base.update(values)
        return base


@dataclass(frozen=True)
class SweepResult:
    """The comparison table (one dict per point, ``COLUMNS``) and where it was written."""

    name: str
    rows: list[dict[str, Any]]
    csv_path: Path
    json_path: Path
    plot_path: Path | None
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "completed"]


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
                evaluation: EvaluationSpec, crossbars: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """One grid point: run-quantization (cached on content) then evaluate-point, then simulate-crossbar for
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
        rows += _crossbar_rows(point, result, evaluation, crossbars, {**common, "cached": None})
    return rows


def _crossbar_rows(point: SweepPoint, result: QuantizationResult, evaluation: EvaluationSpec,
                   crossbars: list[tuple[str, int, int]], common: dict[str, Any]) -> list[dict[str, Any]]:
    """The quantized point on each crossbar (simulate-crossbar, cached on the map's content and the spec)."""
    rows = []
    cstate = convert_map(result.mapname, str(result.output_root), return_state=True)
    for xbar, cell_bits, adc_bits in crossbars:
        started = time.perf_counter()
        axes = dict(xbar=xbar, cell_bits=cell_bits, adc_bits=adc_bits)
        if not cstate.is_completed():
            rows.append(point.row(status="failed", error=f"conversion: {_failure(cstate)}", **common, **axes))
            continue
        try:
            spec = CrossbarSpec.from_xbar(xbar, cell_bits=cell_bits, adc_bits=adc_bits)
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
                              integer_agreement=xe.integer_agreement,
                              seconds=round(time.perf_counter() - started, 3),
                              **{**common, "cached": state.name == "Cached"}, **axes))
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
            model = prepare_model(_model_file(spec), shapes, config.simplify, str(root))
        except Exception as e:  # the model itself is unusable: every point of it fails with the reason
            for i, p in mine:
                rows[i] = [p.row(status="failed", cached=False, error=f"model: {' '.join(str(e).split())}")]
            continue
        eval_sha = sha256_file(spec.eval_set) if spec.eval_set and Path(spec.eval_set).is_file() else None
        evaluation = EvaluationSpec(spec.eval_set, eval_sha, config.eval_samples, config.eval_seed)
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
                                            str(root), evaluation, config.grid.crossbars())
            futures.append((i, p, future))
    for i, p, future in futures:
        try:
            rows[i] = future.result()
        except Exception as e:  # the worker died or the task crashed outside the point's own error handling
            rows[i] = [p.row(status="failed", cached=False, error=" ".join(str(e).split()) or type(e).__name__)]
    table = [row for i in range(len(points)) for row in rows[i]]
    result = _publish(config, root, table, time.perf_counter() - started)
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


def _publish(config: SweepConfig, root: Path | str, table: list[dict[str, Any]], seconds: float) -> SweepResult:
    folder = local_root(root) / "sweeps" / config.name
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "results.csv", folder / "results.json"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    atomic_write(csv_path, text.getvalue())
    atomic_write(json_path, json.dumps({"name": config.name, "config": config.model_dump(),
                                        "seconds": round(seconds, 3), "rows": table}, indent=2, default=str))
    plot_path = plot_sweep(table, folder / "plot.png", title=f"design sweep {config.name}")

    key = f"sweep-{config.name}"
    rows, constant = display_table(table)
    create_table_artifact(rows, key=key, description=(
        f"Design sweep {config.name}: one row per quantization and per crossbar evaluation of it; "
        "errors are relative L2 of the outputs against float, in percent (lower is better); 'added by ADC' is the "
        "crossbar's error against the lossless integer simulation; SNR in dB (higher is better)"
        + (f". The same in every row: {', '.join(f'{k} {v}' for k, v in constant.items())}" if constant else "")
        + f". All columns: {csv_path}"))
    crossbar_plot = plot_crossbar_sweep(table, folder / "crossbar.png", title=f"crossbar sweep {config.name}")
    for image, suffix, what in ((plot_path, "plot", "Output error against bit width"),
                                (crossbar_plot, "crossbar-plot", "Crossbar output error against ADC bits")):
        if image is not None:
            png = base64.b64encode(image.read_bytes()).decode()
            create_markdown_artifact(f"![{what}](data:image/png;base64,{png})\n\n`{image}`", key=f"{key}-{suffix}",
                                     description=what)
    if isinstance(root, str):  # maps on a store: the report goes there too
        store = Store.of(root)
        with store_errors(f"upload the report of sweep {config.name!r}", root):
            for path in (csv_path, json_path, plot_path, crossbar_plot):
                if path is not None:
                    store.fs.put_file(str(path), store.join("sweeps", config.name, path.name))
    failed = [r for r in table if r["status"] != "completed"]
    crossbar_rows = sum(r["adc_bits"] is not None for r in table)
    lines = [f"# Design sweep `{config.name}`", "",
             f"{len(table) - len(failed)}/{len(table)} rows completed ({len(table) - crossbar_rows} quantizations, "
             f"{crossbar_rows} crossbar evaluations), {sum(bool(r['cached']) for r in table)} from the cache, in "
             f"{seconds:.1f} s.", "", *best_points(table), "",
             f"- table: `{csv_path}`, `{json_path}`", f"- plot: `{plot_path}`" if plot_path else "- plot: none"]
    lines += [f"- crossbar plot: `{crossbar_plot}`"] if crossbar_plot else []
    lines += [f"- failed `{r['mapname']}`: {r['error']}" for r in failed]
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary", description=f"Design sweep {config.name}")
    return SweepResult(config.name, table, csv_path, json_path, plot_path, seconds)


#: what the artifact table shows: the axes that vary (the others go to the heading), then the results, most read
#: first: (column, heading, how the value is written)
_SHOWN: list[tuple[str, str, Any]] = [
    ("model", "model", str), ("bits", "bits", str), ("per_channel", "per-channel", str),
    ("algorithm", "algorithm", str), ("calib_samples", "calib samples", str), ("settings", "settings", str),
    ("xbar", "xbar", str),
    ("cell_bits", "cell bits", str), ("adc_bits", "ADC bits", str),
    ("rel_l2", "error %", lambda v: f"{100 * v:.2f}"), ("integer_rel_l2", "added by ADC %", lambda v: f"{100 * v:.2f}"),
    ("top1_agreement", "top-1 agree %", lambda v: f"{100 * v:.1f}"), ("accuracy", "accuracy %", lambda v: f"{100 * v:.1f}"),
    ("cosine", "cosine", lambda v: f"{v:.4f}"), ("worst_snr", "worst SNR dB", lambda v: f"{snr_db(v):.1f}"),
    ("weight_bytes", "weight bytes", lambda v: f"{v:,}"), ("arrays", "arrays", str),
    ("utilization", "utilization %", lambda v: f"{100 * v:.1f}"), ("status", "status", str), ("cached", "cached", str),
    ("seconds", "s", lambda v: f"{v:.1f}"), ("error", "error", str)]
#: columns that describe a point (folded into the heading when every row has the same value)
_AXES = {"model", "bits", "per_channel", "algorithm", "calib_samples", "settings", "xbar", "cell_bits", "adc_bits", "status",
         "cached"}


def display_table(table: list[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The rows as a reader sees them: the axes that vary, then the results (percent, dB); columns empty everywhere
    dropped, and point columns with the same value in every row returned apart (for the heading)."""
    present = [(c, h, f) for c, h, f in _SHOWN if any(r[c] is not None and r[c] != "" for r in table)]
    constant = {h: f(table[0][c]) for c, h, f in present
                if c in _AXES and len(table) > 1 and len({str(r[c]) for r in table}) == 1}
    rows = [{h: "" if r[c] is None else f(r[c]) for c, h, f in present if h not in constant} for r in table]
    return rows, constant


def best_points(table: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the lowest-error row, and the rows no other beats on both error and cost (weight bytes for
    quantizations, arrays for crossbar evaluations)."""
    lines = []
    for label, cost, rows in (("quantization", "weight_bytes", [r for r in table if r["adc_bits"] is None]),
                              ("crossbar", "arrays", [r for r in table if r["adc_bits"] is not None])):
        done = [r for r in rows if r["status"] == "completed" and r["rel_l2"] is not None and r[cost] is not None]
        if not done:
            continue
        front = [r for r in done if not any(o[cost] <= r[cost] and o["rel_l2"] <= r["rel_l2"]
                                             and (o[cost], o["rel_l2"]) != (r[cost], r["rel_l2"]) for o in done)]
        best = min(done, key=lambda r: r["rel_l2"])
        lines += [f"Lowest {label} error: `{_point(best)}`, {100 * best['rel_l2']:.2f}% ({best[cost]:,} {cost})."
                  f" Error against {cost}, the front ({len(front)} of {len(done)}): "
                  + "; ".join(f"`{_point(r)}` {100 * r['rel_l2']:.2f}% at {r[cost]:,}"
                              for r in sorted(front, key=lambda r: r[cost])), ""]
    return lines


def _point(row: dict[str, Any]) -> str:
    parts = [row["model"], f"W{row['bits']}", "pc" if row["per_channel"] else "pt", row["algorithm"],
             f"n{row['calib_samples']}", *(f"{k}={v}" for k, v in json.loads(row["settings"] or "{}").items())]
    if row["adc_bits"] is not None:
        parts += [row["xbar"], f"cell{row['cell_bits']}", f"adc{row['adc_bits']}"]
    return " ".join(str(p) for p in parts)


def plot_sweep(table: list[dict[str, Any]], path: Path, title: str = "design sweep") -> Path | None:
    """Error (and accuracy, when measured) against bit width, one line per model / algorithm / granularity / samples."""
    done = [r for r in table if r["status"] == "completed" and r["rel_l2"] is not None and r["adc_bits"] is None]
    if not done:
        return None
    vary = {k: len({r[k] for r in done}) > 1 for k in ("per_channel", "calib_samples")}

    def label(r: dict[str, Any]) -> str:
        text = f"{r['model']} / {r['algorithm']}"
        if vary["per_channel"]:
            text += " / " + ("per-channel" if r["per_channel"] else "per-tensor")
        return text + (f" / n={r['calib_samples']}" if vary["calib_samples"] else "")

    return atomic_write(path, error_and_accuracy(done, "bits", label, "bit width (weights and activations)", title))


def plot_crossbar_sweep(table: list[dict[str, Any]], path: Path, title: str = "crossbar sweep") -> Path | None:
    """Error against float (and accuracy, when measured) against ADC bits, one line per model / bits / crossbar."""
    done = [r for r in table if r["status"] == "completed" and r["adc_bits"] is not None]
    if not done:
        return None
    return atomic_write(path, error_and_accuracy(
        done, "adc_bits", lambda r: f"{r['model']} W{r['bits']}A{r['bits']} / {r['xbar']} / {r['cell_bits']}-bit cells",
        "ADC bits", title))


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
    with _shared_api():
        return runner(config)


@contextlib.contextmanager
def _shared_api() -> Any:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide temporary server Prefect would start itself
    server.start(timeout=180)  # startup takes 15-20 s on a fresh PREFECT_HOME, longer on a busy machine
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield

