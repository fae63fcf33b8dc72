"""The map stage in Prefect (real temporary server): the pipeline flow, its cache, its artifacts; and
evaluate_crossbar against the integer simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prefect.artifacts import Artifact

import maptools_flows.crossbar
from maptools_flows.crossbar import short_names
from maptools_flows.pipeline import PipelineResult, map_and_simulate, quantize_map_simulate
from maptools.maps.artifacts import MapFolder
from maptools.crossbar.evaluation import evaluate_crossbar
from maptools.errors import SettingsError
from maptools.examples import small_cnn_onnx
from maptools.crossbar.mapping import CROSSBAR_FILE, CrossbarSpec

SHAPES = {"input": [1, 3, 32, 32]}


@pytest.fixture(scope="module")
def pipeline(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    model = small_cnn_onnx(root / "small.onnx")
    result = quantize_map_simulate(str(model), SHAPES, "pipe", calib_steps=8, device="cpu", output_root=str(root),
                                   xbar="64x64", cell_bits=2, adc_bits=12, samples=8)
    return result, root


def test_pipeline_quantizes_maps_and_simulates(pipeline) -> None:
    result, root = pipeline
    crossbars = result.crossbars
    assert result.quantization.conversion is not None and crossbars.mapname == "pipe"
    manifest = MapFolder("pipe", root).open().verify()
    written = json.loads((root / "mapsave" / "pipe" / CROSSBAR_FILE).read_text())
    assert manifest["artifacts"][CROSSBAR_FILE] and written["totals"]["arrays"] == crossbars.crossbars.arrays > 0
    # a 12-bit ADC reads every partial sum of 64-row arrays (worst 64 * 3 = 192 < 4096): nothing lost
    assert crossbars.error.integer_rel_l2 == 0.0 and crossbars.error.integer_agreement == 1.0
    assert crossbars.error.samples == 8 and crossbars.error.rel_l2 > 0
    assert result.quantization.evaluation.samples == 8  # the report's two rows measure on the same inputs
    # the artifacts, read back through the Prefect API: results first, units said, the plot inline
    table = Artifact.get("xbar-pipe-layers")
    assert table is not None
    layers = json.loads(table.data)
    assert list(layers[0])[:3] == ["layer", "ADC bits observed", "ADC bits worst case"]
    assert len(layers) == len(crossbars.crossbars.layers) and all(0 < float(r["utilization %"]) <= 100 for r in layers)
    plot = Artifact.get("xbar-pipe-plot")
    assert plot is not None and str(plot.data).startswith("![") and "(data:image/png;base64," in str(plot.data)
    summary = str(Artifact.get("xbar-pipe").data)
    assert "64x64" in summary and "W8A8" in summary and str(root / "mapsave" / "pipe") in summary
    assert f"**{100 * crossbars.error.rel_l2:.2f}%**" in summary  # the answer leads, in percent
    assert "| 12 | " in summary  # the spec's ADC bits beside the observed / worst-case ones
    # the pipeline's own run has a summary naming both stages' answers
    run = str(Artifact.get("run-pipe").data)
    assert f"{100 * result.quantization.evaluation.rel_l2:.2f}%" in run and f"{crossbars.crossbars.arrays} arrays" in run


def test_plot_labels_are_short_and_distinct() -> None:
    names = ["/conv1/Conv", "/layer2/layer2.0/downsample/downsample.0/Conv", "/layer3/layer3.0/downsample/downsample.0/Conv",
             "/layer1/layer1.0/conv2/Conv", "fc", "p2o.Conv.12", "/backbone/" + "very_long_module_name_" * 3 + "/Conv"]
    labels = short_names(names)
    assert labels[:6] == ["conv1", "layer2.0/downsample.0", "layer3.0/downsample.0", "layer1.0/conv2", "fc",
                          "p2o.Conv.12"]
    assert len(labels[6]) == 28 and labels[6].startswith("...") and labels[6].endswith("name_")


def test_map_and_simulate_is_cached_and_remaps_a_lost_file(pipeline, monkeypatch) -> None:
    _, root = pipeline
    calls: list[Any] = []
    real = maptools_flows.crossbar.map_crossbars

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(maptools_flows.crossbar, "map_crossbars", counting)
    again = map_and_simulate("pipe", str(root), xbar="64x64", cell_bits=2, adc_bits=12, samples=8)
    assert again.cached and calls == []
    # another spec is another key; the lossy ADC loses something against the integer simulation
    lossy = map_and_simulate("pipe", str(root), xbar="64x64", cell_bits=2, adc_bits=4, samples=8)
    assert not lossy.cached and len(calls) == 1 and lossy.error.integer_rel_l2 > 0
    # the map now registers the 4-bit map: the cached 12-bit result no longer describes it, so it is redone
    back = map_and_simulate("pipe", str(root), xbar="64x64", cell_bits=2, adc_bits=12, samples=8)
    assert len(calls) == 2 and not back.cached
    assert json.loads(MapFolder("pipe", root).open().file(CROSSBAR_FILE).read_text())["spec"]["adc_bits"] == 12


def test_map_and_simulate_publishes_accuracy_against_time_on_a_device(pipeline) -> None:
    """``device='pcm'``: Monte Carlo trials at each time after programming, with and without drift compensation,
    as a plot and table artifact; without compensation a day of drift costs far more output error."""
    _, root = pipeline
    result = map_and_simulate("pipe", str(root), xbar="64x64", cell_bits=2, adc_bits=12, samples=4, device="pcm",
                              device_trials=2, device_times=[1.0, 86400.0])
    on, off = result.device["drift compensation on"], result.device["drift compensation off"]
    assert [p.time for p in on.points] == [1.0, 86400.0] and on.points[0].trials == 2
    assert off.points[1].rel_l2[0] > 2 * on.points[1].rel_l2[0]
    noise = result.device_noise  # the preset's noise halved and doubled, read at the first time
    assert sorted(noise) == [0.5, 1.0, 2.0] and noise[2.0].points[0].rel_l2[0] > noise[0.5].points[0].rel_l2[0]
    artifact = Artifact.get("device-pipe")
    assert artifact is not None and artifact.data.count("data:image/png;base64,") == 2
    assert "86400" in artifact.data and "noise x2" in artifact.data
    assert "device" in result.summary() and "energy per inference" in Artifact.get("xbar-pipe").data


def test_bad_crossbar_specs_fail_before_any_work(pipeline) -> None:
    _, root = pipeline
    for bad in (dict(xbar="100x64"), dict(xbar="64"), dict(cell_bits=9)):
        with pytest.raises(Exception, match="power of two|ROWSxCOLS|cell_bits"):
            map_and_simulate("pipe", str(root), **bad)
    with pytest.raises(SettingsError, match="budget"):
        map_and_simulate("pipe", str(root), xbar="64x64", max_arrays=1)


def test_evaluate_crossbar_is_lossless_with_enough_adc_bits(pipeline) -> None:
    _, root = pipeline
    exact = evaluate_crossbar("pipe", CrossbarSpec(rows=32, cols=32, cell_bits=4, adc_bits=12, encoding="offset"),
                              output_root=root, samples=4)
    assert exact.integer_rel_l2 == 0.0 and exact.arrays > 0 and exact.adc_bits_needed <= 12
    coarse = evaluate_crossbar("pipe", CrossbarSpec(rows=32, cols=32, cell_bits=4, adc_bits=3, encoding="offset"),
                               output_root=root, samples=4)
    assert coarse.integer_rel_l2 > 0.01 and coarse.rel_l2 > exact.rel_l2


def test_a_model_whose_output_is_an_image_is_reported_without_a_top1_figure(tmp_path) -> None:
    """A denoiser's output has no class: its crossbar and device evaluations carry no top-1 agreement (argmax over
    the pixels had read as one), and the device plots show the output error alone."""
    import torch

    from maptools import DEVICE_PRESETS, convert, evaluate_device, quantize
    from maptools.examples import export_onnx

    torch.manual_seed(0)
    model = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(4, 3, 3, padding=1)), tmp_path / "denoise.onnx",
                        {"x": [1, 3, 8, 8]})
    quantize({"x": [1, 3, 8, 8]}, "cpu", model, mapname="denoise", calib_steps=8, output_root=tmp_path, error_steps=0)
    convert("denoise", output_root=tmp_path)
    spec = CrossbarSpec(rows=64, cols=64, adc_bits=12)
    error = evaluate_crossbar("denoise", spec, output_root=tmp_path, samples=4)
    assert error.top1_agreement is None and error.integer_agreement is None and 0 <= error.rel_l2 < 0.1
    drift = evaluate_device("denoise", spec, DEVICE_PRESETS["pcm"], output_root=tmp_path, trials=2, times=[1.0],
                            samples=2)
    assert drift.points[0].top1_agreement is None and drift.points[0].rel_l2[0] > 0
    for png in (maptools_flows.crossbar.plot_device({"pcm": drift}, "denoise"),
                maptools_flows.crossbar.plot_device_noise({1.0: drift}, "denoise")):
        assert png.startswith(b"\x89PNG")
