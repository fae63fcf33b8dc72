"""The temporary local Prefect server, started with time to spare on a busy machine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["local_api", "STARTUP_TIMEOUT"]

#: seconds the temporary server may take to start: 15-20 s on a fresh PREFECT_HOME, far more on a loaded machine,
#: where Prefect's own start gives up after 20 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)
STARTUP_TIMEOUT = 180


@contextlib.contextmanager
def local_api() -> Iterator[None]:
    """Inside: flows report to ``PREFECT_API_URL`` where it is set, else to Prefect's temporary local server, started
    here (waiting up to :data:`STARTUP_TIMEOUT`) and named in the settings, so other processes started inside (Dask
    workers) report to the same one instead of each starting their own."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide temporary server Prefect would start itself
    server.start(timeout=STARTUP_TIMEOUT)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield
