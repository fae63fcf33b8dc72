"""Output error of a quantized map against its float model, at any bit width, from its artifacts.

:func:`evaluate_map` runs the map's ``quant_model.onnx`` (exact at every width: each activation's
range is clipped as PPQ's simulation does) and its float ``model.onnx`` in onnxruntime on held-out
inputs (seeded random inputs, a seed other than the calibration's, or a labelled evaluation set),
after checking both against the map's manifest. Nothing is quantized again: data flows one way.
"""

from __future__ import annotations

import itertools
import logging
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.maps.artifacts import (MODEL, QUANT_MODEL, QUANTINFO_JSON, QUANTPARAMS_NPZ, MapFolder, load_quantinfo,
                                     load_quantparams)
from maptools.maps.roots import MapRef
from maptools.calibration import ValidatedCalibration, random_array, resolve_calibration
from maptools.errors import CalibrationError, InputShapeError
from maptools.metrics import comparable, compare_outputs, rel_l2
from maptools.onnx_model import (ModelInput, check_input_shapes, index_limits, load_model, model_inputs, ort_session,
                                 run_on_sample)
from maptools.quantinfo import param_key

__all__ = ["OutputError", "EvaluationSet", "evaluate_map", "load_evaluation_set", "map_evaluation_set",
           "calibration_folder", "random_evaluation_set",
           "compare_outputs", "comparable", "float_outputs", "rel_l2", "weight_memory_bytes"]

log = logging.getLogger(__name__)

EVAL_SEED = 1234  # differs from the default calibration seed (0), so evaluation inputs are held out


@dataclass(frozen=True)
class EvaluationSet:
    """Samples (``{input name: [1, ...] array}``) and, for a labelled set, one class label per sample."""

    samples: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    description: str = ""


@dataclass(frozen=True)
class OutputError:
    """How far a map's quantized model is from its float model on the evaluation set.

    Attributes:
        samples: evaluation samples used.
        rel_l2: ``||q - f|| / ||f||`` over all outputs of all samples.
        per_output: the same for each output alone, by name (:func:`~maptools.metrics.per_output_line` lists it).
        cosine: cosine similarity of the same vectors.
        top1_agreement: share of samples whose top-1 class (first output) equals the float model's; None where the
            first output is not a vector of class scores (an image, boxes, a sequence).
        accuracy, float_accuracy: top-1 accuracy of the quantized and float models (labelled set only).
        verified: the evaluated files matched the map's manifest.
        source: what the evaluation inputs were.
        seconds: time spent.
    """

    samples: int
    rel_l2: float
    cosine: float
    top1_agreement: float | None
    accuracy: float | None
    float_accuracy: float | None
    verified: bool
    source: str
    seconds: float
    per_output: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_evaluation_set(input_shapes: Mapping[str, Sequence[int]], count: int, seed: int = EVAL_SEED,
                          dtypes: Mapping[str, np.dtype] | None = None, limits: Mapping[str, int] | None = None
                          ) -> EvaluationSet:
    """``count`` seeded samples shaped like ``input_shapes``: standard normal, or random integers (below
    ``limits[name]`` where given) for an input whose ``dtypes`` entry is an integer type (float32 where none is
    given)."""
    if count < 1:
        raise InputShapeError(f"evaluation sample count {count} is not positive.", "use 1 or more samples.")
    rng = np.random.default_rng(seed)
    samples = [{k: random_array(rng, s, (dtypes or {}).get(k, np.float32), (limits or {}).get(k))
                for k, s in input_shapes.items()}
               for _ in range(count)]
    return EvaluationSet(samples, None, f"random (seed {seed}, {count} samples)")


def load_evaluation_set(path: str | Path, input_shapes: Mapping[str, Sequence[int]],
                        limit: int | None = None, dtypes: Mapping[str, np.dtype] | None = None) -> EvaluationSet:
    """A labelled set from an ``.npz`` file: ``labels`` (N integers) and one ``[N, ...]`` array per input name; or
    unlabelled samples from a folder, read as a calibration folder is (images in class subfolders, or ``.npy`` /
    ``.npz`` files).

    For a single-input model the inputs array may also be called ``inputs``. Sample ``i`` is
    ``array[i:i+1]``, so each array's shape after the first axis must match the input's.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_set(path, input_shapes, limit, dtypes)
    if not path.is_file():
        raise InputShapeError(f"evaluation set {path} does not exist.",
                              "pass an .npz file with 'labels' and one array per model input, or a folder of samples.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = dict(data)
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:  # (TypeError: an .npy holds one array)
        raise InputShapeError(f"evaluation set {path} is not an .npz file of arrays ({type(e).__name__}: {e}).",
                              "save it with numpy.savez(path, labels=..., <input name>=...), or pass a folder of "
                              "samples.") from e
    if "labels" not in arrays:
        raise InputShapeError(f"evaluation set {path} has no 'labels' array (it has {sorted(arrays)}).",
                              "save it with numpy.savez(path, labels=..., <input name>=...).")
    labels = np.asarray(arrays.pop("labels"))
    if labels.ndim > 1 and labels.size != len(labels):  # (a column [N, 1] is one label per sample too)
        raise InputShapeError(f"evaluation set {path} has 'labels' of shape {list(labels.shape)}; it holds one class "
                              "index per sample.", "save labels as an [N] integer array (argmax of one-hot rows).")
    labels = labels.reshape(-1)
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
        samples.append({name: np.ascontiguousarray(arrays[name][i:i + 1], dtype=(dtypes or {}).get(name, np.float32))
                        for name in arrays})
    return EvaluationSet(samples, labels[:count].astype(np.int64), f"{path.name} ({count} labelled samples)")


#: the calibration kinds a map's evaluation can read again from the folder the manifest records
_FOLDER_KINDS = ("image_folder", "array_folder")


def _folder_set(root: Path, input_shapes: Mapping[str, Sequence[int]], limit: int | None,
                dtypes: Mapping[str, np.dtype] | None, calibration: Mapping[str, Any] | None = None) -> EvaluationSet:
    """Up to ``limit`` samples of a folder of samples, checked against the inputs as calibration is.

    Where the folder holds the samples a map's quantization read (``calibration``: the manifest's record of a folder,
    matched by its path or by the content of those samples, so a copy is recognised too), the samples after those;
    where it holds no others, those, and the description says so, and so it does where they changed since.
    """
    shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    inputs = [ModelInput(k, np.dtype((dtypes or {}).get(k, np.float32)), shape) for k, shape in shapes.items()]
    try:
        checked = ValidatedCalibration(resolve_calibration(root, shapes, 0, 0), inputs, shapes)
        skip, note = 0, ""
        if calibration:
            seen = min(int(calibration.get("used", 0)) + int(calibration.get("held_out", 0)),
                       int(calibration.get("count", 0)))
            same = checked.content_hash(seen) == calibration.get("sha256") if seen <= len(checked) else False
            if same or str(root.resolve()) == calibration.get("root"):
                skip = seen if len(checked) > seen else 0
                note = (f", after the {seen} the map's quantization read" if skip else
                        ": the samples the map was calibrated on (the folder holds no others)")
                note += "" if same else (" (the folder changed since the map was calibrated: which samples it saw is "
                                         "not known)")
        stop = None if limit is None else skip + limit
        samples = [{k: v.numpy() for k, v in sample.items()} for sample in itertools.islice(checked, skip, stop)]
    except CalibrationError as e:
        raise InputShapeError(f"evaluation folder {root}: {e.problem}", e.fix) from e
    if not samples:
        raise InputShapeError(f"evaluation folder {root} holds no samples.", "add samples to it, or evaluate on "
                              "another set.")
    return EvaluationSet(samples, None, f"{root.name}/ samples {skip + 1}-{skip + len(samples)} of {len(checked)}"
                         + note)


def _read_again(calibration: Mapping[str, Any]) -> bool:
    """Whether a manifest's calibration record is a folder this module reads as quantization did (a folder read
    through the user's own transform in Python is not)."""
    return calibration.get("kind") in _FOLDER_KINDS and str(calibration.get("transform", "default")).startswith(
        "default")


def calibration_folder(mapname: str | MapRef, output_root: str | Path | None = None) -> str | None:
    """The folder map ``mapname`` was calibrated on, where it still exists and is read as quantization read it:
    what its evaluations read by default (:func:`map_evaluation_set`); None for random data or samples in Python."""
    record = MapFolder(mapname, output_root).open().record().calibration
    root = record.get("root") if _read_again(record) else None
    return root if root and Path(root).is_dir() else None


def map_evaluation_set(evaluation: EvaluationSet | str | Path | None, input_shapes: Mapping[str, Sequence[int]],
                       samples: int, seed: int, dtypes: Mapping[str, np.dtype], limits: Mapping[str, int],
                       calibration: Mapping[str, Any]) -> EvaluationSet:
    """What a map is evaluated on: ``evaluation`` (an :class:`EvaluationSet`, a labelled ``.npz`` or a folder of
    samples, its first ``samples``); by default the folder the map was calibrated on (``calibration``: the
    manifest's record), else ``samples`` seeded random inputs (``seed``; the description says where that folder
    is gone).

    A folder that holds the samples the map's quantization read (those calibrated on, and those
    ``algorithm='auto'`` chose on: the folder it was calibrated on, or a copy) is read after them where it holds
    more, so the error is measured on held-out inputs; where it holds no more, on the calibrated samples, and the
    set's description says so.
    """
    if isinstance(evaluation, EvaluationSet):
        return evaluation
    folder = calibration if _read_again(calibration) else None
    root = None if folder is None else folder.get("root")
    if evaluation is None and not (root and Path(root).is_dir()):
        data = random_evaluation_set(input_shapes, samples, seed, dtypes, limits)
        if root is None:
            return data
        log.warning("the folder the map was calibrated on, %s, is gone: evaluating on random inputs", root)
        return EvaluationSet(data.samples, None, f"{data.description}: the folder the map was calibrated on, {root}, "
                             "is gone (pass evaluation= / --eval with its new place)")
    path = Path(root if evaluation is None else evaluation)
    if path.is_dir():
        return _folder_set(path, input_shapes, samples, dtypes, folder)
    return load_evaluation_set(path, input_shapes, limit=samples, dtypes=dtypes)


def float_outputs(model_path: str | Path, samples: Sequence[Mapping[str, np.ndarray]],
                  names: Sequence[str] | None = None) -> list[list[np.ndarray]]:
    """The outputs ``names`` (default every output) of a model in onnxruntime (CPU), per sample."""
    session = ort_session(Path(model_path))
    return [[np.asarray(o) for o in run_on_sample(session, names, s)] for s in samples]


def evaluate_map(mapname: str | MapRef, *, output_root: str | Path | None = None,
                 evaluation: EvaluationSet | str | Path | None = None, samples: int = 32,
                 seed: int = EVAL_SEED) -> OutputError:
    """Output error of map ``mapname`` (its ``quant_model.onnx``) against its float model.

    Args:
        mapname: a map written by :func:`maptools.quantize`.
        output_root: where ``mapsave/`` is (default ``$MAPTOOLS_HOME`` or the current directory).
        evaluation: the evaluation set, a labelled ``.npz`` or a folder of samples (its first ``samples``; the
            folder the map was calibrated on from the first sample it did not see: :func:`map_evaluation_set`);
            default that folder, or ``samples`` seeded random inputs (``seed``) for a map calibrated otherwise.

    Raises:
        ArtifactError: the map is missing, incomplete, or its files differ from its manifest.
    """
    started = time.perf_counter()
    version = MapFolder(mapname, output_root).open()
    manifest = version.verified()
    model = load_model(version.file(MODEL))
    shapes = check_input_shapes(model, manifest.model.input_shapes)
    types = {i.name: i.dtype for i in model_inputs(model)}
    data = map_evaluation_set(evaluation, shapes, samples, seed, types, index_limits(model), manifest.calibration)
    names = list(dict.fromkeys(o.name for o in model.graph.output))  # (an output listed twice counts once)
    reference = float_outputs(version.file(MODEL), data.samples, names)
    quantized = float_outputs(version.file(QUANT_MODEL), data.samples, names)
    metrics = compare_outputs(quantized, reference, data.labels, names)
    return OutputError(samples=len(data.samples), verified=True, source=data.description,
                       seconds=time.perf_counter() - started, **metrics)  # type: ignore[arg-type]


def weight_memory_bytes(mapname: str | MapRef, output_root: str | Path | None = None) -> int:
    """Bytes the map's weights take packed at their bit width (plus int32 biases): what the crossbars store."""
    version = MapFolder(mapname, output_root).open()  # one version for both files
    info = load_quantinfo(version.existing(QUANTINFO_JSON))
    params = load_quantparams(version.existing(QUANTPARAMS_NPZ))
    bits = 0
    for name, cfg in info.items():
        if not cfg.has_weights:
            continue
        weight = params.get(param_key(name, cfg.op_type, "weight"))
        bias = params.get(param_key(name, cfg.op_type, "bias"))
        bits += 0 if weight is None else weight.size * int(cfg.weight_bits or 8)
        bits += 0 if bias is None else bias.size * 32
    return (bits + 7) // 8
