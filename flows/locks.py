"""Cache locks that a killed run cannot leave behind.

Prefect's :class:`~prefect.locking.filesystem.FileSystemLockManager` creates a lock file per cache
key, then writes its holder and expiration into it, with no expiration by default: a flow killed
while it holds one (OOM, ``kill -9``) leaves it, and every later run of the same key waits, and one
killed between the two writes leaves a record that says nothing. :class:`LiveLockManager` creates
each lock file complete in one step (holder, host, process id and lease written to a temporary file,
then linked into place, which fails if a lock exists), so a lock file is never seen half written. A
lock whose holder process is gone (same host), whose lease ran out, or whose record lacks a holder
for :data:`GRACE_SECONDS` (written by something else) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager
from prefect.settings import PREFECT_HOME

from maptools.maps.store import holder_alive

__all__ = ["LiveLockManager", "LOCKS", "LEASE_SECONDS", "GRACE_SECONDS"]

#: How long a lock holds without its holder renewing it, when the caller gives no hold timeout.
LEASE_SECONDS = 6 * 3600
#: How long a lock file that names no live holder (empty, unreadable, without a process id) may stand.
GRACE_SECONDS = 10.0


class LiveLockManager(FileSystemLockManager):
    """A file lock manager whose locks die with their holder process (or when their lease runs out)."""

    def lock_path(self, key: str) -> Path:
        """The file that holds the lock of ``key``."""
        return Path(self._lock_path_for_key(key))

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self.lock_path(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self.is_lock_holder(key, holder) or self._create(path, key, holder, hold_timeout):
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 or not self.wait_for_lock(key, left):
                return False

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def _create(self, path: Path, key: str, holder: str, hold_timeout: float | None) -> bool:
        """Create the lock file with its whole record at once; False where a lock file exists."""
        if self.is_locked(key):
            return False
        expiration = datetime.now(timezone.utc) + timedelta(seconds=LEASE_SECONDS if hold_timeout is None
                                                            else hold_timeout)
        record = {"holder": holder, "expiration": str(expiration), "host": socket.gethostname(), "pid": os.getpid()}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, path)  # atomic: fails when another holder's lock file exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
        return True

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = self.lock_path(key)
        try:
            info: dict[str, Any] | None = self._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # an empty or half-written file (not one of ours): stale after the grace
            info = {"path": path}
            if self._live(info):
                return True
        if info is not None and not self._live(info):
            Path(info["path"]).unlink(missing_ok=True)  # its holder was killed: the lock is free
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)

    @staticmethod
    def _live(info: dict[str, Any]) -> bool:
        if "pid" in info:
            return holder_alive(info.get("host"), info.get("pid"))
        try:
            age = time.time() - Path(info["path"]).stat().st_mtime
        except FileNotFoundError:
            return False
        return age < GRACE_SECONDS


LOCKS = LiveLockManager(lock_files_directory=Path(PREFECT_HOME.value()) / "maptools-locks")
