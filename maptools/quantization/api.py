"""The documented entry point: ``quantize(input_shapes, device, onnx_path, mapname=..., calibset=..., calib_steps=...)``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import itertools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from maptools.maps.artifacts import (ARTIFACT_FILES, ERROR_REPORT, MANIFEST, MODEL, QUANT_MODEL, QUANTINFO_JSON,
                                     QUANTINFO_PKL, QUANTPARAMS_NPZ, QUANTPARAMS_PKL, MapFolder, atomic_write,
                                     sha256_file, validate_mapname, write_json, write_pickle)
from maptools.calibration import (MIN_SAMPLES, CalibrationSet, CastCalibration, ProgressCalibration,
                                  ValidatedCalibration, resolve_calibration)
from maptools.device import resolve_device
from maptools.evaluation import OutputError
from maptools.metrics import OutputComparison, Parts, split_parts
from maptools.quantization.equalize import equalization_tensors, equalize_channels
from maptools.quantization.reference import FloatReference
from maptools.errors import CalibrationError, ModelError, QuantizationFailed, SettingsError
from maptools.maps.manifest import Manifest, ModelRecord
from maptools.maps.roots import MapRef
from maptools.quantization.mixed_precision import SENSITIVITY_SAMPLES, Budget, MixedPrecisionReport, search
from maptools.onnx_model import (DEFAULT_DOMAINS, ModelInput, check_input_shapes, concat_parts, index_limits,
                                 load_model, model_inputs, optimizations_fail, ort_session, run_on_sample,
                                 with_inputs)
from maptools.placement import (QUANTIZED_OP_TYPES, PlacementReport, placement_report, record_host,
                                record_nonnegative_inputs, recorded_host)
import maptools.maps.seed as contract
from maptools.prepare import DEQUANTIZED, TARGET_OPSET, opset_of, prepare_model
from maptools.quantinfo import QuantConfig, quantinfo_to_json
from maptools.settings import (MULTIPLIER_BITS, ActivationSign, CalibrationAlgorithm, Optimization, Profile,
                               QuantSettings, ScalePolicy, field_bounds)
from maptools.threads import IdleSample, choose_threads, torch_threads
from maptools.versions import __version__, package_versions

log = logging.getLogger(__name__)

__all__ = ["quantize", "QuantizationResult", "ErrorSummary", "snr_db"]


@dataclass(frozen=True)
class ErrorSummary:
    """PPQ's graphwise SNR (noise power / signal power; lower is better) per Conv/Gemm, and ``outputs``: how far
    ``quant_model.onnx``'s outputs are from the float model's on the same calibration samples (None where the
    report is skipped, ``error_steps=0``)."""

    per_layer: dict[str, float]
    outputs: OutputError | None = None

    @property
    def worst_layer(self) -> str | None:
        return max(self.per_layer, key=self.per_layer.__getitem__) if self.per_layer else None

    @property
    def worst(self) -> float:
        return max(self.per_layer.values(), default=0.0)

    @property
    def median(self) -> float:
        return float(np.median(list(self.per_layer.values()))) if self.per_layer else 0.0

    @property
    def per_layer_db(self) -> dict[str, float]:
        """The same per layer as signal-to-noise in dB (``-10 log10(noise / signal)``; higher is better)."""
        return {name: snr_db(ratio) for name, ratio in self.per_layer.items()}


def snr_db(ratio: float) -> float:
    """A noise-to-signal power ratio as signal-to-noise in dB (higher is better; ``inf`` for no noise)."""
    return math.inf if ratio <= 0 else -10.0 * math.log10(ratio)


@dataclass(frozen=True)
class QuantizationResult:
    """What ``quantize`` produced: where, from what, with which settings, and how accurate.

    Holds paths, hashes and numbers only (no graphs or tensors), so it pickles and
    serialises to JSON cheaply.
    """

    mapname: str
    map_dir: Path
    artifacts: dict[str, Path]
    sha256: dict[str, str]
    model_sha256: str
    settings: QuantSettings
    device: str
    calibration: dict[str, Any]
    errors: ErrorSummary
    seconds: dict[str, float]
    notes: tuple[str, ...] = field(default=())
    prepared: dict[str, Any] = field(default_factory=dict)
    #: the immutable folder of this run's files (``map_dir`` links to the map's current version, which a
    #: later run of the same mapname replaces; this one is kept until the write after that)
    version_dir: Path | None = None
    #: where ``mapsave/`` is (the ``output_root`` the run resolved: a local path, or a store URL)
    output_root: Path | str | None = None
    #: ``bit_width='auto'``: the widths chosen per layer and the errors measured (MixedPrecisionReport JSON)
    mixed_precision: dict[str, Any] | None = None
    #: what runs on the device and on the host (and why), and the crossbars' share of the multiply-accumulates
    placement: PlacementReport | None = None
    #: the contract the map's pickles follow (``settings.profile``, or ``extended`` where the seed contract
    #: could not represent the model)
    profile: Profile = Profile.EXTENDED

    @property
    def map(self) -> MapRef:
        """This map by name and output root, as the later stages take it: ``convert(result.map)``,
        ``read_quantinfo(result.map)``, ``simulate(result.map)``."""
        return MapRef(self.mapname, self.output_root)

    @property
    def quantinfo_path(self) -> Path:
        return self.artifacts[QUANTINFO_PKL]

    @property
    def quantparams_path(self) -> Path:
        return self.artifacts[QUANTPARAMS_PKL]

    @property
    def quant_model_path(self) -> Path:
        return self.artifacts[QUANT_MODEL]

    def to_json(self) -> dict[str, Any]:
        return {
            "mapname": self.mapname, "map_dir": str(self.map_dir),
            "artifacts": {k: str(v) for k, v in self.artifacts.items()}, "sha256": self.sha256,
            "model_sha256": self.model_sha256, "settings": self.settings.to_dict(), "device": self.device,
            "calibration": self.calibration, "error_report": self.errors.per_layer,
            "output_error": None if self.errors.outputs is None else self.errors.outputs.to_dict(),
            "snr_db": {k: None if math.isinf(v) else round(v, 2) for k, v in self.errors.per_layer_db.items()},
            "seconds": self.seconds,
            "notes": list(self.notes), "mixed_precision": self.mixed_precision,
            "placement": None if self.placement is None else self.placement.model_dump(mode="json"),
            "profile": self.profile.value,
        }


def _datapath_checks(settings: QuantSettings, quantinfo: Mapping[str, QuantConfig]) -> list[str]:
    """Check that quantinfo honours ``scale_policy`` (else QuantizationFailed) and ``shared_scales`` (else notes)."""
    if settings.scale_policy is ScalePolicy.POW2:
        bad = [name for name, cfg in quantinfo.items()
               if any(s is not None and not _is_pow2(s) for s in (cfg.output_scale, *cfg.input_scales))
               or (cfg.weight_scale is not None and not all(_is_pow2(float(s)) for s in cfg.weight_scale))]
        if bad:
            raise QuantizationFailed(f"scale_policy='pow2' left scales that are not powers of two at: "
                                     f"{', '.join(bad[:8])}.", "report this model to the maptools maintainers.")
    if not settings.shared_scales or settings.profile is Profile.SEED:  # (the seed contract checks rule 2 itself)
        return []
    joins = {name: cfg for name, cfg in quantinfo.items() if cfg.op_type in ("Add", "Sub", "Concat") and
             len(cfg.input_scales) > 1}
    if not joins:
        return ["shared_scales=True: this model has no Add or Concat of two activations on the device, so there "
                "was nothing to share."]
    apart = [name for name, cfg in joins.items()
             if any(stage.startswith(("input", "align", "concat")) for stage in cfg.requant)]
    if apart:
        return [f"shared_scales=True: inputs of {', '.join(apart[:8])} still arrive on different scales (a tensor "
                "that feeds two adders can sit on one grid only); they are requantized before the adder."]
    return []


def _search_widths(model_path: Path, calibration: CalibrationSet, data: Any, steps: int,
                   first: Mapping[str, Any], settings: QuantSettings, device: str,
                   budget: Budget, reference: FloatReference | None) -> tuple[Any, QuantSettings, MixedPrecisionReport]:
    """``bit_width='auto'``: widths per layer under ``budget`` (see :mod:`maptools.quantization.mixed_precision`)."""
    import torch

    import maptools.quantization.ppq_adapter as _ppq

    model = load_model(model_path)
    names = [o.name for o in model.graph.output]
    samples = [{k: v.detach().cpu().numpy() for k, v in sample.items()}
               for sample, _ in zip(calibration, range(SENSITIVITY_SAMPLES))]

    def quantize_at(candidate: QuantSettings) -> Any:
        return _ppq.quantize_graph(model_path, data, steps, first, candidate, device, reference)

    def measure(graph: Any, reference: list[list[np.ndarray]]) -> float:
        comparison = OutputComparison()
        for sample, expected in zip(samples, reference):
            outputs = graph.run({k: torch.from_numpy(v) for k, v in sample.items()}, output_names=names)
            comparison.add([outputs[n] for n in names], expected)
        return comparison.mean_error()

    return search(model, samples, settings, budget, quantize_at, measure)


@dataclass(frozen=True)
class _Quantized:
    """What PPQ made of a prepared model, read out and exported."""

    graph: Any
    settings: QuantSettings
    mixed: MixedPrecisionReport | None
    quantinfo: dict[str, QuantConfig]
    quantparams: dict[str, np.ndarray | None]
    qdq: bytes
    export_seconds: float


def _read_out(graph: Any, settings: QuantSettings, mixed: MixedPrecisionReport | None) -> _Quantized:
    """A quantized graph's quantinfo, quantparams and QDQ model."""
    quantinfo = graph.quantinfo()
    unquantized = graph.unquantized_conv_inputs()
    if unquantized:
        raise QuantizationFailed(f"these operators would read float inputs: {unquantized}.",
                                 "report this model to the maptools maintainers; a CIM crossbar needs every "
                                 "Conv/Gemm input on a quantization grid.", operator=unquantized[0])
    quantparams = graph.quantparams(quantinfo)
    t = time.perf_counter()
    qdq = graph.qdq_model(quantinfo, quantparams)
    return _Quantized(graph, settings, mixed, quantinfo, quantparams, qdq, time.perf_counter() - t)


def _quantize_prepared(model_path: Path, calibration: CalibrationSet, data: Any, steps: int,
                       first: Mapping[str, Any], settings: QuantSettings, device: str, budget: Budget | None,
                       strict: bool, reference: FloatReference | None) -> _Quantized:
    """PPQ on the prepared model at ``model_path``, read out and exported.

    Where PPQ fails at a device operator, that operator is recorded in the model file as kept on the
    host in float (:func:`maptools.placement.record_host`; the placement of every later stage reads
    it) and PPQ runs again, until it succeeds; ``strict`` makes the first such failure an error.
    """
    import maptools.quantization.ppq_adapter as _ppq

    fallbacks: dict[str, str] = {}
    while True:
        try:
            mixed = None
            if budget is not None:
                graph, chosen, mixed = _search_widths(model_path, calibration, data, steps, first, settings, device,
                                                      budget, reference)
            else:
                graph, chosen = _ppq.quantize_graph(model_path, data, steps, first, settings, device,
                                                    reference), settings
            return _read_out(graph, chosen, mixed)
        except QuantizationFailed as e:
            if e.operator is None or e.operator in fallbacks:
                raise
            if strict:
                raise QuantizationFailed(e.problem, f"quantize without strict=True (--strict) to keep {e.operator} on "
                                         "the host in float, or report this model to the maptools maintainers.",
                                         operator=e.operator) from e
            fallbacks.update({name: e.reason(name) for name in (e.operator, *e.also)})
            log.warning("%s: %s stay on the host in float; quantizing again", e.problem,
                        _listing([e.operator, *e.also]))
            model = onnx.load(str(model_path))
            record_host(model, fallbacks)
            atomic_write(model_path, model.SerializeToString())


#: A device operator whose graphwise noise power reaches this share of its signal's has lost its signal (a note).
LOST_SIGNAL = 0.9

#: Calibration samples on which ``algorithm='auto'`` compares its candidates' output error.
CHOICE_SAMPLES = 16


#: An output that a Concat assembled from parts whose RMS differ by over this factor is measured part by part.
PART_RATIO = 10.0


def _measured_parts(model: onnx.ModelProto, names: Sequence[str],
                    reference: Sequence[Sequence[np.ndarray]]) -> dict[int, Parts]:
    """The outputs (by position) whose error :func:`_output_error` takes part by part: those a Concat assembled
    (:func:`~maptools.onnx_model.concat_parts`) from parts whose RMS on the float model's outputs (``reference``)
    differ by over :data:`PART_RATIO`, where the largest would outweigh the rest (a detector's boxes in pixels
    beside its scores below one)."""
    assembled = concat_parts(model)
    measured = {}
    for i, name in enumerate(names):
        if (found := assembled.get(name)) is None:
            continue
        axis, bounds = found
        if any(np.ndim(r[i]) <= axis or np.shape(r[i])[axis] != bounds[-1] for r in reference):
            continue
        pieces = zip(*(split_parts(r[i], found) for r in reference))  # per part, its piece of each sample
        rms = [math.sqrt(np.mean([np.mean(np.square(p, dtype=np.float64)) for p in part])) for part in pieces]
        if min(rms) > 0 and max(rms) > PART_RATIO * min(rms):
            measured[i] = found
    return measured


def _output_error(qdq: bytes, samples: Sequence[Mapping[str, np.ndarray]],
                  reference: Sequence[Sequence[np.ndarray]], names: Sequence[str], parts: Mapping[int, Parts]) -> float:
    """:meth:`~maptools.metrics.OutputComparison.mean_error` of the QDQ model's outputs ``names`` against the float
    model's (``reference``, per sample) on ``samples``, each part of an output in ``parts`` (:func:`_measured_parts`)
    weighted alike within it: a detector's box offsets as much as its scores."""
    session = ort_session(qdq)
    comparison = OutputComparison(names, parts)
    for sample, expected in zip(samples, reference):  # (one sample's outputs held at a time)
        comparison.add(run_on_sample(session, names, sample), expected)
    return comparison.mean_error()


def _calibrated(model_path: Path, calibration: CalibrationSet, data: Any, steps: int, first: Mapping[str, Any],
                settings: QuantSettings, device: str, budget: Budget | None, strict: bool,
                reference: FloatReference | None, notes: list[str],
                held_out: Iterable[Mapping[str, torch.Tensor]] | None = None) -> _Quantized:
    """:func:`_quantize_prepared` with each of ``settings``' candidates (``auto``: percentile and mse, each also
    bias-corrected where ``optimization`` is none: the correction runs on that calibration's graph, and is undone
    where it is not kept); the quantization with the lowest :func:`_output_error` is kept, and the choice is in
    ``notes``. The error is measured on the ``held_out`` samples (calibration samples beyond ``steps``, which
    no candidate's ranges were fitted to), or where there are none on the first :data:`CHOICE_SAMPLES`
    calibration samples."""
    import maptools.quantization.ppq_adapter as _ppq

    candidates = settings.candidates
    if len(candidates) == 1:
        return _quantize_prepared(model_path, calibration, data, steps, first, settings, device, budget, strict,
                                  reference)
    where = "calibration samples" if held_out is None else "samples held out of the calibration"
    chosen = itertools.islice(calibration, min(steps, CHOICE_SAMPLES)) if held_out is None else held_out
    samples = [{k: v.detach().cpu().numpy() for k, v in sample.items()} for sample in chosen]
    prepared = model_path.read_bytes()  # (one file: preparation writes no external data)
    float_session = ort_session(prepared)
    names = [o.name for o in float_session.get_outputs()]
    expected = [run_on_sample(float_session, names, s) for s in samples]
    del float_session
    parts = _measured_parts(onnx.ModelProto.FromString(prepared), names, expected)
    del prepared
    errors: dict[str, float] = {}
    best: _Quantized | None = None

    def kept(done: _Quantized) -> bool:
        """Whether ``done`` is the best so far (its error recorded; NaN: the first is kept)."""
        nonlocal best
        errors[_label(done.settings)] = _output_error(done.qdq, samples, expected, names, parts)
        if best is None or errors[_label(done.settings)] < errors[_label(best.settings)]:
            best = done
        return best is done

    for algorithm in dict.fromkeys(c.algorithm for c in candidates):  # at most two graphs held: the best and this
        plain, *corrections = [c for c in candidates if c.algorithm is algorithm]  # (then its bias-corrected twin)
        done = _quantize_prepared(model_path, calibration, data, steps, first, plain, device, budget, strict,
                                  reference)
        kept(done)
        if corrections:
            try:
                with _ppq.ppq_step("correcting biases"):
                    previous = _ppq.correct_biases(done.graph, data, steps)
            except QuantizationFailed as e:  # (a candidate, not the run: it fails before it moves a bias)
                notes.append(f"algorithm='auto' left the fast bias correction of {algorithm.value} out: {e.problem}")
                log.warning("%s", notes[-1])
                continue
            if not previous:
                errors[f"{_label(done.settings.replace(optimization=corrections[0].optimization))}"
                       " (moved no bias: the same model)"] = errors[_label(done.settings)]
            elif not kept(_read_out(done.graph, done.settings.replace(optimization=corrections[0].optimization),
                                    done.mixed)):
                _ppq.restore_biases(done.graph, previous)  # (the plain quantization's files were read out before)
    if all(math.isnan(e) for e in errors.values()):
        notes.append(f"algorithm='auto' kept {_label(best.settings)}, the first candidate, without comparing: no "
                     f"output compares with the float model's on the {where} (each one's size depends on the data, "
                     "or differs from the float model's: a decoder's sequence length); pass algorithm= to choose.")
        log.warning(notes[-1])
        return best
    by_part = (f" ({', '.join(names[i] for i in parts)} taken as the parts a Concat assembled, each weighted "
               f"alike: their magnitudes differ by over {PART_RATIO:g}x)" if parts else "")
    notes.append(f"algorithm='auto' chose {_label(best.settings)}: output error against float on {len(samples)} "
                 f"{where}{by_part} " + ", ".join(f"{a} {e:.2%}" for a, e in errors.items()) + ".")
    log.info(notes[-1])
    return best


def _label(settings: QuantSettings) -> str:
    """A candidate of ``algorithm='auto'`` as its note names it: ``mse``, ``mse + fast-bias-correction``."""
    return settings.algorithm.value + ("" if settings.optimization is Optimization.NONE
                                       else f" + {settings.optimization.value}")


def _contract(settings: QuantSettings, quantinfo: Mapping[str, QuantConfig], model: onnx.ModelProto, strict: bool,
              notes: list[str]) -> Profile:
    """The profile the map's pickles are written in: the seed contract where ``settings`` ask for it and the map
    keeps it (:func:`maptools.maps.seed.check`), else extended (a note; an error with ``strict``)."""
    if settings.profile is not Profile.SEED:
        return Profile.EXTENDED
    broken = contract.check(quantinfo, model)
    if not broken:
        return Profile.SEED
    problem = (f"the seed contract cannot represent this map ({len(broken)} violations: "
               f"{'; '.join(map(str, broken[:4]))}{' ...' if len(broken) > 4 else ''})")
    if strict:
        raise QuantizationFailed(problem + ".", "quantize with profile='extended' (only this package's downstream "
                                 "reads it), or without strict=True.")
    notes.append(problem + ": quantinfo.pkl and quantparams.pkl are written in the extended profile's types, which the "
                 "original toolchain refuses to load (`maptools check-seed` lists the violations).")
    log.warning(notes[-1])
    return Profile.EXTENDED


#: calibration samples whose channel ranges decide the equalization (:mod:`maptools.quantization.equalize`)
EQUALIZE_SAMPLES = 8


def _as_prepared(calibration: CalibrationSet, inputs: Sequence[ModelInput], prepared: onnx.ModelProto
                 ) -> CalibrationSet:
    """``calibration`` in the prepared model's input dtypes (a float16 input is float32 after preparation)."""
    given = {i.name: i.dtype for i in inputs}
    widened = {i.name: torch.float32 for i in model_inputs(prepared)
               if i.dtype == np.float32 and given.get(i.name, i.dtype) != i.dtype}
    return CastCalibration(calibration, widened) if widened else calibration


def _never_negative(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    """The float graph inputs none of ``samples`` holds a negative value of (an image scaled to [0, 1]: NNCF
    quantizes such an input on unsigned codes too)."""
    floats = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    return [name for name in floats if samples and all(name in s and float(s[name].min()) >= 0 for s in samples)]


def _keep_on_host(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Record ``names`` in the prepared ``model`` as kept on the host (:func:`maptools.placement.record_host`)."""
    known = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in known]
    if isinstance(names, str) or unknown:
        raise SettingsError(f"keep_on_host names operators the prepared model does not have: "
                            f"{_listing(unknown or [names])}.", "pass a list of node names as quantinfo.json or "
                            "'maptools inspect MODEL --input-shape ...' show them.")
    record_host(model, {**recorded_host(model), **{n: "kept on the host as asked (keep_on_host)" for n in names}})


def _error_report(graph: Any, calibration: CalibrationSet, steps: int, qdq: bytes, notes: list[str]
                  ) -> dict[str, float]:
    """The per-layer SNR; a report PPQ cannot compute is left out (with a note), not a failed run."""
    try:
        return graph.error_report(calibration, steps=steps, qdq=qdq)
    except QuantizationFailed as e:
        notes.append(f"no per-layer error report: {e.problem}")
        log.warning(notes[-1])
        return {}


def _unoptimized(model: onnx.ModelProto, prepared: bytes, qdq: bytes) -> list[str]:
    """A note where onnxruntime loads the map's model.onnx or quant_model.onnx only with its graph optimizations
    off: with the input dims fixed, its constant folding takes a branch of control flow the exporter traced for
    other shapes (silero VAD v5's 8 kHz branch) and its shape inference fails there."""
    if not any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
        return []  # (only control flow has been seen to do it: a plain graph is not loaded twice more)
    failing = {name: why for name, data in (("model.onnx", prepared), ("quant_model.onnx", qdq))
               if (why := optimizations_fail(data)) is not None}
    if not failing:
        return []
    note = (f"onnxruntime loads {' and '.join(failing)} only with its graph optimizations off: "
            "SessionOptions().graph_optimization_level = GraphOptimizationLevel.ORT_DISABLE_ALL, as maptools' own "
            f"sessions do (with them on: {next(iter(failing.values()))}).")
    log.warning(note)
    return [note]


def _output_check(qdq: bytes, model: onnx.ModelProto, calibration: CalibrationSet, count: int,
                  reference: FloatReference | None, random: bool, notes: list[str]) -> OutputError | None:
    """``quant_model.onnx`` (``qdq``) against the float ``model`` on the first ``count`` calibration samples, as
    :func:`~maptools.evaluation.evaluate_map` compares a map on held-out samples (the float side from
    ``reference`` where it was built); None where no output compares (each sized by the data, or an index) or
    onnxruntime cannot run ``qdq`` (a note says so)."""
    started = time.perf_counter()
    samples = [{k: v.detach().cpu().numpy() for k, v in sample.items()}
               for sample in itertools.islice(calibration, count)]
    names = list(dict.fromkeys(o.name for o in model.graph.output))
    if reference is None:
        float_session = ort_session(model.SerializeToString())
        float_run = functools.partial(run_on_sample, float_session, names)
    else:
        float_run = functools.partial(reference.run, names)
    comparison = OutputComparison(names)  # (one sample's outputs held at a time: a large model's are hundreds of MB)
    session = None
    for sample in samples:
        expected = float_run(sample)
        try:
            session = session or ort_session(qdq)
            quantized = run_on_sample(session, names, sample)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; the map is written all the same
            notes.append(f"no output error: onnxruntime cannot run quant_model.onnx ({str(e).strip()[:300]}); the "
                         "integer simulation (convert, then simulate) runs the map without it.")
            log.warning(notes[-1])
            return None
        comparison.add(quantized, expected)
    metrics = comparison.result()
    if not metrics["per_output"]:
        return None  # (every output is sized by the data or an index: nothing to compare)
    return OutputError(samples=len(samples), verified=True, source=f"the first {len(samples)} calibration samples"
                       + (" (seeded random data)" if random else ""), seconds=time.perf_counter() - started, **metrics)


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _lost_signal(lost: list[str], settings: QuantSettings, quantinfo: Mapping[str, QuantConfig],
                 model: onnx.ModelProto) -> str:
    """The note on device operators whose error report reads a lost signal, with the remedies that apply to them:
    a grid of their own for an input an adder or a concatenation shares (the seed profile's shared scales), more
    bits for one read at fewer than the most, and keeping them on the host."""
    producer = {t: n for n in model.graph.node for t in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    nodes = {n.name: n for n in model.graph.node}
    joins = ("Add", "Sum", "Concat")

    def shared(name: str) -> bool:  # its input from an adder or a concatenation, or its output into one
        node = nodes.get(name)
        if node is None or not node.input:
            return False
        source = producer.get(node.input[0])
        if source is not None and source.op_type in ("Relu", "Clip") and source.input:
            source = producer.get(source.input[0])
        after = [r for t in node.output for r in readers.get(t, [])]
        after += [r for a in after if a.op_type in ("Relu", "Clip") for t in a.output for r in readers.get(t, [])]
        return source is not None and source.op_type in joins or any(a.op_type in joins for a in after)

    most = field_bounds(QuantSettings, "activation_bits")["le"]
    joined = [n for n in lost if settings.shared_scales and shared(n)]
    narrow = [n for n in lost if quantinfo[n].io_bits < most]
    remedies = ([f"{_listing(joined, 3)} share{'s' if len(joined) == 1 else ''} the one grid of an adder or a "
                 "concatenation with the other tensors it joins: profile='extended' gives each its own"]
                if joined else []) + (
        [f"{_listing(narrow, 3)} read{'s' if len(narrow) == 1 else ''} {min(quantinfo[n].io_bits for n in narrow)}-bit "
         "inputs: more bits (" + ("layer_bits" if settings.profile is Profile.EXTENDED else
                                  "bit_width; per layer, layer_bits under profile='extended'") + ")"]
        if narrow else []) + ["keep_on_host for these keeps them in float"]
    return (f"{len(lost)} device operator(s) lose their signal (noise power at least {LOST_SIGNAL:.0%} of the "
            f"signal's on the calibration samples): {_listing(lost)}. " + "; ".join(remedies) + ".")


def _share(report: PlacementReport) -> str:
    share = report.crossbar_coverage
    return "none" if share is None else f"{share:.1%}"


def _is_pow2(scale: float) -> bool:
    return scale > 0 and math.frexp(scale)[0] == 0.5


def _check_opset(model: onnx.ModelProto, fallbacks: Sequence[str]) -> None:
    """PPQ's quantized model takes per-channel QuantizeLinear nodes (opset 13): a prepared model left below it
    cannot be written."""
    opset = opset_of(model)
    if opset < TARGET_OPSET and any(n.domain in DEFAULT_DOMAINS for n in model.graph.node):
        why = next((f for f in fallbacks if f.startswith(f"converting to opset {TARGET_OPSET}")), "")
        raise ModelError(f"the model stays at opset {opset}" + (f" ({why})" if why else "") + f", and its quantized "
                         f"model is written at opset {TARGET_OPSET} (per-channel QuantizeLinear), where operators "
                         "of old opsets may mean something else.",
                         f"re-export the model at opset {TARGET_OPSET} or later (torch.onnx.export(..., "
                         f"opset_version={TARGET_OPSET}); tf2onnx --opset {TARGET_OPSET}).")


def quantize(
    input_shapes: Mapping[str, Sequence[int]],
    device: str,
    onnx_path: str | Path,
    mapname: str | None = None,
    calibset: Any = None,
    calib_steps: int = 32,
    *,
    seed: int = 0,
    bit_width: int | Literal["auto"] = 8,
    weight_bits: int | None = None,
    activation_bits: int | None = None,
    per_channel: bool = True,
    algorithm: str | CalibrationAlgorithm = CalibrationAlgorithm.AUTO,
    output_root: str | Path | None = None,
    error_steps: int = 8,
    progress: Callable[[int, int], None] | None = None,
    simplify: bool = True,
    activation_sign: str | ActivationSign | None = None,
    optimization: str | Optimization = Optimization.NONE,
    scale_policy: str | ScalePolicy = ScalePolicy.FLOAT,
    shared_scales: bool | None = None,
    multiplier_bits: int = MULTIPLIER_BITS,
    layer_bits: Mapping[str, tuple[int, int]] | None = None,
    budget: Budget | Mapping[str, Any] | None = None,
    threads: int | None = None,
    strict: bool = False,
    keep_on_host: str | Sequence[str] = (),
    profile: str | Profile = Profile.SEED,
    settings: QuantSettings | None = None,
    source: str | Path | None = None,
) -> QuantizationResult:
    """Quantize an ONNX model as shipped with PPQ and write its artifacts to ``mapsave/<mapname>/``.

    The model is first prepared (:mod:`maptools.prepare`): dims fixed to ``input_shapes``, opset
    13, constants folded, onnxsim, BatchNorm/bias folding; the prepared model is checked against
    the original in onnxruntime and stored in the map as ``model.onnx``.

    Args:
        input_shapes: ``{input name: shape}`` for every graph input, e.g. ``{'input': [1, 3, 224, 224]}``.
        device: ``'cpu'``, ``'cuda'`` (``'cuda:N'``) or ``'auto'`` (CUDA when available).
        onnx_path: the ONNX model file.
        mapname: folder name under ``mapsave/``; defaults to the model file's stem (``my model.onnx``: ``my_model``).
        calibset: ``None`` for seeded random data; a list, torch ``DataLoader`` or other re-iterable
            of ``{input name: tensor}`` dicts shaped like ``input_shapes`` (batch axis included); a
            folder of images (in class subfolders) or of ``.npy``/``.npz`` files; a
            ``(source, transform_fn)`` pair; or a :class:`maptools.calibration.CalibrationSet`.
            Streamed and validated sample by sample (see :mod:`maptools.calibration`).
        calib_steps: calibration batches, 8..512. With fewer samples than steps every sample is
            used once (logged and recorded in the manifest).
        seed: seed of random calibration data; the same seed gives identical artifacts.
        bit_width: weight and activation bits (2..8); ``weight_bits``/``activation_bits`` override it.
            ``'auto'``: per-layer weight and input widths chosen under ``budget``
            (:mod:`maptools.quantization.mixed_precision`; the choice is in ``result.mixed_precision``).
        per_channel: one weight scale per output channel (default) or per tensor.
        algorithm: activation calibration: ``auto`` (default: percentile and mse both, each also with the fast
            bias correction where ``optimization`` is ``'none'``, the model nearest float on the calibration samples
            kept and named in ``result.settings``; percentile on random data), ``percentile``, ``minmax``, ``kl``
            or ``mse``.
        output_root: where ``mapsave/`` goes; default ``$MAPTOOLS_HOME`` or the current directory.
        error_steps: calibration samples the per-layer error report and the output error (``errors.outputs``)
            are measured on; 0 skips both.
        progress: called as ``progress(done, total)`` each time PPQ takes a calibration sample
            (``total``: :meth:`QuantSettings.samples_read`, every pass of every candidate), e.g. to drive a
            progress bar.
        simplify: run onnxsim while preparing (default); the other preparation steps always run.
        activation_sign: ``'signed'`` (the seed profile's, the only one it takes): signed codes everywhere;
            ``'auto'`` (the extended profile's default): unsigned codes ``[0, 2^b - 1]`` for tensors that
            cannot be negative (after Relu, Sigmoid, ...), still with zero offsets.
        optimization: ``'none'`` (default), ``'bias-correction'``, ``'equalization'`` or ``'lsq'``
            (see :class:`maptools.settings.Optimization`); the data-fitted ones refuse random data.
        scale_policy: ``'float'`` (default) or ``'pow2'``: every scale a power of two, so requantization
            is a shift.
        shared_scales: one scale on all activation inputs of each device Add and Concat (no
            requantization before the adder); a model without either gets a note. Default: the
            profile's (``True`` for seed, ``False`` for extended).
        multiplier_bits: bits of the requantization multipliers quantinfo records (8..31).
        layer_bits: ``{crossbar operator: (weight_bits, input_bits)}``: per Conv/Gemm, the width of its
            weights and the width it reads its input at (what ``bit_width='auto'`` chooses).
        budget: for ``bit_width='auto'``: ``{'output_error': 0.05}`` (relative L2 of the outputs against
            float, on the calibration samples) or ``{'weight_bytes': N}``; see
            :class:`maptools.quantization.mixed_precision.Budget`.
        threads: torch threads while PPQ runs; default (None) the cores this process may use that
            are idle when the run starts, so a busy machine does not oversubscribe (:mod:`maptools.threads`).
        strict: where PPQ fails at an operator, fail (``QuantizationFailed`` naming it) instead of keeping
            that operator on the host in float and quantizing again (the default; the result's
            ``placement`` and the manifest list such fallbacks, and the crossbars' share of the work);
            likewise where preparation has to leave a step out (``ModelError``).
        keep_on_host: names of operators of the prepared model to keep on the host in float (like NNCF's
            ignored scope), e.g. a layer the error report shows too sensitive.
        profile: ``'seed'`` (default): ``quantinfo.pkl``/``quantparams.pkl`` in the original toolchain's
            contract (:mod:`maptools.maps.seed`), which its downstream loads as they are; a model the contract
            cannot represent is written ``'extended'`` (with a note; ``strict`` makes it an error).
            ``'extended'``: this package's semantics and pickle types, which the original refuses to load.
        settings: every option above at once (:class:`maptools.settings.QuantSettings`, the one definition of
            each); a keyword given beside it must agree with it.
        source: the file ``onnx_path`` was prepared from, where ``onnx_path`` is a model maptools prepared
            (:func:`maptools.stages.prepare_onnx`, as the flows do): the manifest and the result name it, with the
            sha256 its preparation recorded, as the model quantized.

    Returns:
        A :class:`QuantizationResult` with the artifact paths, their sha256 and the error summary.

    Raises:
        maptools.errors.MaptoolsError: a subclass naming the problem and the fix, raised before
            the map folder is touched; a previous map of the same name stays as it was.
    """
    started = time.perf_counter()
    idle = IdleSample()  # the cores idle while the input is checked decide the thread count (choose_threads)
    auto = bit_width == "auto"
    bits = field_bounds(QuantSettings, "weight_bits")
    if auto:
        if budget is None and Profile(settings.profile if settings is not None and profile == Profile.SEED
                                      else profile) is Profile.SEED:  # (both missing: one error names both)
            raise SettingsError("bit_width='auto' needs a budget, and a profile whose downstream reads activations "
                                "at several widths.", "pass profile='extended' and a budget, e.g. "
                                "budget={'output_error': 0.05}, {'error_ratio': 1.5} or {'weight_bytes': 200_000}.")
        budget = Budget.of(budget)
        if weight_bits is not None or activation_bits is not None or layer_bits or (settings and settings.layer_bits):
            raise SettingsError("bit_width='auto' chooses the widths; weight_bits, activation_bits and layer_bits "
                                "cannot be given with it.", "limit the widths with the budget's weight_choices and "
                                "input_choices instead.")
        bit_width = max(budget.weight_choices)
        weight_bits, activation_bits = max(budget.weight_choices), max(budget.input_choices)
    elif isinstance(bit_width, bool) or not isinstance(bit_width, int) or not bits["ge"] <= bit_width <= bits["le"]:
        raise SettingsError(f"bit_width={bit_width!r} is not supported.",
                            f"use an integer from {bits['ge']} to {bits['le']} (8 is the default), or 'auto'.")
    elif budget is not None:
        raise SettingsError("budget= applies to bit_width='auto' only.", "pass bit_width='auto' or drop budget.")
    keywords = QuantSettings(
        weight_bits=bit_width if weight_bits is None else weight_bits,
        activation_bits=bit_width if activation_bits is None else activation_bits,
        per_channel=per_channel, algorithm=algorithm, calib_steps=calib_steps, seed=seed,
        activation_sign=activation_sign, optimization=optimization, scale_policy=scale_policy,
        shared_scales=shared_scales, multiplier_bits=multiplier_bits, layer_bits=tuple(
            (name, *bits) for name, bits in (layer_bits or {}).items()),
        profile=settings.profile if settings is not None and profile == Profile.SEED else profile,
    )
    if settings is None:
        settings = keywords
    else:
        defaults = QuantSettings(profile=settings.profile)
        clash = [name for name in QuantSettings.model_fields if getattr(keywords, name) != getattr(defaults, name)
                 and getattr(keywords, name) != getattr(settings, name)]
        if clash and not (auto and set(clash) <= {"weight_bits", "activation_bits"}):
            raise SettingsError(f"settings= and the keyword(s) {', '.join(clash)} disagree.",
                                "pass each option once: in settings, or as a keyword.")
        if auto:
            settings = settings.replace(weight_bits=keywords.weight_bits, activation_bits=keywords.activation_bits)
    if auto and settings.profile is Profile.SEED:
        raise SettingsError("bit_width='auto' chooses per-layer widths, and the seed profile's downstream reads every "
                            "activation at one width.", "pass profile='extended' with bit_width='auto'.")
    onnx_path = Path(onnx_path)
    mapname = validate_mapname(MapFolder.named_after(onnx_path) if mapname is None else mapname)
    keep_on_host = [keep_on_host] if isinstance(keep_on_host, str) else list(keep_on_host)  # (one name, not letters)
    if isinstance(error_steps, bool) or not isinstance(error_steps, int) or error_steps < 0:
        raise SettingsError(f"error_steps={error_steps!r} is not a count of samples.",
                            "pass 0 (no per-layer error report) or a positive number, e.g. 8.")
    folder = MapFolder(mapname, output_root)
    target = folder.path
    ppq_device = resolve_device(device)
    model = with_inputs(load_model(onnx_path), input_shapes)
    shapes = check_input_shapes(model, input_shapes)
    inputs = model_inputs(model)

    if calibset is None and settings.optimization.needs_real_data:
        raise CalibrationError(f"optimization={settings.optimization.value!r} fits the quantized model to the "
                               "calibration data, and calibset=None is random noise.",
                               "pass real samples as calibset (or optimization='none'/'equalization').")
    data_source = resolve_calibration(calibset, shapes, settings.calib_steps, settings.seed,
                                 {i.name: i.dtype for i in inputs}, index_limits(model))
    notes: list[str] = []
    replaced = {i.name: i.dims for i in inputs if any(d not in (None, s) for d, s in zip(i.dims, shapes[i.name]))}
    if replaced:
        notes.append("input_shapes replace dims the model fixes (" + ", ".join(
            f"{name}: {['?' if d is None else d for d in dims]} -> {list(shapes[name])}" for name, dims in
            replaced.items()) + "): onnxruntime runs the model at these (an exporter's placeholders), and the map "
            "is for them.")
        log.info(notes[-1])
    if calibset is None:
        notes.append("calibrated on seeded random data: fine for trying the pipeline, not for accuracy "
                     "(ranges of real inputs differ); pass real samples (calibset= in Python, --calib FOLDER "
                     "on the command line, calib= in the flow).")
        log.warning(notes[-1])
        if settings.algorithm is CalibrationAlgorithm.AUTO:  # nothing to choose on: the default
            settings = settings.replace(algorithm=CalibrationAlgorithm.PERCENTILE)
            notes.append("algorithm='auto' chooses on real samples: with random data, percentile.")
    if len(data_source) < MIN_SAMPLES:
        batch = next((s[0] for s in shapes.values() if s), 1)
        raise CalibrationError(f"calibset holds {len(data_source)} samples; PPQ needs at least {MIN_SAMPLES}"
                               + (f" (a sample is one item: here a batch of {batch}, as input_shapes give)"
                                  if batch > 1 else "") + ".",
                               f"provide {MIN_SAMPLES} or more samples, or calibset=None for random data.")
    steps = min(settings.calib_steps, len(data_source))
    if steps < settings.calib_steps:
        notes.append(f"calib_steps={settings.calib_steps} but calibset holds {len(data_source)} samples: "
                     f"calibrated on all {steps} samples once.")
        log.warning(notes[-1])
    calibration = ValidatedCalibration(data_source, inputs, shapes, limit=steps)
    first = next(iter(calibration))  # fail fast on a malformed first sample, before PPQ starts
    model_sha = sha256_file(onnx_path)
    # auto chooses on samples beyond the calibrated ones where the set holds enough of them
    held_count = CHOICE_SAMPLES if len(settings.candidates) > 1 and len(data_source) >= steps + CHOICE_SAMPLES else 0
    read = ValidatedCalibration(data_source, inputs, shapes, limit=steps + held_count) if held_count else calibration
    calib_desc = {**calibration.describe(), "sha256": read.content_hash(),
                  **({"held_out": held_count} if held_count else {})}
    seconds = {"validate": time.perf_counter() - started}

    folder.check_writable()  # a folder that is not a map, or storage we cannot write: before any work
    count = choose_threads(threads, idle)

    with tempfile.TemporaryDirectory(prefix="maptools-prepare-") as scratch:
        t = time.perf_counter()
        prepared = prepare_model(onnx_path, Path(scratch) / MODEL, shapes, simplify=simplify, strict=strict,
                                 loaded=model, source_sha256=model_sha, link=True,  # (random ids: 0/1 are safer)
                                 sample=None if calibset is None else {k: v.detach().cpu().numpy()
                                                                       for k, v in first.items()})
        seconds["prepare"] = time.perf_counter() - t
        log.info("prepared %s: %s (max |diff| from the original %.2e)", onnx_path, "; ".join(prepared.steps) or
                 "nothing to change", prepared.max_abs_diff)
        if source is not None:
            if prepared.source_sha256 in (None, model_sha):  # (a model prepared here records its own sha256)
                raise SettingsError(f"source={str(source)!r} names the file a prepared model came from, and {onnx_path}"
                                    " was not prepared by this maptools for these input shapes and options.",
                                    "pass the model itself as onnx_path and leave source out.")
            onnx_path, model_sha = Path(source), prepared.source_sha256
        t = time.perf_counter()
        model_bytes = prepared.path.read_bytes()
        model = onnx.ModelProto.FromString(model_bytes)
        _check_opset(model, prepared.fallbacks)
        if keep_on_host:
            _keep_on_host(model, keep_on_host)  # (node attributes only: the float session stays valid)
        feed = _as_prepared(calibration, inputs, model)
        held_out = itertools.islice(_as_prepared(read, inputs, model), steps, None) if held_count else None
        first = feed.cast(first) if isinstance(feed, CastCalibration) else first
        # one float session of the prepared model for the equalization and the error report's float side
        reference = FloatReference.build(model, None if keep_on_host else model_bytes, threads=count,
                                         tensors=equalization_tensors(model))
        samples = [{k: v.detach().cpu().numpy() for k, v in sample.items()}
                   for sample in itertools.islice(feed, min(steps, EQUALIZE_SAMPLES))]
        equalized = equalize_channels(model, samples, reference)
        if equalized:
            prepared = dataclasses.replace(prepared, steps=(*prepared.steps, *equalized))
            log.info("channels equalized: %s", "; ".join(equalized))
        unsigned_inputs = _never_negative(model, samples) if settings.unsigned_activations else []
        if unsigned_inputs:
            record_nonnegative_inputs(model, unsigned_inputs)
        if keep_on_host or equalized or unsigned_inputs:
            model_bytes = model.SerializeToString()
            atomic_write(prepared.path, model_bytes)
        if equalized:  # the reference was of the model before
            reference = FloatReference.build(model, model_bytes, threads=count)
        del model, model_bytes  # quantize_graph reads the file (its fallbacks rewrite it): one copy less held
        data = feed if progress is None else ProgressCalibration(feed, settings.samples_read(steps), progress)
        with torch_threads(count) as in_force:
            log.info("calibrating with %d torch threads", in_force)
            try:
                done = _calibrated(prepared.path, feed, data, steps, first, settings, ppq_device,
                                   budget if auto else None, strict, reference, notes, held_out)
            except QuantizationFailed as e:
                if calibset is not None or e.operator is not None:
                    raise
                # a host operator failed on random data: integer inputs that index what another input sizes (a
                # graph network's node ids) get values the model never sees
                raise QuantizationFailed(e.problem, "calibset=None feeds random values, and an integer input may "
                                         "index past what the model expects (ids into another input's rows): pass "
                                         "real samples as calibset; if it fails on those too, report this model to "
                                         "the maptools maintainers.") from e
        seconds["calibrate"] = time.perf_counter() - t - done.export_seconds
        seconds["export"] = done.export_seconds
        prepared_bytes = prepared.path.read_bytes()  # with the operators kept on the host recorded in it
    graph, settings, quantinfo = done.graph, done.settings, done.quantinfo
    if settings.optimization is Optimization.EQUALIZATION and graph.equalization_pairs == 0:
        notes.append("optimization='equalization' found no pair of layers to rescale (PPQ's layer-wise "
                     "equalization takes a Conv/Gemm whose output reaches another through Relu/Clip-like operators "
                     "only; a Sigmoid/SiLU between them stops it): the map is the one optimization='none' gives.")
        log.warning(notes[-1])
    prepared_model = onnx.ModelProto.FromString(prepared_bytes)
    report = placement_report(prepared_model)
    failed = [name for name in report.fallbacks if name not in keep_on_host]
    if failed:
        notes.append(f"{len(failed)} operator(s) stay on the host in float because quantizing them failed or lost "
                     f"a signal ({_listing(failed)}; {failed[0]}: {report.fallbacks[failed[0]][:300]}); the crossbars "
                     f"compute {_share(report)} of the multiply-accumulates. strict=True makes such a failure an "
                     "error.")
        log.warning(notes[-1])
    notes.extend(f"preparation left out: {step}" for step in prepared.fallbacks)
    for step in (s for s in prepared.steps if s.startswith(DEQUANTIZED)):
        notes.append("the model as given is a quantized one: maptools quantized its float equivalent on its own grids, "
                     f"and every error here is measured against that float model, not the model as given ({step}).")
        log.warning(notes[-1])
    quantized = sorted({n.op_type for n in prepared_model.graph.node if n.op_type in QUANTIZED_OP_TYPES})
    if quantized:
        notes.append(f"the model is quantized already ({', '.join(quantized)}): those operators run on the host as "
                     f"written; the crossbars compute {_share(report)} of the multiply-accumulates. Quantize its "
                     "float original to put them on the crossbars.")
        log.warning(notes[-1])
    if done.mixed is not None:
        notes.extend(done.mixed.notes)
    if settings.activation_sign is ActivationSign.AUTO and not settings.unsigned_activations:
        notes.append(f"activation_sign='auto' with algorithm='{settings.algorithm.value}': PPQ's kl observer "
                     "handles signed ranges only, so every activation stays signed.")
        log.warning(notes[-1])
    elif settings.unsigned_activations and not any(c.out_range[0] == 0 for c in quantinfo.values()):
        notes.append("activation_sign='auto': no tensor of this model is provably non-negative (no Relu, "
                     "Sigmoid, ... on the device), so every activation stays signed.")
        log.info(notes[-1])
    for note in _datapath_checks(settings, quantinfo):
        notes.append(note)
        log.warning(note)
    quantparams, qdq = done.quantparams, done.qdq
    notes.extend(_unoptimized(prepared_model, prepared_bytes, qdq))
    written = _contract(settings, quantinfo, prepared_model, strict, notes)
    t = time.perf_counter()
    with torch_threads(count):
        errors = ErrorSummary(_error_report(graph, feed, min(error_steps, steps), qdq, notes),
                              _output_check(qdq, prepared_model, feed, min(error_steps, steps), reference,
                                            random=calibset is None, notes=notes)
                              ) if error_steps else ErrorSummary({})
    seconds["error_report"] = time.perf_counter() - t
    lost = sorted((name for name, ratio in errors.per_layer.items() if ratio >= LOST_SIGNAL), key=list(quantinfo).index)
    if lost:
        notes.append(_lost_signal(lost, settings, quantinfo, prepared_model))
        log.warning(notes[-1])
    mixed_json = None if done.mixed is None else done.mixed.to_json()
    outputs_report = None if errors.outputs is None else {  # (without its timing: the same inputs, the same bytes)
        k: v for k, v in errors.outputs.to_dict().items() if k != "seconds"}

    with folder.write() as stage:
        if written is Profile.SEED:
            atomic_write(stage / QUANTINFO_PKL, contract.dumps(contract.seed_quantinfo(quantinfo)))
            atomic_write(stage / QUANTPARAMS_PKL, contract.dumps(contract.seed_quantparams(
                quantparams, quantinfo, prepared_model)))
        else:
            write_pickle(stage / QUANTINFO_PKL, quantinfo)
            write_pickle(stage / QUANTPARAMS_PKL, quantparams)
        write_json(stage / QUANTINFO_JSON, quantinfo_to_json(quantinfo))
        np.savez(stage / QUANTPARAMS_NPZ, **{k: v for k, v in quantparams.items() if v is not None})
        atomic_write(stage / QUANT_MODEL, qdq)
        atomic_write(stage / MODEL, prepared_bytes)
        write_json(stage / ERROR_REPORT, {"metric": "graphwise snr (noise power / signal power)",
                                          "samples": min(error_steps, steps), "per_layer": errors.per_layer,
                                          "outputs": outputs_report,
                                          "skipped": error_steps == 0})
        if written is Profile.SEED:
            broken = contract.check_map(stage)
            if broken:
                raise QuantizationFailed(f"the seed pickles break the contract: {'; '.join(map(str, broken[:5]))}.",
                                         "report this model to the maptools maintainers; profile='extended' "
                                         "meanwhile.")
        held = {QUANT_MODEL: qdq, MODEL: prepared_bytes}  # the two large ones hashed from memory, not read back
        hashes = {name: hashlib.sha256(held[name]).hexdigest() if name in held else sha256_file(stage / name)
                  for name in ARTIFACT_FILES}
        seconds["total"] = time.perf_counter() - started
        write_json(stage / MANIFEST, Manifest(
            maptools_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            mapname=mapname,
            model=ModelRecord(path=str(onnx_path.resolve()), sha256=model_sha,
                              input_shapes={k: list(v) for k, v in shapes.items()}, prepared=prepared.to_json()),
            settings=settings.to_dict(), device=ppq_device, calib_steps_used=steps,
            calibration=calib_desc, onnx_export_exact=True, threads=count, placement=report, profile=written.value,
            **({"mixed_precision": mixed_json} if mixed_json is not None else {}),
            artifacts=hashes, versions=package_versions(), notes=notes,
            seconds={k: round(v, 3) for k, v in seconds.items()},
        ).to_json())
    log.info("quantized %s -> %s in %.1f s", onnx_path, target, seconds["total"])
    return QuantizationResult(
        mapname=mapname, map_dir=target, artifacts={n: target / n for n in (*ARTIFACT_FILES, MANIFEST)},
        sha256=hashes, model_sha256=model_sha, settings=settings, device=ppq_device, calibration=calib_desc,
        errors=errors, seconds=seconds, notes=tuple(notes), prepared=prepared.to_json(),
        version_dir=folder.published, output_root=folder.root,
        mixed_precision=mixed_json, placement=report, profile=written,
    )

