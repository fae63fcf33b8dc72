"""Persisted task results that cannot run code when they are read back.

Prefect picks the deserializer from the record's own metadata, so a result file written with
``pickle`` (or a JSON serializer naming another ``object_decoder``) would run code on the next
cache hit, whatever serializer the task asks for. Here results are JSON (:data:`SERIALIZER`,
whose decoder rebuilds only maptools' own types and paths) in :class:`ResultFiles`, a local
result storage that returns a record only when its metadata names exactly that serializer; any
other record is refused (:class:`UnsafeResultError`) and the task recomputes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer, prefect_json_object_decoder
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from maptools.errors import UnsafePickleError

__all__ = ["SERIALIZER", "RESULT_STORAGE", "ResultFiles", "UnsafeResultError", "decode", "ensure_result_storage"]

#: Types a result may rebuild: maptools' and the flows' own, and paths.
_MODULES = ("maptools.", "maptools_flows.")
_TYPES = {"pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath",
          "pathlib._local.WindowsPath", "pathlib._local.Path"}


class UnsafeResultError(UnsafePickleError):
    """A persisted result that is not maptools' JSON, or names a type outside maptools."""


def decode(value: dict[str, Any]) -> Any:
    """``json`` object hook: Prefect's, limited to maptools' types (anything else is refused, never imported)."""
    name = value.get("__class__")
    if name is None and "__exc_type__" not in value:
        return value
    if not isinstance(name, str) or not (name.startswith(_MODULES) or name in _TYPES):
        raise UnsafeResultError(f"a persisted result names the type {name or value.get('__exc_type__')!r}.",
                                "delete the result file (or the Prefect storage folder); the task recomputes.")
    return prefect_json_object_decoder(value)


SERIALIZER = JSONSerializer(object_decoder=f"{__name__}.decode")
_EXPECTED = SERIALIZER.model_dump(mode="json")


def _pinned(content: bytes, where: str) -> bytes:
    try:
        serializer = json.loads(content)["metadata"]["serializer"]
    except (ValueError, KeyError, TypeError):
        serializer = None
    if serializer != _EXPECTED:
        raise UnsafeResultError(f"result {where} was not written by maptools' JSON serializer ({serializer!r}).",
                                "delete it (or the Prefect storage folder); the task recomputes.")
    return content


class ResultFiles(LocalFileSystem):
    """Local result storage (``PREFECT_LOCAL_STORAGE_PATH`` unless ``basepath`` is set) that reads back only
    records written with :data:`SERIALIZER`."""

    _block_type_name = "maptools result files"
    _block_type_slug = "maptools-result-files"

    def _resolve_path(self, path: str) -> Path:
        if self.basepath:
            return super()._resolve_path(path)
        return LocalFileSystem(basepath=str(PREFECT_LOCAL_STORAGE_PATH.value()))._resolve_path(path)

    async def aread_path(self, path: str) -> bytes:
        return _pinned(await super().aread_path(path), path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        with open(self._resolve_path(path), "rb") as f:
            return _pinned(f.read(), path)


#: The storage every cached task of maptools persists to, by its block document name (a task's storage must be
#: a saved block; :func:`ensure_result_storage` saves it on the Prefect server a flow talks to).
STORAGE_NAME = "maptools"
RESULT_STORAGE = f"{ResultFiles.get_block_type_slug()}/{STORAGE_NAME}"
_saved: set[str] = set()


def ensure_result_storage() -> None:
    """Save :class:`ResultFiles` (no basepath: ``PREFECT_LOCAL_STORAGE_PATH`` of the reader) on this API, once."""
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    if api not in _saved:
        ResultFiles().save(STORAGE_NAME, overwrite=True)
        _saved.add(api)
