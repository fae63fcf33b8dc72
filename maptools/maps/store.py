"""Maps on shared storage: an ``output_root`` that is an fsspec URL (``s3://bucket/prefix``, ``memory://x``).

One map on the store, under ``<url>/mapsave/<mapname>/``::

    current.json              {"version": V, "manifest_sha256": ...}: the version readers see; written last
    versions/V/<artifacts>    one complete map per version, never changed once current.json names it
    versions/V/manifest.json  uploaded after the artifacts
    .lock                     the writers' lock

* A write stages the map locally (in the map's local mirror, below), then, holding the lock, uploads a
  new version (artifacts first, then its manifest) and replaces ``current.json`` (one PUT: atomic on
  S3). A writer killed before that leaves ``current.json`` naming the previous version, still whole;
  its partial upload is removed by the next write (under the lock, so never an upload in progress).
  Artifacts the previous version already holds (same sha256) are copied on the store, not uploaded.
* A reader fetches ``current.json``, then the manifest (its sha256 must match) and every artifact
  (each sha256 must match) into the local mirror ``$MAPTOOLS_CACHE/store/<hash of url>`` (default
  ``~/.cache/maptools``): an ordinary local map folder, reused while it is at the store's version.
  Nothing read from the store is loaded before its hash is checked; pickles still go through the
  allow-list readers.
* The lock is an object created with ``If-None-Match: *`` (S3 conditional write, fsspec's
  ``mode="create"``): one writer wins, on any number of machines, with no Prefect server needed (the
  library and Dask workers write maps too). It records holder, host, pid and a lease; a lock whose
  holder died (same host) or whose lease ran out is taken over with ``If-Match`` on its ETag, so two
  writers cannot both take it over. The holder renews its lease while it writes, so a writer that
  died on another machine blocks the map for one lease (:data:`LEASE_SECONDS`) at most.

Credentials come from the store's own configuration (for S3: the AWS environment variables, profiles
or instance roles; ``AWS_ENDPOINT_URL`` for an S3-compatible server), or from :func:`store_options`
for the code run inside it (the flows' ``aws_credentials`` block); none is written into a map.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from maptools.errors import (ArtifactError, ConcurrentUpdateError, IntegrityError, MaptoolsError, MissingArtifactError,
                             StorageError, StoreUnavailable)
from maptools.maps.folder import MANIFEST, MapFolder, MapVersion, atomic_write, sha256_file, storage_errors
from maptools.maps.manifest import parse_manifest
from maptools.maps.roots import MapRef, home, is_url, mirror_root, pause_point

__all__ = ["is_url", "mirror_root", "Store", "StoreMapFolder", "store_errors", "store_options", "put_blob",
           "get_blob", "holder_alive", "LEASE_SECONDS",
           "LOCK_WAIT_SECONDS"]

log = logging.getLogger(__name__)

POINTER = "current.json"
#: how long a lock holds unless its holder renews it (it does, every third of this, while it writes): a
#: writer that died on another machine blocks the map this long at most
LEASE_SECONDS = 60.0
#: how long a writer waits for another writer of the same map before giving up
LOCK_WAIT_SECONDS = 20 * 60
_VERSION = re.compile(r"^v-\d+-[0-9a-f]{8}$")
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"}


_OPTIONS: ContextVar[Mapping[str, Any]] = ContextVar("maptools_store_options", default={})


@contextlib.contextmanager
def store_options(**options: Any) -> Iterator[None]:
    """fsspec storage options (s3fs: ``key``, ``secret``, ``token``, ``profile``, ``endpoint_url``,
    ``client_kwargs``) for every store opened inside this block, in this thread or task only (a context
    variable: nothing process-wide changes). They are never written anywhere."""
    token = _OPTIONS.set({**_OPTIONS.get(), **options})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@contextlib.contextmanager
def store_errors(what: str, url: str) -> Iterator[None]:
    """Errors of the store's client as maptools errors: missing bucket, credentials, endpoint, permissions."""
    try:
        yield
    except MaptoolsError:
        raise
    except Exception as e:
        names = {c.__name__ for c in type(e).__mro__} | {c.__name__ for c in type(e.__cause__).__mro__}
        if names & _NO_CREDENTIALS:
            raise StorageError(f"cannot {what}: no credentials for {url} ({e}).",
                               "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment "
                               "of every process that reads or writes the store.") from e
        if names & _UNREACHABLE or isinstance(e, ConnectionError | TimeoutError):
            raise StoreUnavailable(f"cannot {what}: the store of {url} did not answer ({e}).",
                                   "check the endpoint (AWS_ENDPOINT_URL for an S3-compatible server) and the "
                                   "network; the flows retry this.") from e
        if isinstance(e, PermissionError):
            raise StorageError(f"cannot {what}: access to {url} denied ({e}).",
                               "use credentials that may read and write that bucket and prefix.") from e
        if isinstance(e, FileNotFoundError):
            if "bucket" not in str(e).lower():
                raise  # a missing object: the caller decides (a version removed while it was read is read again)
            raise StorageError(f"cannot {what}: the bucket of {url} does not exist.",
                               "create it (e.g. `aws s3 mb s3://BUCKET`) or fix output_root.") from e
        if isinstance(e, OSError):
            raise StorageError(f"cannot {what} on {url}: {e}.",
                               "check output_root and the store, and run again.") from e
        raise


@dataclass(frozen=True)
class Store:
    """A store URL resolved to its fsspec file system and the root path inside it."""

    url: str
    fs: AbstractFileSystem
    path: str

    @classmethod
    def of(cls, url: str) -> Store:
        with store_errors("open the store", url):
            fs, path = fsspec.core.url_to_fs(url, **_OPTIONS.get())
        return cls(url.rstrip("/"), fs, path.rstrip("/"))

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    @property
    def s3(self) -> bool:
        return "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def check(self) -> None:
        """Fail fast on a store we cannot use: a missing bucket, no credentials, no endpoint."""
        if not self.s3:
            return
        bucket = self.path.split("/")[0]
        with store_errors("reach the store", self.url):
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise StorageError(f"the bucket {bucket!r} of {self.url} does not exist.",
                                   f"create it (e.g. `aws s3 mb s3://{bucket}`) or fix output_root.") from None


def put_blob(url: str, path: Path, sha256: str) -> str:
    """Upload ``path`` as ``<url>/blobs/<sha256>`` (content-addressed: skipped when already there); returns its path.

    Workers on other machines fetch it with :func:`get_blob` (e.g. the prepared model a sweep's points read)."""
    store = Store.of(url)
    remote = store.join("blobs", sha256)
    with store_errors(f"upload {path.name}", url):
        if not store.fs.exists(remote):
            store.fs.put_file(str(path), remote)  # one PUT (or a multipart upload): visible only when whole
    return remote


def get_blob(url: str, sha256: str, target: Path) -> Path:
    """``<url>/blobs/<sha256>`` as ``target`` (written atomically, its sha256 checked); reused when ``target``
    already holds those bytes."""
    if target.is_file() and sha256_file(target) == sha256:
        return target
    store = Store.of(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        with store_errors(f"download {sha256[:12]} for {target.name}", url):
            try:
                store.fs.get_file(store.join("blobs", sha256), str(partial))
            except FileNotFoundError:
                raise MissingArtifactError(f"{url}/blobs/{sha256} does not exist on the store.",
                                           "run the stage that uploads it (prepare-model) with this output_root "
                                           "first.") from None
        if sha256_file(partial) != sha256:
            raise IntegrityError(f"{url}/blobs/{sha256} does not match its sha256.",
                                "delete it from the store and run again; do not edit the store by hand.")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def holder_alive(host: Any, pid: Any) -> bool:
    """Whether the process ``pid`` on ``host`` may still run: False only for a process of this host that is gone."""
    if host != socket.gethostname() or not isinstance(pid, int):
        return True  # another machine's process: only its lease tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreMapFolder(MapFolder):
    """A map on a store (see the module docstring); reads and writes go through a local mirror folder."""

    def __init__(self, mapname: str | MapRef, root: str | Path | None = None) -> None:  # root: a store URL
        ref = MapRef.of(mapname, root)
        mapname, root = self.validate(ref.mapname), home(ref.root)
        self.mapname = mapname
        self.store = Store.of(str(root))
        self.root = self.store.url  # type: ignore[assignment]
        self.remote = self.store.join("mapsave", mapname)
        self.url = f"{self.store.url}/mapsave/{mapname}"
        self.mirror = MapFolder(mapname, mirror_root(self.store.url))
        self.parent, self.path = self.mirror.parent, self.mirror.path
        self.published = None

    # --- reading ------------------------------------------------------------------------------------
    def pointer(self) -> dict[str, str] | None:
        with store_errors(f"read map {self.mapname!r}", self.url):
            try:
                data = json.loads(self.store.fs.cat_file(f"{self.remote}/{POINTER}"))
            except FileNotFoundError as e:
                if "bucket" in str(e).lower():
                    raise
                return None
            except ValueError:
                data = None
        if not isinstance(data, dict) or not _VERSION.match(str(data.get("version"))) or \
                not re.fullmatch(r"[0-9a-f]{64}", str(data.get("manifest_sha256"))):
            raise ArtifactError(f"{self.url}/{POINTER} is not a maptools map pointer.",
                                "re-run quantize with this output_root; do not edit the store by hand.")
        return data

    def current(self) -> Path | None:
        try:
            return self.open().path
        except MissingArtifactError:
            return None

    def exists(self) -> bool:
        return self.pointer() is not None

    def open(self) -> MapVersion:
        """The store's current version of the map, in the local mirror (downloaded and verified if needed)."""
        for _ in range(3):
            pointer = self.pointer()
            if pointer is None:
                raise MissingArtifactError(f"map {self.mapname!r} does not exist on the store ({self.url}/{POINTER}).",
                                           f"run quantize(..., mapname={self.mapname!r}, output_root="
                                           f"{self.store.url!r}) first, or check the URL.")
            local = self.mirror.current()
            if local is not None and (local / MANIFEST).is_file() and \
                    sha256_file(local / MANIFEST) == pointer["manifest_sha256"]:
                return MapVersion(self.mapname, local)
            try:
                return MapVersion(self.mapname, self._download(pointer))
            except FileNotFoundError as e:  # the version was removed meanwhile (two newer writes): read the new one
                missing = e
                log.info("map %s changed on the store while it was read; reading it again", self.url)
        raise ConcurrentUpdateError(f"map {self.url} changed three times while it was read ({missing} disappeared).",
                            "read it again once its writers are done.")

    def _download(self, pointer: Mapping[str, str]) -> Path:
        source = f"{self.remote}/versions/{pointer['version']}"
        started, size = time.perf_counter(), 0
        with self.mirror._owned_stage() as stage:
            with store_errors(f"download map {self.mapname!r}", self.url):
                manifest = self.store.fs.cat_file(f"{source}/{MANIFEST}")
            if hashlib.sha256(manifest).hexdigest() != pointer["manifest_sha256"]:
                raise IntegrityError(f"the manifest of {self.url} does not match the sha256 in {POINTER}.",
                                    "re-run quantize with this output_root; do not edit the store by hand.")
            atomic_write(stage / MANIFEST, manifest)
            version = MapVersion(self.mapname, stage)
            artifacts = version.record().artifacts
            names = sorted(artifacts)
            with store_errors(f"download map {self.mapname!r}", self.url):  # concurrently
                self.store.fs.get([f"{source}/{n}" for n in names], [str(version.file(n)) for n in names])
            for name, digest in artifacts.items():
                target = version.file(name)
                if not target.is_file():
                    raise FileNotFoundError(f"{source}/{name}")
                if sha256_file(target) != digest:
                    raise IntegrityError(f"{self.url}/versions/{pointer['version']}/{name} does not match the sha256 "
                                        "in its manifest.", "re-run quantize with this output_root; do not edit the "
                                        "store by hand.")
                size += target.stat().st_size
            path = self.mirror._publish(stage)
        log.info("downloaded map %s (%.1f MB) in %.2f s", self.url, size / 1e6, time.perf_counter() - started)
        return path

    # --- writing --------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        self.store.check()
        self.mirror.check_writable()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The writers' lock of this map on the store (see the module docstring)."""
        path, token = f"{self.remote}/.lock", uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        fs = self.store.fs

        def record() -> bytes:
            return json.dumps({"holder": token, "host": socket.gethostname(), "pid": os.getpid(),
                               "expires": time.time() + LEASE_SECONDS}).encode()

        with store_errors(f"lock map {self.mapname!r}", self.url):
            while True:
                try:
                    fs.pipe_file(path, record(), mode="create")
                    break
                except FileExistsError:
                    pass
                held = self._lock_record(path)
                if held is not None and self._take_over(path, held, record()):
                    break
                if time.monotonic() > deadline:
                    info = held[0] if held else {}
                    raise StorageError(f"map {self.mapname!r} on {self.store.url} is locked by {info.get('host')} pid "
                                       f"{info.get('pid')} for longer than {LOCK_WAIT_SECONDS} s.",
                                       f"wait for that write to finish; if it is gone, delete {self.url}/.lock.")
                time.sleep(0.1 + 0.3 * random.random())
        stop = threading.Event()
        renewal = threading.Thread(target=self._renew, args=(path, token, record, stop), daemon=True,
                                   name=f"maptools-lock-{self.mapname}")
        renewal.start()
        try:
            yield
        finally:
            stop.set()
            renewal.join()
            with contextlib.suppress(Exception):
                held = self._lock_record(path)
                if held is not None and held[0].get("holder") == token:
                    fs.rm_file(path)

    def _renew(self, path: str, token: str, record: Callable[[], bytes], stop: threading.Event) -> None:
        """Extend the lease of the lock ``token`` holds every third of a lease, until ``stop``."""
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                held = self._lock_record(path)
                if held is None or held[0].get("holder") != token:
                    log.warning("the lock of map %s was taken over while this write held it", self.url)
                    return
                if self.store.s3 and held[1]:
                    self.store.fs.pipe_file(path, record(), IfMatch=held[1])
                else:
                    self.store.fs.pipe_file(path, record())
            except Exception as e:  # the next renewal tries again; the lease covers two misses
                log.warning("could not renew the lock of map %s: %s", self.url, e)

    def _lock_record(self, path: str) -> tuple[dict[str, Any], str | None] | None:
        try:
            self.store.fs.invalidate_cache(path)
            etag = self.store.fs.info(path).get("ETag")
            data = json.loads(self.store.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:
            data = {}
        return (data if isinstance(data, dict) else {}), etag

    def _take_over(self, path: str, held: tuple[dict[str, Any], str | None], record: bytes) -> bool:
        """Replace a lock whose holder died or whose lease ran out; False while it is live or another won it."""
        info, etag = held
        expires = info.get("expires")
        live = isinstance(expires, int | float) and expires > time.time()
        if live and holder_alive(info.get("host"), info.get("pid")):
            return False
        log.warning("taking over the lock of map %s from %s pid %s (gone or expired)", self.url, info.get("host"),
                    info.get("pid"))
        try:
            if self.store.s3 and etag:
                self.store.fs.pipe_file(path, record, IfMatch=etag)  # fails if another writer replaced it first
            else:
                self.store.fs.rm_file(path)
                self.store.fs.pipe_file(path, record, mode="create")
        except (FileExistsError, FileNotFoundError, OSError):
            return False
        return True

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        """Yield an empty local staging folder; on success it is uploaded as the map's new version and
        becomes the mirror's current version (``published``)."""
        self.check_writable()
        with self.mirror._owned_stage() as stage:
            with storage_errors(f"write the map {self.mapname!r}"):
                yield stage  # as MapFolder.write: OS errors of the files' writes become StorageError
            pause_point("staged")
            with self.lock():
                self._upload(stage)
            self.published = self.mirror._publish(stage)

    def update(self, files: Mapping[str, bytes], manifest_changes: Mapping[str, Any],
               based_on: Mapping[str, str] | None = None) -> MapVersion:
        """:meth:`MapFolder.update` on the store: under the store's lock, the mirror's new version is uploaded."""
        with self.lock():
            self.open()  # the mirror at the store's current version
            version = self.mirror.update(files, manifest_changes, based_on)
            self._upload(version.path)
        return version

    def _upload(self, folder: Path) -> None:
        """Upload the map in ``folder`` as a new version and make it current (under the lock)."""
        started = time.perf_counter()
        manifest = (folder / MANIFEST).read_bytes()
        record = parse_manifest(json.loads(manifest), str(folder / MANIFEST))
        version = f"v-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        target = f"{self.remote}/versions/{version}"
        fs = self.store.fs
        with store_errors(f"upload map {self.mapname!r}", self.url):
            previous = self.pointer()
            kept = self._artifacts_of(previous)
            same = sorted(name for name, digest in record.artifacts.items() if kept.get(name) == digest)
            new = sorted(name for name in record.artifacts if name not in same)
            if same:  # the store copies them itself, concurrently
                fs.copy([f"{self.remote}/versions/{previous['version']}/{n}" for n in same],  # type: ignore[index]
                        [f"{target}/{n}" for n in same])
            if new:
                fs.put_file(str(folder / new[0]), f"{target}/{new[0]}")
                pause_point("uploading")
                if new[1:]:
                    fs.put([str(folder / n) for n in new[1:]], [f"{target}/{n}" for n in new[1:]])  # concurrently
            size = sum((folder / n).stat().st_size for n in new)
            fs.pipe_file(f"{target}/{MANIFEST}", manifest)
            pause_point("uploaded")
            fs.pipe_file(f"{self.remote}/{POINTER}", json.dumps(
                {"version": version, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}).encode())
        log.info("uploaded map %s (%.1f MB new) in %.2f s", self.url, size / 1e6, time.perf_counter() - started)
        self._clean(keep={version, previous["version"] if previous else None})

    def _artifacts_of(self, pointer: Mapping[str, str] | None) -> dict[str, str]:
        """The artifact hashes of the version ``pointer`` names (empty if unreadable: everything is uploaded)."""
        if pointer is None:
            return {}
        try:
            data = self.store.fs.cat_file(f"{self.remote}/versions/{pointer['version']}/{MANIFEST}")
            if hashlib.sha256(data).hexdigest() != pointer["manifest_sha256"]:
                return {}
            return parse_manifest(json.loads(data), self.url).artifacts
        except (OSError, ValueError, MaptoolsError):
            return {}

    def _clean(self, keep: set[str | None]) -> None:
        """Remove versions but ``keep`` (current and previous), including uploads a killed writer left."""
        with contextlib.suppress(FileNotFoundError):
            for entry in self.store.fs.ls(f"{self.remote}/versions", detail=False, refresh=True):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if _VERSION.match(name) and name not in keep:
                    try:
                        self.store.fs.rm(entry, recursive=True)
                    except OSError as e:  # left for the next write
                        log.warning("could not remove old version %s of %s: %s", name, self.url, e)

    def stale_staging(self) -> list[Path]:
        return self.mirror.stale_staging()

    def versions(self) -> list[str]:
        """The version folders on the store (current, previous, and any partial upload not yet cleaned)."""
        with store_errors(f"list map {self.mapname!r}", self.url), contextlib.suppress(FileNotFoundError):
            return sorted(e.rstrip("/").rsplit("/", 1)[-1]
                          for e in self.store.fs.ls(f"{self.remote}/versions", detail=False, refresh=True))
        return []


MapFolder.store_class = StoreMapFolder
