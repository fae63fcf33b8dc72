"""A local S3-compatible server for the tests: ``moto_server`` (from ``moto[server]``) on a free loopback port."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port

#: credentials the test server accepts; never real ones
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "maptools-test", "AWS_SECRET_ACCESS_KEY": "maptools-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def start_s3_server(logs: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    with open(logs / "moto.log", "wb") as log:
        server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start:\n" + (logs / "moto.log").read_text()[-2000:])
                time.sleep(0.2)
        yield {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def new_bucket(env: dict[str, str] | None = None) -> str:
    """A fresh bucket on the server ``env`` (else this process's environment) points at; returns its name."""
    import s3fs

    name = f"maps-{uuid.uuid4().hex[:10]}"
    options = {} if env is None else {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
                                      "endpoint_url": env["AWS_ENDPOINT_URL"]}
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(name)
    return name
