"""The ``maptools`` command line: ``quantize``, ``inspect``, ``example``.

Bad input, whether a maptools error or a usage error (a wrong option, a bad value), ends with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from pydantic import BaseModel

from maptools.crossbar.mapping import CrossbarSpec
from maptools.errors import InputShapeError, MaptoolsError, SettingsError, StorageError
from maptools.evaluation import EVAL_SEED
from maptools.metrics import per_output_line
from maptools.settings import (MULTIPLIER_BITS, ActivationSign, CalibrationAlgorithm, Optimization, Profile,
                               QuantSettings, ScalePolicy, field_bounds)

if TYPE_CHECKING:
    from maptools.quantization import QuantizationResult

console = Console()


def _setting(model: type[BaseModel], name: str, *decls: str, note: str = "", **options: Any) -> Any:
    """The option that sets ``model``'s field ``name``: its help (plus ``note``) and bounds are the field's."""
    bounds = field_bounds(model, name)
    return typer.Option(*decls, help=escape(f"{model.model_fields[name].description}{note}"), min=bounds.get("ge"),
                        max=bounds.get("le"), **options)


def _error_line(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


#: Python spellings the command line writes otherwise: a keyword whose option has another name, the budgets
_SPELLED = [(r"\bbit_width=", "bits="), (r"\b(?:budget=)?\{'output_error': ([\w.]+)\}", r"max_error=\1"),
            (r"\{'error_ratio': ([\w.]+)\}", r"max_error_ratio=\1"),
            (r"\{'weight_bytes': ([\w.]+)\}", r"max_weight_bytes=\1")]


def _as_options(text: str, ctx: typer.Context) -> str:
    """``text`` with each Python keyword argument of the command's options (``profile='extended'``,
    ``budget={'output_error': 0.05}``) written as its option (``--profile extended``, ``--max-error 0.05``)."""
    options = {p.name: p.opts[0] for p in ctx.command.params if p.opts and p.opts[0].startswith("--")}
    for pattern, spelled in _SPELLED:
        text = re.sub(pattern, spelled, text)
    return re.sub(r"\b(\w+)=(?:'([^']*)'|([\w.-]+))",
                  lambda m: f"{options[m[1]]} {m[2] if m[2] is not None else m[3]}" if m[1] in options else m[0], text)


def fail(error: MaptoolsError, ctx: typer.Context | None = None) -> NoReturn:
    """Print ``error`` as one line on stderr (with the command's ``ctx``, Python keywords written as its options)
    and exit with code 2 (bad input)."""
    _error_line(str(error) if ctx is None else _as_options(str(error), ctx))
    raise typer.Exit(2)


class _OneLineErrors(TyperGroup):
    """Turns usage errors and maptools errors into one line on stderr and exit code 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's usage errors, as typer vendors click
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                ctx = getattr(e, "ctx", None)
                _error_line(e.format_message().rstrip(".") + (f" (see '{ctx.command_path} --help')" if ctx else ""))
            sys.exit(e.exit_code)
        except MaptoolsError as e:
            _error_line(str(e))
            sys.exit(2)
        except typer.Abort:
            _error_line("aborted.")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(help="Quantize ONNX CNNs with PPQ for compute-in-memory accelerators.\n\n"
                       "Start with [bold]maptools quantize --help[/]; [bold]maptools inspect MODEL.onnx[/] shows a "
                       "model's inputs.", cls=_OneLineErrors, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


def _print_widths(report: dict) -> None:
    table = Table(title=f"bit_width=auto: error {report['error']:.4f} (uniform {report['uniform_error']:.4f}), "
                        f"weights {report['weight_bytes']} of {report['uniform_weight_bytes']} bytes")
    for column in ("layer", "type", "params", "weight bits", "input bits"):
        table.add_column(column)
    for layer in report["layers"]:
        table.add_row(layer["name"], layer["op_type"], str(layer["params"]), str(layer["weight_bits"]),
                      str(layer["input_bits"]))
    console.print(table)


def _print_result(result: QuantizationResult) -> None:
    from maptools.quantization import snr_db

    s = result.settings
    errors = result.errors
    calib = result.calibration
    source = f" ({calib.get('root') or calib['type']})" if "root" in calib or "type" in calib else ""
    table = Table(title=f"quantized -> {result.map_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("settings", f"W{s.weight_bits}A{s.activation_bits}, "
                  f"{'per-channel' if s.per_channel else 'per-tensor'} weights, {s.algorithm.value} activations "
                  f"({'unsigned where non-negative' if s.unsigned_activations else 'signed'}), "
                  f"optimization {s.optimization.value}, {s.scale_policy.value} scales, {result.profile.value} profile"
                  f"{', shared at Add/Concat' if s.shared_scales else ''}"
                  f"{f', {len(s.layer_bits)} layers with their own widths' if s.layer_bits else ''}")
    table.add_row("calibration", f"{calib['kind']}{source}: {calib.get('used')} of {calib.get('count')} samples, "
                  f"seed {s.seed}")
    table.add_row("device", result.device)
    if result.placement is not None:
        table.add_row("placement", result.placement.summary())
    if errors.outputs is not None:
        out = errors.outputs
        table.add_row("output error", f"{out.rel_l2:.2%} rel. L2 against float"
                      + ("" if out.top1_agreement is None else f", top-1 agreement {out.top1_agreement:.1%}")
                      + f", on {out.source}" + (f"; {line}" if (line := per_output_line(out.per_output)) else ""))
    if errors.per_layer:
        table.add_row("layer SNR", f"median {snr_db(errors.median):.1f} dB, worst {snr_db(errors.worst):.1f} dB "
                      f"({errors.worst_layer}); higher is better")
    table.add_row("time", ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    table.add_row("artifacts", ", ".join(result.artifacts))
    console.print(table)
    if result.mixed_precision is not None:
        _print_widths(result.mixed_precision)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def _parse_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or min(shape) <= 0:
            raise typer.BadParameter(f"{spec!r} is not NAME=D0,D1,... with positive integers "
                                     "(one per input, e.g. input=1,3,224,224).", param_hint="'--input-shape'")
        if name in shapes:
            raise typer.BadParameter(f"input {name!r} is given twice ({name}={','.join(map(str, shapes[name]))} and "
                                     f"{spec}): give each input once.", param_hint="'--input-shape'")
        shapes[name] = shape
    return shapes


def _parse_layer_bits(specs: Sequence[str]) -> dict[str, tuple[int, int]]:
    layers: dict[str, tuple[int, int]] = {}
    for spec in specs:
        name, sep, bits = spec.rpartition("=")
        widths = bits.split(",")
        if not sep or not name or len(widths) != 2 or not all(w.strip().isdigit() for w in widths):
            raise typer.BadParameter(f"{spec!r} is not NODE=WEIGHT_BITS,INPUT_BITS (e.g. /stem/Conv=8,6).",
                                     param_hint="'--layer-bits'")
        layers[name] = (int(widths[0]), int(widths[1]))
    return layers


def _model_shapes(model: Path) -> dict[str, list[int]]:
    """The input shapes fixed in the model itself; InputShapeError where a dimension is dynamic."""
    from maptools.onnx_model import load_model, model_inputs

    shapes: dict[str, list[int]] = {}
    for i in model_inputs(load_model(model)):
        if any(d is None for d in i.dims):
            example = ",".join(str(d) if d is not None else "1" if axis == 0 else f"<D{axis}>"
                               for axis, d in enumerate(i.dims))
            raise InputShapeError(f"input {i.name!r} of {model} has dynamic dimensions "
                                  f"{['?' if d is None else d for d in i.dims]}.",
                                  f"pass --input-shape {i.name}={example} with your sizes (batch first); "
                                  f"'maptools inspect {model}' shows the model's axes.")
        shapes[i.name] = [int(d) for d in i.dims if d is not None]
    return shapes


class _CalibrationBar(Progress):
    """A progress bar that appears with the first calibration sample (not for inputs refused earlier)."""

    def __init__(self, hidden: bool = False) -> None:
        super().__init__(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=console, disable=hidden)

    def __enter__(self) -> _CalibrationBar:
        return self  # started by the first report()

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.stop()

    def report(self, done: int, total: int) -> None:
        if not self.tasks:
            self.start()
            self.add_task("calibrating", total=total)
        self.update(self.tasks[0].id, completed=done)


@app.command()
def quantize(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="The ONNX model to quantize, as exported (it is prepared first).",
                                          show_default=False, metavar="MODEL.onnx")],
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", "-s", show_default=False, metavar="NAME=D0,D1,...",
        help="NAME=D0,D1,... for a model input, batch first, e.g. input=1,3,224,224; repeat it for each input. "
             "Default: the shapes fixed in the model (see 'maptools inspect').")] = None,
    mapname: Annotated[str | None, typer.Option(
        help="Name of the output folder mapsave/NAME/.",
        show_default="the model file's name without .onnx, other characters than letters, digits, '.', '_', '-' as '_'"
    )] = None,
    calib: Annotated[str, typer.Option(
        help="Calibration data: 'random' (seeded noise; fine for trying things, not for accuracy) or a folder "
             "of images in class subfolders (DIR/<class>/<image>, resized to the input size, ImageNet-normalized, channels first or last as the input is) "
             "or of .npy/.npz files (one sample each, shaped like the input; an .npz keyed by input "
             "name).")] = "random",
    calib_steps: Annotated[int, _setting(QuantSettings, "calib_steps", note=" A folder with fewer is used once in "
                                                                             "full.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda (cuda:N) or auto (CUDA when present).")] = "auto",
    bits: Annotated[str, typer.Option(
        help="Bits of weights and activations (2-8), or auto: per-layer weight and input widths under "
             "--max-error, --max-error-ratio or --max-weight-bytes.")] = "8",
    max_error: Annotated[float | None, typer.Option(
        min=0.0, show_default=False, help="--bits auto: the largest output error (rel. L2 against float, on the "
                                          "calibration samples), e.g. 0.05.")] = None,
    max_error_ratio: Annotated[float | None, typer.Option(
        min=1.0, show_default=False, help="--bits auto: the largest output error as a multiple of the error with "
                                          "every layer at 8 bits, e.g. 1.5.")] = None,
    max_weight_bytes: Annotated[int | None, typer.Option(
        min=1, show_default=False, help="--bits auto: the largest weight memory in bytes.")] = None,
    weight_bits: Annotated[int | None, _setting(QuantSettings, "weight_bits", note=" Overrides --bits.",
                                                show_default=False)] = None,
    activation_bits: Annotated[int | None, _setting(QuantSettings, "activation_bits", note=" Overrides --bits.",
                                                    show_default=False)] = None,
    per_channel: Annotated[bool, _setting(QuantSettings, "per_channel", "--per-channel/--per-tensor")] = True,
    algorithm: Annotated[CalibrationAlgorithm, _setting(QuantSettings, "algorithm", case_sensitive=False)
                         ] = CalibrationAlgorithm.AUTO,
    seed: Annotated[int, _setting(QuantSettings, "seed")] = 0,
    activation_sign: Annotated[ActivationSign | None, _setting(QuantSettings, "activation_sign", case_sensitive=False,
                                                               show_default="the profile's")] = None,
    optimize: Annotated[Optimization, _setting(QuantSettings, "optimization", "--optimize", "--optimization",
                                               case_sensitive=False)] = Optimization.NONE,
    scale_policy: Annotated[ScalePolicy, _setting(QuantSettings, "scale_policy", case_sensitive=False)
                            ] = ScalePolicy.FLOAT,
    shared_scales: Annotated[bool | None, _setting(QuantSettings, "shared_scales", "--shared-scales/--separate-scales",
                                                   show_default="the profile's")] = None,
    profile: Annotated[Profile, _setting(QuantSettings, "profile", case_sensitive=False)] = Profile.SEED,
    multiplier_bits: Annotated[int, _setting(QuantSettings, "multiplier_bits")] = MULTIPLIER_BITS,
    layer_bits: Annotated[list[str] | None, _setting(
        QuantSettings, "layer_bits", "--layer-bits", show_default=False, metavar="NODE=W,A",
        note=" One NODE=W,A per operator, e.g. /stem/Conv=8,6; repeat it for several.")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, show_default="the cores that are free when the run starts", help="torch threads while PPQ runs.")
    ] = None,
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that receives mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
    strict: Annotated[bool, typer.Option(
        help="Fail where PPQ fails at an operator (or preparation leaves a step out), instead of keeping that "
             "operator on the host in float.")] = False,
    keep_on_host: Annotated[list[str] | None, typer.Option(
        "--keep-on-host", show_default=False, metavar="NODE",
        help="Keep this operator of the prepared model on the host in float; repeat it for several.")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print the result as one JSON object (QuantizationResult.to_json) instead of the table, "
                       "for scripts; no progress bar.")] = False,
) -> None:
    """Quantize an ONNX model with PPQ; write mapsave/NAME/ (quantinfo, quantparams, QDQ model, errors, manifest).

    Symmetric quantization with zero offsets, as a compute-in-memory crossbar needs. Examples:

    maptools quantize resnet18.onnx --input-shape input=1,3,224,224 --calib calib_images/ --calib-steps 128

    maptools quantize resnet18.onnx --calib random --bits 4 --algorithm minmax --mapname resnet18-w4
    """
    from maptools.quantization import quantize as run_quantize

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if bits != "auto" and not (bits.isdigit() and 2 <= int(bits) <= 8):
            raise SettingsError(f"--bits {bits} is not a width.", "pass 2 to 8, or auto with --max-error, "
                                                                  "--max-error-ratio or --max-weight-bytes.")
        budget = {k: v for k, v in (("output_error", max_error), ("error_ratio", max_error_ratio),
                                    ("weight_bytes", max_weight_bytes)) if v is not None}
        shapes = _parse_shapes(input_shape) if input_shape else _model_shapes(model)
        with _CalibrationBar(hidden=json_output) as bar:
            result = run_quantize(
                shapes, device, model, mapname=mapname, calibset=None if calib == "random" else calib,
                calib_steps=calib_steps, seed=seed, bit_width="auto" if bits == "auto" else int(bits),
                budget=budget or None, weight_bits=weight_bits,
                activation_bits=activation_bits, per_channel=per_channel, algorithm=algorithm,
                activation_sign=activation_sign, optimization=optimize, output_root=output_root,
                progress=bar.report, scale_policy=scale_policy, shared_scales=shared_scales,
                multiplier_bits=multiplier_bits, threads=threads, strict=strict, keep_on_host=keep_on_host or (),
                profile=profile, layer_bits=_parse_layer_bits(layer_bits or []),
            )
    except MaptoolsError as e:
        fail(e, ctx)
    if json_output:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_result(result)


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
        fail(e)
    _print_result(result)


def _dims(value_info: Any) -> list[int | str]:
    """Dims as written: a size, a symbolic name, or '?' (unset, or <= 0 as older exporters write)."""
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return out


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX model file.", metavar="MODEL.onnx")],
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", "-s", show_default=False, metavar="NAME=D0,D1,...",
        help="Concrete shape of a dynamic input (repeat per input), to preview preparation and placement.")] = None,
) -> None:
    """Show a model's opset, inputs (dynamic axes marked), outputs and operators, and what quantizing it involves.

    With fixed shapes (in the model, or --input-shape), the model is also prepared (as 'maptools
    quantize' does, checked in onnxruntime) and its operators are split into device and host work; an
    --input-shape that does not fit the model exits with code 2.
    """
    from maptools.onnx_model import load_model, model_inputs
    from maptools.placement import place, placement_report
    from maptools.prepare import TARGET_OPSET, opset_of, opset_report, prepare_model

    try:
        proto = load_model(model)
        given = _parse_shapes(input_shape) if input_shape else {}
    except MaptoolsError as e:
        fail(e)
    inputs = model_inputs(proto)
    initializers = {i.name for i in proto.graph.initializer}
    opset = opset_of(proto)
    table = Table(title=f"{model}  (opset {opset}, {len(proto.graph.node)} nodes)")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("detail")
    dynamic = []
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        dims = _dims(vi)
        if any(isinstance(d, str) for d in dims):
            dynamic.append(vi.name)
        spec = next(i for i in inputs if i.name == vi.name)
        table.add_row("input", vi.name, f"{spec.dtype} {dims}")
    for o in proto.graph.output:
        table.add_row("output", o.name, str(_dims(o)))
    for op, n in sorted(Counter(node.op_type for node in proto.graph.node).items()):
        table.add_row("operator", op, str(n))
    console.print(table)

    notes, warnings = [], []
    missing = [name for name in dynamic if name not in given]
    if missing:
        warnings.append(f"dynamic axes in {', '.join(missing)}: pass --input-shape NAME=D0,D1,... (to quantize, "
                        "and here to preview the preparation)")
    if opset < TARGET_OPSET:
        notes.append(f"opset {opset}: maptools converts it to {TARGET_OPSET} (PPQ's) with onnx's version converter")
    elif opset > TARGET_OPSET:
        rewrites, problems = opset_report(proto)
        notes.append(f"opset {opset}: maptools brings it to {TARGET_OPSET} (PPQ's)"
                     + (", rewriting " + ", ".join(f"{k} x{v}" for k, v in rewrites.items()) if rewrites else ""))
        if problems:
            warnings.append(f"no opset-13 form, so the model keeps opset {opset}: " + "; ".join(problems[:8]))
    foreign = sorted({f"{n.op_type} ({n.domain})" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        notes.append(f"operators outside the standard ONNX domain run on the host: {', '.join(foreign)}")
    failed: MaptoolsError | None = None
    if not missing:
        shapes = {i.name: given.get(i.name) or [int(d) for d in i.dims] for i in inputs}
        with tempfile.TemporaryDirectory(prefix="maptools-inspect-") as scratch:
            try:
                done = prepare_model(model, Path(scratch) / "model.onnx", shapes)
                prepared = load_model(done.path)
            except MaptoolsError as e:
                failed = e
                warnings.append(f"preparing with {shapes} fails: {e}")
            else:
                placement = place(prepared)
                roles = placement.roles
                device = Counter(n.op_type for n in prepared.graph.node if roles[n.name].part == "device")
                host = Counter(n.op_type for n in prepared.graph.node if roles[n.name].part == "host")
                notes.append(f"prepared with {shapes}: {'; '.join(done.steps) or 'nothing to change'}")
                notes.append(f"device ({sum(device.values())}): " + ", ".join(f"{k} {v}" for k, v in
                                                                               device.most_common()))
                notes.append(f"host ({sum(host.values())}): " + (", ".join(f"{k} {v}" for k, v in host.most_common())
                                                                  or "none"))
                notes.append(f"placement: {placement_report(prepared, placement).summary()}")
                console.print(f"maptools quantize {model} " + " ".join(
                    f"--input-shape {k}={','.join(map(str, v))}" for k, v in shapes.items()), highlight=False)
    for note in notes:
        console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if isinstance(failed, InputShapeError) and given:
        raise typer.Exit(2)  # the shapes asked for do not fit (named in the warning above)


@app.command()
def convert(
    mapname: Annotated[str, typer.Option(help="The quantized map mapsave/NAME/ to convert.", show_default=False)],
    model: Annotated[Path | None, typer.Option(
        help="The ONNX model that was quantized.", show_default="the model recorded in the map's manifest",
        metavar="MODEL.onnx")] = None,
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that holds mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
) -> None:
    """Build the operator graph of a quantized map (quantinfo attached) and write mapsave/NAME/operator_graph.json."""
    from maptools.conversion import convert as run_convert

    try:
        result = run_convert(mapname, model, output_root=output_root)
    except MaptoolsError as e:
        fail(e)
    console.print(f"{result.graph_path}: {result.nodes} operators ({result.device_ops} device, {result.host_ops} "
                  f"host), {result.edges} edges, from {result.model_path}; {result.seconds:.2f} s")


@app.command(name="check-seed")
def check_seed(
    mapname: Annotated[str, typer.Argument(help="The map mapsave/NAME/ to check.", show_default=False)],
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that holds mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
) -> None:
    """Check a map against the original toolchain's contract (the seed profile): its pickles' classes and types,
    one signed range per operator, one scale along every edge and at every adder, ratios below 2^7.

    Exit code 0 when the original reads the map as it is, 1 with one line per violation otherwise.
    """
    from maptools.maps.seed import check_seed as run_check

    try:
        violations = run_check(mapname, output_root)
    except MaptoolsError as e:
        fail(e)
    if not violations:
        console.print(f"{mapname}: follows the seed contract; the original toolchain reads it as it is.")
        return
    for violation in violations:
        console.print(escape(str(violation)), highlight=False)
    console.print(f"{mapname}: {len(violations)} violations of the seed contract.")
    raise typer.Exit(1)


def _spec(xbar: str, cell_bits: int, adc_bits: int, dac_bits: int, encoding: str, max_arrays: int | None,
          adc_range: str, cols_per_adc: int) -> Any:
    from maptools.crossbar.mapping import CrossbarSpec

    return CrossbarSpec.from_xbar(xbar, cell_bits=cell_bits, adc_bits=adc_bits, dac_bits=dac_bits,  # type: ignore
                                  encoding=encoding, max_arrays=max_arrays, adc_range=adc_range,
                                  cols_per_adc=cols_per_adc)


_XBAR = Annotated[str, typer.Option("--xbar", help="Crossbar size ROWSxCOLS: word lines x bit lines of one array, "
                                                   "powers of two.")]
_CELL = Annotated[int, _setting(CrossbarSpec, "cell_bits")]
_ADC = Annotated[int, _setting(CrossbarSpec, "adc_bits")]
_DAC = Annotated[int, _setting(CrossbarSpec, "dac_bits")]
_ENC = Annotated[str, _setting(CrossbarSpec, "encoding", metavar="differential|offset")]
_RANGE = Annotated[str, _setting(CrossbarSpec, "adc_range", metavar="full|max|calibrated")]
_SHARE = Annotated[int, _setting(CrossbarSpec, "cols_per_adc")]


@app.command(name="map")
def map_command(
    mapname: Annotated[str, typer.Option(help="A converted map (run 'maptools convert' first).", show_default=False)],
    xbar: _XBAR = "256x256", cell_bits: _CELL = 2, adc_bits: _ADC = 8, dac_bits: _DAC = 1,
    encoding: _ENC = "differential", adc_range: _RANGE = "full", cols_per_adc: _SHARE = 1,
    max_arrays: Annotated[int | None, _setting(CrossbarSpec, "max_arrays", note=" A network needing more is refused.",
                                               show_default=False)] = None,
    input: Annotated[str, typer.Option("--input", help="Inputs for the observed partial sums: 'random', or an "
                                                       ".npy/.npz file of real samples (batch first).")] = "random",
    samples: Annotated[int, typer.Option(min=1, help="Random inputs for the observed partial sums.")] = 2,
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that holds mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
) -> None:
    """Lay a converted map onto crossbar arrays; write mapsave/NAME/crossbar_map.json and print the statistics."""
    from maptools.crossbar.mapping import CROSSBAR_FILE, map_crossbars
    from maptools.maps.artifacts import map_dir

    try:
        result = map_crossbars(mapname, _spec(xbar, cell_bits, adc_bits, dac_bits, encoding, max_arrays, adc_range,
                                              cols_per_adc), output_root=output_root, inputs=input, samples=samples)
    except MaptoolsError as e:
        fail(e)
    table = Table(title=f"{mapname} on {xbar} arrays, {cell_bits}-bit cells, {adc_bits}-bit ADC, {encoding}")
    columns = ["layer", "arrays", "util", "cycles", "psum worst", "psum seen", "ADC bits (worst / seen)"]
    columns += ["ADC steps per slice"] if adc_range != "full" else []
    for column in columns:
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in result.layers:
        steps = [", ".join(map(str, layer.adc_steps)) or "1"] if adc_range != "full" else []
        arrays = f"those of {layer.shares}" if layer.shares else str(layer.arrays)
        table.add_row(layer.name, arrays, f"{layer.utilization:.0%}", str(layer.cycles),
                      str(layer.psum_worst), str(layer.psum_observed), f"{layer.adc_bits_needed} / "
                      f"{layer.adc_bits_observed}", *steps)
    table.caption = (f"{result.arrays} arrays, {result.utilization:.1%} of their cells used, {result.cycles} cycles "
                     f"per inference; {result.cost.summary()}")
    console.print(table)
    console.print(f"written to {map_dir(mapname, output_root) / CROSSBAR_FILE}", highlight=False, soft_wrap=True)


_EVAL = Annotated[str | None, typer.Option(
    "--eval", help="Evaluation inputs: a labelled .npz (labels and one array per input) or a folder of samples "
                   "(images in class subfolders, or .npy/.npz files).",
    show_default="the folder the map was calibrated on, after the samples its quantization read; seeded random "
                 "inputs for a map calibrated on random data")]


@app.command()
def evaluate(
    mapname: Annotated[str, typer.Option(help="A quantized map mapsave/NAME/.", show_default=False)],
    samples: Annotated[int, typer.Option(min=1, help="Evaluation inputs (see --eval).")] = 32,
    eval: _EVAL = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of random evaluation inputs.")] = EVAL_SEED,
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that holds mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Output error of a map's quant_model.onnx against its float model on held-out inputs (and accuracy on a
    labelled set)."""
    from maptools.evaluation import evaluate_map

    try:
        result = evaluate_map(mapname, output_root=output_root, evaluation=eval, samples=samples, seed=seed)
    except MaptoolsError as e:
        fail(e)
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{mapname}: quant_model.onnx against float", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("inputs", f"{result.samples}: {result.source}")
    table.add_row("output error", f"{result.rel_l2:.2%} rel. L2, cosine {result.cosine:.5f}")
    if len(result.per_output) > 1:
        table.add_row("per output", per_output_line(result.per_output).removeprefix("per output: "))
    if result.top1_agreement is not None:
        table.add_row("top-1 agreement", f"{result.top1_agreement:.1%}")
    if result.accuracy is not None:
        table.add_row("accuracy", f"{result.accuracy:.1%} (float {result.float_accuracy:.1%})")
    console.print(table)


@app.command()
def device(
    mapname: Annotated[str, typer.Option(help="A converted map (run 'maptools convert' first).", show_default=False)],
    preset: Annotated[str, typer.Option(help="Non-ideal cells: a preset of maptools.DEVICE_PRESETS (pcm: IBM's PCM "
                                             "statistics, reram: Wan et al. 2022, as aihwkit fits them).")] = "pcm",
    trials: Annotated[int, typer.Option(min=1, help="Monte Carlo trials (independent draws of every cell).")] = 20,
    time: Annotated[list[float] | None, typer.Option(
        "--time", help="Seconds after programming at which the cells are read; repeat it.",
        show_default="1 s, 1 h, 1 day, 1 year")] = None,
    compensation: Annotated[bool, typer.Option(help="Global drift compensation (one scale per array row "
                                                    "block).")] = True,
    xbar: _XBAR = "256x256", cell_bits: _CELL = 2, adc_bits: _ADC = 8, dac_bits: _DAC = 1,
    encoding: _ENC = "differential", adc_range: _RANGE = "full", cols_per_adc: _SHARE = 1,
    samples: Annotated[int, typer.Option(min=1, help="Evaluation inputs (see --eval).")] = 8,
    eval: _EVAL = None,
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that holds mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
) -> None:
    """Monte Carlo over non-ideal cells: a converted map's output error (and top-1 agreement with float) at each
    time after programming, mean +- std over the trials."""
    from maptools.crossbar.device import DEVICE_PRESETS
    from maptools.crossbar.evaluation import evaluate_device

    if preset not in DEVICE_PRESETS:
        fail(SettingsError(f"device preset {preset!r} is unknown.", f"use one of: {', '.join(DEVICE_PRESETS)}."))
    times = time or [1.0, 3600.0, 86400.0, 365 * 86400.0]
    try:
        spec = _spec(xbar, cell_bits, adc_bits, dac_bits, encoding, None, adc_range, cols_per_adc)
        result = evaluate_device(mapname, spec, DEVICE_PRESETS[preset].replace(compensation=compensation),
                                 output_root=output_root, trials=trials, times=times, samples=samples,
                                 evaluation=eval)
    except MaptoolsError as e:
        fail(e)
    table = Table(title=f"{mapname} on {preset} cells, {xbar} arrays, {adc_bits}-bit ADC, compensation "
                        f"{'on' if compensation else 'off'}")
    for column in ("time after programming (s)", "output error (rel. L2)", "top-1 agreement", "accuracy"):
        table.add_column(column, justify="right")
    for p in result.points:
        accuracy = "-" if p.accuracy is None else f"{p.accuracy[0]:.1%} +- {p.accuracy[1]:.1%}"
        table.add_row(f"{p.time:g}", f"{p.rel_l2[0]:.2%} +- {p.rel_l2[1]:.2%}",
                      "-" if p.top1_agreement is None else f"{p.top1_agreement[0]:.1%} +- {p.top1_agreement[1]:.1%}",
                      accuracy)
    table.caption = (f"{trials} trials of {result.samples} samples ({result.source}); {result.seconds_per_trial:.2f} s "
                     "per trial and time")
    console.print(table)


@app.command()
def simulate(
    mapname: Annotated[str, typer.Option(help="A converted map (run 'maptools convert' first).", show_default=False)],
    input: Annotated[str, typer.Option(
        "--input", help="'random' (seeded normal noise), an .npy file (one model input) or an .npz file "
                        "(one array per input name); batch first.")] = "random",
    requant: Annotated[str, typer.Option(help="Requantization: float (float64 multiplier) or fixed (31-bit "
                                              "multiplier and shift, as hardware).")] = "float",
    seed: Annotated[int, typer.Option(min=0, help="Seed of --input random.")] = 0,
    crossbar: Annotated[bool, typer.Option("--crossbar", help="Compute every Conv/Gemm through crossbar arrays "
                                                              "(--xbar, --cell-bits, --adc-bits, ...).")] = False,
    xbar: _XBAR = "256x256", cell_bits: _CELL = 2, adc_bits: _ADC = 8, dac_bits: _DAC = 1,
    encoding: _ENC = "differential", adc_range: _RANGE = "full", cols_per_adc: _SHARE = 1,
    save: Annotated[Path | None, typer.Option(help="Write the outputs to this .npz file ('.npz' added where the name "
                                                   "lacks it).", show_default=False)] = None,
    output_root: Annotated[str | None, typer.Option(
        help="Folder (or store URL, s3://BUCKET/PREFIX) that holds mapsave/.",
        show_default="$MAPTOOLS_HOME, else the current folder")] = None,
) -> None:
    """Run the integer re-simulation of a converted map (integer weights of quantparams, scales of quantinfo),
    or with --crossbar the crossbar-level simulation (and its difference from the integer one)."""
    import io

    import numpy as np

    from maptools.maps.folder import atomic_write
    from maptools.simulate import simulate as run_simulate

    target = None if save is None else save if save.suffix == ".npz" else save.with_name(save.name + ".npz")
    if target is not None and not target.parent.is_dir():  # (before the simulation, not after it)
        fail(StorageError(f"cannot write {target}: the folder {target.parent} does not exist.",
                          "create it, or pass --save a file in an existing folder."))
    try:
        spec = _spec(xbar, cell_bits, adc_bits, dac_bits, encoding, None, adc_range, cols_per_adc) if crossbar \
            else None
        result = run_simulate(mapname, input, output_root=output_root, requant=requant, seed=seed, crossbar=spec)
        reference = run_simulate(mapname, input, output_root=output_root, requant=requant, seed=seed) \
            if crossbar else None
    except MaptoolsError as e:
        fail(e)
    for name, value in result.outputs.items():
        flat = value.reshape(value.shape[0], -1)
        top = np.argsort(-flat[0], kind="stable")[:5]
        console.print(f"{name} {list(value.shape)}: sample 0 top-5 " + ", ".join(f"{i} ({flat[0, i]:.4g})" for i in top))
        if reference is not None:
            ref = reference.outputs[name]
            console.print(f"  crossbar vs integer simulation: relative L2 difference "
                          f"{np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-12):.4%}")
    console.print(f"{result.batch} sample(s) in {result.seconds:.2f} s ({result.seconds_per_sample:.3f} s each, "
                  f"requant {result.requant.value}{', crossbar ' + xbar if crossbar else ''})")
    if target is not None:
        arrays = io.BytesIO()
        np.savez(arrays, **result.outputs)
        try:
            atomic_write(target, arrays.getvalue())
        except MaptoolsError as e:
            fail(e)
        console.print(f"outputs written to {target}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
