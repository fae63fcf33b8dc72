"""Two machines, one S3-compatible store (``moto_server`` on loopback) and one Prefect server: machine A serves
the quantize deployment, machine B the event-triggered downstream stage. They share no local path (own working
folder, PREFECT_HOME and map mirror each): maps and Prefect results travel through the store only."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maptools.maps.store import StoreMapFolder
from tests import servers
from tests.s3 import new_bucket

PARAMS = ["-p", "onnx_path=example:small_cnn", "-p", 'input_shapes={"input": [1, 3, 32, 32]}',
          "-p", "calib_steps=8", "-p", "device=cpu", "-p", "mapname=shared"]
SERVE = str(servers.ROOT / "deployments" / "serve.py")
DASK = str(Path(sys.executable).with_name("dask"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, s3_server: dict[str, str]) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("lab")
    logs = base / "logs"
    logs.mkdir()
    env = {**servers.prefect_env(base / "server-home"), **s3_server}
    procs = [servers.start_prefect_server(env, logs)]
    try:
        bucket = new_bucket(s3_server)
        saved = subprocess.run([str(Path(sys.executable).with_name("maptools")), "results-storage",
                                f"s3://{bucket}/prefect-results", "--name", "lab"], env=env, capture_output=True,
                               text=True, timeout=120)
        assert saved.returncode == 0, saved.stdout + saved.stderr
        slug = saved.stdout.split("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=")[1].split()[0]
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = slug
        machines = {}
        for name, deployment in (("a", "quantize"), ("b", "simulate-on-quantized")):
            folder = base / f"machine-{name}"
            folder.mkdir()
            machine = {**servers.prefect_env(folder / "prefect-home"), **s3_server,
                       "PREFECT_API_URL": env["PREFECT_API_URL"], "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": slug,
                       "MAPTOOLS_CACHE": str(folder / "cache")}
            procs.append(servers.start(machine, logs / f"{name}.log", sys.executable, SERVE, deployment, cwd=folder))
            machines[name] = {"env": machine, "folder": folder}
        deadline = time.monotonic() + 120
        with servers.client(env) as client:
            for flow_deployment in ("quantize-model/quantize", "simulate-quantized-run/simulate-on-quantized"):
                while True:
                    try:
                        client.read_deployment_by_name(flow_deployment)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{flow_deployment} was never served:\n"
                                               + "\n".join((logs / f).read_text()[-2000:] for f in ("a.log", "b.log")))
                        time.sleep(1)
        yield {"env": env, "bucket": bucket, "machines": machines, "logs": logs}
    finally:
        for proc in reversed(procs):
            servers.stop(proc)


def _result(env: dict[str, str], flow_run_id: Any) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from maptools_flows.results import StoreResults

    assert StoreResults.get_block_type_slug() in env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]  # its type, registered

    from prefect.events.worker import EventsWorker

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), servers.client(env) as client:
        result = client.read_flow_run(flow_run_id).state.result()
        EventsWorker.drain_all()  # the block load's events go to this server now, not to a stopped one at exit
    return result


def test_two_machines_share_maps_and_results_through_the_store(lab, s3_env, tmp_path, monkeypatch) -> None:
    env, url = lab["env"], f"s3://{lab['bucket']}/maps"
    run = servers.prefect(env, "deployment", "run", "quantize-model/quantize", *PARAMS, "-p", f"output_root={url}",
                          "--watch", "--watch-interval", "1", "--watch-timeout", "300")
    assert "Completed" in run.stdout, run.stdout + (lab["logs"] / "a.log").read_text()[-3000:]

    deadline = time.monotonic() + 240
    downstream: list[Any] = []
    while time.monotonic() < deadline and not downstream:
        downstream = [r for r in servers.flow_runs(env, "simulate-on-quantized") if r.state and r.state.is_final()]
        time.sleep(2)
    assert downstream, "the downstream stage never ran:\n" + (lab["logs"] / "b.log").read_text()[-3000:]
    assert downstream[0].state.is_completed(), downstream[0].state.message + (lab["logs"] / "b.log").read_text()[-3000:]
    result = _result(env, downstream[0].id)  # machine B's result, read back from the store
    assert result["mapname"] == "shared" and result["simulation"]["outputs"]["output"]["shape"] == [4, 10]
    assert result["crossbars"]["arrays"] > 0

    # the map on the store is whole and holds what both machines added; a third mirror verifies it
    monkeypatch.setenv("MAPTOOLS_CACHE", str(tmp_path / "reader"))
    manifest = StoreMapFolder("shared", url).open().verify()
    assert {"quantinfo.pkl", "operator_graph.json", "crossbar_map.json"} <= set(manifest["artifacts"])
    a, b = (lab["machines"][m]["folder"] for m in "ab")
    assert list(a.rglob("quantinfo.pkl")) and not list(a.rglob("crossbar_map.json"))  # A quantized only
    assert list(b.rglob("crossbar_map.json"))  # B fetched the map, mapped it, and uploaded the result
    for machine in (a, b):  # no Prefect result on a local disk: all on the store
        assert not [p for p in (machine / "prefect-home").rglob("*") if p.is_file() and "storage" in p.parts]
    store = StoreMapFolder("shared", url).store
    assert store.fs.find(f"{lab['bucket']}/prefect-results")

    # machine B runs the same quantization: a cache hit on what A computed, checked against the store's hashes
    check = ("import json; from maptools_flows.quantize_model import quantize_model\n"
             f"r = quantize_model('example:small_cnn', {{'input': [1, 3, 32, 32]}}, 'shared', calib_steps=8, "
             f"device='cpu', output_root={url!r})\n"
             "print('RESULT', json.dumps({'cached': r.quantization_cached, 'map_dir': r.map_dir, "
             "'sha256': r.quantization.sha256}))")
    done = subprocess.run([sys.executable, "-c", check], env=lab["machines"]["b"]["env"], cwd=b, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    hit = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert hit["cached"] and Path(hit["map_dir"]).is_relative_to(b)
    assert hit["sha256"] == {k: v for k, v in manifest["artifacts"].items() if k in hit["sha256"]}


@contextlib.contextmanager
def _dask_workers(address: str, names: str, base: Path, s3: dict[str, str]) -> Iterator[dict[str, Path]]:
    """Dask workers as separate processes, each with its own working folder and map mirror ("machines")."""
    procs, caches = [], {}
    try:
        for name in names:
            folder = base / f"worker-{name}"
            folder.mkdir()
            env = {**os.environ, **s3, "MAPTOOLS_CACHE": str(folder / "cache")}
            procs.append(servers.start(env, base / f"worker-{name}.log", DASK, "worker", address, "--name", name,
                                       "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", cwd=folder))
            caches[name] = folder / "cache"
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(len(names), timeout=120)
        yield caches
    finally:
        for proc in procs:
            servers.stop(proc)


def test_a_sweep_on_a_multi_worker_cluster_keeps_its_maps_on_the_store(prefect_server, small_cnn, s3_env, tmp_path,
                                                                       monkeypatch) -> None:
    from distributed import Client

    from maptools_flows.sweep import run_sweep
    from tests.test_sweep import config

    monkeypatch.setenv("MAPTOOLS_CACHE", str(tmp_path / "flow-machine"))
    url = f"s3://{new_bucket()}/lab"
    port = servers.free_port()
    scheduler = servers.start({**os.environ}, tmp_path / "scheduler.log", DASK, "scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--no-dashboard")
    address = f"tcp://127.0.0.1:{port}"
    try:
        def names_of(client: Client) -> dict[str, str]:
            return {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}

        with _dask_workers(address, "ab", tmp_path, s3_env) as caches, Client(address) as client:
            first = run_sweep(config(small_cnn, url, address, bits=[4, 8], algorithms=["percentile", "minmax"]))
            workers = names_of(client)
        assert all(r["status"] == "completed" and not r["cached"] for r in first.rows), first.rows
        assert {workers[r["worker"]] for r in first.rows} == {"a", "b"}
        for row in first.rows:  # each point's map came back to the worker that ran it, from the store
            assert Path(row["map_dir"]).is_relative_to(caches[workers[row["worker"]]])

        # new machines with empty mirrors: every point is a cache hit on what others computed, fetched from the store
        with _dask_workers(address, "cd", tmp_path, s3_env) as caches, Client(address) as client:
            again = run_sweep(config(small_cnn, url, address, bits=[4, 8], algorithms=["percentile", "minmax"]))
            workers = names_of(client)
        assert all(r["status"] == "completed" and r["cached"] for r in again.rows), again.rows
        assert [r["rel_l2"] for r in again.rows] == [r["rel_l2"] for r in first.rows]
        for row in again.rows:
            assert Path(row["map_dir"]).is_relative_to(caches[workers[row["worker"]]])
            assert StoreMapFolder(row["mapname"], url).open().verify()["artifacts"]["quantinfo.pkl"]
    finally:
        servers.stop(scheduler)
    store = StoreMapFolder("any", url).store
    assert store.fs.exists(store.join("sweeps", "t", "results.csv"))


def test_a_result_storage_block_that_reads_pickles_is_refused(lab, tmp_path) -> None:
    env = {**lab["machines"]["a"]["env"], "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "local-file-system/plain"}
    code = ("from prefect.filesystems import LocalFileSystem\n"
            f"LocalFileSystem(basepath={str(tmp_path)!r}).save('plain', overwrite=True)\n"
            "from maptools_flows.quantize_model import quantize_model\n"
            "quantize_model('example:small_cnn', {'input': [1, 3, 32, 32]}, 'plain', calib_steps=8, device='cpu')\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "LocalFileSystem, which would read back pickled results" in done.stderr, done.stderr[-3000:]
    assert "maptools results-storage" in done.stderr and not (tmp_path / "mapsave").exists()


def test_credentials_from_an_aws_credentials_block(lab, tmp_path, monkeypatch) -> None:
    """A flow run whose process has no AWS credentials at all reads and writes the store with a prefect-aws
    AwsCredentials block's; the keys appear in no map, manifest or flow parameter."""
    s3 = {k: v for k, v in lab["env"].items() if k.startswith("AWS_")}
    env = {k: v for k, v in lab["machines"]["a"]["env"].items()
           if not k.startswith("AWS_") and k != "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", MAPTOOLS_CACHE=str(tmp_path / "cache"))
    url = f"s3://{lab['bucket']}/with-block"
    code = ("from prefect_aws import AwsCredentials\n"
            "from prefect_aws.client_parameters import AwsClientParameters\n"
            f"AwsCredentials(aws_access_key_id={s3['AWS_ACCESS_KEY_ID']!r}, "
            f"aws_secret_access_key={s3['AWS_SECRET_ACCESS_KEY']!r}, region_name='us-east-1', "
            f"aws_client_parameters=AwsClientParameters(endpoint_url={s3['AWS_ENDPOINT_URL']!r})"
            ").save('lab-s3', overwrite=True)\n"
            "from maptools_flows.quantize_model import quantize_model\n"
            f"r = quantize_model('example:small_cnn', {{'input': [1, 3, 32, 32]}}, 'keyed', calib_steps=8, "
            f"device='cpu', output_root={url!r}, aws_credentials='lab-s3')\n"
            "print('MAPDIR', r.map_dir)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MAPTOOLS_CACHE", str(tmp_path / "reader"))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    folder = StoreMapFolder("keyed", url)
    manifest = folder.open().verify()
    assert "operator_graph.json" in manifest["artifacts"]
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    assert not [p for p in folder.path.resolve().iterdir() if secret.encode() in p.read_bytes()]
    (run,) = [r for r in servers.flow_runs_of(env, "quantize-model") if r.parameters.get("mapname") == "keyed"]
    assert run.parameters["aws_credentials"] == "lab-s3" and secret not in json.dumps(run.parameters)

    failed = subprocess.run([sys.executable, "-c", code.replace("aws_credentials='lab-s3'", "")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "no credentials" in failed.stderr  # without the block, the store refuses
