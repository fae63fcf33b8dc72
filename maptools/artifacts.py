"""The map folder: where artifacts live, how they are written atomically, read safely, and checked.

Layout of ``<root>/mapsave/<mapname>/``::

    quantinfo.pkl  quantinfo.json     per-operator QuantConfig
    quantparams.pkl quantparams.npz   integer Conv/Gemm weights, int32 biases
    quant_model.onnx                  QDQ model for onnxruntime
    error_report.json                 PPQ graphwise SNR per Conv/Gemm
    model.onnx                        the float model that was quantized (conversion reads it)
    manifest.json                     sha256 of the input model and every artifact, settings, versions

A run writes everything into a staging folder beside the destination and swaps it in at the
end, so a failed or killed run leaves the previous map exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import ArtifactError, MapnameError, UnsafePickleError
from maptools.quantinfo import QuantConfig

__all__ = [
    "ARTIFACT_FILES", "MANIFEST", "MODEL", "map_dir", "output_root", "validate_mapname", "sha256_file", "staged_map",
    "read_quantinfo", "read_quantparams", "read_manifest", "verify_map", "safe_load_pickle", "write_json",
    "atomic_write",
]

QUANTINFO_PKL, QUANTINFO_JSON = "quantinfo.pkl", "quantinfo.json"
QUANTPARAMS_PKL, QUANTPARAMS_NPZ = "quantparams.pkl", "quantparams.npz"
QUANT_MODEL, ERROR_REPORT, MANIFEST = "quant_model.onnx", "error_report.json", "manifest.json"
MODEL = "model.onnx"
ARTIFACT_FILES = (QUANTINFO_PKL, QUANTINFO_JSON, QUANTPARAMS_PKL, QUANTPARAMS_NPZ, QUANT_MODEL, ERROR_REPORT, MODEL)

_MAPNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def output_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$MAPTOOLS_HOME``, else the current directory."""
    return Path(root or os.environ.get("MAPTOOLS_HOME") or Path.cwd()).expanduser().resolve()


def validate_mapname(mapname: str) -> str:
    if not isinstance(mapname, str) or not _MAPNAME.match(mapname) or mapname in {".", ".."}:
        raise MapnameError(
            f"mapname {mapname!r} is not a plain folder name (empty, a path, or unusual characters).",
            "use letters, digits, '.', '_' or '-', starting with a letter or digit, e.g. 'resnet18'.",
        )
    return mapname


def map_dir(mapname: str, root: str | Path | None = None) -> Path:
    """``<root>/mapsave/<mapname>``, restoring a previous map if a swap was interrupted."""
    folder = output_root(root) / "mapsave" / validate_mapname(mapname)
    backup = folder.with_name(f".{mapname}.previous")
    if not folder.exists() and backup.is_dir():
        os.replace(backup, folder)
    return folder


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    The temp file is created with mode 0o666 so the process umask applies as for any new file
    (the umask is never read or changed: it is process-global and writers run in threads).
    A failure leaves ``path`` as it was and no temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.incomplete")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see :func:`atomic_write`)."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def _map_lock(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged_map(folder: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``folder`` as a whole.

    On any exception the staging folder is removed and ``folder`` is untouched. Concurrent
    writers of the same map are serialised by a lock file, so their files never interleave.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.incomplete-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; a map folder is an ordinary folder
    try:
        yield stage
        backup = folder.with_name(f".{folder.name}.previous")
        with _map_lock(folder):
            if backup.exists():
                shutil.rmtree(backup)
            if folder.exists():
                os.replace(folder, backup)
            os.replace(stage, folder)
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --- safe reading -------------------------------------------------------------------------------

_ALLOWED = {
    ("maptools.quantinfo", "QuantConfig"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED and not (module.startswith("numpy") and name.endswith("DType")):
            raise UnsafePickleError(
                f"the pickle refers to {module}.{name}, which is not a maptools config type or a numpy array.",
                "only load pickles maptools wrote; read the .json/.npz twin instead if in doubt.",
            )
        return super().find_class(module, name)


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle allowing only QuantConfig and numpy arrays (no arbitrary code execution)."""
    data = Path(path).read_bytes()
    return _AllowListUnpickler(io.BytesIO(data)).load()


def _existing(mapname: str, name: str, root: str | Path | None) -> Path:
    path = map_dir(mapname, root) / name
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist.", f"run quantize(..., mapname={mapname!r}) first, or check "
                            "output_root / MAPTOOLS_HOME.")
    return path


def read_quantinfo(mapname: str, root: str | Path | None = None) -> dict[str, QuantConfig]:
    """Load ``quantinfo.pkl`` of a map with the allow-list unpickler."""
    data = safe_load_pickle(_existing(mapname, QUANTINFO_PKL, root))
    if not isinstance(data, dict) or not all(isinstance(v, QuantConfig) for v in data.values()):
        raise ArtifactError(f"quantinfo.pkl of map {mapname!r} does not hold {{name: QuantConfig}}.",
                            "re-run quantize for this map.")
    return data


def read_quantparams(mapname: str, root: str | Path | None = None) -> dict[str, np.ndarray | None]:
    """Load ``quantparams.pkl`` of a map with the allow-list unpickler."""
    data = safe_load_pickle(_existing(mapname, QUANTPARAMS_PKL, root))
    if not isinstance(data, dict):
        raise ArtifactError(f"quantparams.pkl of map {mapname!r} is not a dict.", "re-run quantize for this map.")
    return data


def read_manifest(mapname: str, root: str | Path | None = None) -> dict[str, Any]:
    return json.loads(_existing(mapname, MANIFEST, root).read_text())


def verify_map(folder: Path) -> dict[str, Any]:
    """Check every artifact of a map folder against its manifest; return the manifest.

    Raises ArtifactError naming the first missing or changed file.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} does not exist.", "re-run quantization for this map.")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["artifacts"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"artifact {path} is missing.", "re-run quantization for this map.")
        if sha256_file(path) != digest:
            raise ArtifactError(f"artifact {path} does not match the sha256 in its manifest.",
                                "re-run quantization for this map; do not edit artifacts by hand.")
    return manifest


def write_pickle(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "wb") as f:
        pickle.dump(dict(data), f, protocol=pickle.HIGHEST_PROTOCOL)
