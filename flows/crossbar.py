"""Thin Prefect tasks of the map stage: convert-map, map-crossbars, simulate-crossbar and their report.

``map-crossbars`` and ``simulate-crossbar`` are cached on content: the hashes of the map's
artifacts they read (:class:`MapContent`), the crossbar spec, the evaluation data and the code.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from maptools_flows.plots import png_bytes, pyplot
from maptools_flows.quantize_model import QuantizeModelResult
from maptools_flows.tasks import (_CACHE, _PERSIST, _RETRY, EvaluationSpec, _artifact_key, _pct,
                                  _per_output_table)
from maptools import conversion
from maptools.maps.artifacts import MapFolder
from maptools.crossbar.device import DeviceModel
from maptools.crossbar.evaluation import CrossbarError, DeviceEvaluation, evaluate_crossbar, evaluate_device
from maptools.errors import ArtifactError
from maptools.crossbar.mapping import CROSSBAR_FILE, CrossbarMap, CrossbarSpec, map_crossbars

__all__ = ["MapContent", "MapAndSimulateResult", "PipelineResult", "convert_map", "map_crossbars_task",
           "simulate_crossbar", "simulate_device", "publish_crossbar_report", "publish_device_report",
           "crossbar_file_current", "plot_crossbar_map", "plot_device", "plot_device_noise", "short_names"]


@dataclass(frozen=True)
class MapContent:
    """A converted map by content: its folder and the sha256 of every artifact the map stage reads."""

    mapname: str
    output_root: str
    sha256: dict[str, str]


@task(name="convert-map", **_RETRY)
def convert_map(mapname: str, output_root: str) -> MapContent:
    """The map's operator graph (built now unless a verified one is registered) and the map's content."""
    manifest = MapFolder(mapname, output_root).open().verified()
    if conversion.GRAPH_FILE not in manifest.artifacts:
        conversion.convert(mapname, output_root=output_root)
        manifest = MapFolder(mapname, output_root).open().verified()
    hashes = {k: v for k, v in manifest.artifacts.items() if k != CROSSBAR_FILE}
    return MapContent(mapname, output_root, dict(sorted(hashes.items())))


@task(name="map-crossbars", cache_policy=_CACHE, **_PERSIST, **_RETRY)
def map_crossbars_task(content: MapContent, spec: CrossbarSpec, psum_samples: int, seed: int) -> CrossbarMap:
    """Tile, slice and count the map on ``spec``; observed partial sums on ``psum_samples`` seeded inputs;
    ``crossbar_map.json`` registered in the map."""
    return map_crossbars(content.mapname, spec, output_root=content.output_root, samples=psum_samples, seed=seed)


def crossbar_file_current(content: MapContent, mapped: CrossbarMap) -> bool:
    """True when the map registers exactly this ``crossbar_map.json`` (a cached result still describes the map)."""
    try:
        manifest = MapFolder(content.mapname, content.output_root).open().record()
    except ArtifactError:
        return False
    return manifest.artifacts.get(CROSSBAR_FILE) == hashlib.sha256(mapped.to_bytes()).hexdigest()


@task(name="simulate-crossbar", cache_policy=_CACHE, **_PERSIST, **_RETRY)
def simulate_crossbar(content: MapContent, spec: CrossbarSpec, evaluation: EvaluationSpec) -> CrossbarError:
    """The crossbar-level simulation against the float model and the integer simulation (cached on content)."""
    return evaluate_crossbar(content.mapname, spec, output_root=content.output_root, evaluation=evaluation.eval_set,
                             samples=evaluation.samples, seed=evaluation.seed)


@task(name="simulate-device", cache_policy=_CACHE, **_PERSIST, **_RETRY)
def simulate_device(content: MapContent, spec: CrossbarSpec, device: DeviceModel, evaluation: EvaluationSpec,
                    trials: int, times: list[float]) -> DeviceEvaluation:
    """Monte Carlo over ``device``'s cells: ``trials`` draws, each read at every time in ``times`` (cached on
    content)."""
    return evaluate_device(content.mapname, spec, device, output_root=content.output_root, trials=trials,
                           times=times, evaluation=evaluation.eval_set, samples=evaluation.samples,
                           seed=evaluation.seed)


def _scored(points: list[Any]) -> tuple[str, str] | None:
    """What the left plot shows for these device points: accuracy where every point has it, else top-1 agreement
    where every point has it (its attribute and axis label); None where neither (an image or boxes come out)."""
    for attribute, label in (("accuracy", "top-1 accuracy (%)"), ("top1_agreement", "top-1 agreement with float (%)")):
        if all(getattr(p, attribute) is not None for p in points):
            return attribute, label
    return None


def plot_device(runs: dict[str, DeviceEvaluation], title: str) -> bytes:
    """Accuracy (top-1 agreement with float where there are no labels; left out for outputs that are not class
    scores) and output error against time after programming, mean +- one standard deviation over the trials, one
    line per run."""
    scored = _scored([p for run in runs.values() for p in run.points])
    fig, axes = pyplot().subplots(1, 2 if scored else 1, figsize=(12 if scored else 6, 4.2), squeeze=False)
    error_ax = axes[0][-1]
    for label, run in runs.items():
        times = [max(p.time, 1e-1) for p in run.points]
        for ax, values in (((axes[0][0], [getattr(p, scored[0]) for p in run.points]),) if scored else ()) + (
                (error_ax, [p.rel_l2 for p in run.points]),):
            mean = [100 * v[0] for v in values]
            std = [100 * v[1] for v in values]
            line, = ax.plot(times, mean, marker="o", label=label)
            ax.fill_between(times, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
    first = next(iter(runs.values()))
    if scored:
        axes[0][0].set(ylabel=scored[1], ylim=(0, 100))
        if scored[0] == "accuracy" and first.float_accuracy is not None:
            axes[0][0].axhline(100 * first.float_accuracy, color="0.5", linestyle=":", label="float model")
    error_ax.set(ylabel="output error vs float, rel. L2 (%)", yscale="log")
    for ax in axes[0]:
        ax.set(xscale="log", xlabel="time after programming (s)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return png_bytes(fig)


def plot_device_noise(noise: dict[float, DeviceEvaluation], title: str) -> bytes:
    """Accuracy (or top-1 agreement, as :func:`plot_device`) and output error against the scale of the device's
    noise, at the first read time, mean +- one standard deviation over the trials."""
    scales = sorted(noise)
    firsts = [noise[s].points[0] for s in scales]
    scored = _scored(firsts)
    fig, axes = pyplot().subplots(1, 2 if scored else 1, figsize=(12 if scored else 6, 4.2), squeeze=False)
    panels = ((axes[0][0], [getattr(p, scored[0]) for p in firsts]),) if scored else ()
    for ax, values in (*panels, (axes[0][-1], [p.rel_l2 for p in firsts])):
        mean, std = [100 * v[0] for v in values], [100 * v[1] for v in values]
        ax.errorbar(scales, mean, yerr=std, marker="o", capsize=3)
        ax.set(xscale="log", xticks=scales, xticklabels=[f"{s:g}x" for s in scales], title=title,
               xlabel=f"noise scale (x the preset's programming and read noise) at {firsts[0].time:g} s")
        ax.grid(True, which="both", alpha=0.3)
    if scored:
        axes[0][0].set(ylabel=scored[1], ylim=(0, 100))
    axes[0][-1].set(ylabel="output error vs float, rel. L2 (%)", yscale="log")
    return png_bytes(fig)


def _mean_std(value: tuple[float, float, Any] | None) -> str:
    """A share's mean +- std over the trials, in percent (``-`` where it is not measured)."""
    return "-" if value is None else f"{100 * value[0]:.1f}% +- {100 * value[1]:.1f}"


@task(name="publish-device-report")
def publish_device_report(mapname: str, runs: dict[str, DeviceEvaluation],
                          noise: dict[float, DeviceEvaluation] | None = None) -> str:
    """A markdown artifact: accuracy and output error against time after programming and, with ``noise``, against
    the noise's scale (plots inline), and the table of means, standard deviations and 95% intervals."""
    key = _artifact_key(mapname).replace("quant-", "device-", 1)
    first = next(iter(runs.values()))
    title = f"{mapname}: {first.device['model']} cells, {first.points[0].trials} trials"
    png = base64.b64encode(plot_device(runs, title)).decode()
    lines = [f"# `{mapname}` on non-ideal cells", "", f"![accuracy against time](data:image/png;base64,{png})", ""]
    if noise:
        png = base64.b64encode(plot_device_noise(noise, title)).decode()
        lines += [f"![accuracy against noise](data:image/png;base64,{png})", ""]
        runs = {**runs, **{f"noise x{scale:g}": run for scale, run in sorted(noise.items())}}
    lines += ["| run | time after programming (s) | output error (rel. L2), mean +- std | top-1 agreement | accuracy |",
             "|---|---|---|---|---|"]
    for label, run in runs.items():
        for p in run.points:
            accuracy = _mean_std(p.accuracy)
            lines.append(f"| {label} | {p.time:g} | {100 * p.rel_l2[0]:.2f}% +- {100 * p.rel_l2[1]:.2f} | "
                         f"{_mean_std(p.top1_agreement)} | {accuracy} |")
    lines += ["", f"{first.samples} samples ({first.source}); {first.seconds_per_trial:.3f} s per trial and time."]
    return str(create_markdown_artifact("\n".join(lines), key=key, description=f"{mapname} on non-ideal cells"))


def short_names(names: list[str], width: int = 28) -> list[str]:
    """Layer labels a reader can scan: the path's last parts (``/layer1/layer1.0/conv1/Conv`` ->
    ``layer1.0/conv1``), the operator type dropped, cut to ``width`` characters from the left."""
    labels = []
    for name in names:
        parts = [p for p in name.split("/") if p]
        if len(parts) > 1 and parts[-1][:1].isupper():  # torch's exporter ends a path with the op type
            parts = parts[:-1]
        # a module's name, then its child's: /layer2/layer2.0/downsample/downsample.0 -> layer2.0/downsample.0
        parts = [p for i, p in enumerate(parts) if i + 1 == len(parts) or not parts[i + 1].startswith(p + ".")]
        label = "/".join(parts[-2:]) or name
        labels.append(label if len(label) <= width else "..." + label[-(width - 3):])
    return labels


def plot_crossbar_map(mapped: CrossbarMap) -> bytes:
    """PNG: utilization and ADC bits (worst case and observed) per layer, one horizontal row per layer (first
    layer on top), legend outside the data."""
    layers = mapped.layers
    y = list(range(len(layers)))
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11.0, max(3.5, 0.22 * len(layers) + 1.8)), sharey=True,
                                           gridspec_kw={"width_ratios": [1, 1.2]})
    left.barh(y, [100 * lay.utilization for lay in layers], color="tab:blue")
    left.set(xlabel="utilization (% of the layer's cells)", xlim=(0, 100))
    left.set_yticks(y, short_names([lay.name for lay in layers]), fontsize=7)
    left.invert_yaxis()
    left.grid(True, axis="x", alpha=0.3)
    worst = [lay.adc_bits_needed for lay in layers]
    observed = [lay.adc_bits_observed for lay in layers]
    if any(v is not None for v in observed):
        right.hlines([i for i, v in zip(y, observed) if v is not None], [v for v in observed if v is not None],
                     [w for w, v in zip(worst, observed) if v is not None], color="0.8", linewidth=2)
        right.plot([v if v is not None else float("nan") for v in observed], y, "o", markersize=4, color="tab:green",
                   label="lossless readout, observed")
    right.plot(worst, y, "s", markersize=4, color="tab:blue", label="lossless readout, worst case")
    right.axvline(mapped.spec.adc_bits, color="tab:red", linestyle="--", label=f"ADC of the spec ({mapped.spec.adc_bits} bits)")
    right.set(xlabel="ADC bits")
    right.xaxis.set_major_locator(pyplot().MaxNLocator(integer=True))
    right.grid(True, axis="x", alpha=0.3)
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(f"{mapped.spec.rows}x{mapped.spec.cols}, {mapped.spec.cell_bits}-bit cells: {mapped.arrays} arrays, "
                 f"{100 * mapped.utilization:.1f}% of cells used", fontsize=10)
    return png_bytes(fig, dpi=100)


def _bits(values: set[int]) -> str:
    return "/".join(str(v) for v in sorted(values)) or "-"


@task(name="publish-crossbar-report")
def publish_crossbar_report(mapname: str, mapped: CrossbarMap, error: CrossbarError, map_dir: str) -> str:
    """Prefect artifacts: a summary that leads with what the crossbars lost and cost, the per-layer table
    (ADC bits and utilization first) and an inline utilization / ADC-bits plot."""
    key = _artifact_key(mapname).replace("quant-", "xbar-", 1)
    s, cost = mapped.spec, mapped.cost
    create_table_artifact([{"layer": lay.name, "ADC bits observed": lay.adc_bits_observed,
                            "ADC bits worst case": lay.adc_bits_needed, "utilization %": f"{100 * lay.utilization:.1f}",
                            "arrays": f"those of {lay.shares}" if lay.shares else lay.arrays,
                            "W/A bits": f"{lay.weight_bits}/{lay.input_bits}",
                            "cycles": lay.cycles, "matrix": f"{lay.groups}x{lay.rows}x{lay.cols}",
                            "psum observed": lay.psum_observed, "psum worst": lay.psum_worst,
                            "energy nJ": f"{price.total_pj / 1e3:.4g}", "latency us": f"{price.latency_ns / 1e3:.4g}"}
                           for lay, price in zip(mapped.layers, cost.layers)], key=f"{key}-layers",
                          description=f"{mapname} on {s.rows}x{s.cols} crossbars with a {s.adc_bits}-bit ADC "
                                      f"({s.adc_range} range), per layer (ADC bits a lossless readout needs: observed "
                                      "on sample inputs, and in the worst case; matrix: groups x rows x columns)")
    png = base64.b64encode(plot_crossbar_map(mapped)).decode()
    create_markdown_artifact(f"![utilization and ADC bits per layer of {mapname}](data:image/png;base64,{png})",
                             key=f"{key}-plot", description=f"{mapname}: utilization and ADC bits per layer")
    observed = max((lay.adc_bits_observed for lay in mapped.layers if lay.adc_bits_observed is not None), default=None)
    accuracy = (f"{100 * error.accuracy:.1f}% (integer {100 * error.integer_accuracy:.1f}%, float "
                f"{100 * error.float_accuracy:.1f}%)" if error.accuracy is not None else "-")
    lines = [f"# `{mapname}` on {s.rows}x{s.cols} crossbars", "",
             "| output error vs float (rel. L2) | top-1 agreement | accuracy | added by the crossbars (rel. L2 vs the "
             "lossless integer simulation) | agreement with it | inputs |", "|---|---|---|---|---|---|",
             f"| **{100 * error.rel_l2:.2f}%** | {_pct(error.top1_agreement, 1)} | {accuracy} | "
             f"{100 * error.integer_rel_l2:.2f}% | {_pct(error.integer_agreement, 1)} | {error.samples} "
             f"({error.source}) |", "", *_per_output_table(error.per_output),
             "| arrays | utilization | cycles / inference | ADC bits (spec) | ADC bits a lossless readout needs: "
             "observed / worst case |", "|---|---|---|---|---|",
             f"| {mapped.arrays} | {100 * mapped.utilization:.1f}% | {mapped.cycles:,} | {s.adc_bits} | "
             f"{'-' if observed is None else observed} / "
             f"{max((lay.adc_bits_needed for lay in mapped.layers), default=0)} |", "",
             "| energy per inference | of it in ADCs | latency | area | component table |", "|---|---|---|---|---|",
             f"| {cost.total_pj / 1e6:.4g} uJ | {100 * cost.energy_pj['adc'] / max(cost.total_pj, 1e-30):.0f}% | "
             f"{cost.latency_ns / 1e3:.4g} us | {cost.area_mm2:.4g} mm2 ({cost.tiles} tiles) | {cost.table} "
             f"({s.cols_per_adc} columns per ADC) |", "",
             f"Quantization: W{_bits({lay.weight_bits for lay in mapped.layers})}"
             f"A{_bits({lay.input_bits for lay in mapped.layers})}. Crossbar: {s.cell_bits}-bit cells ({s.encoding}), "
             f"{s.dac_bits}-bit inputs per cycle, {s.adc_bits}-bit ADC ({s.adc_range} range). Map: `{map_dir}`.",
             f"\n{error.seconds_per_sample:.3f} s per sample (integer simulation "
             f"{error.integer_seconds_per_sample:.3f} s)."]
    return str(create_markdown_artifact("\n".join(lines), key=key, description=f"{mapname} on crossbars"))


# Results of the flows (defined here, in an importable module, so a result read back in another process
# unpickles whatever file a worker loaded the flow from).

@dataclass(frozen=True)
class MapAndSimulateResult:
    """The map on crossbars (``crossbar_map.json``'s content) and what the crossbar simulation lost."""

    mapname: str
    content: MapContent
    crossbars: CrossbarMap
    error: CrossbarError
    cached: bool
    seconds: dict[str, float]
    #: Monte Carlo over non-ideal cells (the flow's ``device``): per run (drift compensation on, off)
    device: dict[str, DeviceEvaluation] = field(default_factory=dict)
    #: the same device with its noise scaled (``{scale: run}``, the first read time)
    device_noise: dict[float, DeviceEvaluation] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly totals and errors."""
        return {"mapname": self.mapname, **self.crossbars.to_json()["totals"], "error": self.error.to_dict(),
                "cached": self.cached, **({"device": {k: v.to_dict() for k, v in self.device.items()}}
                                          if self.device else {})}


@dataclass(frozen=True)
class PipelineResult:
    """Every stage's typed result: quantization (and conversion), then crossbars."""

    quantization: QuantizeModelResult
    crossbars: MapAndSimulateResult
