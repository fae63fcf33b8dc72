"""Real servers for the end-to-end tests, on loopback, each stopped by the test that starts it:
``prefect server start`` and the Prefect CLI against it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (twice: workers ignore the first), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_when_paused(code: str, point: str, folder: Path, **env: str) -> None:
    """Run ``code`` in a child Python that stops at the write's fault-injection ``point``
    (``MAPTOOLS_TEST_PAUSE_AT``), then SIGKILL it there."""
    env = {**os.environ, "MAPTOOLS_TEST_PAUSE_AT": point, "MAPTOOLS_TEST_PAUSE_DIR": str(folder), **env}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    marker = folder / f"{point}.reached"
    deadline = time.monotonic() + 240
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not marker.exists():
        child.kill()
        child.wait()
        raise AssertionError(f"the child never reached the pause point {point!r}")
    child.send_signal(signal.SIGKILL)
    child.wait()


def prefect_env(home: Path) -> dict[str, str]:
    """The environment of a process that talks to a Prefect server on a free loopback port, with its own
    PREFECT_HOME (and no PREFECT_* setting of this process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1",
               PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"))
    return env


def start(env: dict[str, str], log: Path, *args: str, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """A process in its own session (so :func:`stop` reaches its children), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(list(args), env=env, cwd=cwd, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)


def start_prefect_server(env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """``prefect server start`` on the port of ``env``'s PREFECT_API_URL; returns once it is healthy."""
    port = env["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0]
    server = start(env, logs / "server.log", *PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port,
                   "--analytics-off")
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                stop(server)
                raise RuntimeError("prefect server did not start:\n" + (logs / "server.log").read_text()[-3000:])
            time.sleep(1)


def prefect(env: dict[str, str], *args: str, check: bool = True, timeout: int = 300,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def client(env: dict[str, str]) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(env["PREFECT_API_URL"])


def flow_runs(env: dict[str, str], deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client(env) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def flow_runs_of(env: dict[str, str], flow: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with client(env) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])))
