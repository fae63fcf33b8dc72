"""Step 7: the prepared model against the original in onnxruntime on seeded random inputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.shape_inference

from maptools.errors import InputShapeError, ModelError
from maptools.onnx_model import integer_range, model_inputs, ort_session


from maptools.prepare.opset import fix_input_dims
log = logging.getLogger(__name__)

# --- checks -------------------------------------------------------------------------------------------

def _static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ModelError(f"ONNX shape inference fails on the prepared model: {str(e).strip()[:300]}",
                         "check that input_shapes fit the model (a Reshape to a constant batch, for example, fixes "
                         "the batch the model was exported with).") from e
    g = inferred.graph
    known = {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}
    inits = {i.name for i in g.initializer}
    dynamic = []
    for node in g.node:
        for t in node.output:
            vi = known.get(t)
            if not t:
                continue
            if vi is not None and vi.type.WhichOneof("value") not in (None, "tensor_type"):
                continue  # a sequence or an optional: onnxruntime carries it on the host, whatever its length
            tt = vi.type.tensor_type if vi is not None else None
            if tt is None or not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
                if t not in inits:
                    dynamic.append(f"{t} ({node.op_type} {node.name})")
    if dynamic:
        raise ModelError(f"these tensors have no static shape after preparation: {', '.join(dynamic[:8])}"
                         + (f" and {len(dynamic) - 8} more" if len(dynamic) > 8 else "") + ".",
                         "maptools needs every tensor shape fixed by input_shapes; operators whose output size "
                         "depends on the data (NonZero, NonMaxSuppression, TopK with a computed k) must be removed "
                         "from the model first.")
    return inferred


def from_sample(dtype: np.dtype, rank: int) -> bool:
    """Whether preparation's checks take an input of a calibration sample as it is, not at random: integers and
    booleans (ids that index a table, where 0 and 1 may be out of range) and any input of rank 0 or 1 (a
    parameter, such as a Resize's scales or a noise level, which random values make meaningless)."""
    return not np.issubdtype(dtype, np.floating) or rank <= 1


def _random_feed(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], rng: np.random.Generator,
                 ranges: Mapping[str, tuple[float, float]] | None = None,
                 sample: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Standard normal floats (uniform within ``ranges[name]`` where given), byte values for 8-bit integers (an
    image's or a sound's, as calibration draws them), 0/1 for wider integers (ids, counts, flags) and booleans;
    the inputs :func:`from_sample` names as in ``sample`` (a calibration sample) where it has them at these
    shapes."""
    feed = {}
    for spec in model_inputs(model):
        shape = list(shapes[spec.name])
        given = None if sample is None else sample.get(spec.name)
        if given is not None and list(np.shape(given)) == shape and from_sample(spec.dtype, len(shape)):
            feed[spec.name] = np.asarray(given).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating) and spec.name in (ranges or {}):
            feed[spec.name] = rng.uniform(*ranges[spec.name], shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif spec.dtype in (np.uint8, np.int8):
            feed[spec.name] = rng.integers(*integer_range(np.dtype(spec.dtype)), shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feed


@dataclass(frozen=True)
class Reference:
    """The original model's outputs on seeded random inputs, as onnxruntime computes them."""

    feeds: tuple[dict[str, np.ndarray], ...]
    names: tuple[str, ...]
    outputs: tuple[tuple[np.ndarray, ...], ...]
    #: the model computes in float16 somewhere (weights or casts), even where its inputs and outputs are float32
    half: bool = False

    @property
    def output_shapes(self) -> dict[str, list[int]]:
        return {name: list(value.shape) for name, value in zip(self.names, self.outputs[0] if self.outputs else ())}


def _declared(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> str:
    """The fixed input dims ``shapes`` override, in words (empty when none)."""
    found = [f"input {spec.name!r} axis {axis} is fixed to {want} in the model"
             for spec in model_inputs(model) for axis, (want, got) in enumerate(zip(spec.dims, shapes[spec.name]))
             if want is not None and want != got]
    return "; ".join(found)


def reference_outputs(original: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], checks: int = 3,
                      seed: int = 0, ranges: Mapping[str, tuple[float, float]] | None = None,
                      sample: Mapping[str, np.ndarray] | None = None) -> Reference:
    """Run ``original`` at ``shapes`` (its declared input dims replaced, as its own package may do at load) on
    ``checks`` seeded random inputs (``ranges``, ``sample``: as :func:`_random_feed`).

    Raises:
        ModelError: onnxruntime cannot load the model, or run it at its own declared shapes, or an output is
            not a tensor.
        InputShapeError: the model does not run with ``shapes``.
    """
    others = [f"{o.name!r} ({o.type.WhichOneof('value')})" for o in original.graph.output
              if o.type.WhichOneof("value") not in (None, "tensor_type")]
    if others:
        raise ModelError(f"the model's outputs {', '.join(others)} are not tensors (a sequence, a map): maptools "
                         "carries tensors between its stages.",
                         "export the model with tensor outputs (a sequence: concatenated into one tensor).")
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(original)
    fix_input_dims(relaxed, shapes)
    try:
        session = ort_session(relaxed)
    except Exception as e:
        try:
            ort_session(original)
        except Exception:
            raise ModelError(f"onnxruntime cannot load the model: {str(e).strip()[:300]}",
                             "check the model file; maptools needs a model onnxruntime runs.") from e
        raise _misfit(original, shapes, e) from e  # it loads as declared: the shapes do not fit
    names = tuple(o.name for o in original.graph.output)
    rng = np.random.default_rng(seed)
    feeds = tuple(_random_feed(original, shapes, rng, ranges, sample) for _ in range(checks))
    outputs = []
    made_up = [spec.name for spec in model_inputs(original) if from_sample(spec.dtype, len(shapes[spec.name]))
               and (sample is None or list(np.shape(sample.get(spec.name))) != list(shapes[spec.name]))]
    for feed in feeds:
        try:
            outputs.append(tuple(session.run(list(names), feed)))
        except Exception as e:
            raise _misfit(original, shapes, e, made_up) from e
    return Reference(feeds, names, tuple(outputs), _computes_in_half(original))


def _computes_in_half(model: onnx.ModelProto) -> bool:
    """True where a float16 weight, Cast or tensor appears (a mixed-precision export rounds inside)."""
    half = onnx.TensorProto.FLOAT16
    g = model.graph
    return (any(t.data_type == half for t in g.initializer)
            or any(vi.type.tensor_type.elem_type == half for vi in [*g.input, *g.value_info, *g.output])
            or any(a.name == "to" and a.i == half for n in g.node if n.op_type == "Cast" for a in n.attribute))


def _misfit(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], error: Exception,
            made_up: Sequence[str] = ()) -> InputShapeError | ModelError:
    """onnxruntime's failure at ``shapes``: the shapes' fault, or the model's where they are its declared ones, or
    the values made up for the inputs ``made_up`` (integers, scalars: :func:`from_sample`), which no sample gave."""
    declared = _declared(model, shapes)
    detail = " ".join(str(error).split())[:300]
    if not declared and all(None not in spec.dims for spec in model_inputs(model)):
        return ModelError(f"onnxruntime fails running the model at its own declared input shapes "
                          f"{ {k: list(v) for k, v in shapes.items()} } on seeded random inputs: {detail}",
                          "if the model needs inputs like its real ones (ids within a table, a Resize's scales), "
                          "pass calibration data: the check takes its integers and its inputs of rank 0 or 1 from the "
                          "first sample; otherwise check the model file, as maptools needs a model onnxruntime runs.")
    if made_up and not declared:
        return InputShapeError(
            f"the model does not run with input_shapes { {k: list(v) for k, v in shapes.items()} } and made-up values "
            f"for its inputs {', '.join(repr(n) for n in made_up)} (integers 0 or 1, random scalars): {detail}",
            "pass calibration data (calibset=..., --calib): preparation takes those inputs from the first sample, as "
            "a model may need real ones (a sample rate, ids within a table); if it fails on those too, give the "
            "shapes the model was exported for.")
    return InputShapeError(
        f"the model does not run with input_shapes { {k: list(v) for k, v in shapes.items()} }"
        + (f" ({declared})" if declared else "") + f": {detail}",
        "give the shapes the model was exported for" + (
            f", e.g. {_suggested(model, shapes)}" if declared else
            " (a Reshape to a constant batch fixes the batch size, for example)") + ".")


def _suggested(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{spec.name}={[d if d is not None else g for d, g in zip(spec.dims, shapes[spec.name])]}"
                     for spec in model_inputs(model))


def check_equivalent(reference: Reference, prepared: onnx.ModelProto, rtol: float = 1e-3, atol: float = 1e-4
                     ) -> tuple[float, float]:
    """Run ``prepared`` on the reference's inputs; return (max abs, max relative) output difference.

    The relative difference is per output, against the output's largest magnitude. Raises
    ModelError when onnxruntime cannot run it or an element differs beyond
    ``atol * max(1, max|ref|) + rtol * |ref|``.
    """
    try:
        after = ort_session(prepared)
        wants = {i.name: i.type for i in after.get_inputs()}  # a float16 input is float32 after preparation
        got_all = [after.run(list(reference.names), {k: v.astype(np.float32) if wants.get(k) == "tensor(float)" else v
                                                     for k, v in feed.items()}) for feed in reference.feeds]
    except Exception as e:
        raise ModelError(f"onnxruntime cannot run the prepared model: {str(e).strip()[:300]}",
                         "report this model to the maptools maintainers.") from e
    worst_abs = worst_rel = 0.0
    for ref, got in zip(reference.outputs, got_all):
        for name, r, g in zip(reference.names, ref, got):
            if r.shape != g.shape:
                raise ModelError(f"output {name!r} has shape {list(g.shape)} after preparation, {list(r.shape)} before.",
                                 "report this model to the maptools maintainers.")
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(r, g):
                    raise ModelError(f"output {name!r} (integer) changed in preparation.",
                                     "report this model to the maptools maintainers.")
                continue
            same = (r == g) | (np.isnan(r) & np.isnan(g))  # (a Log of a negative random input: NaN in both)
            with np.errstate(invalid="ignore"):  # (inf - inf where both overflow: ``same`` holds there)
                diff = np.where(same, 0.0, np.abs(r.astype(np.float64) - g))
            peak = float(np.abs(r[np.isfinite(r)]).max(initial=0.0))
            if r.dtype == np.float16 or reference.half:  # the original rounds to 11 bits, and that compounds over
                rtol, atol = max(rtol, 5e-2), max(atol, 5e-2)  # a deep network (a U-Net's mask: 3.3% of its peak)
            worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
            worst_rel = max(worst_rel, float(diff.max(initial=0.0)) / max(peak, 1e-12))
            if not np.all(same | (diff <= atol * max(1.0, peak) + rtol * np.abs(r))):
                raise ModelError(f"the prepared model's output {name!r} differs from the original's by up to "
                                 f"{float(diff.max()):.3g} (largest value {peak:.3g}).",
                                 "report this model to the maptools maintainers.")
    return worst_abs, worst_rel
