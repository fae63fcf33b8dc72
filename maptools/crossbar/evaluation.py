"""What a network loses on a crossbar: the crossbar simulation against the float model and the integer one.

:func:`evaluate_crossbar` runs a converted map's evaluation inputs through
:class:`~maptools.crossbar.mapping.CrossbarSimulator` (a given :class:`~maptools.crossbar.mapping.CrossbarSpec`),
through the lossless :class:`~maptools.simulate.IntegerSimulator`, and through the float
``model.onnx`` in onnxruntime, and reports the crossbar's output error against both, its accuracy
on a labelled set, and what the mapping costs (arrays, utilization, cycles, ADC bits needed).
:func:`evaluate_device` does the same through non-ideal cells (:mod:`maptools.crossbar.device`), trial by
trial and at each time after programming, and reports each metric's mean, spread and confidence interval.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.conversion import graph_of
from maptools.maps.artifacts import MODEL, QUANTPARAMS_NPZ, MapFolder, load_quantparams
from maptools.maps.roots import MapRef
from maptools.errors import SettingsError
from maptools.evaluation import EVAL_SEED, EvaluationSet, compare_outputs, float_outputs, map_evaluation_set
from maptools.crossbar.device import DeviceModel
from maptools.crossbar.mapping import CrossbarSpec, map_graph
from maptools.simulate import IntegerSimulator

__all__ = ["CrossbarError", "evaluate_crossbar", "DevicePoint", "DeviceEvaluation", "evaluate_device"]

_CHUNK = 8  # samples simulated at a time (bounded memory on large inputs)


@dataclass(frozen=True)
class CrossbarError:
    """The crossbar simulation of a map on an evaluation set.

    Attributes:
        spec: the crossbar (``CrossbarSpec`` as a dict).
        samples, source: the evaluation inputs.
        rel_l2, cosine, top1_agreement: crossbar outputs against the float model (first output's top-1; None where
            it is not a vector of class scores).
        per_output: rel. L2 against the float model of each output alone, by name.
        accuracy, float_accuracy, integer_accuracy: top-1 accuracy on a labelled set (else None).
        integer_rel_l2, integer_agreement: crossbar against the lossless integer simulation
            (0.0 and 1.0 when the ADC loses nothing).
        arrays, utilization, cycles, adc_bits_needed: the mapping's totals (worst-case ADC bits).
        energy_pj, latency_ns, area_mm2: its cost per inference (:attr:`CrossbarMap.cost`, the ISAAC component
            table).
        adc_steps: per layer whose ADCs read in steps above one partial-sum unit (a ``max`` or ``calibrated``
            range), the step of each cell slice.
        seconds_per_sample, integer_seconds_per_sample: simulation time per sample of each.
    """

    spec: dict[str, Any]
    samples: int
    source: str
    rel_l2: float
    cosine: float
    top1_agreement: float | None
    accuracy: float | None
    float_accuracy: float | None
    integer_accuracy: float | None
    integer_rel_l2: float
    integer_agreement: float | None
    arrays: int
    utilization: float
    cycles: int
    adc_bits_needed: int
    seconds_per_sample: float
    integer_seconds_per_sample: float
    energy_pj: float
    latency_ns: float
    area_mm2: float
    adc_steps: dict[str, tuple[int, ...]] = field(default_factory=dict)
    per_output: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _chunks(samples: Sequence[dict[str, np.ndarray]], batched: frozenset[str], size: int
            ) -> list[Sequence[dict[str, np.ndarray]]]:
    """Consecutive samples, ``size`` at most, that may run as one batch: the inputs without the batch axis
    (a 0-d sample rate, a recurrent state) go whole to a run, so a chunk's samples must agree on them."""
    chunks: list[list[dict[str, np.ndarray]]] = []
    for sample in samples:
        last = chunks[-1] if chunks else None
        if last is not None and len(last) < size and all(
                np.array_equal(sample[k], last[0][k]) for k in sample if k not in batched):
            last.append(sample)
        else:
            chunks.append([sample])
    return chunks


def _run(simulator: IntegerSimulator, samples: Sequence[dict[str, np.ndarray]]) -> tuple[list[list[np.ndarray]], float]:
    """Outputs per sample, and seconds, simulating up to ``_CHUNK`` samples at a time (each sample at the shapes
    the model was prepared for: its batch, where that is more than 1, stays together). A model whose shapes do
    not follow the batch (an output sized by the data, a time axis first) runs one sample at a time."""
    started, out = time.perf_counter(), []
    for chunk in _chunks(samples, simulator.batched, _CHUNK if simulator.batch_major else 1):
        feed = {k: np.concatenate([s[k] for s in chunk]) if k in simulator.batched else chunk[0][k] for k in chunk[0]}
        outputs = simulator.run(feed).outputs
        if len(chunk) == 1:  # (as computed: a 0-d output has no axis to split)
            out.append(list(outputs.values()))
            continue
        parts = {k: np.split(v, len(chunk), axis=simulator.batch_axis(k)) for k, v in outputs.items()}
        out += [[parts[k][i] for k in outputs] for i in range(len(chunk))]
    return out, time.perf_counter() - started


def _opened(mapname: str | MapRef, output_root: str | Path | None, evaluation: EvaluationSet | str | Path | None,
            samples: int, seed: int) -> tuple[Any, dict[str, np.ndarray | None], EvaluationSet, list[list[np.ndarray]]]:
    """The map's graph and integer weights (one version for every file read), the evaluation set and the float
    model's outputs on it."""
    version = MapFolder(mapname, output_root).open()
    graph = graph_of(version)
    params = load_quantparams(version.existing(QUANTPARAMS_NPZ))
    data = map_evaluation_set(evaluation, graph.inputs, samples, seed, graph.input_types, graph.input_limits,
                              version.record().calibration)
    return graph, params, data, float_outputs(version.existing(MODEL), data.samples, list(graph.outputs))


def evaluate_crossbar(mapname: str | MapRef, spec: CrossbarSpec, *, output_root: str | Path | None = None,
                      evaluation: EvaluationSet | str | Path | None = None, samples: int = 32, seed: int = EVAL_SEED,
                      calibration: Mapping[str, np.ndarray] | None = None) -> CrossbarError:
    """Output error of map ``mapname`` computed on ``spec`` crossbars (see the module docstring).

    Args:
        mapname: a converted map (``maptools convert``).
        spec: the crossbar and its ADC.
        evaluation: labelled or random samples, a labelled ``.npz`` or a folder of samples (its first ``samples``;
            the folder the map was calibrated on from the first sample it did not see, see
            :func:`~maptools.evaluation.map_evaluation_set`); default that folder, or ``samples`` seeded random
            inputs for a map calibrated otherwise.
        calibration: a batch of inputs (``{input name: [N, ...] array}``) that a ``max`` or ``calibrated``
            ADC range is calibrated on; default seeded random inputs other than the evaluation's.

    Raises:
        ArtifactError: the map is missing, not converted, or differs from its manifest.
    """
    graph, params, data, reference = _opened(mapname, output_root, evaluation, samples, seed)
    integer, integer_seconds = _run(IntegerSimulator(graph, params), data.samples)
    simulator = spec.simulator(graph, params, calibration=calibration)
    crossbar, seconds = _run(simulator, data.samples)
    names = list(graph.outputs)
    against_float = compare_outputs(crossbar, reference, data.labels, names)
    against_integer = compare_outputs(crossbar, integer, names=names)
    integer_accuracy = compare_outputs(integer, reference, data.labels, names)["accuracy"]
    mapped = map_graph(graph, params, spec, shifts=simulator.adc_shifts)
    n = len(data.samples)
    cost = mapped.cost
    return CrossbarError(
        spec=spec.model_dump(), samples=n, source=data.description, rel_l2=float(against_float["rel_l2"]),
        cosine=float(against_float["cosine"]), top1_agreement=against_float["top1_agreement"],
        accuracy=against_float["accuracy"], float_accuracy=against_float["float_accuracy"],
        integer_accuracy=integer_accuracy, integer_rel_l2=float(against_integer["rel_l2"]),
        integer_agreement=against_integer["top1_agreement"], arrays=mapped.arrays,
        utilization=mapped.utilization, cycles=mapped.cycles,
        adc_bits_needed=max((layer.adc_bits_needed for layer in mapped.layers), default=0),
        seconds_per_sample=seconds / n, integer_seconds_per_sample=integer_seconds / n, energy_pj=cost.total_pj,
        latency_ns=cost.latency_ns, area_mm2=cost.area_mm2,
        adc_steps={layer.name: layer.adc_steps for layer in mapped.layers if layer.adc_steps},
        per_output=against_float["per_output"])


@dataclass(frozen=True)
class DevicePoint:
    """One time after programming, over the Monte Carlo trials: each metric's mean, standard deviation and 95%
    confidence interval of the mean (normal approximation; ``None`` where the metric is absent)."""

    time: float
    trials: int
    rel_l2: tuple[float, float, tuple[float, float]]
    top1_agreement: tuple[float, float, tuple[float, float]] | None
    accuracy: tuple[float, float, tuple[float, float]] | None


@dataclass(frozen=True)
class DeviceEvaluation:
    """A map on ``spec`` crossbars of ``device`` cells: per time point, the trials' statistics."""

    spec: dict[str, Any]
    device: dict[str, Any]
    samples: int
    source: str
    points: list[DevicePoint]
    float_accuracy: float | None
    seconds_per_trial: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summary(values: Sequence[float]) -> tuple[float, float, tuple[float, float]]:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    half = 1.96 * std / np.sqrt(len(values))
    return mean, std, (mean - half, mean + half)


def evaluate_device(mapname: str | MapRef, spec: CrossbarSpec, device: DeviceModel, *,
                    output_root: str | Path | None = None, trials: int = 20, times: Sequence[float] = (0.0,),
                    evaluation: EvaluationSet | str | Path | None = None, samples: int = 32, seed: int = EVAL_SEED,
                    calibration: Mapping[str, np.ndarray] | None = None) -> DeviceEvaluation:
    """Output error (and accuracy, on a labelled set) of map ``mapname`` on ``spec`` crossbars built of
    ``device``'s cells: ``trials`` Monte Carlo draws of the cells (the tiling is mapped once), each read at every
    time in ``times`` (seconds after programming).

    Args:
        mapname, spec, output_root, evaluation, samples, seed, calibration: as :func:`evaluate_crossbar`.
        device: the cells' non-idealities (``maptools.crossbar.device.DEVICE_PRESETS['pcm']``, ...).
        trials: Monte Carlo trials (independent draws of every cell's state).
        times: seconds after programming at which the cells are read (drift).
    """
    if trials < 1 or not times or any(t < 0 for t in times):
        raise SettingsError(f"trials={trials}, times={list(times)}: need at least one trial and times >= 0.",
                            "pass e.g. trials=20, times=[0, 3600, 86400].")
    graph, params, data, reference = _opened(mapname, output_root, evaluation, samples, seed)
    simulator = spec.simulator(graph, params, calibration=calibration)
    started, points, float_accuracy = time.perf_counter(), [], None
    for at in times:
        metrics = []
        for trial in range(trials):
            simulator.set_device(device, trial, at)
            outputs, _ = _run(simulator, data.samples)
            metrics.append(compare_outputs(outputs, reference, data.labels, list(graph.outputs)))
        float_accuracy = metrics[0]["float_accuracy"]
        accuracy, agreement = [m["accuracy"] for m in metrics], [m["top1_agreement"] for m in metrics]
        points.append(DevicePoint(
            time=float(at), trials=trials, rel_l2=_summary([m["rel_l2"] for m in metrics]),
            top1_agreement=None if agreement[0] is None else _summary(agreement),
            accuracy=None if accuracy[0] is None else _summary(accuracy)))
    return DeviceEvaluation(spec=spec.model_dump(), device=device.model_dump(), samples=len(data.samples),
                            source=data.description, points=points, float_accuracy=float_accuracy,
                            seconds_per_trial=(time.perf_counter() - started) / (trials * len(times)))
