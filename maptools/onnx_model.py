"""Reading ONNX models: loading with clear errors, graph inputs, shape checks, simplification."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from maptools.errors import InputShapeError, ModelError

__all__ = ["ModelInput", "load_model", "model_inputs", "check_input_shapes", "simplify_model", "SimplifyResult"]


@dataclass(frozen=True)
class ModelInput:
    """A graph input: name, numpy dtype and dims (None where dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX model, raising ModelError with a fix for each failure."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"ONNX model {str(p)!r} does not exist.", "check the path (relative paths start at "
                         f"{Path.cwd()}).")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(f"{str(p)!r} is not a valid ONNX model ({type(e).__name__}: {str(e)[:200]}).",
                         "re-export it, e.g. torch.onnx.export(..., dynamo=False), and check the file was "
                         "copied completely.") from e
    if not model.graph.input:
        raise ModelError(f"{str(p)!r} has no graph inputs.", "export the model with its input tensors.")
    return model


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    initializers = {i.name for i in model.graph.initializer}
    result = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        result.append(ModelInput(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return result


def check_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Validate ``input_shapes`` against the graph inputs; return them as tuples of ints."""
    if not isinstance(input_shapes, Mapping):
        raise InputShapeError(f"input_shapes must be a dict of input name -> shape, not {type(input_shapes).__name__}.",
                              "pass e.g. {'input': [1, 3, 224, 224]}.")
    inputs = {i.name: i for i in model_inputs(model)}
    missing = [n for n in inputs if n not in input_shapes]
    extra = [n for n in input_shapes if n not in inputs]
    if missing or extra:
        raise InputShapeError(
            f"input_shapes names {sorted(input_shapes)} but the model's inputs are {sorted(inputs)}"
            + (f" (missing: {missing})" if missing else "") + (f" (unknown: {extra})" if extra else "") + ".",
            "give exactly one shape per model input, keyed by its name (see `maptools inspect MODEL`).",
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in inputs.items():
        shape = input_shapes[name]
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            raise InputShapeError(f"shape {shape!r} for input {name!r} is not a list of positive integers.",
                                  "pass e.g. [1, 3, 224, 224].")
        if len(shape) != len(spec.dims):
            raise InputShapeError(f"input {name!r} has rank {len(spec.dims)} {list(spec.dims)} in the model, but "
                                  f"input_shapes gives rank {len(shape)} {list(shape)}.",
                                  "give one dimension per model axis, batch first.")
        for axis, (want, got) in enumerate(zip(spec.dims, shape)):
            if want is not None and want != got:
                raise InputShapeError(f"input {name!r} axis {axis} is fixed to {want} in the model, but input_shapes "
                                      f"gives {got}.", f"use {list(d if d is not None else g for d, g in zip(spec.dims, shape))}.")
        shapes[name] = tuple(int(d) for d in shape)
    return shapes


@dataclass(frozen=True)
class SimplifyResult:
    """Where the simplified model went and how far its outputs are from the original's."""

    path: Path
    max_abs_diff: float
    nodes_before: int
    nodes_after: int


def simplify_model(src: Path, dst: Path, input_shapes: Mapping[str, Sequence[int]], checks: int = 3,
                   seed: int = 0, rtol: float = 1e-4, atol: float = 1e-4) -> SimplifyResult:
    """Simplify ``src`` with onnxsim into ``dst``, checking it computes the same function.

    The check runs both models in onnxruntime on ``checks`` seeded random inputs and raises
    ModelError when any output differs beyond ``atol + rtol * |reference|``.
    """
    import onnxruntime as ort
    from onnxsim import simplify

    model = load_model(src)
    shapes = check_input_shapes(model, input_shapes)
    try:
        simplified, ok = simplify(model, overwrite_input_shapes={k: list(v) for k, v in shapes.items()})
    except Exception as e:
        raise ModelError(f"onnxsim could not simplify {src}: {e}", "pass the model unsimplified "
                         "(simplify=False) or re-export it with a supported opset.") from e
    if not ok:
        raise ModelError(f"onnxsim's own check failed on {src}.", "quantize the original model (simplify=False).")
    rng = np.random.default_rng(seed)
    dtypes = {i.name: i.dtype for i in model_inputs(model)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(simplified.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for _ in range(checks):
        feed = {k: rng.standard_normal(v).astype(dtypes[k]) for k, v in shapes.items()}
        for ref, out in zip(before.run(None, feed), after.run(None, feed)):
            diff = np.abs(ref.astype(np.float64) - out)
            worst = max(worst, float(diff.max(initial=0.0)))
            if not np.all(diff <= atol + rtol * np.abs(ref)):
                raise ModelError(f"the simplified model's outputs differ from the original's by up to {worst:.3g}.",
                                 "quantize the original model (simplify=False) and report the model to onnxsim.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(simplified, str(dst))
    return SimplifyResult(dst, worst, len(model.graph.node), len(simplified.graph.node))
