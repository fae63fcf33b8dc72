"""The full ``maptools`` command: the library's commands plus the Prefect flows (``maptools flow ...``).

The library (``maptools.cli``) never imports Prefect; this module adds the orchestrated commands
to the same Typer app, and the ``maptools`` console script points here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from maptools_flows.quantize_model import QuantizeModelResult, quantize_model
from maptools_flows.server import local_api
from maptools.maps.artifacts import output_location
from maptools.cli import app, fail
from maptools.errors import MaptoolsError
from maptools.metrics import per_output_line
from maptools.quantization import snr_db

flow_app = typer.Typer(help="Run the quantize-model Prefect flow (a temporary local Prefect server starts "
                            "when PREFECT_API_URL is not set).", no_args_is_help=True)
app.add_typer(flow_app, name="flow")
console = Console()


def _show(result: QuantizeModelResult) -> None:
    q = result.quantization
    table = Table(title=f"quantize-model: {result.mapname} ({'cached' if result.quantization_cached else 'computed'})")
    table.add_column("artifact")
    table.add_column("sha256 (first 12)")
    for name, digest in q.sha256.items():
        table.add_row(str(q.artifacts[name]), digest[:12])
    if result.conversion is not None:
        table.add_row(str(result.conversion.graph_path), "(operator graph)")
    console.print(table)
    e = result.evaluation
    if e is not None:
        agreement = "" if e.top1_agreement is None else f", top-1 agreement {100 * e.top1_agreement:.1f}%"
        console.print(f"output error against float {100 * e.rel_l2:.2f}% (rel. L2){agreement} on {e.samples} "
                      f"inputs: {e.source}", highlight=False)
        if per_output_line(e.per_output):
            console.print(per_output_line(e.per_output), highlight=False)
    if q.errors.per_layer:
        console.print(f"per-layer SNR median {snr_db(q.errors.median):.1f} dB, worst {snr_db(q.errors.worst):.1f} dB "
                      f"({q.errors.worst_layer}; higher is better)", highlight=False)
    console.print(", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()), highlight=False)


@flow_app.command()
def example(
    workdir: Annotated[Path, typer.Option(help="Folder for onnx_models/ and mapsave/.")] = Path("."),
    calib_steps: Annotated[int, typer.Option(help="Random calibration samples (8-512).")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Build ResNet18 (random weights, in code) and run the whole flow on it."""
    from maptools.examples import RESNET18_SHAPES

    try:
        with local_api():  # (a busy machine may take longer than Prefect's own 20 s to start the local server)
            result = quantize_model("example:resnet18", RESNET18_SHAPES, "resnet18", calib_steps=calib_steps,
                                    device=device, output_root=str(workdir.resolve()))
    except MaptoolsError as e:
        fail(e)
    _show(result)


@app.command("results-storage")
def results_storage(
    url: Annotated[str, typer.Argument(help="Store URL for Prefect results, e.g. s3://BUCKET/prefect-results.")],
    name: Annotated[str, typer.Option(help="Block document name.")] = "maptools-store",
) -> None:
    """Save a result storage block on a store, for workers on several machines to share cached results."""
    from maptools_flows.results import save_store_results

    try:
        slug = save_store_results(url, name)
    except MaptoolsError as e:
        fail(e)
    console.print(f"saved {slug} -> {url}; on every worker (and where you run flows):", highlight=False)
    console.print(f"export PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug}", highlight=False, soft_wrap=True)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep config, YAML or TOML (see examples/sweep.yaml).")],
    dask_address: Annotated[str | None, typer.Option(help="An existing Dask scheduler, e.g. tcp://host:8786 "
                                                          "(default: a local cluster).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Workers of the local cluster (default: the "
                                                            "config's, else 2).")] = None,
    output_root: Annotated[str | None, typer.Option(help="Where mapsave/ and sweeps/ go, a folder or a store URL "
                                                         "(s3://BUCKET/PREFIX); overrides the config.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows and the table files as one JSON "
                                                             "object instead of the table, for scripts.")] = False,
) -> None:
    """Design-space sweep: quantize each model at every grid point on Dask; writes a CSV/JSON table and a plot."""
    from maptools_flows.sweep import display_table, load_config, run_sweep

    try:
        cfg = load_config(config, dask_address=dask_address, workers=workers,
                          output_root=None if output_root is None else str(output_location(output_root)))
        result = run_sweep(cfg)
    except MaptoolsError as e:
        fail(e)
    if json_output:
        print(json.dumps({"name": result.name, "seconds": round(result.seconds, 3), "csv": str(result.csv_path),
                          "json": str(result.json_path), "plot": None if result.plot_path is None
                          else str(result.plot_path), "rows": result.rows}, indent=2, default=str))
        return
    rows, constant = display_table(result.rows)
    headers = [h for h in (rows[0] if rows else {}) if h != "error"]  # failures are listed below the table
    dropped = []
    while len(headers) > 1 and sum(max(len(h), *(len(r[h]) for r in rows)) + 2 for h in headers) > console.width:
        dropped.insert(0, headers.pop())  # results come first: the last columns matter least
    table = Table(title=f"design sweep {result.name}: {len(rows) - len(result.failed)}/{len(rows)} rows completed "
                        f"in {result.seconds:.1f} s", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  caption=", ".join(f"{k} {v}" for k, v in constant.items()) or None)
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(*(row[h] for h in headers))
    console.print(table)
    if dropped:
        console.print(f"not shown at this width: {', '.join(dropped)} (every column is in the table files below)",
                      highlight=False, soft_wrap=True)
    for row in result.failed:
        console.print(f"[yellow]failed[/] {row['mapname']}: {row['error']}", highlight=False, soft_wrap=True)
    console.print(f"table: {result.csv_path} and {result.json_path.name}; plot: {result.plot_path}", highlight=False,
                  soft_wrap=True)


if __name__ == "__main__":
    app()
