"""Thin Prefect tasks of the map stage: convert-map, map-crossbars, simulate-crossbar and their report.

``map-crossbars`` and ``simulate-crossbar`` are cached on content: the hashes of the map's
artifacts they read (:class:`MapContent`), the crossbar spec, the evaluation data and the code.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from maptools_flows.plots import png_bytes, pyplot
from maptools_flows.quantize_model import QuantizeModelResult
from maptools_flows.tasks import _CACHE, _PERSIST, _RETRY, EvaluationSpec, _artifact_key
from maptools import conversion
from maptools.artifacts import MapFolder
from maptools.crossbar_error import CrossbarError, evaluate_crossbar
from maptools.errors import ArtifactError
from maptools.evaluation import load_evaluation_set
from maptools.mapping import CROSSBAR_FILE, CrossbarMap, CrossbarSpec, map_crossbars

__all__ = ["MapContent", "MapAndSimulateResult", "PipelineResult", "convert_map", "map_crossbars_task",
           "simulate_crossbar", "publish_crossbar_report", "crossbar_file_current", "plot_crossbar_map"]


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
    data = None
    if evaluation.eval_set is not None:
        from maptools.conversion import read_graph

        graph = read_graph(content.mapname, content.output_root)
        data = load_evaluation_set(evaluation.eval_set, graph.inputs, limit=evaluation.samples)
    return evaluate_crossbar(content.mapname, spec, output_root=content.output_root, evaluation=data,
                             samples=evaluation.samples, seed=evaluation.seed)


def plot_crossbar_map(mapped: CrossbarMap) -> bytes:
    """PNG: utilization and ADC bits (worst case and observed) per layer."""
    layers = mapped.layers
    x = list(range(len(layers)))
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(max(7.0, 0.28 * len(layers) + 2), 6.5), sharex=True)
    top.bar(x, [100 * lay.utilization for lay in layers], color="tab:blue")
    top.set(ylabel="utilization (%)", ylim=(0, 100),
            title=f"{mapped.spec.rows}x{mapped.spec.cols}, {mapped.spec.cell_bits}-bit cells: {mapped.arrays} arrays, "
                  f"{100 * mapped.utilization:.1f}% of cells used")
    top.grid(True, axis="y", alpha=0.3)
    bottom.step(x, [lay.adc_bits_needed for lay in layers], where="mid", label="lossless, worst case")
    observed = [lay.adc_bits_observed for lay in layers]
    if any(v is not None for v in observed):
        bottom.plot(x, [v if v is not None else float("nan") for v in observed], "o", label="lossless, observed")
    bottom.axhline(mapped.spec.adc_bits, color="tab:red", linestyle="--", label=f"ADC ({mapped.spec.adc_bits} bits)")
    bottom.set(ylabel="ADC bits", xlabel="layer")
    bottom.set_xticks(x, [lay.name for lay in layers], rotation=90, fontsize=7)
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.legend(fontsize=8)
    return png_bytes(fig, dpi=100)


def _bits(values: set[int]) -> str:
    return "/".join(str(v) for v in sorted(values)) or "-"


@task(name="publish-crossbar-report")
def publish_crossbar_report(mapname: str, mapped: CrossbarMap, error: CrossbarError, map_dir: str = "") -> str:
    """Prefect artifacts: a summary that leads with what the crossbars lost and cost, the per-layer table
    (ADC bits and utilization first) and an inline utilization / ADC-bits plot."""
    key = _artifact_key(mapname).replace("quant-", "xbar-", 1)
    s = mapped.spec
    create_table_artifact([{"layer": lay.name, "ADC bits observed": lay.adc_bits_observed,
                            "ADC bits worst case": lay.adc_bits_needed, "utilization %": f"{100 * lay.utilization:.1f}",
                            "arrays": lay.arrays, "W/A bits": f"{lay.weight_bits}/{lay.input_bits}",
                            "cycles": lay.cycles, "matrix": f"{lay.groups}x{lay.rows}x{lay.cols}",
                            "psum observed": lay.psum_observed, "psum worst": lay.psum_worst}
                           for lay in mapped.layers], key=f"{key}-layers",
                          description=f"{mapname} on {s.rows}x{s.cols} crossbars with a {s.adc_bits}-bit ADC, per "
                                      "layer (ADC bits a lossless readout needs: observed on sample inputs, and in "
                                      "the worst case; matrix: groups x rows x columns)")
    png = base64.b64encode(plot_crossbar_map(mapped)).decode()
    create_markdown_artifact(f"![utilization and ADC bits per layer of {mapname}](data:image/png;base64,{png})",
                             key=f"{key}-plot", description=f"{mapname}: utilization and ADC bits per layer")
    observed = max((lay.adc_bits_observed for lay in mapped.layers if lay.adc_bits_observed is not None), default=None)
    accuracy = (f"{100 * error.accuracy:.1f}% (integer {100 * error.integer_accuracy:.1f}%, float "
                f"{100 * error.float_accuracy:.1f}%)" if error.accuracy is not None else "-")
    lines = [f"# `{mapname}` on {s.rows}x{s.cols} crossbars", "",
             "| output error vs float (rel. L2) | top-1 agreement | accuracy | added by the crossbars (rel. L2 vs the "
             "lossless integer simulation) | agreement with it | inputs |", "|---|---|---|---|---|---|",
             f"| **{100 * error.rel_l2:.2f}%** | {100 * error.top1_agreement:.1f}% | {accuracy} | "
             f"{100 * error.integer_rel_l2:.2f}% | {100 * error.integer_agreement:.1f}% | {error.samples} "
             f"({error.source}) |", "",
             "| arrays | utilization | cycles / inference | ADC bits (spec) | ADC bits a lossless readout needs: "
             "observed / worst case |", "|---|---|---|---|---|",
             f"| {mapped.arrays} | {100 * mapped.utilization:.1f}% | {mapped.cycles:,} | {s.adc_bits} | "
             f"{'-' if observed is None else observed} / "
             f"{max((lay.adc_bits_needed for lay in mapped.layers), default=0)} |", "",
             f"Quantization: W{_bits({lay.weight_bits for lay in mapped.layers})}"
             f"A{_bits({lay.input_bits for lay in mapped.layers})}. Crossbar: {s.cell_bits}-bit cells ({s.encoding}), "
             f"{s.dac_bits}-bit inputs per cycle, {s.adc_bits}-bit ADC." + (f" Map: `{map_dir}`." if map_dir else ""),
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

    def summary(self) -> dict[str, Any]:
        """JSON-friendly totals and errors."""
        return {"mapname": self.mapname, **self.crossbars.to_json()["totals"], "error": self.error.to_dict(),
                "cached": self.cached}


@dataclass(frozen=True)
class PipelineResult:
    """Every stage's typed result: quantization (and conversion), then crossbars."""

    quantization: QuantizeModelResult
    crossbars: MapAndSimulateResult
