"""Reference pages generated from the code at build time (mkdocs-gen-files), so they cannot drift.

- ``reference/settings.md``: every field of :class:`maptools.QuantSettings` and :class:`maptools.CrossbarSpec`;
- ``reference/cli.md``: every command and option of the ``maptools`` command (the typer app);
- ``reference/manifest.md``: the ``manifest.json`` schema, from the pydantic model;
- ``reference/errors.md``: every error class, what it means, its builtin, whether a retry can help;
- ``images/*.png``: the figures of ``benchmarks/results/*.json``.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mkdocs_gen_files
import typer
from pydantic import BaseModel

import maptools
import maptools.errors
from maptools.crossbar.device import DEVICE_PRESETS, DeviceModel
from maptools.crossbar.mapping import CrossbarSpec
from maptools.maps.manifest import Manifest
from maptools.settings import QuantSettings
from maptools_flows.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _prose(text: str) -> str:
    """Sphinx roles (``:meth:`x```, ``:class:`~a.b```) as plain code, rich markup (``[bold]x[/]``) dropped."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"\[/?\w*\]", "", text)


def _cell(text: Any) -> str:
    """One table cell: on one line, with what markdown would read as a table border, link or tag escaped."""
    parts = " ".join(_prose(str(text)).split()).split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = parts[i].replace("|", "\\|").replace("[", "\\[").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _type(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(f"`{m.value}`" for m in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(f"`{value}`" for value in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "`null`"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"`{annotation.__name__}`"
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    text = text or re.sub(r"Annotated\[str, StringConstraints\([^)]*\)\]", "sha256", str(annotation))
    return "`" + re.sub(r"(typing|maptools)[.\w]*\.", "", text).replace(" | ", " or ") + "`"


def _default(value: Any) -> str:
    value = value.value if isinstance(value, enum.Enum) else value
    return "null" if value is None else f"`{json.dumps(value)}`"


def _bounds(field: Any) -> str:
    parts = []
    for item in field.metadata:
        for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, key, None) is not None:
                parts.append(f"{sign} {getattr(item, key)}")
    return ", ".join(parts)


def settings_page() -> str:
    lines = ["# Settings reference", "",
             "Generated from `maptools.settings.QuantSettings` (one definition of every quantization option: the "
             "Python API's keywords, the command line's options, the flow's parameters, the sweep's `settings` axes "
             "and the manifest's `settings` all come from these fields) and `maptools.CrossbarSpec`. A value out of "
             "bounds raises `SettingsError` naming the field and the fix. Guide: [Quantization settings]"
             "(../settings.md).", "",
             "## `QuantSettings`", "", _cell(inspect.getdoc(QuantSettings).split("\n\n")[0]), "",
             "| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, field in QuantSettings.model_fields.items():
        lines.append(f"| `{name}` | {_cell(_type(field.annotation))} | {_default(field.default)} | {_bounds(field)} | "
                     f"{_cell(field.description or '')} |")
    lines += ["", "## `CrossbarSpec`", "", "The crossbar array and its periphery (the map stage; guide: "
              "[Crossbars](../crossbar.md)).", "", "| field | type | default | bounds | meaning |",
              "|---|---|---|---|---|"]
    for name, field in CrossbarSpec.model_fields.items():
        lines.append(f"| `{name}` | {_cell(_type(field.annotation))} | {_default(field.default)} | {_bounds(field)} | "
                     f"{_cell(field.description or '')} |")
    lines += ["", "## `DeviceModel`", "", "The crossbar's cells, for `evaluate_device` (guide: [Crossbars, non-ideal "
              "cells](../crossbar.md#non-ideal-cells-monte-carlo-over-trials-and-time)); every default is an ideal "
              "cell. Presets: " + ", ".join(f"`{n}`" for n in DEVICE_PRESETS) + ".", "",
              "| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, field in DeviceModel.model_fields.items():
        lines.append(f"| `{name}` | {_cell(_type(field.annotation))} | {_default(field.default)} | {_bounds(field)} | "
                     f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    if hasattr(command, "list_commands"):  # a group (typer's own click, or click's)
        ctx = command.context_class(command, info_name=path[-1])
        for name in command.list_commands(ctx):
            yield from _commands(command.get_command(ctx, name), [*path, name])


def cli_page() -> str:
    root = typer.main.get_command(app)
    lines = ["# Command-line reference", "",
             "Generated from the `maptools` command (`maptools --help`, `maptools COMMAND --help` print the same). "
             "Guide: [The command line](../cli.md). Bad input ends with one line `error: ...` on stderr and exit "
             "code 2.", ""]
    for path, command in _commands(root, ["maptools"]):
        if len(path) > 1:
            lines += [f"## `{' '.join(path)}`", ""]
        if command.help:
            lines += [_prose(inspect.cleandoc(command.help).split("\b")[0].strip()), ""]
        with command.context_class(command, info_name=" ".join(path)) as ctx:
            lines += ["```text", command.get_usage(ctx).strip(), "```", ""]
            params = [p for p in command.get_params(ctx) if p.name != "help" and not p.hidden]
            if params:
                lines += ["| option | meaning |", "|---|---|"]
                for p in params:  # what --help prints for it: its names and metavar, its help and default
                    names, meaning = p.get_help_record(ctx) or (p.name.upper(), "")
                    lines.append(f"| {_cell('`' + names + '`')} | {_cell(meaning)} |")
                lines.append("")
    return "\n".join(lines) + "\n"


def _model_table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | required | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        lines.append(f"| `{name}` | {_cell(_type(field.annotation))} | {'yes' if field.is_required() else 'no'} | "
                     f"{_cell(field.description or '')} |")
    return lines


def manifest_page() -> str:
    from maptools.maps.manifest import ModelRecord
    from maptools.placement import PlacementReport

    schema = json.dumps(Manifest.model_json_schema(), indent=2)
    lines = ["# Manifest schema", "",
             "Generated from `maptools.maps.manifest.Manifest`. Every map folder holds a `manifest.json`: what "
             "was quantized, how, and the sha256 of every artifact (readers trust a file only when its sha256 "
             "matches). Unknown keys are kept, so a manifest round-trips unchanged. Guide: [The map folder]"
             "(../map-folder.md); read it with `maptools.read_manifest(mapname)`.", "",
             "## `manifest.json`", "", *_model_table(Manifest), "", "## `model`", "",
             _cell(inspect.getdoc(ModelRecord)), "", *_model_table(ModelRecord), "", "## `placement`", "",
             _cell(inspect.getdoc(PlacementReport).split("\n\n")[0]), "",
             "## JSON Schema", "", '??? note "The full JSON Schema"', "", "    ```json",
             *("    " + line for line in schema.splitlines()), "    ```", ""]
    return "\n".join(lines)


def errors_page() -> str:
    classes = [getattr(maptools.errors, n) for n in maptools.errors.__all__]
    lines = ["# Errors reference", "", "Generated from `maptools.errors`. " + _cell(inspect.getdoc(maptools.errors)),
             "", "Every message ends with `Fix: ...`, the fix for that case. The command line prints it as one line "
             "`error: ...` with exit code 2. The flows retry an error only where `transient` is true.", "",
             "| error | is also a | transient | what it means |", "|---|---|---|---|"]
    for cls in classes:
        bases = [b.__name__ for b in cls.__mro__[1:] if b.__module__ == "builtins" and b not in (Exception,
                                                                                                BaseException, object)]
        parent = next((b.__name__ for b in cls.__mro__[1:] if b.__module__ == cls.__module__), "")
        also = ", ".join(f"`{b}`" for b in ([parent] if parent else []) + bases)
        lines.append(f"| `{cls.__name__}` | {also} | {'yes' if cls.transient else 'no'} | "
                     f"{_cell(inspect.getdoc(cls) or '')} |")
    lines += ["", "```python", "from maptools import MaptoolsError, quantize", "", "try:",
              "    quantize({'input': [1, 3, 32, 32]}, 'cpu', 'missing.onnx', mapname='m')",
              "except MaptoolsError as e:", "    print(e.problem, '->', e.fix)", "```", ""]
    return "\n".join(lines)


RESULTS = ROOT / "benchmarks" / "results"


def figures() -> dict[str, bytes]:
    """PNG figures of the benchmark results committed under ``benchmarks/results/`` (each left out when its
    results are not there)."""
    import tempfile

    from maptools_flows.plots import png_bytes, pyplot
    from maptools_flows.sweep_report import plot_crossbar_sweep, plot_sweep

    plt = pyplot()
    out: dict[str, bytes] = {}
    sweep = RESULTS / "sweep_crossbar.json"
    if sweep.is_file():  # the flows' own plots, from the sweep's results.json
        rows = json.loads(sweep.read_text())["rows"]
        with tempfile.TemporaryDirectory() as tmp:
            for name, plot in (("sweep_bits.png", plot_sweep), ("sweep_adc.png", plot_crossbar_sweep)):
                if plot(rows, Path(tmp) / name, title="examples/sweep-crossbar.yaml") is not None:
                    out[name] = (Path(tmp) / name).read_bytes()
    adc = RESULTS / "adc_range.json"
    if adc.is_file():
        data = json.loads(adc.read_text())
        fig, ax = plt.subplots(figsize=(8, 4))
        lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in data["rows"]:
            lines.setdefault((row["xbar"], row["adc_range"]), []).append(row)
        styles = {"full": "-", "calibrated": "-", "max": ":"}
        for (xbar, adc_range), rows in sorted(lines.items()):
            ax.plot([r["adc_bits"] for r in rows], [100 * r["accuracy"] for r in rows], styles[adc_range],
                    marker="o", label=f"{xbar}, {adc_range} range")
        ax.axhline(100 * data["rows"][0]["integer_accuracy"], color="0.4", linestyle="--",
                   label="integer simulation (lossless ADC)")
        ax.set(xlabel="ADC bits", ylabel="top-1 accuracy, %", ylim=(0, 100),
               title=f"{data['model']} on crossbars, {data['cell_bits']}-bit cells")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize=8, frameon=False)
        out["adc_range.png"] = png_bytes(fig)
        if all("energy_uj" in row for row in data["rows"]):
            fig, ax = plt.subplots(figsize=(8, 4))
            for (xbar, adc_range), rows in sorted(lines.items()):
                ax.plot([r["energy_uj"] for r in rows], [100 * r["accuracy"] for r in rows], styles[adc_range],
                        marker="o", label=f"{xbar}, {adc_range} range")
            ax.set(xlabel="energy per inference, uJ (ISAAC component table; ADC bits grow to the right)",
                   ylabel="top-1 accuracy, %", ylim=(0, 100), xscale="log",
                   title=f"{data['model']} on crossbars: accuracy against energy")
            ax.grid(alpha=0.3, which="both")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize=8, frameon=False)
            out["adc_energy.png"] = png_bytes(fig)
    snr = RESULTS / "layer_snr.json"
    if snr.is_file():
        data = json.loads(snr.read_text())
        fig, ax = plt.subplots(figsize=(9, 3.6))
        for run in data["runs"]:
            ax.plot(range(len(run["layers"])), list(run["layers"].values()), marker=".",
                    label=f"W{run['weight_bits']}A{run['activation_bits']} (output error {100 * run['rel_l2']:.2f}%)")
        ax.set_xlabel(f"Conv/Gemm layer of {data['model']}, in execution order")
        ax.set_ylabel("SNR, dB (higher is better)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
        fig.tight_layout()
        out["layer_snr.png"] = png_bytes(fig)
    path = RESULTS / "real_models.json"
    if path.is_file():
        models = {name: row for name, row in json.loads(path.read_text())["models"].items()
                  if (row.get("maptools_qdq") or {}).get("metric") is not None}
        keys = [("maptools_qdq", "maptools quant_model.onnx"), ("maptools_sim", "maptools integer simulation"),
                ("onnxruntime", "onnxruntime quantize_static"), ("nncf", "NNCF")]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        width = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            values = [100 * ((row.get(key) or {}).get("metric") or 0) for row in models.values()]
            ax.bar([x + i * width for x in range(len(models))], values, width, label=label)
        ax.set_xticks([x + 1.5 * width for x in range(len(models))], list(models), rotation=20, ha="right")
        ax.set_ylabel("task metric against float, %")
        ax.set_ylim(0, 105)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncols=2, frameon=False)
        fig.tight_layout()
        out["real_models.png"] = png_bytes(fig)
    return out


for name, render in (("settings", settings_page), ("cli", cli_page), ("manifest", manifest_page),
                     ("errors", errors_page)):
    with mkdocs_gen_files.open(f"reference/{name}.md", "w") as page:
        page.write(render())
for name, data in figures().items():
    with mkdocs_gen_files.open(f"images/{name}", "wb") as image:
        image.write(data)
with mkdocs_gen_files.open("changelog.md", "w") as changelog:  # one file, CHANGELOG.md at the root
    changelog.write((ROOT / "CHANGELOG.md").read_text())
