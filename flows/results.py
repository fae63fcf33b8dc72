"""Persisted task results that cannot run code when they are read back, locally or on a shared store.

Prefect picks the deserializer from the record's own metadata, so a result file written with
``pickle`` (or a JSON serializer naming another ``object_decoder``) would run code on the next
cache hit, whatever serializer the task asks for. Here results are JSON (:data:`SERIALIZER`,
whose decoder rebuilds only maptools' own types and paths) in :class:`ResultFiles`, a local
result storage that returns a record only when its metadata names exactly that serializer; any
other record is refused (:class:`UnsafeResultError`) and the task recomputes.

For several machines, :class:`StoreResults` is the same on an fsspec URL (``s3://bucket/prefix``):
``maptools results-storage URL`` saves one as a block, and ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``
naming it (on every worker) sends the flows' and the cached tasks' results there, so a cache hit
on one machine returns what another computed (the flows then check the map's hashes on the store).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.serializers import JSONSerializer, prefect_json_object_decoder
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK

from maptools.errors import SettingsError, UnsafePickleError
from maptools.maps.folder import atomic_write, storage_errors

__all__ = ["SERIALIZER", "RESULT_STORAGE", "ResultFiles", "StoreResults", "UnsafeResultError", "decode",
           "ensure_result_storage", "save_store_results"]

#: Types a result may rebuild: maptools' and the flows' own, and paths.
_MODULES = ("maptools.", "maptools_flows.")
_TYPES = {"pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath",
          "pathlib._local.WindowsPath", "pathlib._local.Path"}


class UnsafeResultError(UnsafePickleError):
    """A persisted result that is not maptools' JSON, or names a type outside maptools."""


def _checked(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` (a JSON object) if the type it names, if any, is maptools' or a path; else UnsafeResultError."""
    name = value.get("__class__")
    if name is None and "__exc_type__" not in value:
        return value
    if not isinstance(name, str) or not (name.startswith(_MODULES) or name in _TYPES):
        raise UnsafeResultError(f"a persisted result names the type {name or value.get('__exc_type__')!r}.",
                                "delete the result file (or the Prefect storage folder); the task recomputes.")
    return value


def decode(value: dict[str, Any]) -> Any:
    """``json`` object hook: Prefect's, limited to maptools' types (anything else is refused, never imported)."""
    return prefect_json_object_decoder(_checked(value)) if "__class__" in value else _checked(value)


SERIALIZER = JSONSerializer(object_decoder=f"{__name__}.decode")
_EXPECTED = SERIALIZER.model_dump(mode="json")


def _pinned(content: bytes, where: str) -> bytes:
    """``content`` if it is a result record of :data:`SERIALIZER`, or a bare JSON value (a flow's result, whose
    serializer Prefect keeps in the run's state) that names maptools' types only; else UnsafeResultError."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict) and "result" in data:
        serializer = data["metadata"].get("serializer")
    elif data is not None:
        json.loads(content, object_hook=_checked)  # a bare value: every type it names must be maptools'
        return content
    else:
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

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        """Read synchronously (Prefect's result store calls :meth:`aread_path` from async code, and passes
        ``_sync=True`` here)."""
        with open(self._resolve_path(path), "rb") as f:
            return _pinned(f.read(), path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content, _sync=True)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Write a record whole (a temp file, then a rename: a killed writer leaves no partial record); an OS
        error (disk full, read-only, no permission) is a :class:`~maptools.errors.StorageError`."""
        target = self._resolve_path(path)
        with storage_errors(f"create {target.parent}"):
            target.parent.mkdir(parents=True, exist_ok=True)
        return str(atomic_write(target, content))


class StoreResults(RemoteFileSystem):
    """Result storage on an fsspec URL (``basepath``, e.g. ``s3://bucket/prefect-results``) that reads back only
    records written with :data:`SERIALIZER`. Credentials come from the environment (AWS variables, profiles,
    roles), never from the block."""

    _block_type_name = "maptools store results"
    _block_type_slug = "maptools-store-results"

    async def aread_path(self, path: str) -> bytes:
        return _pinned(await super().aread_path(path), path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        """Read synchronously (see :meth:`ResultFiles.read_path`)."""
        with self.filesystem.open(self._resolve_path(path), "rb") as f:
            return _pinned(f.read(), path)


#: The local storage every cached task of maptools persists to, by its block document name (a task's storage
#: must be a saved block; :func:`ensure_result_storage` saves it on the Prefect server a flow talks to).
STORAGE_NAME = "maptools"
_LOCAL = f"{ResultFiles.get_block_type_slug()}/{STORAGE_NAME}"
#: What the cached tasks persist to: the default storage block when one is configured (a :class:`StoreResults`,
#: shared by every worker), else the local :class:`ResultFiles`.
RESULT_STORAGE = PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.value() or _LOCAL
_saved: set[str] = set()


def ensure_result_storage() -> None:
    """Check the configured result storage reads back JSON only, or save the local :class:`ResultFiles` (no
    basepath: ``PREFECT_LOCAL_STORAGE_PATH`` of the reader) on this API; once per API."""
    from prefect.blocks.core import Block
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    if api in _saved:
        return
    if RESULT_STORAGE != _LOCAL:
        block = Block.load(RESULT_STORAGE)
        if not isinstance(block, ResultFiles | StoreResults):
            raise SettingsError(f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={RESULT_STORAGE} is a "
                                f"{type(block).__name__}, which would read back pickled results (code) from storage.",
                                "save a maptools block instead (`maptools results-storage s3://BUCKET/PREFIX "
                                "--name NAME`) and point the setting at it.")
    else:
        ResultFiles().save(STORAGE_NAME, overwrite=True)
    _saved.add(api)


def save_store_results(url: str, name: str) -> str:
    """Save a :class:`StoreResults` block on ``url`` under ``name``; returns its slug for
    ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``."""
    from maptools.maps.store import Store

    store = Store.of(url)
    store.check()
    StoreResults(basepath=store.url).save(name, overwrite=True)
    return f"{StoreResults.get_block_type_slug()}/{name}"
