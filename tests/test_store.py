"""Maps on a store (``memory://`` in process, and a real S3-compatible server on loopback): written whole,
read back on another "machine" (another local mirror) with hash checks, bad stores refused, kills survived."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from maptools import quantize, read_manifest, read_quantinfo, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.errors import ArtifactError, MissingArtifactError, StorageError, StoreUnavailable
from maptools.examples import SMALL_CNN_SHAPES
from maptools.maps.folder import MapFolder
from maptools.simulate import simulate
from maptools.maps.store import StoreMapFolder
from tests.s3 import new_bucket
from tests.servers import free_port, kill_when_paused



def _quantize(model: Path, root: str | Path, seed: int = 0):
    return quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="m", calib_steps=8, seed=seed, output_root=root)


def _machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """Act as another machine: a local mirror of the store that shares nothing with the others."""
    cache = tmp_path / f"machine-{name}"
    monkeypatch.setenv("MAPTOOLS_CACHE", str(cache))
    return cache


def test_a_map_on_a_store_is_read_converted_and_simulated_on_another_machine(small_cnn, tmp_path,
                                                                             monkeypatch) -> None:
    url = f"memory://lab-{uuid.uuid4().hex[:8]}/maps"
    local = _quantize(small_cnn, tmp_path / "local")
    first = _machine(monkeypatch, tmp_path, "a")
    remote = _quantize(small_cnn, url)
    assert remote.output_root == url and remote.sha256 == local.sha256  # same bytes wherever they go
    assert remote.map_dir.is_relative_to(first)
    store = fsspec.filesystem("memory")
    pointer = json.loads(store.cat_file(f"/lab-{url[13:21]}/maps/mapsave/m/current.json"))
    assert store.exists(f"/lab-{url[13:21]}/maps/mapsave/m/versions/{pointer['version']}/quantinfo.pkl")

    second = _machine(monkeypatch, tmp_path, "b")
    assert not second.exists()
    assert read_manifest("m", url)["artifacts"] == local.sha256
    info = read_quantinfo("m", url)
    assert info.keys() == read_quantinfo("m", tmp_path / "local").keys()
    assert (second / "store").is_dir()  # fetched into machine b's own mirror
    converted = convert("m", output_root=url)
    assert converted.graph_path.is_relative_to(second)

    _machine(monkeypatch, tmp_path, "c")
    graph = read_graph("m", url)  # the graph machine b added is on the store, verified against the artifacts
    assert graph.meta["quantinfo_sha256"] == local.sha256["quantinfo.json"]
    run = simulate("m", "random", output_root=url, batch=2)
    assert run.batch == 2
    assert len(StoreMapFolder("m", url).versions()) == 2  # quantized, then converted: current and previous


def test_a_store_map_that_does_not_verify_is_refused(small_cnn, tmp_path, monkeypatch) -> None:
    url = f"memory://lab-{uuid.uuid4().hex[:8]}"
    _machine(monkeypatch, tmp_path, "a")
    _quantize(small_cnn, url)
    folder = StoreMapFolder("m", url)
    version = folder.pointer()["version"]
    store, base = folder.store.fs, f"{folder.remote}/versions/{version}"
    params = store.cat_file(f"{base}/quantparams.pkl")
    store.pipe_file(f"{base}/quantparams.pkl", params[:-1] + bytes([params[-1] ^ 1]))
    mirror = _machine(monkeypatch, tmp_path, "b")
    with pytest.raises(ArtifactError, match="quantparams.pkl does not match the sha256"):
        read_quantparams("m", url)
    assert not MapFolder("m", next((mirror / "store").iterdir())).exists()  # nothing unverified became readable
    store.pipe_file(f"{base}/quantparams.pkl", params)
    manifest = json.loads(store.cat_file(f"{base}/manifest.json"))
    manifest["settings"]["seed"] = 7
    store.pipe_file(f"{base}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="manifest .* does not match the sha256 in current.json"):
        read_manifest("m", url)
    with pytest.raises(MissingArtifactError, match="does not exist on the store"):
        read_manifest("other", url)


def test_bad_stores_are_refused_before_any_work(small_cnn, s3_env, monkeypatch, tmp_path) -> None:
    import s3fs

    _machine(monkeypatch, tmp_path, "a")
    with pytest.raises(StorageError, match="bucket .* does not exist") as info:
        _quantize(small_cnn, "s3://no-such-bucket/maps")
    assert "aws s3 mb" in info.value.fix
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="no credentials") as info:
        _quantize(small_cnn, "s3://any-bucket/maps")
    assert "AWS_ACCESS_KEY_ID" in info.value.fix
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, s3_env[key])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreUnavailable, match="did not answer") as info:
        read_manifest("m", "s3://any-bucket/maps")
    assert isinstance(info.value, StorageError) and "retry" in info.value.fix


@pytest.mark.parametrize("point", ["uploading", "uploaded"])
def test_a_write_killed_during_upload_leaves_the_previous_map_on_the_store(point, small_cnn, s3_env, tmp_path,
                                                                           monkeypatch) -> None:
    url = f"s3://{new_bucket()}/lab"
    _machine(monkeypatch, tmp_path, "a")
    before = _quantize(small_cnn, url, seed=0)
    code = (f"from maptools import quantize\nquantize({SMALL_CNN_SHAPES!r}, 'cpu', {str(small_cnn)!r}, mapname='m', "
            f"calib_steps=8, seed=1, output_root={url!r})\n")
    kill_when_paused(code, point, tmp_path, MAPTOOLS_CACHE=str(tmp_path / "machine-killed"))

    _machine(monkeypatch, tmp_path, "b")
    folder = StoreMapFolder("m", url)
    assert len(folder.versions()) == 2  # the previous map and the killed write's partial upload
    manifest = folder.open().verify()  # fetched and verified on a machine that never saw the map
    assert manifest["artifacts"] == before.sha256 and manifest["settings"]["seed"] == 0
    assert folder.store.fs.exists(f"{folder.remote}/.lock")  # the killed writer's lock is still there

    after = _quantize(small_cnn, url, seed=2)  # takes over the dead writer's lock, removes its upload
    assert folder.versions() == sorted(folder.versions()) and len(folder.versions()) == 2
    assert folder.open().verify()["artifacts"] == after.sha256
    assert not folder.store.fs.exists(f"{folder.remote}/.lock")


def test_concurrent_writers_of_one_map_take_turns(small_cnn, s3_env, tmp_path, monkeypatch) -> None:
    url = f"s3://{new_bucket()}/lab"
    _machine(monkeypatch, tmp_path, "a")
    results, errors = {}, []

    def write(seed: int) -> None:
        try:
            results[seed] = _quantize(small_cnn, url, seed=seed)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    folder = StoreMapFolder("m", url)
    manifest = folder.open().verify()
    assert manifest["artifacts"] in (results[0].sha256, results[1].sha256)
    assert len(folder.versions()) == 2 and not folder.store.fs.exists(f"{folder.remote}/.lock")


def test_the_command_line_takes_a_store_url(small_cnn, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from maptools_flows.cli import app

    runner = CliRunner()
    url = f"memory://lab-{uuid.uuid4().hex[:8]}/cim"
    _machine(monkeypatch, tmp_path, "a")
    done = runner.invoke(app, ["quantize", str(small_cnn), "--input-shape", "input=1,3,32,32", "--mapname", "cli",
                               "--calib-steps", "8", "--device", "cpu", "--output-root", url])
    assert done.exit_code == 0, done.output
    _machine(monkeypatch, tmp_path, "b")
    assert runner.invoke(app, ["convert", "--mapname", "cli", "--output-root", url]).exit_code == 0
    ran = runner.invoke(app, ["simulate", "--mapname", "cli", "--output-root", url, "--input", "random"])
    assert ran.exit_code == 0, ran.output
    assert "operator_graph.json" in read_manifest("cli", url)["artifacts"]
    missing = runner.invoke(app, ["convert", "--mapname", "nope", "--output-root", url])
    assert missing.exit_code != 0 and "does not exist on the store" in " ".join(missing.output.split())


def test_a_reader_whose_version_is_removed_meanwhile_reads_the_new_one(small_cnn, tmp_path, monkeypatch) -> None:
    url = f"memory://lab-{uuid.uuid4().hex[:8]}"
    _machine(monkeypatch, tmp_path, "a")
    _quantize(small_cnn, url, seed=0)
    stale = StoreMapFolder("m", url).pointer()
    _quantize(small_cnn, url, seed=1)
    newest = _quantize(small_cnn, url, seed=2)  # removes the seed-0 version (current and previous are kept)
    _machine(monkeypatch, tmp_path, "b")
    folder = StoreMapFolder("m", url)
    assert stale["version"] not in folder.versions()
    pointers = iter([stale])  # the reader resolved current.json just before the two writes
    real = folder.pointer
    monkeypatch.setattr(folder, "pointer", lambda: next(pointers, None) or real())
    assert folder.open().verify()["artifacts"] == newest.sha256
    assert not folder.mirror.stale_staging()  # the failed download left nothing behind


def test_a_lock_from_another_machine_holds_for_its_lease_and_is_renewed(s3_env, monkeypatch) -> None:
    import maptools.maps.store as store_module

    url = f"s3://{new_bucket()}/lab"
    folder = StoreMapFolder("m", url)
    lock = f"{folder.remote}/.lock"
    fs = folder.store.fs

    def held_elsewhere(expires: float) -> None:
        fs.pipe_file(lock, json.dumps({"holder": "x", "host": "another-machine", "pid": 1,
                                       "expires": expires}).encode())

    monkeypatch.setattr(store_module, "LOCK_WAIT_SECONDS", 1.0)
    held_elsewhere(time.time() + 600)  # live: only its lease tells, the pid is on another host
    with pytest.raises(StorageError, match="locked by another-machine pid 1"):
        with folder.lock():
            pass
    held_elsewhere(time.time() - 1)  # its lease ran out: the writer died there
    with folder.lock():
        assert json.loads(fs.cat_file(lock))["host"] != "another-machine"
    assert not fs.exists(lock)

    monkeypatch.setattr(store_module, "LEASE_SECONDS", 0.6)
    with folder.lock():
        time.sleep(2.0)  # three leases: renewed, never lapsed
        record = json.loads(fs.cat_file(lock))
        assert record["expires"] > time.time() and record["pid"] == os.getpid()
