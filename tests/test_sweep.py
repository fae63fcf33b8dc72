"""The design-sweep flow on a 2-worker Dask LocalCluster (loopback) and a real Prefect server.

Grid points run in the Dask workers' processes, so they are told apart by their task states
(``cached``: run-quantization and evaluate-map both came from the cache), not by counting calls.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prefect.artifacts import Artifact
from typer.testing import CliRunner

from maptools_flows.cli import app
from maptools_flows.tasks import EvaluationSpec
from maptools_flows.sweep import (COLUMNS, Grid, ModelSpec, SweepConfig, SweepConfigError, SweepPoint, load_config,
                                  plot_sweep, run_sweep)
from maptools import quantize
from maptools.errors import InputShapeError
from maptools.evaluation import EvaluationSet, evaluate_map, float_outputs, load_evaluation_set, random_evaluation_set

SHAPES = {"input": [1, 3, 32, 32]}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sweep.yaml"
runner = CliRunner()


def config(model: Path, root: Path, address: str, name: str = "t", **grid: Any) -> SweepConfig:
    return SweepConfig(name=name, models=[ModelSpec(name="cnn", path=str(model), input_shapes=SHAPES)],
                       grid=Grid(calib_samples=[8], **grid), device="cpu", eval_samples=8, simplify=False,
                       output_root=str(root), dask_address=address)


def by_point(rows: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["bits"], r["algorithm"]): r for r in rows}


def assert_monotonic(rows: list[dict[str, Any]]) -> None:
    """Fewer bits never give a lower error for the same model and algorithm (5% slack for noise)."""
    done = [r for r in rows if r["status"] == "completed"]
    for algorithm in {r["algorithm"] for r in done}:
        errors = sorted((r["bits"], r["rel_l2"]) for r in done if r["algorithm"] == algorithm)
        for (_, low_bits_error), (_, high_bits_error) in zip(errors, errors[1:]):
            assert low_bits_error >= 0.95 * high_bits_error, (algorithm, errors)


def test_sweep_is_parallel_incremental_and_survives_bad_points(prefect_server, dask_cluster, small_cnn,
                                                               tmp_path) -> None:
    first = run_sweep(config(small_cnn, tmp_path, dask_cluster, bits=[4, 8], algorithms=["percentile", "minmax"]))
    assert len(first.rows) == 4 and all(set(r) == set(COLUMNS) for r in first.rows)
    assert all(r["status"] == "completed" and not r["cached"] and r["verified"] for r in first.rows), first.rows
    assert len({r["worker"] for r in first.rows}) == 2  # both workers took points
    points = by_point(first.rows)
    assert set(points) == {(4, "percentile"), (4, "minmax"), (8, "percentile"), (8, "minmax")}
    for algorithm in ("percentile", "minmax"):
        w4, w8 = points[4, algorithm], points[8, algorithm]
        assert w8["rel_l2"] < 0.05 < w4["rel_l2"] and w4["worst_snr"] > w8["worst_snr"]
        assert w4["weight_bytes"] < w8["weight_bytes"] and w8["cosine"] > 0.99
        assert w4["mapname"] == f"cnn-w4-pc-{algorithm}-n8"
        assert (tmp_path / "mapsave" / w4["mapname"] / "quantinfo.pkl").is_file()
    assert_monotonic(first.rows)

    # the written table, plot and artifacts
    with first.csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and list(table[0]) == COLUMNS
    assert len(json.loads(first.json_path.read_text())["rows"]) == 4
    assert first.plot_path is not None and first.plot_path.read_bytes()[:4] == b"\x89PNG"
    artifact = Artifact.get("sweep-t")
    assert artifact is not None and "minmax" in str(artifact.data)
    shown = json.loads(artifact.data)
    # the axes that vary, then the results; the one model (and what no row varies) in the heading
    assert list(shown[0])[:4] == ["bits", "algorithm", "error %", "top-1 agree %"]
    assert "model cnn" in artifact.description and "model" not in shown[0] and "xbar" not in shown[0]
    assert sorted(float(r["error %"]) for r in shown) == sorted(round(100 * r["rel_l2"], 2) for r in first.rows)
    image = Artifact.get("sweep-t-plot")
    assert image is not None and "](data:image/png;base64," in str(image.data)

    # a rerun recomputes nothing
    again = run_sweep(config(small_cnn, tmp_path, dask_cluster, bits=[4, 8], algorithms=["percentile", "minmax"]))
    assert all(r["status"] == "completed" and r["cached"] for r in again.rows), again.rows
    assert [r["rel_l2"] for r in again.rows] == [r["rel_l2"] for r in first.rows]

    # a grown grid computes only the new points; bad settings fail their own points only
    grown = run_sweep(config(small_cnn, tmp_path, dask_cluster, bits=[4, 6, 8, 9],
                             algorithms=["percentile", "minmax", "bogus"]))
    assert len(grown.rows) == 12
    rows = by_point(grown.rows)
    for bits in (4, 6, 8):
        for algorithm in ("percentile", "minmax"):
            row = rows[bits, algorithm]
            assert row["status"] == "completed" and row["cached"] == (bits != 6), row
        bogus = rows[bits, "bogus"]
        assert bogus["status"] == "failed" and "unknown calibration algorithm 'bogus'" in bogus["error"], bogus
    for algorithm in ("percentile", "minmax", "bogus"):
        row = rows[9, algorithm]
        assert row["status"] == "failed" and "weight_bits=9 is not supported" in row["error"], row
    assert_monotonic(grown.rows)
    assert len(grown.failed) == 6
    summary = Artifact.get("sweep-t-summary")
    assert summary is not None and "6/12 rows completed (12 quantizations, 0 crossbar evaluations)" in str(summary.data)
    best = min((r for r in grown.rows if r["status"] == "completed"), key=lambda r: r["rel_l2"])
    assert f"Lowest quantization error: `cnn W{best['bits']} pc {best['algorithm']} n8`" in str(summary.data)


def test_config_errors_are_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - path: m.onnx\ngrid:\n  bits: [8, four]\nworkers: 0\ncolour: red\n")
    with pytest.raises(SweepConfigError) as info:
        load_config(bad)
    message = str(info.value)
    for part in ("models.0: 'input_shapes' is required", "grid.bits.1: Input should be a valid integer", "workers: Input should "
                 "be greater than or equal to 1", "colour: Extra inputs are not permitted"):
        assert part in message, message
    (tmp_path / "syntax.toml").write_text("grid = [")
    for path, expected in ((bad, "grid.bits.1"), (tmp_path / "syntax.toml", "is not valid TOML"),
                           (tmp_path / "missing.yaml", "does not exist")):
        result = runner.invoke(app, ["sweep", str(path)])
        assert result.exit_code == 2, result.output
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_example_config_is_valid() -> None:
    example = load_config(EXAMPLE)
    assert len(example.points()) == 12 and example.models[0].example == "small_cnn"
    crossbar = load_config(EXAMPLE.parent / "sweep-crossbar.yaml")
    assert len(crossbar.points()) == 2 and len(crossbar.grid.crossbars()) == 10
    assert {c["adc_range"] for c in crossbar.grid.crossbars()} == {"full", "calibrated"}  # the ADC range is an axis


def test_cli_runs_a_toml_sweep_on_a_cluster(prefect_server, dask_cluster, small_cnn, tmp_path) -> None:
    (tmp_path / "cfg").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cfg" / "eval.npz", labels=rng.integers(0, 10, 5),
             input=rng.standard_normal((5, 3, 32, 32)).astype(np.float32))
    (tmp_path / "cfg" / "sweep.toml").write_text(
        f'name = "cli"\neval_samples = 4\nsimplify = false\noutput_root = "../out"\n'
        f'[[models]]\nname = "cnn"\npath = "{small_cnn}"\ninput_shapes = {{input = [1, 3, 32, 32]}}\n'
        f'eval_set = "eval.npz"\n'
        f'[grid]\nbits = [8]\nalgorithms = ["minmax"]\ncalib_samples = [8, 4]\n')
    result = runner.invoke(app, ["sweep", str(tmp_path / "cfg" / "sweep.toml"), "--dask-address", dask_cluster])
    assert result.exit_code == 0, result.output
    scripted = runner.invoke(app, ["sweep", str(tmp_path / "cfg" / "sweep.toml"), "--dask-address", dask_cluster,
                                   "--json"])
    assert scripted.exit_code == 0, scripted.output
    data = json.loads(scripted.stdout)  # stdout is the JSON object alone
    assert data["name"] == "cli" and [r["status"] for r in data["rows"]] == ["completed", "failed"]
    assert data["rows"][0]["cached"] and Path(data["csv"]).is_file()
    assert "1/2 rows completed" in result.stdout and "calib_steps=4" in result.stdout
    assert "…" not in result.stdout and "error %" in result.stdout  # 80 columns when piped: nothing cut short
    rows = json.loads((tmp_path / "out" / "sweeps" / "cli" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert 0 <= rows[0]["accuracy"] <= 1 and rows[0]["float_accuracy"] is not None
    assert (tmp_path / "out" / "sweeps" / "cli" / "plot.png").is_file()


def test_evaluation_with_a_labelled_set(small_result, tmp_path) -> None:
    """evaluate_map reproduces the map exactly and scores a labelled .npz (labels = the float model's classes)."""
    root = small_result.output_root
    data = random_evaluation_set(SHAPES, 6, seed=7)
    labels = np.array([int(np.argmax(o[0])) for o in float_outputs(small_result.artifacts["model.onnx"],
                                                                     data.samples)])
    np.savez(tmp_path / "eval.npz", labels=labels, inputs=np.concatenate([s["input"] for s in data.samples]))
    labelled = load_evaluation_set(tmp_path / "eval.npz", SHAPES)
    inputs = np.concatenate([s["input"] for s in data.samples])
    np.savez(tmp_path / "onehot.npz", labels=np.eye(2)[labels % 2], inputs=inputs)  # one-hot rows: refused
    with pytest.raises(InputShapeError, match=r"'labels' of shape \[6, 2\]; it holds one class index per sample"):
        load_evaluation_set(tmp_path / "onehot.npz", SHAPES)
    result = evaluate_map(small_result.mapname, output_root=root, evaluation=labelled)
    assert result.verified and result.samples == 6 and result.float_accuracy == 1.0
    assert result.accuracy == result.top1_agreement and 0 < result.rel_l2 < 0.05 and result.cosine > 0.99


def test_evaluation_defaults_to_the_calibration_folders_unread_samples(small_cnn, small_result, tmp_path) -> None:
    """A map calibrated on a folder is evaluated on that folder's samples after the calibrated ones (the calibrated
    ones where there are no others); a map calibrated on random data on random inputs."""
    rng = np.random.default_rng(5)
    arrays = [rng.uniform(-2, 2, SHAPES["input"]).astype(np.float32) for _ in range(14)]
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, array in enumerate(arrays):
        np.save(folder / f"{i:02}.npy", array)
    quantize(SHAPES, "cpu", small_cnn, mapname="f", calibset=str(folder), calib_steps=8, algorithm="percentile",
             output_root=tmp_path)
    default = evaluate_map("f", output_root=tmp_path, samples=32)
    held = evaluate_map("f", output_root=tmp_path, evaluation=EvaluationSet([{"input": a} for a in arrays[8:]]))
    assert default.samples == 6
    assert default.source == "calib/ samples 9-14 of 14, after the 8 the map's quantization read"
    assert default.rel_l2 == held.rel_l2 and default.per_output == held.per_output
    assert evaluate_map("f", output_root=tmp_path, samples=3).samples == 3
    moved = folder.rename(tmp_path / "moved")  # recognised by the content of the samples the map read
    other = evaluate_map("f", output_root=tmp_path, evaluation=str(moved), samples=4)
    assert other.source == "moved/ samples 9-12 of 14, after the 8 the map's quantization read"
    gone = evaluate_map("f", output_root=tmp_path, samples=5).source  # the default: random, saying why
    assert gone.startswith("random (seed 1234, 5 samples): the folder the map was calibrated on") and "gone" in gone
    (tmp_path / "elsewhere").mkdir()
    for i, array in enumerate(arrays[:4]):
        np.save(tmp_path / "elsewhere" / f"{i:02}.npy", array)
    assert evaluate_map("f", output_root=tmp_path, evaluation=str(tmp_path / "elsewhere")).source == \
        "elsewhere/ samples 1-4 of 4"  # another folder: from its first sample
    moved.rename(folder)
    quantize(SHAPES, "cpu", small_cnn, mapname="all", calibset=str(folder), calib_steps=14, algorithm="percentile",
             output_root=tmp_path)
    seen = evaluate_map("all", output_root=tmp_path, samples=32)
    assert seen.samples == 14 and seen.source.endswith("the samples the map was calibrated on (the folder holds no "
                                                       "others)")
    random = evaluate_map(small_result.mapname, output_root=small_result.output_root, samples=4)
    assert random.source.startswith("random")
    np.save(folder / "14.npy", arrays[1])  # a folder that held no more than the calibrated samples, grown
    grown = evaluate_map("all", output_root=tmp_path)
    assert grown.samples == 1 and grown.source == "calib/ samples 15-15 of 15, after the 14 the map's quantization read"
    np.save(folder / "00.npy", arrays[2])  # a calibrated sample edited
    assert evaluate_map("all", output_root=tmp_path).source.endswith(
        "(the folder changed since the map was calibrated: which samples it saw is not known)")
    for bad in ("one.npy", "broken.npz", "notes.txt"):  # files that are not a labelled .npz: a clear error
        (tmp_path / bad).write_bytes(b"not an array")
        with pytest.raises(InputShapeError, match="is not an .npz file of arrays"):
            evaluate_map("all", output_root=tmp_path, evaluation=tmp_path / bad)
    np.save(tmp_path / "one.npy", arrays[0])
    with pytest.raises(InputShapeError, match="is not an .npz file of arrays"):
        evaluate_map("all", output_root=tmp_path, evaluation=tmp_path / "one.npy")
    spec = EvaluationSpec.of(str(folder), 4, 0)  # a folder as the flows' eval_set: keyed on its files' bytes
    np.save(folder / "13.npy", arrays[0])
    assert spec.sha256 is not None and EvaluationSpec.of(str(folder), 4, 0).sha256 != spec.sha256


def test_plot_lines_are_one_per_varying_point(tmp_path) -> None:
    """A crossbar plot's line is one quantization on one crossbar (the axes that vary name it), and its dashed
    reference is that quantization's error without crossbars."""
    from maptools_flows.sweep_report import line_label, plot_crossbar_sweep

    rows = []
    for a in ("percentile", "minmax"):
        point = SweepPoint("cnn", 8, True, a, 8, (("scale_policy", "pow2"),))
        rows.append(point.row(status="completed", rel_l2=0.01))
        rows += [point.row(status="completed", rel_l2=0.3 / adc, xbar="64x64", cell_bits=2, adc_bits=adc)
                 for adc in (4, 6, 8)]
    crossbar = [r for r in rows if r["adc_bits"] is not None]
    label = line_label(crossbar, ("bits", "xbar", "cell_bits"))
    assert {label(r) for r in crossbar} == {"W8A8 / percentile / 64x64 / 2-bit cells",
                                        "W8A8 / minmax / 64x64 / 2-bit cells"}  # the one model is in the title
    path = plot_crossbar_sweep(rows, tmp_path / "x.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    other = [{**r, "model": "resnet"} for r in crossbar[:3]]
    label = line_label(crossbar + other, ("bits", "xbar", "cell_bits"))
    assert {label(r) for r in other} == {"resnet / W8A8 / percentile / 64x64 / 2-bit cells"}


def test_plot_has_an_accuracy_panel(tmp_path) -> None:
    rows = [SweepPoint("cnn", b, True, a, 8).row(status="completed", rel_l2=0.5 / b ** 2, accuracy=1 - 1 / b)
            for b in (4, 6, 8) for a in ("percentile", "minmax")]
    rows.append(SweepPoint("cnn", 9, True, "minmax", 8).row(status="failed", error="weight_bits=9"))
    path = plot_sweep(rows, tmp_path / "plot.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_sweep(rows[-1:], tmp_path / "none.png") is None


def test_gpu_sweep_needs_gpu_workers(prefect_server, dask_cluster, small_cnn, tmp_path) -> None:
    """Points of a cuda sweep take a GPU resource; a cluster without one fails at once instead of hanging."""
    gpu = config(small_cnn, tmp_path, dask_cluster, bits=[8]).model_copy(update={"device": "cuda"})
    with pytest.raises(SweepConfigError, match="has a GPU resource"):
        run_sweep(gpu)


def test_crossbar_axes_add_a_row_per_crossbar(prefect_server, dask_cluster, small_cnn, tmp_path) -> None:
    cfg = config(small_cnn, tmp_path, dask_cluster, name="xb", bits=[8], algorithms=["minmax"], xbar=["64x64"],
                 cell_bits=[2], adc_bits=[4, 12, 99], crossbar={"encoding": ["differential", "offset"]})
    first = run_sweep(cfg)
    assert [(r["adc_bits"], r["crossbar"]) for r in first.rows] == [(None, None)] + [
        (bits, json.dumps({"encoding": encoding})) for bits in (4, 12, 99) for encoding in ("differential", "offset")]
    # any other CrossbarSpec field is an axis too: an offset-encoded weight takes one column instead of two
    offset = {r["adc_bits"]: r for r in first.rows[1:] if "offset" in r["crossbar"]}
    assert offset[12]["integer_rel_l2"] == 0.0 and offset[12]["arrays"] < first.rows[3]["arrays"]
    quantized, coarse, lossless, bad = (first.rows[0], *(r for r in first.rows[1:] if "differential" in r["crossbar"]))
    assert quantized["status"] == coarse["status"] == lossless["status"] == "completed", first.rows
    assert all(r["mapname"] == quantized["mapname"] and r["xbar"] == "64x64" for r in first.rows[1:])
    # 12 bits read every partial sum of a 64-row array of 2-bit cells (64 * 3): exactly the integer simulation
    assert lossless["integer_rel_l2"] == 0.0 and lossless["integer_agreement"] == 1.0
    assert coarse["integer_rel_l2"] > 0 and coarse["rel_l2"] > lossless["rel_l2"] and coarse["arrays"] > 0
    assert bad["status"] == "failed" and "adc_bits=99 is out of range" in bad["error"]
    # the energy per inference: ADC energy grows 2x a bit, and offset columns halve the conversions
    assert 0 < coarse["energy_uj"] < lossless["energy_uj"] and offset[12]["energy_uj"] < lossless["energy_uj"]
    assert coarse["latency_us"] == lossless["latency_us"] > 0
    for plot in ("crossbar", "energy"):
        assert (tmp_path / "sweeps" / "xb" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
        assert Artifact.get(f"sweep-xb-{plot}-plot") is not None
    again = run_sweep(cfg)
    assert [r["cached"] for r in again.rows[:5]] == [True] * 5, again.rows
    with pytest.raises(ValueError, match="give both 'xbar' and 'adc_bits'"):
        Grid(bits=[8], xbar=["64x64"])
    with pytest.raises(ValueError, match="with the grid's 'xbar' axis"):
        Grid(bits=[8], crossbar={"rows": [64]})
    with pytest.raises(ValueError, match="'colour' is not a crossbar setting"):
        Grid(bits=[8], crossbar={"colour": ["red"]})


def test_device_axes_add_a_row_per_device_and_time(prefect_server, dask_cluster, small_cnn, tmp_path) -> None:
    """Device axes (a preset and any DeviceModel field) and read times: each crossbar point is also simulated on
    each device, one row per time with the trials' mean and std; drift without compensation costs more."""
    cfg = config(small_cnn, tmp_path, dask_cluster, name="dev", bits=[8], algorithms=["minmax"], xbar=["64x64"],
                 adc_bits=[12], device={"preset": ["pcm"], "compensation": [True, False]}, times=[1.0, 86400.0],
                 device_trials=2)
    rows = run_sweep(cfg).rows
    devices = [r for r in rows if r["device"] is not None]
    assert [(json.loads(r["device"])["compensation"], r["time_s"]) for r in devices] == [
        (True, 1.0), (True, 86400.0), (False, 1.0), (False, 86400.0)]
    assert all(r["status"] == "completed" and r["trials"] == 2 and r["rel_l2_std"] >= 0 for r in devices), devices
    on, off = devices[1], devices[3]
    assert off["rel_l2"] > 2 * on["rel_l2"]
    assert (tmp_path / "sweeps" / "dev" / "device.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="DEVICE_PRESETS"):
        Grid(bits=[8], xbar=["64x64"], adc_bits=[8], device={"preset": ["rram"]})
    with pytest.raises(ValueError, match="not a device setting"):
        Grid(bits=[8], xbar=["64x64"], adc_bits=[8], device={"colour": [1]})
