"""Cache locks that a killed run cannot leave behind.

Prefect's :class:`~prefect.locking.filesystem.FileSystemLockManager` writes a lock file per cache
key with no expiration: a flow killed while it holds one (OOM, ``kill -9``) leaves it, and every
later run of the same key waits forever, ``refresh=True`` included. :class:`LiveLockManager`
records the holder's host and process id and a lease: a lock whose holder process is gone (same
host) or whose lease ran out is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager
from prefect.settings import PREFECT_HOME
from prefect.types._datetime import now

from maptools.mapfolder import atomic_write
from maptools.store import holder_alive

__all__ = ["LiveLockManager", "LOCKS", "LEASE_SECONDS"]

#: How long a lock holds without its holder renewing it, when the caller gives no hold timeout.
LEASE_SECONDS = 6 * 3600


class LiveLockManager(FileSystemLockManager):
    """A file lock manager whose locks die with their holder process (or when their lease runs out)."""

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        lease = LEASE_SECONDS if hold_timeout is None else hold_timeout
        if not super().acquire_lock(key, holder, acquire_timeout, lease):
            return False
        path = self._lock_path_for_key(key)
        record = {"holder": holder, "expiration": str(now("UTC") + timedelta(seconds=lease)),
                  "host": socket.gethostname(), "pid": os.getpid()}
        atomic_write(path, json.dumps(record))
        return True

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info: dict[str, Any] | None = self._get_lock_info(key, use_cache=use_cache)
        if info is not None and not holder_alive(info.get("host"), info.get("pid")):
            Path(info["path"]).unlink(missing_ok=True)  # its holder was killed: the lock is free
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


LOCKS = LiveLockManager(lock_files_directory=Path(PREFECT_HOME.value()) / "maptools-locks")
