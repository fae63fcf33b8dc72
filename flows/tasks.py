"""Thin Prefect tasks over maptools functions, with content-keyed caching and transient-only retries."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from maptools_flows.locks import LOCKS
from maptools_flows.plots import layer_widths
from maptools_flows.results import RESULT_STORAGE, SERIALIZER
import maptools
from maptools import conversion, stages
from maptools.maps.artifacts import read_quantinfo, sha256_file
from maptools.maps.folder import sha256_folder
from maptools.evaluation import OutputError, evaluate_map, weight_memory_bytes
from maptools.errors import MaptoolsError
from maptools.quantization import QuantizationResult, quantize, snr_db
from maptools.settings import QuantSettings, Settings
from maptools.versions import package_versions

__all__ = ["EvaluationSpec", "prepare_model", "build_calibset", "run_quantization", "evaluate_quantized",
           "publish_report", "convert",
           "ContentKey", "is_transient", "code_fingerprint"]


@dataclass(frozen=True)
class EvaluationSpec:
    """What a map is evaluated on: a labelled .npz or a folder of samples (by path and sha256), or the map's own
    default (:func:`~maptools.evaluation.map_evaluation_set`: its calibration folder, or seeded random inputs)."""

    eval_set: str | None
    sha256: str | None
    samples: int
    seed: int

    @classmethod
    def of(cls, eval_set: str | None, samples: int, seed: int) -> EvaluationSpec:
        """The spec of ``eval_set`` (a file, or a folder by its files: a changed set misses the cache)."""
        if not eval_set:
            return cls(None, None, samples, seed)
        path = Path(eval_set)
        if path.is_dir():
            return cls(str(path.resolve()), sha256_folder(path), samples, seed)
        return cls(eval_set, sha256_file(path) if path.is_file() else None, samples, seed)


@cache
def code_fingerprint() -> str:
    """sha256 of maptools' source files and the versions of the packages that shape a result."""
    digest = hashlib.sha256()
    package = Path(maptools.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    versions = package_versions()
    digest.update(json.dumps({k: versions[k] for k in ("ppq", "torch", "onnx", "onnxsim")}, sort_keys=True).encode())
    return digest.hexdigest()


#: task inputs that do not change a result: left out of the cache key
_NOT_KEYED = frozenset({"threads"})


class ContentKey(CachePolicy):
    """Cache key from content: the model's and calibration data's sha256, every setting, and the code.

    Paths of inputs do not enter the key (a copied model hits); where the output goes
    (``mapname``, ``output_root``) does, since the cached result names those files.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        parts: dict[str, Any] = {"task": task_ctx.task.name, "code": code_fingerprint()}
        for name, value in sorted(inputs.items()):
            if name in _NOT_KEYED:
                continue
            if isinstance(value, stages.PreparedOnnx):
                parts[name] = value.sha256
            elif isinstance(value, stages.CalibrationSpec):
                parts[name] = value.sha256
            elif isinstance(value, QuantSettings):
                parts[name] = value.to_dict()
            elif isinstance(value, Settings):
                parts[name] = {"type": type(value).__name__, **value.model_dump(mode="json")}
            elif isinstance(value, QuantizationResult):
                parts[name] = {"sha256": value.sha256, "mapname": value.mapname, "output_root": str(value.output_root)}
            elif isinstance(value, Path):
                parts[name] = str(value)
            elif is_dataclass(value) and not isinstance(value, type):
                parts[name] = {"type": type(value).__name__, **asdict(value)}
            else:
                parts[name] = value
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


#: OSErrors that a retry cannot fix (a missing file stays missing).
_DETERMINISTIC_OS_ERRORS = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


#: CUDA (and other accelerator) runtime faults: torch >= 2.8 raises AcceleratorError for them
_ACCELERATOR_FAULTS = tuple(t for t in (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if t)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what its error class says may pass (an unreachable map store, a map replaced meanwhile), other I/O
    errors and accelerator faults; never the deterministic bad-input errors (a missing bucket or missing
    credentials included)."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, MaptoolsError):
        return error.transient
    if isinstance(error, _DETERMINISTIC_OS_ERRORS):
        return False
    return isinstance(error, (OSError, *_ACCELERATOR_FAULTS))


_CACHE = ContentKey().configure(isolation_level="SERIALIZABLE", lock_manager=LOCKS)
#: Cached results are JSON in storage that refuses anything else (see maptools_flows.results).
_PERSIST = dict(persist_result=True, result_serializer=SERIALIZER, result_storage=RESULT_STORAGE)
_RETRY = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2,
              retry_condition_fn=is_transient)


@task(name="prepare-model", **_RETRY)
def prepare_model(onnx_path: str, input_shapes: dict[str, list[int]], simplify: bool,
                  output_root: str, calib: str | None = None) -> stages.PreparedOnnx:
    """Fix dims, opset 13, onnxsim and PPQ-ready rewrites into a content-addressed file, checked against the
    original in onnxruntime (keyed on the model's bytes, the shapes, the options and the integer inputs of the
    calibration folder ``calib``'s first sample, which the checks take)."""
    return stages.prepare_onnx(onnx_path, input_shapes, simplify=simplify, root=output_root, calib=calib)


@task(name="build-calibset", **_RETRY)
def build_calibset(calib: str | None, input_shapes: dict[str, list[int]], calib_steps: int,
                   seed: int) -> stages.CalibrationSpec:
    """Describe the calibration data (kind, source, count, content hash); no tensors leave this task."""
    return stages.describe_calibration(calib, input_shapes, calib_steps, seed)


@task(name="run-quantization", cache_policy=_CACHE, **_PERSIST, **_RETRY)
def run_quantization(model: stages.PreparedOnnx, calibration: stages.CalibrationSpec,
                     input_shapes: dict[str, list[int]], mapname: str, device: str, settings: QuantSettings,
                     output_root: str, budget: dict[str, Any] | None = None, threads: int | None = None,
                     strict: bool = False, keep_on_host: list[str] | None = None) -> QuantizationResult:
    """PPQ on the prepared model; artifacts are written atomically into mapsave/<mapname>/. With a ``budget``
    the widths are chosen per layer (``bit_width='auto'``)."""
    # (simplify as the model was prepared: quantize then recognises the prepared file instead of preparing again;
    # the manifest names the file it was prepared from: on a cache hit, the one first quantized with these bytes)
    return quantize(input_shapes, device, stages.model_file(model, output_root), mapname=mapname,
                    calibset=calibration.calibset(), settings=settings, **({"bit_width": "auto"} if budget else {}),
                    output_root=output_root, budget=budget, threads=threads, strict=strict,
                    keep_on_host=keep_on_host or (), simplify=model.simplified, source=model.source)


def _scale(value: float | None) -> str:
    return "float" if value is None else f"{value:.4g}"


def _artifact_key(mapname: str) -> str:
    return "quant-" + (re.sub(r"[^a-z0-9-]+", "-", mapname.lower()).strip("-") or "map")


@task(name="evaluate-map", cache_policy=_CACHE, **_PERSIST)
def evaluate_quantized(result: QuantizationResult, evaluation: EvaluationSpec) -> OutputError:
    """Output error of the map's quant_model.onnx (exact at every width) against its float model on held-out
    inputs; cached on the map's content. Nothing is calibrated again."""
    return evaluate_map(result.map, evaluation=evaluation.eval_set, samples=evaluation.samples, seed=evaluation.seed)


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _per_output_table(per_output: dict[str, float]) -> list[str]:
    """A Markdown table of each output's own error where there are several (else nothing)."""
    if len(per_output) < 2:
        return []
    return ["| output | error vs float alone (rel. L2) |", "|---|---|",
            *(f"| `{name}` | {_pct(error)} |" for name, error in per_output.items()), ""]


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


@task(name="publish-report")
def publish_report(result: QuantizationResult, seconds: dict[str, float], source: str,
                   evaluation: OutputError | None = None) -> str:
    """Prefect artifacts: a summary that leads with the output error against float, and per-layer SNR (dB) and
    scales, worst layer first."""
    info = read_quantinfo(result.mapname, result.output_root)
    rows = []
    for name, db in sorted(result.errors.per_layer_db.items(), key=lambda item: item[1]):
        cfg = info[name]
        rows.append({"layer": name, "type": cfg.op_type, "SNR dB": _db(db), "input_scale": _scale(cfg.input_scale),
                     "output_scale": _scale(cfg.output_scale),
                     "weight_scale_min": f"{float(cfg.weight_scale.min()):.3g}",
                     "weight_scale_max": f"{float(cfg.weight_scale.max()):.3g}"})
    key = _artifact_key(result.mapname)
    create_table_artifact(rows, key=f"{key}-layers", description=(
        f"Per-layer SNR of {result.mapname}, worst first: signal-to-noise of each layer's output against float, in "
        "dB (higher is better; the noise/signal ratio is in error_report.json)"))
    mixed = result.mixed_precision
    if mixed is not None:
        create_table_artifact(
            [{"layer": layer["name"], "type": layer["op_type"], "params": layer["params"],
              "weight_bits": layer["weight_bits"], "input_bits": layer["input_bits"],
              "error alone, weights %": f"{100 * layer['weight_error'][str(layer['weight_bits'])]:.2f}",
              "error alone, input %": f"{100 * layer['input_error'][str(layer['input_bits'])]:.2f}"}
             for layer in mixed["layers"]],
            key=f"{key}-bits", description=f"Widths bit_width='auto' chose for {result.mapname} (errors: rel. L2 "
                                           "of the outputs against float, percent)")
        png = base64.b64encode(layer_widths(mixed, result.mapname)).decode()
        create_markdown_artifact(f"![widths per layer of {result.mapname}](data:image/png;base64,{png})",
                                 key=f"{key}-bits-plot", description=f"Widths and sensitivity per layer of "
                                                                     f"{result.mapname}")
    s = result.settings
    lines = [f"# Quantized `{result.mapname}`", ""]
    if evaluation is not None:
        lines += ["| output error vs float (rel. L2) | cosine | top-1 agreement | accuracy (float) | inputs |",
                  "|---|---|---|---|---|",
                  f"| **{_pct(evaluation.rel_l2)}** | {evaluation.cosine:.5f} | {_pct(evaluation.top1_agreement, 1)} | "
                  + (f"{_pct(evaluation.accuracy, 1)} ({_pct(evaluation.float_accuracy, 1)})"
                     if evaluation.accuracy is not None else "-")
                  + f" | {evaluation.samples}: {evaluation.source} |", "",
                  *_per_output_table(evaluation.per_output)]
    weight_bytes = weight_memory_bytes(result.mapname, result.output_root)
    worst = result.errors.worst_layer
    lines += ["| | |", "|---|---|",
              f"| model | `{source}` |", f"| map | `{result.map_dir}` |",
              f"| settings | W{s.weight_bits}A{s.activation_bits}, {'per-channel' if s.per_channel else 'per-tensor'}, "
              f"{s.algorithm.value}, {s.optimization.value} optimization, {s.scale_policy.value} scales, "
              f"{result.profile.value} profile |",
              f"| calibration | {result.calibration.get('used')} {result.calibration.get('kind')} samples "
              f"(seed {s.seed}) on `{result.device}` |",
              f"| weights on the crossbars | {weight_bytes:,} bytes |"]
    calib = result.errors.outputs
    if calib is not None:
        lines += [f"| output error on calibration samples | {_pct(calib.rel_l2)} (rel. L2"
                  + ("" if calib.top1_agreement is None else f", top-1 agreement {_pct(calib.top1_agreement, 1)}")
                  + f") on {calib.source} |"]
    if worst is not None:
        lines += [f"| layer SNR | median {_db(snr_db(result.errors.median))} dB, worst "
                  f"{_db(result.errors.per_layer_db[worst])} dB (`{worst}`); higher is better |"]
    placement = result.placement
    if placement is not None:
        lines += [f"| placement | {placement.summary()} |"]
    lines += [""]
    if placement is not None and placement.fallbacks:
        lines += ["| kept on the host in float, on record | why |", "|---|---|"]
        lines += [f"| `{name}` | {why.replace('|', '/')} |" for name, why in placement.fallbacks.items()]
        lines += [""]
    if mixed is not None:
        lines += [f"bit_width='auto' under {mixed['budget']}: output error {_pct(mixed['error'])} (uniform "
                  f"{_pct(mixed['uniform_error'])}), {mixed['average_weight_bits']:.2f} weight bits per parameter, "
                  f"{mixed['average_input_bits']:.2f} input bits per MAC, weights {mixed['weight_bytes']} of "
                  f"{mixed['uniform_weight_bytes']} bytes.", ""]
    lines += ["| artifact | sha256 |", "|---|---|"]
    lines += [f"| `{result.artifacts[n]}` | `{d[:16]}` |" for n, d in result.sha256.items()]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in seconds.items()]
    lines += [f"\n> note: {n}" for n in result.notes]
    return str(create_markdown_artifact("\n".join(lines), key=key, description=f"Quantization of {result.mapname}"))


@task(name="convert", cache_policy=_CACHE, **_PERSIST, **_RETRY)
def convert(result: QuantizationResult) -> conversion.ConversionResult:
    """Downstream conversion: the operator graph with quantinfo attached, written beside the artifacts.

    Cached on the artifacts' sha256 and the map folder.
    """
    return conversion.convert(result.mapname, output_root=result.output_root)
