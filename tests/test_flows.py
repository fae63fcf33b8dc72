"""The quantize-model flow on a real (temporary) Prefect server: caching, retries, concurrency, chaining."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from prefect import flow
from prefect.artifacts import Artifact

import maptools_flows.tasks
from maptools_flows.quantize_model import QuantizeModelResult, quantize_model
from maptools import convert, read_quantinfo
from maptools.errors import CalibrationError, StorageError, StoreUnavailable
from maptools.evaluation import evaluate_map
from maptools.examples import small_cnn_onnx
from maptools.maps.artifacts import sha256_file

SHAPES = {"input": [1, 3, 32, 32]}


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small CNN exported without onnxsim, so the flow's simplify step has work to do."""
    return small_cnn_onnx(tmp_path_factory.mktemp("flowmodels") / "small_raw.onnx", simplify=False)


@pytest.fixture
def quantize_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record every real call of maptools' quantize made by the flow's task."""
    calls: list[dict[str, Any]] = []
    real = maptools_flows.tasks.quantize

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(maptools_flows.tasks, "quantize", counting)
    yield calls


def run(model: Path, root: Path | str, mapname: str = "small", **kwargs: Any) -> QuantizeModelResult:
    return quantize_model(str(model), SHAPES, mapname, calib_steps=8, device="cpu", output_root=str(root), **kwargs)


def test_flow_runs_the_chain_and_publishes_a_report(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    result = run(raw_model, tmp_path)
    assert len(quantize_calls) == 1 and not result.quantization_cached
    assert result.model.simplified and result.model.path.parent == tmp_path / "mapsave" / ".models"
    assert result.quantization.map_dir == tmp_path / "mapsave" / "small"
    assert result.conversion is not None and result.conversion.graph_path.is_file()
    assert result.calibration.kind == "random" and result.calibration.count == 8
    # the summary, read back through the Prefect API, leads with the output error on held-out inputs
    evaluation = result.evaluation
    assert evaluation is not None and evaluation.samples == 16 and 0 < evaluation.rel_l2 < 0.2
    summary = str(Artifact.get("quant-small").data)
    assert "mapsave/small/quantinfo.pkl" in summary and str(raw_model) in summary
    assert summary.index(f"**{100 * evaluation.rel_l2:.2f}%**") < summary.index("| settings | W8A8")
    assert "weights on the crossbars |" in summary and " dB (`" in summary
    calibrated = result.quantization.errors.outputs  # and gives the error on calibration samples beside it
    assert f"| output error on calibration samples | {100 * calibrated.rel_l2:.2f}% (rel. L2" in summary
    table = Artifact.get("quant-small-layers")
    assert table is not None and "/stem/stem.0/Conv" in str(table.data)
    layers = json.loads(table.data)
    snr = [float(r["SNR dB"]) for r in layers]
    assert snr == sorted(snr) and 10 < snr[0] < 80  # worst layer first, in dB (higher is better)
    assert snr[0] == pytest.approx(-10 * math.log10(result.quantization.errors.worst), abs=0.05)


@pytest.mark.parametrize("simplify", [True, False])
def test_the_flow_prepares_the_model_once(prefect_server, raw_model, tmp_path, simplify: bool) -> None:
    """quantize recognises the flow's prepared file (same shapes and options) and uses it as it is."""
    result = run(raw_model, tmp_path, mapname=f"once-{simplify}", simplify=simplify, run_conversion=False)
    assert result.model.simplified is simplify
    assert result.quantization.sha256["model.onnx"] == result.model.sha256
    assert result.quantization.prepared["steps"] == list(result.model.steps)
    # the manifest names the user's model, as quantize called on it does; the prepared copy is its "prepared" record
    manifest = json.loads((result.quantization.map_dir / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(raw_model.resolve()) and result.model.source == manifest["model"]["path"]
    assert manifest["model"]["sha256"] == sha256_file(raw_model) == result.quantization.model_sha256
    assert manifest["model"]["prepared"]["sha256"] == result.model.sha256 != sha256_file(raw_model)
    convert(result.mapname, model_path=raw_model, output_root=tmp_path)  # (checks the model against the manifest)


def test_rerun_is_cached_and_does_not_call_ppq(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    first = run(raw_model, tmp_path)
    second = run(raw_model, tmp_path)
    assert len(quantize_calls) == 1
    assert second.quantization_cached and second.quantization.seconds == first.quantization.seconds
    copy = tmp_path / "elsewhere" / "copy.onnx"
    copy.parent.mkdir()
    shutil.copy(raw_model, copy)
    assert run(copy, tmp_path).quantization_cached and len(quantize_calls) == 1


def test_changed_byte_setting_or_refresh_misses(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    run(raw_model, tmp_path)
    model = onnx.load(str(raw_model))
    weight = model.graph.initializer[0]
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 1e-3
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    assert not run(changed, tmp_path).quantization_cached
    assert not run(raw_model, tmp_path, algorithm="minmax").quantization_cached
    assert not run(raw_model, tmp_path, refresh=True).quantization_cached
    assert len(quantize_calls) == 4


def test_changed_calibration_file_misses(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.save(folder / f"{i:02}.npy", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    first = run(raw_model, tmp_path, calib=str(folder))
    assert not first.quantization_cached
    # evaluated on the folder's samples after the 8 calibrated on, not on random inputs
    assert first.evaluation.samples == 4 and first.evaluation.source.startswith("calib/ samples 9-12 of 12")
    assert run(raw_model, tmp_path, calib=str(folder)).quantization_cached
    np.save(folder / "10.npy", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))  # a held-out sample edited
    held = run(raw_model, tmp_path, calib=str(folder))  # the same map (its samples did not change): evaluated again
    assert held.evaluation.rel_l2 == evaluate_map("small", output_root=tmp_path).rel_l2 != first.evaluation.rel_l2
    np.save(folder / "03.npy", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    result = run(raw_model, tmp_path, calib=str(folder))
    assert not result.quantization_cached and result.calibration.kind != "random"
    assert len(quantize_calls) == 3


def test_deleted_or_edited_artifact_is_recomputed(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    first = run(raw_model, tmp_path)
    first.quantization.artifacts["quantparams.npz"].unlink()
    again = run(raw_model, tmp_path)
    assert not again.quantization_cached and again.quantization.artifacts["quantparams.npz"].is_file()
    with open(again.quantization.artifacts["quantinfo.json"], "a") as f:
        f.write(" ")
    assert not run(raw_model, tmp_path).quantization_cached
    assert len(quantize_calls) == 3


def fail_first(monkeypatch: pytest.MonkeyPatch, error: Callable[[], Exception]) -> list[int]:
    attempts: list[int] = []
    real = maptools_flows.tasks.quantize

    def flaky(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(maptools_flows.tasks, "quantize", flaky)
    return attempts


@pytest.mark.parametrize("fault", [lambda: OSError(5, "Input/output error (injected)"),
                                   lambda: StoreUnavailable("the store did not answer (injected).")])
def test_transient_fault_is_retried(fault, prefect_server, raw_model, tmp_path, monkeypatch) -> None:
    attempts = fail_first(monkeypatch, fault)
    result = run(raw_model, tmp_path, mapname="retried")
    assert len(attempts) == 2 and result.quantization.quantinfo_path.is_file()


def test_a_missing_bucket_fails_once_without_retry(prefect_server, raw_model, tmp_path, s3_env,
                                                   quantize_calls) -> None:
    with pytest.raises(StorageError, match="bucket .*no-such-bucket.* does not exist"):
        run(raw_model, "s3://no-such-bucket/maps")
    assert not quantize_calls  # refused while preparing the model, which would go to the store


def test_bad_input_fails_once_without_retry(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    folder = tmp_path / "nan"
    folder.mkdir()
    for i in range(8):
        np.save(folder / f"{i}.npy", np.full((1, 3, 32, 32), np.nan if i == 5 else 0.5, np.float32))
    with pytest.raises(CalibrationError, match="sample 5"):
        run(raw_model, tmp_path, mapname="bad", calib=str(folder))
    assert len(quantize_calls) == 1
    assert not (tmp_path / "mapsave" / "bad").exists()


def test_concurrent_runs_of_one_key_compute_once(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    results: list[QuantizeModelResult] = []
    threads = [threading.Thread(target=lambda: results.append(run(raw_model, tmp_path, mapname="twice")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2 and len(quantize_calls) == 1
    assert sorted(r.quantization_cached for r in results) == [False, True]
    assert results[0].quantization.sha256 == results[1].quantization.sha256


def test_result_is_consumed_by_another_flow(prefect_server, raw_model, tmp_path) -> None:
    @flow
    def downstream(result: QuantizeModelResult) -> int:
        info = read_quantinfo(result.quantization.map)
        return sum(cfg.op_type == "Conv" for cfg in info.values())

    @flow
    def pipeline() -> int:
        return downstream(run(raw_model, tmp_path))

    assert pipeline() == 4


def test_conversion_is_cached_with_the_quantization(prefect_server, raw_model, tmp_path) -> None:
    first = run(raw_model, tmp_path, mapname="conv")
    graph = first.conversion.graph_path
    graph.unlink()
    again = run(raw_model, tmp_path, mapname="conv")
    assert again.quantization_cached and again.conversion.graph_path == graph and graph.is_file()


def test_a_cache_hit_with_a_broken_manifest_is_recomputed(prefect_server, raw_model, tmp_path) -> None:
    from maptools.maps.artifacts import verify_map

    first = run(raw_model, tmp_path, mapname="broken")
    manifest = first.quantization.map_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # truncated
    again = run(raw_model, tmp_path, mapname="broken")
    assert not again.quantization_cached and verify_map(again.quantization.map_dir)
    manifest.unlink()
    third = run(raw_model, tmp_path, mapname="broken")
    assert not third.quantization_cached and verify_map(third.quantization.map_dir)


def test_a_poisoned_result_file_cannot_run_code(prefect_server, raw_model, tmp_path, quantize_calls) -> None:
    """Cached results are maptools' JSON; a record rewritten as a pickle (or naming a foreign type) that
    would run code when loaded is refused, never loaded, and the task recomputes."""
    import base64
    import pickle

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from maptools_flows.results import SERIALIZER, UnsafeResultError, decode

    run(raw_model, tmp_path, mapname="poison")
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    records = [p for p in storage.iterdir() if p.is_file() and '"maptools_flows.results.decode"' in p.read_text()
               and "QuantizationResult" in p.read_text()]
    assert records, "run-quantization persisted no JSON record"
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    for record in records:  # the attacker's record: a pickle serializer and a payload that runs code
        data = json.loads(record.read_text())
        data["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
        data["result"] = base64.b64encode(pickle.dumps(Exploit())).decode()
        record.write_text(json.dumps(data))
    quantize_calls.clear()
    again = run(raw_model, tmp_path, mapname="poison")
    assert not marker.exists() and not again.quantization_cached and len(quantize_calls) == 1
    # and the JSON decoder rebuilds maptools' own types only: a foreign type is refused, never imported
    with pytest.raises(UnsafeResultError, match="subprocess.Popen"):
        SERIALIZER.loads(json.dumps({"__class__": "subprocess.Popen", "data": ["touch", str(marker)]}).encode())
    assert decode({"plain": 1}) == {"plain": 1} and not marker.exists()


def test_a_model_that_cannot_be_prepared_fails_with_a_maptools_error(prefect_server, tmp_path) -> None:
    """Garbage bytes, and a model onnxruntime cannot run, fail the flow once with ModelError (never retried)."""
    from onnx import TensorProto, helper

    from maptools.errors import ModelError

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model")
    unknown = tmp_path / "unknown.onnx"
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["input"], ["output"], name="n")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(unknown))
    for model in (garbage, unknown):
        with pytest.raises(ModelError) as info:
            run(model, tmp_path, mapname="bad")
        assert info.value.fix and not (tmp_path / "mapsave" / "bad").exists()


def test_flow_chooses_widths_under_a_budget_on_a_pow2_grid(prefect_server, raw_model, tmp_path) -> None:

    result = run(raw_model, tmp_path, mapname="auto", bit_width="auto", max_weight_bytes=6000, scale_policy="pow2",
                 shared_scales=True, profile="extended")
    report = result.quantization.mixed_precision
    assert report is not None and report["weight_bytes"] <= 6000 < report["uniform_weight_bytes"]
    info = read_quantinfo("auto", tmp_path)
    assert all(math.frexp(c.output_scale)[0] == 0.5 for c in info.values() if c.output_scale is not None)
    table = Artifact.get("quant-auto-bits")
    assert table is not None and all(layer["name"] in str(table.data) for layer in report["layers"])
    plot = Artifact.get("quant-auto-bits-plot")
    assert plot is not None and plot.type == "markdown" and "](data:image/png;base64," in str(plot.data)
    again = run(raw_model, tmp_path, mapname="auto", bit_width="auto", max_weight_bytes=6000, scale_policy="pow2",
                shared_scales=True, threads=1, profile="extended")  # the thread count is not part of the cache key
    assert again.quantization_cached and again.quantization.mixed_precision == report
    with pytest.raises(Exception, match="bit_width='auto' only"):
        run(raw_model, tmp_path, mapname="auto", max_weight_bytes=6000)


_ONE_FLOW = """
from prefect import flow
from maptools_flows.server import local_api

@flow
def one() -> int:
    return 1

with local_api():
    print("result", one())
"""


def test_the_command_lines_flows_start_the_local_server_with_time_to_spare(tmp_path) -> None:
    """Prefect's own start of its temporary server gives up after 20 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_
    SECONDS), which a loaded machine exceeded on a fresh PREFECT_HOME; ``maptools flow example`` and sweeps start it
    in :func:`local_api`, which waits longer. With Prefect's limit at 1 s (a flow run outside then fails: "Timed out
    while attempting to connect to ephemeral Prefect API server"), a flow run inside runs."""
    import os
    import subprocess
    import sys

    script = tmp_path / "one.py"
    script.write_text(_ONE_FLOW)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=400)
    assert "result 1" in done.stdout, (done.stdout[-500:], done.stderr[-1500:])
