"""Plain functions for the pipeline's stages that need more than ``quantize`` itself.

Each returns a small, serialisable, content-identified value, so an orchestrator (the Prefect
flows in ``flows/``) can cache on content and never moves tensors between steps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from maptools import prepare
from maptools.maps.artifacts import MapFolder, local_root, output_location, sha256_file, write_json
from maptools.maps.folder import storage_errors
from maptools.calibration import SampleCalibration, resolve_calibration
from maptools.errors import CalibrationError, MaptoolsError, ModelError
from maptools.examples import EXAMPLE_PREFIX, example_model
from maptools.onnx_model import check_input_shapes, load_model, with_inputs
from maptools.prepare.checks import from_sample
from maptools.quantization import QuantizationResult
from maptools.maps.store import get_blob, put_blob

__all__ = ["PreparedOnnx", "CalibrationSpec", "prepare_onnx", "describe_calibration", "located", "has_artifact",
           "model_file"]


@dataclass(frozen=True)
class PreparedOnnx:
    """A model ready to quantize: its path, the sha256 of its bytes, the file it was prepared from (absolute path,
    sha256), and how it was prepared."""

    path: Path
    sha256: str
    source: str
    source_sha256: str
    input_shapes: dict[str, list[int]]
    simplified: bool
    max_abs_diff: float = 0.0
    steps: tuple[str, ...] = ()


def prepare_onnx(onnx_path: str | Path, input_shapes: Mapping[str, Sequence[int]], *, simplify: bool = True,
                 root: str | Path | None = None, calib: str | Path | None = None) -> PreparedOnnx:
    """Prepare ``onnx_path`` (:func:`maptools.prepare.prepare_model`) into ``<root>/mapsave/.models/``.

    ``onnx_path`` may name a built-in model, ``example:resnet18`` or ``example:small_cnn``
    (exported once to ``<root>/onnx_models/``). ``calib``: the calibration folder, whose first sample's
    integer inputs and inputs of rank 0 or 1 the preparation's checks take (ids that index a table, a Resize's
    scales; ``None`` or ``'random'``: 0/1 and random values).

    The output is content-addressed by everything that decides it: the source model's sha256,
    the input shapes, ``simplify``, those integer inputs, and the preparation code and converter versions; a
    second call is a lookup, checked against the sha256 recorded beside the file (a changed or truncated
    file is prepared again).
    """
    if str(onnx_path).startswith(EXAMPLE_PREFIX):
        onnx_path = example_model(str(onnx_path), local_root(root) / "onnx_models")
    source = Path(onnx_path)
    model = with_inputs(load_model(source), input_shapes)
    shapes = {k: [int(d) for d in v] for k, v in check_input_shapes(model, input_shapes).items()}
    source_sha = sha256_file(source)
    sample = _sample_inputs(calib, shapes)
    identity = {"source": source_sha, "shapes": shapes, "simplify": simplify, "code": prepare.fingerprint(),
                **({"integers": SampleCalibration([sample]).content_hash()} if sample else {})}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    folder = local_root(root) / "mapsave" / ".models"
    with storage_errors(f"create {folder}"):
        folder.mkdir(parents=True, exist_ok=True)
    target, record = folder / f"{key}.onnx", folder / f"{key}.json"
    prepared = None
    try:
        known = json.loads(record.read_text())
        if sha256_file(target) == known["sha256"]:
            prepared = PreparedOnnx(target, known["sha256"], str(source.resolve()), source_sha, shapes, simplify,
                                    float(known["max_abs_diff"]), tuple(known["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not prepared yet, or the cached copy is damaged: prepare again
    if prepared is None:
        done = prepare.prepare_model(source, target, shapes, simplify=simplify, sample=sample or None,
                                     loaded=model, source_sha256=source_sha)  # (loaded and hashed once)
        write_json(record, {"source_sha256": source_sha, "sha256": done.sha256, "max_abs_diff": done.max_abs_diff,
                            "steps": list(done.steps)})
        prepared = PreparedOnnx(target, done.sha256, str(source.resolve()), source_sha, shapes, simplify,
                                done.max_abs_diff, done.steps)
    where = output_location(root)
    if isinstance(where, str):  # maps on a store: workers elsewhere fetch the prepared model from there
        put_blob(where, target, prepared.sha256)
    return prepared


def _sample_inputs(calib: str | Path | None, shapes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """The inputs of the first sample in the calibration folder ``calib`` that preparation's checks take from it
    (:func:`~maptools.prepare.checks.from_sample`; none for random data)."""
    if calib is None or str(calib) == "random":
        return {}
    first = next(iter(resolve_calibration(str(calib), {k: tuple(v) for k, v in shapes.items()}, 1, 0)), {})
    arrays = {k: np.asarray(v) for k, v in first.items()}
    return {k: a for k, a in arrays.items() if from_sample(a.dtype, a.ndim)}


def model_file(model: PreparedOnnx, root: str | Path | None = None) -> Path:
    """The prepared model on this machine: ``model.path`` where it exists (prepare-model checked its sha256,
    and quantize records it again), else, for an output root on a store, fetched from the store by its
    sha256 (checked) into this machine's mirror."""
    if model.path.is_file():
        return model.path
    where = output_location(root)
    if isinstance(where, str):
        return get_blob(where, model.sha256, local_root(where) / "mapsave" / ".models" / f"{model.sha256}.onnx")
    raise ModelError(f"the prepared model {model.path} is missing.",
                     "prepare the model again (the flows do this on their next run).")


@dataclass(frozen=True)
class CalibrationSpec:
    """What the calibration data is, small enough for a cache key: no tensors.

    ``source`` is ``None`` (seeded random data) or a folder path; ``sha256`` identifies the
    content (random: seed, count and shapes; folders: every file's name and bytes).
    """

    kind: str
    source: str | None
    seed: int
    count: int
    sha256: str

    def calibset(self) -> str | None:
        """The ``calibset`` argument for :func:`maptools.quantization.quantize`."""
        return self.source


def describe_calibration(calib: str | Path | None, input_shapes: Mapping[str, Sequence[int]], calib_steps: int,
                         seed: int = 0) -> CalibrationSpec:
    """Resolve ``calib`` (``None``/``'random'`` or a folder) into a :class:`CalibrationSpec`."""
    source = None if calib is None or str(calib) == "random" else str(Path(calib).resolve())
    if source is not None and not Path(source).is_dir():
        raise CalibrationError(f"calibration folder {calib!r} does not exist.",
                               "pass an existing folder of images or .npy/.npz files, or 'random'.")
    shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    data = resolve_calibration(source, shapes, calib_steps, seed)
    description: dict[str, Any] = data.describe()
    return CalibrationSpec(kind=str(description["kind"]), source=source, seed=seed, count=len(data),
                           sha256=data.content_hash())


def located(result: QuantizationResult) -> QuantizationResult | None:
    """``result`` with its paths on this machine, if its map still holds exactly its artifacts; else None.

    For a map on a store the current version is downloaded (hashes checked) into this machine's mirror,
    and the paths are rebased there: a result computed on another machine (a cache hit) is usable here.
    """
    try:
        folder = MapFolder(result.mapname, result.output_root) if result.output_root is not None \
            else MapFolder.at(result.map_dir)
        version = folder.open()
        manifest = version.manifest()
        if not all(manifest["artifacts"].get(name) == digest and sha256_file(version.file(name)) == digest
                   for name, digest in result.sha256.items()):
            return None
    except (OSError, KeyError, MaptoolsError):
        return None
    if folder.path == result.map_dir:
        return result
    return replace(result, map_dir=folder.path, artifacts={n: folder.path / n for n in result.artifacts},
                   version_dir=version.path)


def has_artifact(mapname: str, root: str | Path | None, name: str) -> bool:
    """Whether the map's current version holds ``name`` (e.g. its operator graph) as its manifest registers it."""
    try:
        version = MapFolder(mapname, root).open()
        digest = version.record().artifacts.get(name)
        return digest is not None and sha256_file(version.file(name)) == digest
    except (OSError, MaptoolsError):
        return False
