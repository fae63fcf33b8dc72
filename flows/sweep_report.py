"""The design sweep's report: the table files, the plots, and the Prefect artifacts a reader opens first
(the axes that vary, then the results; the lowest-error point and the error/cost front)."""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from maptools_flows.plots import error_and_accuracy
from maptools_flows.sweep_config import COLUMNS, SweepConfig
from maptools.maps.artifacts import atomic_write, local_root
from maptools.quantization import snr_db
from maptools.maps.store import Store, store_errors

__all__ = ["SweepResult", "display_table", "best_points", "plot_sweep", "plot_crossbar_sweep", "plot_energy_sweep",
           "plot_device_sweep",
           "publish", "line_label"]


@dataclass(frozen=True)
class SweepResult:
    """The comparison table (one dict per point, ``COLUMNS``) and where it was written."""

    name: str
    rows: list[dict[str, Any]]
    csv_path: Path
    json_path: Path
    plot_path: Path | None
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "completed"]


def publish(config: SweepConfig, root: Path | str, table: list[dict[str, Any]], seconds: float) -> SweepResult:
    """Write ``results.csv``, ``results.json`` and the plots under ``sweeps/<name>/`` (and to the store when the
    maps are on one), and publish the table, plot and summary artifacts."""
    folder = local_root(root) / "sweeps" / config.name
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / "results.csv", folder / "results.json"
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    atomic_write(csv_path, text.getvalue())
    atomic_write(json_path, json.dumps({"name": config.name, "config": config.model_dump(),
                                        "seconds": round(seconds, 3), "rows": table}, indent=2, default=str))
    plot_path = plot_sweep(table, folder / "plot.png", title=f"design sweep {config.name}")

    key = f"sweep-{config.name}"
    rows, constant = display_table(table)
    create_table_artifact(rows, key=key, description=(
        f"Design sweep {config.name}: one row per quantization and per crossbar evaluation of it; "
        "errors are relative L2 of the outputs against float, in percent (lower is better); 'added by ADC' is the "
        "crossbar's error against the lossless integer simulation; SNR in dB (higher is better)"
        + (f". The same in every row: {', '.join(f'{k} {v}' for k, v in constant.items())}" if constant else "")
        + f". All columns: {csv_path}"))
    crossbar_plot = plot_crossbar_sweep(table, folder / "crossbar.png", title=f"crossbar sweep {config.name}")
    energy_plot = plot_energy_sweep(table, folder / "energy.png", title=f"energy per inference, {config.name}")
    device_plot = plot_device_sweep(table, folder / "device.png", title=f"device sweep {config.name}")
    for image, suffix, what in ((plot_path, "plot", "Output error against bit width"),
                                (crossbar_plot, "crossbar-plot", "Crossbar output error against ADC bits"),
                                (energy_plot, "energy-plot", "Crossbar output error against energy per inference"),
                                (device_plot, "device-plot", "Output error on non-ideal cells against time")):
        if image is not None:
            png = base64.b64encode(image.read_bytes()).decode()
            create_markdown_artifact(f"![{what}](data:image/png;base64,{png})\n\n`{image}`", key=f"{key}-{suffix}",
                                     description=what)
    if isinstance(root, str):  # maps on a store: the report goes there too
        store = Store.of(root)
        with store_errors(f"upload the report of sweep {config.name!r}", root):
            for path in (csv_path, json_path, plot_path, crossbar_plot, energy_plot, device_plot):
                if path is not None:
                    store.fs.put_file(str(path), store.join("sweeps", config.name, path.name))
    failed = [r for r in table if r["status"] != "completed"]
    crossbar_rows = sum(r["adc_bits"] is not None for r in table)
    lines = [f"# Design sweep `{config.name}`", "",
             f"{len(table) - len(failed)}/{len(table)} rows completed ({len(table) - crossbar_rows} quantizations, "
             f"{crossbar_rows} crossbar evaluations), {sum(bool(r['cached']) for r in table)} from the cache, in "
             f"{seconds:.1f} s.", "", *best_points(table), "",
             f"- table: `{csv_path}`, `{json_path}`", f"- plot: `{plot_path}`" if plot_path else "- plot: none"]
    lines += [f"- crossbar plot: `{crossbar_plot}`"] if crossbar_plot else []
    lines += [f"- energy plot: `{energy_plot}`"] if energy_plot else []
    lines += [f"- device plot: `{device_plot}`"] if device_plot else []
    lines += [f"- failed `{r['mapname']}`: {r['error']}" for r in failed]
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary", description=f"Design sweep {config.name}")
    return SweepResult(config.name, table, csv_path, json_path, plot_path, seconds)


#: what the artifact table shows: the axes that vary (the others go to the heading), then the results, most read
#: first: (column, heading, how the value is written)
_SHOWN: list[tuple[str, str, Any]] = [
    ("model", "model", str), ("bits", "bits", str), ("per_channel", "per-channel", str),
    ("algorithm", "algorithm", str), ("calib_samples", "calib samples", str), ("settings", "settings", str),
    ("xbar", "xbar", str),
    ("cell_bits", "cell bits", str), ("adc_bits", "ADC bits", str), ("adc_range", "ADC range", str),
    ("crossbar", "crossbar", str),
    ("rel_l2", "error %", lambda v: f"{100 * v:.2f}"), ("integer_rel_l2", "added by ADC %", lambda v: f"{100 * v:.2f}"),
    ("top1_agreement", "top-1 agree %", lambda v: f"{100 * v:.1f}"), ("accuracy", "accuracy %", lambda v: f"{100 * v:.1f}"),
    ("cosine", "cosine", lambda v: f"{v:.4f}"), ("worst_snr", "worst SNR dB", lambda v: f"{snr_db(v):.1f}"),
    ("weight_bytes", "weight bytes", lambda v: f"{v:,}"), ("arrays", "arrays", str),
    ("energy_uj", "energy uJ", lambda v: f"{v:.3g}"), ("latency_us", "latency us", lambda v: f"{v:.3g}"),
    ("device", "device", str), ("time_s", "time s", lambda v: f"{v:g}"), ("trials", "trials", str),
    ("rel_l2_std", "error std %", lambda v: f"{100 * v:.2f}"), ("accuracy_std", "accuracy std %",
                                                                 lambda v: f"{100 * v:.1f}"),
    ("utilization", "utilization %", lambda v: f"{100 * v:.1f}"), ("status", "status", str), ("cached", "cached", str),
    ("seconds", "s", lambda v: f"{v:.1f}"), ("error", "error", str)]
#: columns that describe a point (folded into the heading when every row has the same value)
_AXES = {"model", "bits", "per_channel", "algorithm", "calib_samples", "settings", "xbar", "cell_bits", "adc_bits",
         "adc_range", "crossbar", "device", "time_s", "trials", "status", "cached"}


def display_table(table: list[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The rows as a reader sees them: the axes that vary, then the results (percent, dB); columns empty everywhere
    dropped, and point columns with the same value in every row returned apart (for the heading)."""
    present = [(c, h, f) for c, h, f in _SHOWN if any(r[c] is not None and r[c] != "" for r in table)]
    constant = {h: f(table[0][c]) for c, h, f in present
                if c in _AXES and len(table) > 1 and len({str(r[c]) for r in table}) == 1}
    rows = [{h: "" if r[c] is None else f(r[c]) for c, h, f in present if h not in constant} for r in table]
    return rows, constant


def best_points(table: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the lowest-error row, and the rows no other beats on both error and cost (weight bytes for
    quantizations, arrays for crossbar evaluations)."""
    lines = []
    for label, cost, rows in (("quantization", "weight_bytes", [r for r in table if r["adc_bits"] is None]),
                              ("crossbar", "arrays", [r for r in table if r["adc_bits"] is not None])):
        done = [r for r in rows if r["status"] == "completed" and r["rel_l2"] is not None and r[cost] is not None]
        if not done:
            continue
        front = [r for r in done if not any(o[cost] <= r[cost] and o["rel_l2"] <= r["rel_l2"]
                                             and (o[cost], o["rel_l2"]) != (r[cost], r["rel_l2"]) for o in done)]
        best = min(done, key=lambda r: r["rel_l2"])
        lines += [f"Lowest {label} error: `{_point(best)}`, {100 * best['rel_l2']:.2f}% ({best[cost]:,} {cost})."
                  f" Error against {cost}, the front ({len(front)} of {len(done)}): "
                  + "; ".join(f"`{_point(r)}` {100 * r['rel_l2']:.2f}% at {r[cost]:,}"
                              for r in sorted(front, key=lambda r: r[cost])), ""]
    return lines


def _point(row: dict[str, Any]) -> str:
    parts = [row["model"], f"W{row['bits']}", "pc" if row["per_channel"] else "pt", row["algorithm"],
             f"n{row['calib_samples']}", *(f"{k}={v}" for k, v in json.loads(row["settings"] or "{}").items())]
    if row["adc_bits"] is not None:
        parts += [row["xbar"], f"cell{row['cell_bits']}", f"adc{row['adc_bits']}"]
        parts += [f"{row['adc_range']} range"] if row.get("adc_range") not in (None, "full") else []
        parts += [f"{k}={v}" for k, v in json.loads(row.get("crossbar") or "{}").items()]
    return " ".join(str(p) for p in parts)


def plot_sweep(table: list[dict[str, Any]], path: Path, title: str = "design sweep") -> Path | None:
    """Error (and accuracy, when measured) against bit width, one line per model / algorithm / granularity / samples."""
    done = [r for r in table if r["status"] == "completed" and r["rel_l2"] is not None and r["adc_bits"] is None]
    if not done:
        return None
    return atomic_write(path, error_and_accuracy(done, "bits", line_label(done, ("algorithm",)),
                                                 "bit width (weights and activations)", _titled(title, done)))


def _titled(title: str, rows: list[dict[str, Any]]) -> str:
    """The plot's title, with the model when there is one (its lines then leave it out)."""
    models = {r["model"] for r in rows}
    return f"{title}: {models.pop()}" if len(models) == 1 else title


def line_label(rows: list[dict[str, Any]], always: tuple[str, ...] = ()) -> Any:
    """A plot line's label: the model (where there are several), ``always``'s columns, and every other point column
    that varies."""
    vary = [k for k in ("bits", "algorithm", "per_channel", "calib_samples", "settings", "xbar", "cell_bits",
                        "adc_range", "crossbar", "device")
            if k in always or len({r.get(k) for r in rows}) > 1]
    text = {"model": lambda r: r["model"], "bits": lambda r: f"W{r['bits']}A{r['bits']}",
            "algorithm": lambda r: r["algorithm"],
            "per_channel": lambda r: "per-channel" if r["per_channel"] else "per-tensor",
            "calib_samples": lambda r: f"n={r['calib_samples']}", "xbar": lambda r: r["xbar"],
            "cell_bits": lambda r: f"{r['cell_bits']}-bit cells", "adc_range": lambda r: f"{r['adc_range']} ADC range",
            "settings": lambda r: ", ".join(f"{k}={v}" for k, v in json.loads(r["settings"] or "{}").items()),
            "crossbar": lambda r: ", ".join(f"{k}={v}" for k, v in json.loads(r.get("crossbar") or "{}").items()),
            "device": lambda r: ", ".join(f"{k}={v}" for k, v in json.loads(r.get("device") or "{}").items())}
    if len({r["model"] for r in rows}) > 1 or not vary:  # one model is named in the title, not on every line
        vary = ["model", *vary]
    return lambda r: " / ".join(text[k](r) for k in vary)


def plot_energy_sweep(table: list[dict[str, Any]], path: Path, title: str = "energy per inference") -> Path | None:
    """Error against float (and accuracy, when measured) against the crossbars' energy per inference, one line per
    model / bits / crossbar size and cell bits (its points: the other crossbar axes)."""
    done = [r for r in table
            if r["status"] == "completed" and r.get("energy_uj") is not None and r.get("device") is None]
    if not done:
        return None
    return atomic_write(path, error_and_accuracy(
        done, "energy_uj", line_label(done, ("bits", "xbar", "cell_bits")), "energy per inference (uJ, ISAAC "
        "component table)", _titled(title, done), log_x=True))


def plot_device_sweep(table: list[dict[str, Any]], path: Path, title: str = "device sweep") -> Path | None:
    """Error against float (and accuracy, when measured) against time after programming (mean over the trials), one
    line per crossbar point and device."""
    done = [r for r in table if r["status"] == "completed" and r.get("device") is not None]
    if not done:
        return None
    return atomic_write(path, error_and_accuracy(done, "time_s", line_label(done, ("device",)),
                                                 "time after programming (s)", _titled(title, done), log_x=True))


def plot_crossbar_sweep(table: list[dict[str, Any]], path: Path, title: str = "crossbar sweep") -> Path | None:
    """Error against float (and accuracy, when measured) against ADC bits, one line per model / bits / crossbar."""
    done = [r for r in table if r["status"] == "completed" and r["adc_bits"] is not None and r.get("device") is None]
    if not done:
        return None
    quantized = {r["mapname"]: r["rel_l2"] for r in table if r["adc_bits"] is None and r["status"] == "completed"}
    return atomic_write(path, error_and_accuracy(
        done, "adc_bits", line_label(done, ("bits", "xbar", "cell_bits")), "ADC bits", _titled(title, done),
        reference=lambda r: quantized.get(r["mapname"]), reference_label="without crossbars"))


