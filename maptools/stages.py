"""Plain functions for the pipeline's stages that need more than ``quantize`` itself.

Each returns a small, serialisable, content-identified value, so an orchestrator (the Prefect
flows in ``flows/``) can cache on content and never moves tensors between steps.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maptools.artifacts import output_root, sha256_file, write_json
from maptools.calibration import resolve_calibration
from maptools.errors import CalibrationError
from maptools.examples import EXAMPLE_PREFIX, example_model
from maptools.onnx_model import check_input_shapes, load_model, simplify_model

__all__ = ["SimplifiedModel", "CalibrationSpec", "simplify_onnx", "describe_calibration", "artifacts_intact"]


@dataclass(frozen=True)
class SimplifiedModel:
    """A model ready to quantize: its path, the sha256 of its bytes, and the simplification check."""

    path: Path
    sha256: str
    source_sha256: str
    simplified: bool
    max_abs_diff: float = 0.0


def simplify_onnx(onnx_path: str | Path, input_shapes: Mapping[str, Sequence[int]], *, enabled: bool = True,
                  root: str | Path | None = None) -> SimplifiedModel:
    """onnxsim ``onnx_path`` into ``<root>/mapsave/.models/<sha256>.onnx``, checking it computes the same.

    ``onnx_path`` may name a built-in model, ``example:resnet18`` or ``example:small_cnn``
    (exported once to ``<root>/onnx_models/``).

    The output is content-addressed by the source model's sha256, so a second call is a file
    lookup. With ``enabled=False`` the model is only checked and its own path is returned.
    """
    if str(onnx_path).startswith(EXAMPLE_PREFIX):
        onnx_path = example_model(str(onnx_path), output_root(root) / "onnx_models")
    source = Path(onnx_path)
    model = load_model(source)
    check_input_shapes(model, input_shapes)
    source_sha = sha256_file(source)
    if not enabled:
        return SimplifiedModel(source.resolve(), source_sha, source_sha, simplified=False)
    folder = output_root(root) / "mapsave" / ".models"
    folder.mkdir(parents=True, exist_ok=True)
    target, check_file = folder / f"{source_sha}.onnx", folder / f"{source_sha}.check.json"
    if target.is_file() and check_file.is_file():
        diff = float(json.loads(check_file.read_text())["max_abs_diff"])
        return SimplifiedModel(target, sha256_file(target), source_sha, simplified=True, max_abs_diff=diff)
    fd, tmp = tempfile.mkstemp(prefix=".incomplete-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        check = simplify_model(source, Path(tmp), input_shapes)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    write_json(check_file, {"source_sha256": source_sha, "max_abs_diff": check.max_abs_diff})
    return SimplifiedModel(target, sha256_file(target), source_sha, simplified=True, max_abs_diff=check.max_abs_diff)


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


def artifacts_intact(artifacts: Mapping[str, Path], sha256: Mapping[str, str]) -> bool:
    """True when every artifact exists and still has the recorded sha256."""
    try:
        return all(sha256_file(artifacts[name]) == digest for name, digest in sha256.items())
    except (OSError, KeyError):
        return False

