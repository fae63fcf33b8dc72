"""Map artifacts: their names, safe readers, and the functions every stage uses to reach a map.

Layout of a map (``<root>/mapsave/<mapname>``, see :mod:`maptools.maps.folder` for how it is written,
versioned and recovered)::

    quantinfo.pkl  quantinfo.json     per-operator QuantConfig
    quantparams.pkl quantparams.npz   integer Conv/Gemm weights, int32 biases
    quant_model.onnx                  QDQ model for onnxruntime
    error_report.json                 PPQ graphwise SNR per Conv/Gemm
    model.onnx                        the prepared float model that was quantized
    operator_graph.json               written by convert (registered in the manifest)
    manifest.json                     sha256 of the input model and every artifact, settings, versions
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import ArtifactError, UnsafePickleError
from maptools.maps.folder import MANIFEST, MapFolder, atomic_write, sha256_file
from maptools.maps.roots import MapRef, local_root, output_location, output_root
from maptools.quantinfo import QuantConfig, quantinfo_from_json

__all__ = [
    "ARTIFACT_FILES", "MANIFEST", "MODEL", "map_dir", "output_root", "output_location", "local_root",
    "validate_mapname", "sha256_file",
    "read_quantinfo", "read_quantparams", "read_manifest", "verify_map", "safe_load_pickle", "write_json", "one_copy",
    "atomic_write", "MapFolder", "load_quantinfo", "load_quantparams",
]

QUANTINFO_PKL, QUANTINFO_JSON = "quantinfo.pkl", "quantinfo.json"
QUANTPARAMS_PKL, QUANTPARAMS_NPZ = "quantparams.pkl", "quantparams.npz"
QUANT_MODEL, ERROR_REPORT = "quant_model.onnx", "error_report.json"
MODEL = "model.onnx"
ARTIFACT_FILES = (QUANTINFO_PKL, QUANTINFO_JSON, QUANTPARAMS_PKL, QUANTPARAMS_NPZ, QUANT_MODEL, ERROR_REPORT, MODEL)

def validate_mapname(mapname: str) -> str:
    return MapFolder.validate(mapname)


def map_dir(mapname: str, root: str | Path | None = None) -> Path:
    """``<root>/mapsave/<mapname>``: the path readers see (a link to the map's current version)."""
    return MapFolder(mapname, root).path


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see :func:`atomic_write`)."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


# --- safe reading -------------------------------------------------------------------------------

_ALLOWED = {
    ("maptools.quantinfo", "QuantConfig"), ("maptools.quantinfo", "Requant"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
#: numpy's dtype classes (``numpy.dtypes.Float32DType`` ...), by exact module and name.
_DTYPE_MODULES = {"numpy", "numpy.dtypes"}


#: What the seed contract's pickles add (:mod:`maptools.maps.seed`): the original's config class, and float32 torch
#: tensors written as ``torch.Tensor([values])``.
_SEED_ALLOWED = {("maptools.core.proto", "OperatorQuantConfig"), ("torch", "Tensor")}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, seed: bool = False) -> None:
        super().__init__(file)
        self._seed = seed

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _ALLOWED or (self._seed and (module, name) in _SEED_ALLOWED) or (
            module in _DTYPE_MODULES and name.endswith("DType") and name.isidentifier())
        if not allowed:
            raise UnsafePickleError(
                f"the pickle refers to {module}.{name}, which is not a maptools config type or a numpy array.",
                "only load pickles maptools wrote; read the .json/.npz twin instead if in doubt.",
            )
        return super().find_class(module, name)


def safe_load_pickle(path: str | Path, *, seed: bool = False) -> Any:
    """Unpickle allowing only maptools' config types and numpy arrays (no arbitrary code execution); ``seed``
    also allows the seed contract's ``OperatorQuantConfig`` and ``torch.Tensor``."""
    data = Path(path).read_bytes()
    return _AllowListUnpickler(io.BytesIO(data), seed=seed).load()


def load_quantinfo(path: str | Path) -> dict[str, QuantConfig]:
    """A map's ``quantinfo.json``: ``{name: QuantConfig}`` (the complete record, whatever the map's profile;
    ``quantinfo.pkl`` holds the same in the profile's pickle types)."""
    try:
        return quantinfo_from_json(json.loads(Path(path).read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{path} does not hold {{name: QuantConfig}} ({type(e).__name__}: {e}).",
                            "re-run quantize for this map.") from e


def read_quantinfo(mapname: str | MapRef, output_root: str | Path | None = None) -> dict[str, QuantConfig]:
    """A map's quantinfo, ``{op name: QuantConfig}`` (from ``quantinfo.json``; no pickle is run)."""
    return load_quantinfo(MapFolder(mapname, output_root).open().existing(QUANTINFO_JSON))


def load_quantparams(path: str | Path) -> dict[str, np.ndarray | None]:
    """A map's ``quantparams.npz``: ``{'<op>_conv_weight': integer codes, '<op>_conv_bias': int32 codes or None}``
    for every crossbar layer, Gemm included (``quantparams.pkl`` of a seed map holds Gemm's in float)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            params: dict[str, np.ndarray | None] = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a quantparams archive ({e}).", "re-run quantize for this map.") from e
    for key in [k for k in params if k.endswith("_weight")]:
        params.setdefault(key.removesuffix("_weight") + "_bias", None)
    return params


def read_quantparams(mapname: str | MapRef, output_root: str | Path | None = None) -> dict[str, np.ndarray | None]:
    """A map's integer weights and int32 biases (from ``quantparams.npz``; no pickle is run)."""
    return load_quantparams(MapFolder(mapname, output_root).open().existing(QUANTPARAMS_NPZ))


def read_manifest(mapname: str | MapRef, output_root: str | Path | None = None) -> dict[str, Any]:
    """A map's ``manifest.json`` (checked against the schema)."""
    return MapFolder(mapname, output_root).open().manifest()


def verify_map(folder: Path) -> dict[str, Any]:
    """Check every artifact of the map at ``folder`` (``<root>/mapsave/<mapname>``) against its manifest.

    Reads one version of the map (a concurrent rewrite never mixes two); returns its manifest.
    Raises ArtifactError naming the first missing or changed file.
    """
    return MapFolder.at(folder).open().verify()


def one_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with equal arrays as one object, which a pickle then holds once (PPQ gives each step of a
    written-out recurrence its own copy of the shared weights: a CRNN's quantparams.pkl was 3.3x its content).
    Unpickled, those keys share one array."""
    first: dict[tuple[str, tuple[int, ...], bytes], np.ndarray] = {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            digest = hashlib.sha256(value.tobytes()).digest()
            value = first.setdefault((value.dtype.str, value.shape, digest), value)
        out[key] = value
    return out


def write_pickle(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, pickle.dumps(one_copy(data), protocol=pickle.HIGHEST_PROTOCOL))
