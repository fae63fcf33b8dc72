"""Cache locks die with their holder: a flow killed while holding one does not block later runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from maptools_flows.locks import LiveLockManager

ROOT = Path(__file__).resolve().parents[1]


def test_a_killed_holders_lock_is_taken_over_and_a_live_one_is_not(tmp_path) -> None:
    code = ("import sys, time\nfrom pathlib import Path\nfrom maptools_flows.locks import LiveLockManager\n"
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


def test_a_lock_file_is_whole_from_the_instant_it_exists(tmp_path) -> None:
    """Kill the holder the moment its lock file appears: the file already names it, and the next run takes over."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom maptools_flows.locks import LiveLockManager\n"
            "manager = LiveLockManager(Path(sys.argv[1]))\nassert manager.acquire_lock('key', 'child')\n"
            "time.sleep(600)\n")
    manager = LiveLockManager(tmp_path)
    lock = manager.lock_path("key")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert time.monotonic() < deadline and child.poll() is None
    child.send_signal(signal.SIGKILL)
    record = json.loads(lock.read_text())
    child.wait()
    assert record["pid"] == child.pid and record["holder"] == "child" and record["expiration"]
    started = time.monotonic()
    assert manager.acquire_lock("key", "next", acquire_timeout=30)
    assert time.monotonic() - started < 5


def test_a_record_without_a_holder_is_stale_after_the_grace(tmp_path, monkeypatch) -> None:
    """Prefect's own manager writes the file in two steps: a record without a pid (or an empty file) is taken
    over once it is older than GRACE_SECONDS, and respected before."""
    import os
    from datetime import datetime, timedelta, timezone

    from maptools_flows import locks

    manager = LiveLockManager(tmp_path)
    lock = manager.lock_path("key")
    lock.write_text(json.dumps({"holder": "killed", "expiration": str(datetime.now(timezone.utc) + timedelta(hours=6))}))
    assert manager.is_locked("key") and not manager.acquire_lock("key", "next", acquire_timeout=0.3)
    old = time.time() - locks.GRACE_SECONDS - 1
    os.utime(lock, (old, old))
    assert manager.acquire_lock("key", "next", acquire_timeout=5)
    manager.release_lock("key", "next")
    lock.write_text("")  # killed between creating the file and writing it
    os.utime(lock, (old, old))
    assert manager.acquire_lock("key", "after", acquire_timeout=5)


def test_a_flow_killed_holding_its_cache_lock_does_not_block_the_next_run(prefect_server, small_cnn, tmp_path) -> None:
    """kill -9 a quantize-model flow while run-quantization holds its cache lock (paused in the map write);
    the same run again takes the dead holder's lock over and completes."""
    import os

    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    from maptools.maps.artifacts import verify_map
    from maptools_flows.locks import LOCKS
    from maptools_flows.quantize_model import quantize_model

    args = (str(small_cnn), {"input": [1, 3, 32, 32]}, "killed")
    kwargs = dict(calib_steps=8, device="cpu", output_root=str(tmp_path / "out"))
    code = ("import sys\nfrom maptools_flows.quantize_model import quantize_model\n"
            f"quantize_model(*{args!r}, **{kwargs!r})\n")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PREFECT_HOME": str(LOCKS.lock_files_directory.parent),
           "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
           "MAPTOOLS_TEST_PAUSE_AT": "staged", "MAPTOOLS_TEST_PAUSE_DIR": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "staged.reached").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child flow never reached the write"
            time.sleep(0.2)
        held = [p for p in LOCKS.lock_files_directory.glob("*.lock")
                if f'"pid": {child.pid}' in p.read_text()]
        assert held, "the child holds no cache lock"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    started = time.monotonic()
    result = quantize_model(*args, **kwargs)
    assert not result.quantization_cached and verify_map(result.quantization.map_dir)["mapname"] == "killed"
    assert time.monotonic() - started < 120
