"""Plots the flows publish (PNG bytes for files and Prefect image artifacts)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

__all__ = ["pyplot", "png_bytes", "error_and_accuracy", "layer_widths"]


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """``fig`` as PNG; the figure is closed."""
    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, dpi=dpi, format="png", bbox_inches="tight")  # legends placed outside the axes stay in
    pyplot().close(fig)
    return png.getvalue()


def error_and_accuracy(rows: list[dict[str, Any]], x: str, label: Callable[[dict[str, Any]], str], x_label: str,
                       title: str, reference: Callable[[dict[str, Any]], float | None] | None = None,
                       reference_label: str = "", log_x: bool = False) -> bytes:
    """Output error against float (log scale) and, where measured, accuracy, against ``x`` (its values as ticks,
    or a log scale with ``log_x``): one line per label, each with its ``reference`` error (e.g. the same
    quantization without crossbars) as a dashed line of its colour; the float model's accuracy as a grey line;
    legends beside the axes, not over the data."""
    from matplotlib import ticker

    from matplotlib.lines import Line2D

    has_accuracy = any(r["accuracy"] is not None for r in rows)
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault(label(r), []).append(r)
    legend_rows = math.ceil((len(lines) + 1) / 2)  # the legend goes below the axes: the figure grows with it
    fig, axes = pyplot().subplots(1, 2 if has_accuracy else 1, figsize=(12 if has_accuracy else 8,
                                                                         4.5 + 0.22 * legend_rows), squeeze=False)
    if len(lines) > 10:  # the default cycle repeats after 10 colours
        for ax in axes[0]:
            ax.set_prop_cycle(color=[pyplot().get_cmap("tab20")(i) for i in range(20)])
    ticks: dict[str, Any] = {"xscale": "log"} if log_x else {"xticks": sorted({r[x] for r in rows})}
    dashed = False
    for name, rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: r[x])
        line, = axes[0][0].plot([r[x] for r in rs], [100 * r["rel_l2"] for r in rs], marker="o", label=name)
        ref = reference(rs[0]) if reference is not None else None
        if ref:
            axes[0][0].axhline(100 * ref, color=line.get_color(), linestyle="--", linewidth=1)
            dashed = True
        if has_accuracy:
            acc = [r for r in rs if r["accuracy"] is not None]
            axes[0][1].plot([r[x] for r in acc], [100 * r["accuracy"] for r in acc], marker="o", label=name)
    ax = axes[0][0]
    ax.set(xlabel=x_label, ylabel="output error vs float, ||q - f|| / ||f|| (%)", title=title, yscale="log",
           **ticks)
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if has_accuracy:
        floats = {r["float_accuracy"] for r in rows if r.get("float_accuracy") is not None}
        if len(floats) == 1:
            axes[0][1].axhline(100 * floats.pop(), color="0.5", linestyle=":", label="float model")
        axes[0][1].set(xlabel=x_label, ylabel="top-1 accuracy (%)", title="accuracy on the evaluation set",
                       **ticks)
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if dashed and ax is axes[0][0]:  # one entry for every line's dashed reference
            handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1))
            labels.append(f"dashed, same colour: {reference_label}")
        ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  frameon=False)
    return png_bytes(fig)


def layer_widths(report: dict[str, Any], title: str) -> bytes:
    """``bit_width='auto'``: the weight and input bits chosen per layer, beside each layer's sensitivity."""
    layers = report["layers"]
    names = [layer["name"].strip("/").replace("/", "\n", 1) for layer in layers]
    x = list(range(len(layers)))
    fig, (bits, sens) = pyplot().subplots(2, 1, figsize=(max(7, 0.5 * len(layers) + 3), 7), sharex=True)
    bits.bar([i - 0.2 for i in x], [layer["weight_bits"] for layer in layers], width=0.4, label="weight bits")
    bits.bar([i + 0.2 for i in x], [layer["input_bits"] for layer in layers], width=0.4, label="input bits")
    bits.set(ylabel="bits", yticks=[2, 4, 6, 8], title=f"{title}: error {100 * report['error']:.2f}% "
             f"(uniform {100 * report['uniform_error']:.2f}%), weights {report['weight_bytes']} of "
             f"{report['uniform_weight_bytes']} bytes")
    for key, marker in (("weight_error", "o"), ("input_error", "s")):
        for b in sorted({int(k) for layer in layers for k in layer[key]}):
            sens.plot(x, [100 * layer[key].get(str(b), float("nan")) for layer in layers], marker=marker,
                      label=f"{key.split('_')[0]} at {b} bits")
    sens.set(ylabel="output error, that layer alone (%)", yscale="log")
    sens.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    for ax in (bits, sens):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return png_bytes(fig)
