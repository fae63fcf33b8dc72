"""Non-ideal cells (:mod:`maptools.crossbar.device`) against analytic predictions, and the Monte Carlo
evaluation of a map through them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maptools import (DEVICE_PRESETS, CrossbarSpec, DeviceModel, SettingsError, convert, evaluate_crossbar,
                      evaluate_device, quantize, read_graph, read_quantparams)
from maptools.crossbar.device import CellStates
from maptools.crossbar.mapping import CrossbarSimulator
from maptools.examples import SMALL_CNN_SHAPES
from maptools.simulate import IntegerSimulator, load_inputs

LEVELS = 4  # 2-bit cells


@pytest.fixture(scope="module")
def cnn_map(small_cnn: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    root = tmp_path_factory.mktemp("device")
    result = quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="cnn", calib_steps=8, output_root=root,
                      error_steps=0)
    convert(result.map)
    return result.map


def _products(device: DeviceModel, levels: torch.Tensor, x: torch.Tensor, trials: int, time: float = 0.0
              ) -> torch.Tensor:
    """``x @ levels read`` of ``trials`` independent draws of the cells: ``[trials, cols]``."""
    return torch.stack([x @ CellStates(levels, LEVELS, device, "layer/0/0", t).read_levels(time)[0].double()
                        for t in range(trials)])


def test_an_ideal_device_keeps_the_crossbar_simulation_exact(cnn_map) -> None:
    """Cells without non-idealities, and cells whose noise is far below one level (through the noisy path,
    every partial sum read from float conductances), compute what the integer simulation computes, code for
    code, with a lossless ADC."""
    graph, params = read_graph(cnn_map), read_quantparams(cnn_map)
    x = load_inputs(graph, "random", batch=2)
    reference = IntegerSimulator(graph, params).run(x, keep=True)
    spec = CrossbarSpec(rows=64, cols=64, adc_bits=12)
    for device in (DeviceModel(g_min=0.1), DeviceModel(g_min=0.1, programming_noise=1e-9, read_noise=1e-9)):
        run = CrossbarSimulator(graph, params, spec, device=device).run(x, keep=True)
        assert all(np.array_equal(reference.codes[t], run.codes[t]) for t in reference.codes), device


def test_programming_and_read_noise_variances_match_the_analytic_prediction() -> None:
    """With programming noise on every cell (and, separately, read noise), a column's product with fixed inputs
    varies over 1000 trials as predicted: sigma^2 ((L-1) / (1 - g_min))^2 sum_i x_i^2 (g_i^2 for read noise),
    within 5%; its mean stays the ideal product."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, LEVELS, (1, 64, 32), generator=gen).to(torch.float64)
    x = torch.randint(0, 128, (64,), generator=gen).to(torch.float64)
    g_min, sigma = 0.5, 0.02  # no conductance comes near zero: nothing is clipped
    scale = (LEVELS - 1) / (1 - g_min)
    g = g_min + (1 - g_min) * levels[0] / (LEVELS - 1)
    for device, predicted in (
            (DeviceModel(g_min=g_min, programming_noise=sigma, compensation=False),
             (sigma * scale) ** 2 * torch.full((32,), float((x ** 2).sum()), dtype=torch.float64)),
            (DeviceModel(g_min=g_min, read_noise=sigma, compensation=False),
             (sigma * scale) ** 2 * ((x[:, None] * g) ** 2).sum(dim=0))):
        products = _products(device, levels, x, 1000)
        ideal = x @ levels[0]
        assert float(products.var(dim=0).sum() / predicted.sum()) == pytest.approx(1.0, abs=0.05), device
        assert torch.allclose(products.mean(dim=0), ideal, rtol=0, atol=4 * float(predicted.max().sqrt()) / 30)


def test_stuck_cells_fall_inside_the_binomial_interval() -> None:
    levels = torch.ones((1, 500, 400), dtype=torch.float64)
    device = DeviceModel(g_min=0.1, stuck_on=0.01, stuck_off=0.02)
    programmed = CellStates(levels, LEVELS, device, "layer/0/0", 0).programmed
    n = programmed.numel()
    for rate, value in ((0.01, 1.0), (0.02, 0.1)):
        count = int((programmed == value).sum())
        assert abs(count - n * rate) < 4 * np.sqrt(n * rate * (1 - rate)), (rate, count)
    assert int(((programmed != 1.0) & (programmed != 0.1)).sum()) == pytest.approx(n * 0.97, rel=0.01)


def test_global_drift_compensation_restores_the_mean_output() -> None:
    """A year after programming, with drift exponents spread across cells, the compensated product's mean over
    trials is within 1% of the ideal one; uncompensated, it has lost a third or more."""
    gen = torch.Generator().manual_seed(1)
    levels = torch.randint(1, LEVELS, (1, 128, 16), generator=gen).to(torch.float64)
    x = torch.randint(0, 128, (128,), generator=gen).to(torch.float64)
    ideal = float((x @ levels[0]).sum())
    drift = DeviceModel(drift_nu=0.06, drift_nu_sigma=0.02, t0=20.0)
    year = 365 * 86400.0
    compensated = float(_products(drift, levels, x, 100, year).sum(dim=1).mean())
    uncompensated = float(_products(drift.replace(compensation=False), levels, x, 100, year).sum(dim=1).mean())
    assert compensated == pytest.approx(ideal, rel=0.01)
    assert uncompensated < 0.67 * ideal


def test_evaluate_device_reports_trials_at_each_time(cnn_map) -> None:
    spec = CrossbarSpec(rows=64, cols=64, adc_bits=12)
    ideal = evaluate_device(cnn_map, spec, DeviceModel(), trials=2, samples=4)
    exact = evaluate_crossbar(cnn_map, spec, samples=4)
    assert ideal.points[0].rel_l2[:2] == (exact.rel_l2, 0.0)
    pcm = DEVICE_PRESETS["pcm"].replace(compensation=False)
    result = evaluate_device(cnn_map, spec, pcm, trials=3, times=[0.0, 86400.0], samples=4)
    assert [p.time for p in result.points] == [0.0, 86400.0] and result.device["model"] == "pcm"
    for point in result.points:
        mean, std, (low, high) = point.rel_l2
        assert std > 0 and low < mean < high and point.trials == 3
    assert result.points[1].rel_l2[0] > result.points[0].rel_l2[0] > exact.rel_l2  # drift, then noise alone
    with pytest.raises(SettingsError, match="trials"):
        evaluate_device(cnn_map, spec, pcm, trials=0)
    with pytest.raises(SettingsError, match="g_min"):
        DeviceModel(g_min=1.0)


def test_ir_drop_scales_each_cell_by_its_wire_distance(cnn_map) -> None:
    """First-order IR drop: with no other non-ideality a column's product is ``x @ (levels * (1 - ir_drop * d))``,
    ``d`` each cell's wire distance (row + column over rows + cols - 2); the farthest cell loses ``ir_drop``. On
    the CNN the output error grows with the drop, and compensation takes back part of it."""
    gen = torch.Generator().manual_seed(1)
    levels = torch.randint(0, LEVELS, (1, 64, 32), generator=gen).to(torch.float64)
    x = torch.randint(0, 128, (64,), generator=gen).to(torch.float64)
    wire = (torch.arange(64)[:, None] + torch.arange(32)[None, :]).double() / (64 + 32 - 2)
    device = DeviceModel(ir_drop=0.2, compensation=False)
    read = CellStates(levels, LEVELS, device, "layer/0/0", 0, wire.float()).read_levels(0.0)[0].double()
    assert torch.allclose(x @ read, x @ (levels[0] * (1 - 0.2 * wire)), rtol=1e-6)
    assert float(read[63, 31]) == pytest.approx(float(levels[0, 63, 31]) * (1 - 0.2 * 94 / 94), rel=1e-6)
    spec = CrossbarSpec(rows=64, cols=64, adc_bits=12)
    errors = {(drop, comp): evaluate_device(cnn_map, spec, DeviceModel(ir_drop=drop, compensation=comp), trials=1,
                                            samples=4).points[0].rel_l2[0]
              for drop in (0.02, 0.2) for comp in (False, True)}
    assert errors[0.02, False] < errors[0.2, False] and errors[0.2, True] < errors[0.2, False], errors


def test_the_reram_preset_follows_its_published_fits_over_time() -> None:
    """The ``reram`` preset (Wan et al., Nature 2022, as aihwkit fits it): cells at g_max deviate from their target
    with the fitted std at 1 s (programming), at 1 day (a fresh deviation: ReRAM wanders, it does not drift),
    and in between as the log-time interpolation of the fits; stuck cells stay stuck."""
    levels = torch.full((1, 200, 100), LEVELS - 1, dtype=torch.float64)
    device = DEVICE_PRESETS["reram"].replace(compensation=False)
    cells = CellStates(levels, LEVELS, device, "layer/0/0", 0)
    fits = {1.0: (0.348, 16.030, -43.853, 45.393, -16.815), 86400.0: (0.701, 22.086, -50.773, 47.095, -16.458)}
    for time, coeffs in fits.items():
        read = cells.conductances(time)
        assert float(read.std()) == pytest.approx(sum(coeffs) / 40, rel=0.05), time
        assert float(read.mean()) == pytest.approx(1.0, abs=0.01)
    assert sum(fits[1.0]) / 40 < float(cells.conductances(3600.0).std()) < sum(fits[86400.0]) / 40
    stuck = CellStates(levels, LEVELS, device.replace(stuck_off=0.5), "layer/0/0", 0)
    assert torch.equal(stuck.conductances(86400.0)[stuck.stuck], stuck.programmed[stuck.stuck])
