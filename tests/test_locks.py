"""Cache locks die with their holder: a flow killed while holding one does not block later runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.locks import LiveLockManager

ROOT = Path(__file__).resolve().parents[1]


def test_a_killed_holders_lock_is_taken_over_and_a_live_one_is_not(tmp_path) -> None:
    code = ("import sys, time\nfrom pathlib import Path\nfrom flows.locks import LiveLockManager\n"
            "manager = LiveLockManager(Path(sys.argv[1]))\nassert manager.acquire_lock('key', 'child')\n"
            "Path(sys.argv[1], 'held').touch()\ntime.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (tmp_path / "held").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    manager = LiveLockManager(tmp_path)
    assert manager.is_locked("key") and not manager.acquire_lock("key", "parent", acquire_timeout=0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    started = time.monotonic()
    assert manager.acquire_lock("key", "parent", acquire_timeout=30)
    assert time.monotonic() - started < 5
    # this process holds it now, alive: another holder waits
    other = LiveLockManager(tmp_path)
    assert not other.acquire_lock("key", "other", acquire_timeout=0.5)
    manager.release_lock("key", "parent")
    assert other.acquire_lock("key", "other", acquire_timeout=5)
