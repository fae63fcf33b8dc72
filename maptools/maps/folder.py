"""The map folder: one owner for where a map lives, how it is written, recovered, read and verified.

On disk, ``<root>/mapsave/<mapname>`` is a symbolic link to the current version of the map,
an immutable folder ``.<mapname>.v-<time>-<id>`` beside it::

    mapsave/resnet18 -> .resnet18.v-1764300000000000000-3fa2c1   the map readers see
    mapsave/.resnet18.v-...                                       current and previous version
    mapsave/.resnet18.incomplete-<id>  (+ .owner)                 a write in progress
    mapsave/.resnet18.lock                                        writers' lock

* A write fills a staging folder, then, under the writers' lock, renames it to a new version
  and replaces the link atomically (``os.replace`` of a new link). A failed or killed write leaves
  the current version as it was; its staging folder is removed by the next write of that map
  (a staging folder is stale when no process holds the flock of its ``.owner`` file: the kernel
  drops a killed process's locks).
* A reader resolves the link once (:meth:`MapFolder.open`) and reads every file of one version,
  so it sees a complete old or new map, never a mix. The previous version stays until the next
  write, for readers that resolved the link just before a swap.
* A change to a map (``convert`` adding the operator graph) is a new version: the files are
  hard-linked from the current one, the new file and manifest added, and the link swapped.
* Maps written before versioning (a plain folder) are read as they are and converted to a link
  on their next write; a folder that is not a map (no ``manifest.json``) is never replaced.

The writers' lock is an ``fcntl.flock`` (released by the kernel when its holder dies), taken only
around the swap; nothing reads or sets process-global state (umask, working directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from maptools.errors import (ArtifactError, ConcurrentUpdateError, IntegrityError, MapnameError, MissingArtifactError,
                             StorageError)
from maptools.maps.manifest import Manifest, parse_manifest
from maptools.maps.roots import MapRef, home, is_url, output_root, pause_point

__all__ = ["MapFolder", "MapVersion", "MANIFEST", "sha256_file", "sha256_folder", "atomic_write", "atomic_link",
           "storage_errors"]

MANIFEST = "manifest.json"
_MAPNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"^\.(?P<map>.+)\.v-(?P<stamp>\d+)-[0-9a-f]+$")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(path: str | Path) -> str:
    """sha256 over every file under ``path``: its path relative to ``path`` and its :func:`sha256_file`."""
    root, digest = Path(path), hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}|{sha256_file(file)}|".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """OS errors of writing a map (disk full, read-only, a file where a folder should be) as StorageError."""
    try:
        yield
    except OSError as e:
        if isinstance(e, ArtifactError | MapnameError | StorageError):
            raise
        hints = {
            errno.ENOSPC: "free disk space (or pass another output_root) and run again.",
            errno.EROFS: "pass an output_root on a writable file system.",
            errno.EACCES: "pass an output_root you may write to, or fix its permissions.",
            errno.EPERM: "pass an output_root you may write to, or fix its permissions.",
            errno.ENOTDIR: "a file stands where a folder is needed: pass another output_root or move the file.",
            errno.EDQUOT: "free space within your disk quota and run again.",
        }
        raise StorageError(f"cannot {what}: {e.strerror or e} ({e.filename or ''}).".replace(" ()", ""),
                           hints.get(e.errno, "check the output folder (space, permissions) and run again.")) from e


#: bytes per write() call: Linux throttles a task that dirties many pages in one call far longer than the same
#: pages written a megabyte at a time (a 45 MB model: 0.41 s in one call, 0.017 s in 1 MiB calls, this machine)
_CHUNK = 1 << 20


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    The temp file is created with mode 0o666 so the process umask applies as for any new file
    (the umask is never read or changed: it is process-global and writers run in threads).
    A failure leaves ``path`` as it was and no temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.incomplete")
    payload = data.encode() if isinstance(data, str) else data
    with storage_errors(f"write {path}"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                view = memoryview(payload)
                for start in range(0, len(view), _CHUNK):  # see _CHUNK
                    f.write(view[start:start + _CHUNK])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def atomic_link(src: str | Path, dst: str | Path) -> bool:
    """``dst`` made a hard link to ``src`` atomically (a link beside it, then renamed over ``dst``); False, and
    ``dst`` as it was, where the file system cannot (another device, no hard links)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.link")
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


@dataclass(frozen=True)
class MapVersion:
    """One complete, immutable version of a map, as a reader resolved it."""

    mapname: str
    path: Path

    def file(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ArtifactError(f"artifact name {name!r} is not a file name inside the map.",
                                "the manifest was edited: re-run quantize for this map.")
        return self.path / name

    def existing(self, name: str) -> Path:
        """:meth:`file`, which must exist."""
        path = self.file(name)
        if not path.is_file():
            raise MissingArtifactError(f"{path} does not exist.", f"run quantize(..., mapname={self.mapname!r}) first, "
                                       "or check output_root / MAPTOOLS_HOME.")
        return path

    def _load(self) -> tuple[dict[str, Any], Manifest]:
        """The manifest as read (a dict) and typed, checked once."""
        path = self.path / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingArtifactError(f"{path} does not exist.", "re-run quantization for this map.") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} is not valid JSON ({e}).", "re-run quantization for this map.") from e
        if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
            raise ArtifactError(f"{path} has no artifact registry.", "re-run quantization for this map.")
        return data, parse_manifest(data, str(path))

    def manifest(self) -> dict[str, Any]:
        """The manifest (checked against :class:`Manifest`, not verified: see :meth:`verify`)."""
        return self._load()[0]

    def record(self) -> Manifest:
        """The manifest, typed (not verified: see :meth:`verified`)."""
        return self._load()[1]

    def verify(self, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Check every registered artifact (but ``skip``) against the manifest's sha256; return the manifest."""
        return self._verified(skip)[0]

    def verified(self, skip: frozenset[str] = frozenset()) -> Manifest:
        """:meth:`verify`, typed."""
        return self._verified(skip)[1]

    def _verified(self, skip: frozenset[str]) -> tuple[dict[str, Any], Manifest]:
        data, record = self._load()
        for name, digest in record.artifacts.items():
            if name in skip:
                continue
            path = self.file(name)
            if not path.is_file():
                raise MissingArtifactError(f"artifact {path} is missing.", "re-run quantization for this map.")
            if sha256_file(path) != digest:
                raise IntegrityError(f"artifact {path} does not match the sha256 in its manifest.",
                                    "re-run quantization for this map; do not edit artifacts by hand.")
        return data, record


class MapFolder:
    """``<root>/mapsave/<mapname>``: paths, the writers' lock, staging, the swap, recovery and cleanup.

    A root that is a store URL (``s3://...``, see :mod:`maptools.maps.store`) gives a
    :class:`~maptools.maps.store.StoreMapFolder`, which keeps this interface (``maptools.maps.store`` registers
    it as :attr:`store_class`; importing any ``maptools`` module imports it).
    """

    #: the class of a map folder in a store (set by :mod:`maptools.maps.store`)
    store_class: ClassVar[type[MapFolder] | None] = None

    def __new__(cls, mapname: str | MapRef, root: str | Path | None = None) -> MapFolder:
        ref = MapRef.of(mapname, root)
        if cls is MapFolder and MapFolder.store_class is not None and is_url(home(ref.root)):
            return super().__new__(MapFolder.store_class)
        return super().__new__(cls)

    def __init__(self, mapname: str | MapRef, root: str | Path | None = None) -> None:
        ref = MapRef.of(mapname, root)
        self.mapname = self.validate(ref.mapname)
        self.root = output_root(ref.root)
        self.parent = self.root / "mapsave"
        self.path = self.parent / self.mapname
        self.published: Path | None = None  # the version the last write of this object made

    @classmethod
    def at(cls, path: str | Path) -> MapFolder:
        """The map whose path (``<root>/mapsave/<mapname>``) is ``path``."""
        path = Path(path)
        if path.parent.name != "mapsave":
            raise MapnameError(f"{path} is not a map path (<output_root>/mapsave/<mapname>).",
                               "pass the map's folder as quantize returned it (result.map_dir).")
        return cls(path.name, path.parent.parent)

    @staticmethod
    def named_after(path: str | Path) -> str:
        """The default mapname of a model file: its stem, each run of characters a mapname cannot hold as ``_``
        (``my model (1).onnx`` -> ``my_model_1``); ``model`` where nothing is left."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._-")[:128]
        return name or "model"

    @staticmethod
    def validate(mapname: str) -> str:
        if not isinstance(mapname, str) or not _MAPNAME.fullmatch(mapname) or mapname in {".", ".."}:
            raise MapnameError(
                f"mapname {mapname!r} is not a plain folder name (empty, a path, or unusual characters).",
                "use letters, digits, '.', '_' or '-', starting with a letter or digit, e.g. 'resnet18'.",
            )
        return mapname

    # --- reading ------------------------------------------------------------------------------------
    def _versions(self) -> list[Path]:
        try:
            entries = list(self.parent.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            match = _VERSION.match(entry.name)
            if match and match["map"] == self.mapname and entry.is_dir():
                found.append((int(match["stamp"]), entry))
        return [p for _, p in sorted(found)]

    def current(self) -> Path | None:
        """The folder readers see now: the link's target, a legacy plain folder, or (a write was
        killed between moving a legacy folder and linking) the newest complete version."""
        if self.path.is_symlink():
            target = Path(os.path.realpath(self.path))
            if target.is_dir():
                return target
        elif self.path.is_dir():
            return self.path
        complete = [v for v in self._versions() if (v / MANIFEST).is_file()]
        return complete[-1] if complete else None

    def open(self) -> MapVersion:
        """Resolve the map once, for a consistent read of its files."""
        folder = self.current()
        if folder is None or not (folder / MANIFEST).is_file():
            raise MissingArtifactError(f"{self.path / MANIFEST} does not exist.",
                                       f"run quantize(..., mapname={self.mapname!r}) first, or check output_root / "
                                       "MAPTOOLS_HOME.")
        return MapVersion(self.mapname, folder)

    def exists(self) -> bool:
        return self.current() is not None and (self.current() / MANIFEST).is_file()  # type: ignore[operator]

    # --- writing --------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Refuse before any work, without writing anything: a folder at the map's place that is not a
        map, a file where a folder is needed, or a folder we cannot write."""
        if self.path.is_dir() and not self.path.is_symlink() and not (self.path / MANIFEST).is_file() and \
                any(self.path.iterdir()):
            raise MapnameError(f"{self.path} exists and is not a maptools map (no {MANIFEST}): maptools will not "
                               "replace it.", "choose another mapname or output_root, or move that folder away.")
        if self.path.exists() and not self.path.is_dir():
            raise MapnameError(f"{self.path} exists and is a file, not a map folder.",
                               "choose another mapname or output_root, or move that file away.")
        existing = self.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"cannot create {self.parent}: {existing} is a file.",
                               "a file stands where a folder is needed: pass another output_root or move the file.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write to {existing} (read-only or no permission).",
                               "pass an output_root you may write to (a writable file system).")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The writers' lock of this map (an flock: a killed holder releases it)."""
        with storage_errors(f"lock {self.path}"):
            self.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.parent / f".{self.mapname}.lock", "a")
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _owned_stage(self, locked: bool = False) -> Iterator[Path]:
        """A new staging folder and its owner file, flocked while this write lasts. Both are made under the
        writers' lock (``locked``: the caller holds it), which every clean-up holds: a clean-up between the
        owner file's creation and its flock would take it for a dead writer's and remove it."""
        token = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        owner = self.parent / f".{self.mapname}.incomplete-{token}.owner"
        stage = self.parent / f".{self.mapname}.incomplete-{token}"
        with contextlib.nullcontext() if locked else self.lock():
            with storage_errors(f"create a staging folder in {self.parent}"):
                self.parent.mkdir(parents=True, exist_ok=True)
                handle: IO[str] = open(owner, "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this write ends or its process dies
                with storage_errors(f"create {stage}"):
                    os.mkdir(stage, 0o777)  # the umask applies, as for any new folder
            except BaseException:
                owner.unlink(missing_ok=True)
                handle.close()
                raise
        try:
            try:
                yield stage
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            owner.unlink(missing_ok=True)
            handle.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        """Yield an empty staging folder; on success it becomes the map's new version (``published``).

        On any exception (or a kill) the current version is untouched; the staging folder is
        removed now, or by the next write after a kill.
        """
        self.check_writable()
        with self._owned_stage() as stage:
            with storage_errors(f"write the map {self.mapname!r} in {self.parent}"):
                yield stage  # every file of a new map is written here: OS errors become StorageError
            pause_point("staged")
            self.published = self._publish(stage)

    def update(self, files: Mapping[str, bytes], manifest_changes: Mapping[str, Any],
               based_on: Mapping[str, str] | None = None) -> MapVersion:
        """A new version: the current files (hard links) plus ``files``, registered in the manifest.

        ``manifest_changes`` are merged into the manifest; ``files`` are added to its artifacts.
        ``based_on`` (artifact hashes the new files were derived from) must still be the map's, else
        another run rewrote the map meanwhile and ArtifactError says so.
        """
        with self.lock():
            current = self.open()
            manifest = current.verify(skip=frozenset(files))  # the files being replaced may be gone
            if based_on is not None and any(manifest["artifacts"].get(k) != v for k, v in based_on.items()):
                raise ConcurrentUpdateError(f"map {self.mapname!r} was rewritten while this step read it.",
                                            "run the step again on the new map.")
            with self._owned_stage(locked=True) as stage:
                with storage_errors(f"write {stage}"):
                    for entry in current.path.iterdir():
                        if entry.name != MANIFEST and entry.name not in files and entry.is_file():
                            try:
                                os.link(entry, stage / entry.name)
                            except OSError:
                                shutil.copy2(entry, stage / entry.name)
                for name, data in files.items():
                    atomic_write(stage / MapVersion(self.mapname, stage).file(name).name, data)
                manifest = {**manifest, **manifest_changes}
                manifest["artifacts"] = {**manifest["artifacts"],
                                         **{name: sha256_file(stage / name) for name in files}}
                parse_manifest(manifest, f"the new manifest of {self.mapname!r}")
                atomic_write(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
                version = self._publish(stage, locked=True)
        return MapVersion(self.mapname, version)

    def _publish(self, stage: Path, locked: bool = False) -> Path:
        """Make ``stage`` the current version: rename it, swap the link, clean up. Returns the version path."""
        with contextlib.nullcontext() if locked else self.lock(), storage_errors(f"publish {self.path}"):
            previous = self.current()
            if previous == self.path:  # a legacy plain folder (checked to be a map): becomes a version too
                legacy = self.parent / f".{self.mapname}.v-{time.time_ns() - 1}-{uuid.uuid4().hex[:8]}"
                os.rename(self.path, legacy)
                previous = legacy
            version = self.parent / f".{self.mapname}.v-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
            os.rename(stage, version)
            pause_point("renamed")
            link = self.parent / f".{self.mapname}.link-{uuid.uuid4().hex[:8]}"
            try:
                os.symlink(version.name, link)
                os.replace(link, self.path)
            except OSError:  # the link still names the previous version: the new one is nobody's
                link.unlink(missing_ok=True)
                shutil.rmtree(version, ignore_errors=True)
                raise
            self._clean(keep={version, previous})
        return version

    def _clean(self, keep: set[Path | None]) -> None:
        """Remove versions other than ``keep`` and staging folders whose writer is gone (under the lock)."""
        for version in self._versions():
            if version not in keep:
                shutil.rmtree(version, ignore_errors=True)
        prefix = f".{self.mapname}.incomplete-"
        for entry in list(self.parent.iterdir()):
            if not entry.name.startswith(prefix) or entry.name.endswith(".owner"):
                continue
            owner = entry.with_name(entry.name + ".owner")
            if owner.exists() and _held(owner):
                continue  # a write in progress
            shutil.rmtree(entry, ignore_errors=True)
            owner.unlink(missing_ok=True)
        for owner in self.parent.glob(f"{prefix}*.owner"):
            if not owner.with_name(owner.name[:-len(".owner")]).exists() and not _held(owner):
                owner.unlink(missing_ok=True)
        for link in self.parent.glob(f".{self.mapname}.link-*"):
            link.unlink(missing_ok=True)

    def stale_staging(self) -> list[Path]:
        """Staging folders of this map whose writer is gone (what the next write removes)."""
        prefix = f".{self.mapname}.incomplete-"
        return [e for e in self.parent.glob(f"{prefix}*") if not e.name.endswith(".owner")
                and not (e.with_name(e.name + ".owner").exists() and _held(e.with_name(e.name + ".owner")))]


def _held(owner: Path) -> bool:
    """Whether a live process holds the flock of a staging folder's owner file."""
    try:
        with open(owner) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
