"""Output error of a quantized map against its float model, at any bit width.

``quant_model.onnx`` cannot be used for this under 8 bits (onnxruntime's QDQ operators are int8,
so it saturates to int8 ranges), and the integer re-simulation (:mod:`maptools.simulate`) rounds
its requantization differently from PPQ (off by one output LSB here and there). So
:func:`evaluate_map` re-runs PPQ's quantization of the map's own float model (``model.onnx`` in the
map folder) with the map's settings and calibration data, checks that it reproduces the map's
``quantparams`` and scales exactly (``reproduced``), and compares PPQ's simulation against
onnxruntime's float model on held-out inputs: seeded random inputs (a seed other than the
calibration's) or a labelled evaluation set.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maptools.artifacts import MODEL, map_dir, read_manifest, read_quantinfo, read_quantparams, sha256_file
from maptools.calibration import ValidatedCalibration, resolve_calibration
from maptools.device import resolve_device
from maptools.errors import ArtifactError, InputShapeError
from maptools.onnx_model import check_input_shapes, load_model, model_inputs
from maptools.quantinfo import param_key
from maptools.settings import QuantSettings

__all__ = ["OutputError", "EvaluationSet", "evaluate_map", "load_evaluation_set", "random_evaluation_set",
           "compare_outputs", "float_outputs", "weight_memory_bytes"]

EVAL_SEED = 1234  # differs from the default calibration seed (0), so evaluation inputs are held out


@dataclass(frozen=True)
class EvaluationSet:
    """Samples (``{input name: [1, ...] array}``) and, for a labelled set, one class label per sample."""

    samples: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    description: str = ""


@dataclass(frozen=True)
class OutputError:
    """How far PPQ's simulation of a map is from the float model on the evaluation set.

    Attributes:
        samples: evaluation samples used.
        rel_l2: ``||q - f|| / ||f||`` over all outputs of all samples.
        cosine: cosine similarity of the same vectors.
        top1_agreement: share of samples whose top-1 class (first output) equals the float model's.
        accuracy, float_accuracy: top-1 accuracy of the quantized and float models (labelled set only).
        reproduced: the re-quantization gave exactly the map's quantparams and scales, so the error
            is the map's own.
        source: what the evaluation inputs were.
        seconds: time spent.
    """

    samples: int
    rel_l2: float
    cosine: float
    top1_agreement: float
    accuracy: float | None
    float_accuracy: float | None
    reproduced: bool
    source: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_evaluation_set(input_shapes: Mapping[str, Sequence[int]], count: int, seed: int = EVAL_SEED) -> EvaluationSet:
    """``count`` seeded standard-normal samples shaped like ``input_shapes``."""
    if count < 1:
        raise InputShapeError(f"evaluation sample count {count} is not positive.", "use 1 or more samples.")
    rng = np.random.default_rng(seed)
    samples = [{k: rng.standard_normal(list(s), dtype=np.float32) for k, s in input_shapes.items()}
               for _ in range(count)]
    return EvaluationSet(samples, None, f"random (seed {seed}, {count} samples)")


def load_evaluation_set(path: str | Path, input_shapes: Mapping[str, Sequence[int]],
                        limit: int | None = None) -> EvaluationSet:
    """A labelled set from an ``.npz`` file: ``labels`` (N integers) and one ``[N, ...]`` array per input name.

    For a single-input model the inputs array may also be called ``inputs``. Sample ``i`` is
    ``array[i:i+1]``, so each array's shape after the first axis must match the input's.
    """
    path = Path(path)
    if not path.is_file():
        raise InputShapeError(f"evaluation set {path} does not exist.",
                              "pass an .npz file with 'labels' and one array per model input.")
    with np.load(path, allow_pickle=False) as data:
        arrays = dict(data)
    if "labels" not in arrays:
        raise InputShapeError(f"evaluation set {path} has no 'labels' array (it has {sorted(arrays)}).",
                              "save it with numpy.savez(path, labels=..., <input name>=...).")
    labels = np.asarray(arrays.pop("labels")).reshape(-1)
    if len(input_shapes) == 1 and "inputs" in arrays and next(iter(input_shapes)) not in arrays:
        arrays = {next(iter(input_shapes)): arrays.pop("inputs")}
    if set(arrays) != set(input_shapes):
        raise InputShapeError(f"evaluation set {path} holds arrays {sorted(arrays)}; the model's inputs are "
                              f"{sorted(input_shapes)}.", "key one array per model input name, plus 'labels'.")
    count = len(labels) if limit is None else min(limit, len(labels))
    samples = []
    for name, array in arrays.items():
        want = list(input_shapes[name])
        if array.ndim != len(want) or list(array.shape[1:]) != want[1:] or len(array) < len(labels):
            raise InputShapeError(f"evaluation array {name!r} has shape {list(array.shape)}; expected "
                                  f"[{len(labels)}, {', '.join(map(str, want[1:]))}].", "reshape the data to match.")
    for i in range(count):
        samples.append({name: np.ascontiguousarray(arrays[name][i:i + 1], dtype=np.float32) for name in arrays})
    return EvaluationSet(samples, labels[:count].astype(np.int64), f"{path.name} ({count} labelled samples)")


def float_outputs(model_path: str | Path, samples: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of the float model in onnxruntime (CPU), per sample."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return [[np.asarray(o) for o in session.run(None, dict(s))] for s in samples]


def compare_outputs(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
                    labels: np.ndarray | None = None) -> dict[str, float | None]:
    """rel. L2, cosine and top-1 agreement (first output) of per-sample outputs; accuracies with labels."""
    q = np.concatenate([np.ravel(o) for sample in quantized for o in sample]).astype(np.float64)
    f = np.concatenate([np.ravel(o) for sample in reference for o in sample]).astype(np.float64)
    norm_f, norm_q = float(np.linalg.norm(f)), float(np.linalg.norm(q))
    rel = float(np.linalg.norm(q - f) / norm_f) if norm_f > 0 else float(np.linalg.norm(q - f))
    cosine = float(q @ f / (norm_q * norm_f)) if norm_q > 0 and norm_f > 0 else 0.0
    top_q = np.array([int(np.argmax(sample[0])) for sample in quantized])
    top_f = np.array([int(np.argmax(sample[0])) for sample in reference])
    result: dict[str, float | None] = {"rel_l2": rel, "cosine": cosine,
                                       "top1_agreement": float(np.mean(top_q == top_f)),
                                       "accuracy": None, "float_accuracy": None}
    if labels is not None:
        result["accuracy"] = float(np.mean(top_q == labels))
        result["float_accuracy"] = float(np.mean(top_f == labels))
    return result


def _calibration_source(manifest: Mapping[str, Any]) -> str | None:
    calib = manifest.get("calibration", {})
    if calib.get("kind") == "random":
        return None
    root = calib.get("root")
    if not root:
        raise ArtifactError(f"the manifest does not say where the {calib.get('kind')!r} calibration data is.",
                            "pass calibset= to evaluate_map.")
    return str(root)


def _same_quantization(graph: Any, mapname: str, root: Path) -> bool:
    """Whether a re-quantized graph has exactly the map's integer parameters and scales."""
    info, stored_info = graph.quantinfo(), read_quantinfo(mapname, root)
    if info.keys() != stored_info.keys():
        return False
    for name, cfg in info.items():
        old = stored_info[name]
        if (cfg.input_scales, cfg.output_scale) != (old.input_scales, old.output_scale):
            return False
        if cfg.has_weights and not np.array_equal(cfg.weight_scale, old.weight_scale):
            return False
    params, stored = graph.quantparams(info), read_quantparams(mapname, root)
    if params.keys() != stored.keys():
        return False
    return all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
               for a, b in ((params[k], stored[k]) for k in params))


def evaluate_map(mapname: str, *, output_root: str | Path | None = None, calibset: Any = None,
                 evaluation: EvaluationSet | None = None, samples: int = 32, seed: int = EVAL_SEED,
                 device: str = "cpu") -> OutputError:
    """Output error of map ``mapname`` (PPQ's simulation) against its float model.

    Args:
        mapname: a map written by :func:`maptools.quantize`.
        output_root: where ``mapsave/`` is (default ``$MAPTOOLS_HOME`` or the current directory).
        calibset: the calibration data the map was made with; default: what its manifest records
            (seeded random data, or the folder it names).
        evaluation: the evaluation set; default ``samples`` seeded random inputs (``seed``).
        device: where PPQ runs (``cpu``, ``cuda[:N]`` or ``auto``).

    Raises:
        ArtifactError: the map is missing or incomplete.
    """
    from maptools import _ppq  # heavy import

    started = time.perf_counter()
    folder = map_dir(mapname, output_root)
    manifest = read_manifest(mapname, output_root)
    model_path = folder / MODEL
    if not model_path.is_file() or sha256_file(model_path) != manifest["artifacts"].get(MODEL):
        raise ArtifactError(f"{model_path} is missing or differs from the manifest.", "re-run quantize for this map.")
    # maps written before 0.2 have no activation_sign/optimization: they were signed, without a pass
    settings = QuantSettings(**{"activation_sign": "signed", "optimization": "none", **manifest["settings"]})
    model = load_model(model_path)
    shapes = check_input_shapes(model, manifest["model"]["input_shapes"])
    steps = int(manifest["calib_steps_used"])
    source = resolve_calibration(_calibration_source(manifest) if calibset is None else calibset, shapes,
                                 settings.calib_steps, settings.seed)
    calibration = ValidatedCalibration(source, model_inputs(model), shapes, limit=steps)
    ppq_device = resolve_device(device)
    graph = _ppq.quantize_graph(model_path, calibration, steps, next(iter(calibration)), settings, ppq_device)
    reproduced = _same_quantization(graph, mapname, output_root)

    data = evaluation or random_evaluation_set(shapes, samples, seed)
    reference = float_outputs(model_path, data.samples)
    names = graph.output_names
    quantized = []
    for sample in data.samples:
        out = graph.run({k: torch.from_numpy(v) for k, v in sample.items()})
        quantized.append([out[n] for n in names])
    metrics = compare_outputs(quantized, reference, data.labels)
    return OutputError(samples=len(data.samples), reproduced=reproduced, source=data.description,
                       seconds=time.perf_counter() - started, **metrics)  # type: ignore[arg-type]


def weight_memory_bytes(mapname: str, output_root: str | Path | None = None) -> int:
    """Bytes the map's weights take packed at their bit width (plus int32 biases): what the crossbars store."""
    info = read_quantinfo(mapname, output_root)
    params = read_quantparams(mapname, output_root)
    bits = 0
    for name, cfg in info.items():
        if not cfg.has_weights:
            continue
        weight = params.get(param_key(name, cfg.op_type, "weight"))
        bias = params.get(param_key(name, cfg.op_type, "bias"))
        bits += 0 if weight is None else weight.size * int(cfg.weight_bits or 8)
        bits += 0 if bias is None else bias.size * 32
    return (bits + 7) // 8
