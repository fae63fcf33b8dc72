"""The ``maptools`` command line."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from maptools.errors import MaptoolsError

if TYPE_CHECKING:
    from maptools.quantization import QuantizationResult

app = typer.Typer(help="Quantize ONNX CNNs with PPQ for compute-in-memory accelerators.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()


def _fail(error: MaptoolsError) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _print_result(result: QuantizationResult) -> None:
    table = Table(title=f"mapsave/{result.mapname}", show_lines=False)
    table.add_column("artifact")
    table.add_column("sha256 (first 12)")
    for name, digest in result.sha256.items():
        table.add_row(str(result.artifacts[name]), digest[:12])
    console.print(table)
    s = result.settings
    console.print(f"W{s.weight_bits}A{s.activation_bits}, {'per-channel' if s.per_channel else 'per-tensor'}, "
                  f"{s.algorithm.value}, {result.calibration.get('used')} samples on {result.device}; "
                  f"per-layer SNR median {result.errors.median:.2e}, worst {result.errors.worst:.2e} "
                  f"({result.errors.worst_layer}); {result.seconds['total']:.1f} s")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


@app.command()
def example(
    workdir: Annotated[Path, typer.Option(help="Folder for onnx_models/ and mapsave/.")] = Path("."),
    calib_steps: Annotated[int, typer.Option(help="Random calibration samples (8-512).")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Build ResNet18 (random weights, in code), simplify it with onnxsim and quantize it."""
    from maptools.examples import RESNET18_SHAPES, resnet18_onnx
    from maptools.quantization import quantize

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = resnet18_onnx(workdir / "onnx_models" / "simp-resnet18.onnx")
        console.print(f"built and simplified {model}")
        result = quantize(RESNET18_SHAPES, device, model, mapname="resnet18", calibset=None,
                          calib_steps=calib_steps, output_root=workdir.resolve())
    except MaptoolsError as e:
        _fail(e)
    _print_result(result)


@app.command()
def inspect(model: Annotated[Path, typer.Argument(help="ONNX model file.")]) -> None:
    """List a model's inputs, outputs and operator counts."""
    from maptools.onnx_model import load_model, model_inputs

    try:
        proto = load_model(model)
    except MaptoolsError as e:
        _fail(e)
    table = Table(title=str(model))
    table.add_column("kind")
    table.add_column("name")
    table.add_column("detail")
    for i in model_inputs(proto):
        table.add_row("input", i.name, f"{i.dtype} {['?' if d is None else d for d in i.dims]}")
    for o in proto.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else "?" for d in o.type.tensor_type.shape.dim]
        table.add_row("output", o.name, str(dims))
    for op, n in sorted(Counter(node.op_type for node in proto.graph.node).items()):
        table.add_row("operator", op, str(n))
    console.print(table)


if __name__ == "__main__":
    app()
