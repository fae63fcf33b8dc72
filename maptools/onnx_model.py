"""Reading ONNX models: loading with clear errors, graph inputs, shape checks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx.defs
import onnx.helper
import onnx.numpy_helper

from maptools.errors import InputShapeError, ModelError

__all__ = ["ModelInput", "load_model", "model_inputs", "overridable_initializers", "with_inputs", "index_limits",
           "integer_range", "check_input_shapes",
           "node_attr", "constant_values", "opsets", "auto_pads", "ort_session",
           "CONTROL_FLOW_OP_TYPES", "OUTER_INPUTS", "outer_inputs", "explicit_outer_inputs", "implicit_outer_inputs",
           "implicit_node", "one_copy_each", "concat_parts", "in_topological_order"]

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class ModelInput:
    """A graph input: name, numpy dtype and dims (None where dynamic: symbolic, unset, or <= 0)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX model, raising ModelError with a fix for each failure."""
    p = Path(path)
    if p.is_dir():
        raise ModelError(f"{str(p)!r} is a folder, not an ONNX model file.", "pass the .onnx file inside it.")
    if not p.is_file():
        raise ModelError(f"ONNX model {str(p)!r} does not exist.", "check the path (relative paths start at "
                         f"{Path.cwd()}).")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        missing = [name for name in _external_data(p) if not (p.parent / name).is_file()]
        if missing:
            raise ModelError(f"{str(p)!r} keeps its weights in external data files that are not beside it: "
                             f"{', '.join(missing[:3])}.", f"copy {missing[0]} into {str(p.parent)!r} with the "
                             "model (an exporter wrote the weights there: torch's dynamo exporter writes "
                             "MODEL.onnx.data).") from e
        raise ModelError(f"{str(p)!r} is not a valid ONNX model ({type(e).__name__}: {str(e)[:200]}).",
                         "re-export it, e.g. torch.onnx.export(..., dynamo=False), and check the file was "
                         "copied completely.") from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001  (exporters write models the checker refuses and onnxruntime runs)
        _check_loads(p, model, e)
    if not model.graph.input:
        raise ModelError(f"{str(p)!r} has no graph inputs.", "export the model with its input tensors.")
    return model


def _external_data(path: Path) -> list[str]:
    """The external data files ``path``'s tensors keep their values in (relative to its folder); empty where it has
    none, or does not load even without them."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (not ONNX at all: the caller says so)
        return []
    tensors = [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
    named = [next((e.value for e in t.external_data if e.key == "location"), "")
             for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    return list(dict.fromkeys(name for name in named if name))


#: onnxruntime graph optimizations that change what a model computes, left out of every session here:
#: WeightBiasQuantization quantizes a Conv's or Gemm's float weights between activation quantizers to int8 with one
#: scale per tensor (a dequantized depthwise model checked with its quantizers kept read 101.8% off the original
#: with it, 1.4% without it)
INEXACT_OPTIMIZERS = ["WeightBiasQuantization"]


def ort_session(model: onnx.ModelProto | bytes | str | Path) -> Any:
    """An onnxruntime CPU session of ``model`` (in memory, or a file; without :data:`INEXACT_OPTIMIZERS`) that logs
    nothing (its errors come as exceptions; its warnings are about the model, not the run: an output whose size
    depends on the data differs from the recorded one); where onnxruntime's graph optimizations make a model it
    cannot load (its fusion of int4 quantizers into a ``QLinearConv`` that takes no int4), a session without
    them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    data = model if isinstance(model, bytes | str) else str(model) if isinstance(model, Path) \
        else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=INEXACT_OPTIMIZERS)
    except Exception as e:  # onnxruntime raises its own types
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception:
            raise e from None


def optimizations_fail(model: bytes) -> str | None:
    """Why onnxruntime's default session (its graph optimizations on) cannot load ``model``, which
    :func:`ort_session` loads without them; None where it loads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types)
        return " ".join(str(e).split())[-300:]
    return None


def run_on_sample(session: Any, names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` on a sample of the user's (calibration, evaluation): onnxruntime's failure there is the
    model's, and raised as one :class:`ModelError` naming it."""
    try:
        return session.run(None if names is None else list(names), dict(feed))
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidArgument, RuntimeException)
        shapes = {k: list(np.shape(v)) for k, v in feed.items()}
        raise ModelError(f"onnxruntime fails running the model on a sample {shapes}: {str(e).strip()[:300]}",
                         "check the model runs in onnxruntime on such inputs: an export that traced a size computed "
                         "from the data (TopK's k, a NonZero count) runs only on inputs like the export's own; "
                         "re-export it, or calibrate on such inputs.") from e


def _check_loads(path: Path, model: onnx.ModelProto, checker_error: Exception) -> None:
    """A model onnx's checker refuses is still good input if onnxruntime loads it."""
    try:
        ort_session(model)
    except Exception as e:
        unknown = sorted({f"{n.op_type} (domain {n.domain or 'ai.onnx'!r})" for n in model.graph.node
                          if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
                          or n.domain not in ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")})
        if unknown:
            raise ModelError(f"{str(path)!r} uses operators that neither ONNX nor onnxruntime defines: "
                             f"{', '.join(unknown[:5])} (onnxruntime: {str(e).strip()[:200]}).",
                             "its converter left them unconverted (tf2onnx keeps a TFLite or TensorFlow operator "
                             "it cannot translate): convert them to ONNX operators, or export the part of the model "
                             "before them.") from e
        raise ModelError(f"{str(path)!r} is not a valid ONNX model (onnx: {str(checker_error).strip()[:200]}; "
                         f"onnxruntime: {str(e).strip()[:200]}).",
                         "re-export it, e.g. torch.onnx.export(..., dynamo=False), and check the file was "
                         "copied completely.") from e


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """An ONNX node's attribute as a Python value (str for bytes), or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    initializers = {i.name for i in model.graph.initializer}
    result = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        kind = vi.type.WhichOneof("value")
        if kind not in (None, "tensor_type") or not vi.type.tensor_type.elem_type:
            what = {"sequence_type": "a sequence", "optional_type": "an optional", "map_type": "a map",
                    "sparse_tensor_type": "a sparse tensor"}.get(kind or "", "untyped")
            raise ModelError(f"the model's input {vi.name!r} is {what}, not a tensor: maptools feeds tensors "
                             "(calibration, checks, evaluation).",
                             "export the model with tensor inputs (an optional input as a tensor it always gets).")
        tt = vi.type.tensor_type
        # a dim_param, an absent value, or a value <= 0 (older exporters write -1) is dynamic
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        result.append(ModelInput(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return result


def overridable_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers the file also lists as graph inputs, which onnxruntime lets a caller feed (tf2onnx's TF1
    ``PlaceholderWithDefault``, a training flag that gates dropout) and otherwise takes as they are."""
    listed = {vi.name for vi in model.graph.input}
    return [i.name for i in model.graph.initializer if i.name in listed]


def with_inputs(model: onnx.ModelProto, input_shapes: Any) -> onnx.ModelProto:
    """``model`` with each overridable initializer ``input_shapes`` names made a plain input (its default
    dropped): the calibration samples feed it, as the model's own package does (``training=False``)."""
    named = set(overridable_initializers(model)) & set(input_shapes if isinstance(input_shapes, Mapping) else ())
    if not named:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    defaults = {i.name: i for i in result.graph.initializer if i.name in named}
    kept = [i for i in result.graph.initializer if i.name not in named]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    for vi in result.graph.input:  # an input listed without its dims takes the default's
        if vi.name in named and not vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.shape.SetInParent()
            for d in defaults[vi.name].dims:
                vi.type.tensor_type.shape.dim.add().dim_value = d
    return result


#: Operators whose output depends on their input's shape only, not on its values.
_SHAPE_ONLY = frozenset({"Shape", "Size", "ConstantOfShape", "EyeLike"})


def integer_range(dtype: np.dtype, limit: int | None = None) -> tuple[int, int]:
    """``[low, high)`` of random values for an integer (or bool) input: byte values or token ids (0-255; -128-127
    for int8), below ``limit`` where the input indexes a table of ``limit`` rows
    (:func:`index_limits`); 0-1 for bool."""
    if dtype.kind == "b":
        return 0, 2
    if limit is not None:
        return 0, max(1, min(256, limit))
    return (-128, 128) if dtype == np.int8 else (0, 256)


def index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """``{input: n}`` for each integer input whose values reach the indices of a ``Gather`` from a constant
    table (token ids into an embedding of ``n`` rows, directly or through a Cast, a Reshape, a row picked from
    them, or tf2onnx's wrap of negative ids): random values of that input must stay below ``n`` (the smallest
    such table), or the model indexes out of bounds."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            dims[node.output[0]] = list(node.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    limits = {}
    for spec in model_inputs(model):
        if spec.dtype.kind not in "iu":
            continue
        found, seen, todo = [], {spec.name}, [spec.name]
        while todo:  # every tensor the input's values flow into
            tensor = todo.pop()
            for node in readers.get(tensor, []):
                if node.op_type == "Gather" and node.input[1] == tensor and node.input[0] in dims:
                    shape = dims[node.input[0]]
                    found.append(shape[int(node_attr(node, "axis", 0)) % len(shape)])
                elif node.op_type not in _SHAPE_ONLY:
                    todo.extend(t for t in node.output if t and t not in seen)
                    seen.update(node.output)
        if found:
            limits[spec.name] = min(found)
    return limits


def check_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Validate ``input_shapes`` against the graph inputs (names, ranks, positive sizes); return them as
    tuples of ints.

    A size that differs from a fixed dim of the model is not refused here: exporters write placeholder
    sizes that the model's own package replaces at load. Whether the model runs at these shapes is
    checked in onnxruntime (:func:`maptools.prepare.reference_outputs`).
    """
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
    text = [name for name, spec in inputs.items() if spec.dtype.kind in "OSU"]
    if text:
        raise ModelError(f"input(s) {', '.join(text)} take strings (a text front end, such as ai.onnx.ml's "
                         "LabelEncoder or a tokenizer): a string has no quantization grid, nor can calibration "
                         "sample one.", "quantize the numeric part: cut the model after its string operators "
                         "(onnx.utils.extract_model, with their numeric outputs as its inputs).")
    labels = [o.name for o in model.graph.output if o.type.HasField("tensor_type")
              and o.type.tensor_type.elem_type == onnx.TensorProto.STRING]
    if labels:
        raise ModelError(f"output(s) {', '.join(labels)} are strings (a class label lookup, such as ai.onnx.ml's "
                         "LabelEncoder after an ArgMax): a string has no quantization grid, and maptools carries "
                         "numeric tensors between its stages.", "quantize the numeric part: cut the model before "
                         "its string operators (onnx.utils.extract_model, with their numeric inputs as its outputs), "
                         "and look the labels up after it.")
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
        shapes[name] = tuple(int(d) for d in shape)
    return shapes


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and the outputs of standard ``Constant`` nodes, by tensor name."""
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.attribute:
            value = onnx.helper.get_attribute_value(node.attribute[0])
            values[node.output[0]] = (onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto)
                                      else np.asarray(value.decode() if isinstance(value, bytes) else value))
    return values


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """``{domain: version}`` of the model's opset imports, the default domain as ``''``."""
    return {("" if o.domain in DEFAULT_DOMAINS else o.domain): int(o.version) for o in model.opset_import}


def auto_pads(auto_pad: str, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[int]:
    """Explicit ``pads`` ([begin..., end...]) of a window operator with ``auto_pad`` VALID, SAME_UPPER or
    SAME_LOWER over input sizes ``spatial``."""
    rank = len(kernel)
    pads = [0] * 2 * rank
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i, size in enumerate(spatial):
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + rank] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return pads


# --- control flow: the tensors a subgraph reads from the graph around it --------------------------

#: Operators with subgraphs (run on the host, in onnxruntime).
CONTROL_FLOW_OP_TYPES = frozenset({"If", "Loop", "Scan"})
#: Attribute of a control-flow node in the explicit form: how many of its inputs are outer-scope reads.
OUTER_INPUTS = "maptools_outer_inputs"
#: Attribute of a control-flow node in the explicit form: the names its subgraphs read those inputs by.
OUTER_NAMES = "maptools_outer_names"


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs of ``node``, by attribute name: tools that rebuild a node sort its attributes
    (``onnx.helper.make_node``; an If's ``then_branch`` and ``else_branch`` swap), and the order of
    :func:`outer_inputs` must survive that."""
    return [g for a in sorted(node.attribute, key=lambda a: a.name)
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])]


def _reads(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` reads from its enclosing scope, in order of first use."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    found: list[str] = []
    for node in graph.node:
        inner = [t for g in _subgraphs(node) for t in _reads(g)]
        for name in [*node.input, *inner]:
            if name and name not in local and name not in found:
                found.append(name)
        local.update(node.output)
    found += [o.name for o in graph.output if o.name not in local and o.name not in found]
    return found


def outer_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a control-flow node's subgraphs read from the graph around it (not its own inputs)."""
    found: list[str] = []
    for name in (t for g in _subgraphs(node) for t in _reads(g)):
        if name not in node.input and name not in found:
            found.append(name)
    return found


def _rename_reads(graph: onnx.GraphProto, names: Mapping[str, str]) -> None:
    """Point the outer-scope reads of ``graph`` (and of its nested subgraphs) at new names."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in names and name not in local:
                node.input[k] = names[name]
        for g in _subgraphs(node):
            _rename_reads(g, {old: new for old, new in names.items() if old not in local})
        local.update(node.output)
    for out in graph.output:
        if out.name in names and out.name not in local:
            out.name = names[out.name]


def explicit_outer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which each control-flow node lists the tensors its subgraphs read as extra inputs (counted
    in its :data:`OUTER_INPUTS` attribute): graph tools that follow edges (PPQ, the operator graph) then order
    and feed it correctly. Not valid ONNX until :func:`implicit_outer_inputs` undoes it. ``model`` itself where
    it has no control-flow node (not copied: its weights are most of it)."""
    if not any(n.op_type in CONTROL_FLOW_OP_TYPES and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for node in out.graph.node:
        if node.op_type in CONTROL_FLOW_OP_TYPES and node.domain in ("", "ai.onnx"):
            # every read, also of one of the node's own inputs (a trip count the body reads): a tool that renames
            # that input (PPQ's export copies a shared constant) must rename the read with it
            reads = list(dict.fromkeys(t for g in _subgraphs(node) for t in _reads(g)))
            node.input.extend(reads)
            node.attribute.append(onnx.helper.make_attribute(OUTER_INPUTS, len(reads)))
            if reads:
                node.attribute.append(onnx.helper.make_attribute(OUTER_NAMES, reads))
    return out


def implicit_node(node: onnx.NodeProto) -> tuple[onnx.NodeProto, list[str]]:
    """``node`` back in ONNX's form and the names it was given for its outer-scope reads (its subgraphs read
    those names: an extra input renamed since, by a tool that rewired it, is renamed inside them too)."""
    count = node_attr(node, OUTER_INPUTS)
    if count is None:
        return onnx.NodeProto.FromString(node.SerializeToString()), []
    plain = _without_outer(node, int(count))
    given = list(node.input[len(node.input) - int(count):])
    # (by the names recorded, not read again: once a tool renamed one of the node's own inputs, a read of it would
    # no longer match, shifting every name after it)
    names = [n.decode() if isinstance(n, bytes) else n for n in node_attr(node, OUTER_NAMES) or []]
    renamed = {old: new for old, new in zip(names, given) if old != new}
    for g in _subgraphs(plain):
        _rename_reads(g, renamed)
    return plain, given


def _without_outer(node: onnx.NodeProto, count: int) -> onnx.NodeProto:
    plain = onnx.NodeProto.FromString(node.SerializeToString())
    del plain.input[len(plain.input) - count:]
    keep = [a for a in plain.attribute if a.name not in (OUTER_INPUTS, OUTER_NAMES)]
    del plain.attribute[:]
    plain.attribute.extend(keep)
    return plain


def implicit_outer_inputs(model: onnx.ModelProto) -> None:
    """Undo :func:`explicit_outer_inputs` in place (the subgraphs read the extra inputs' current names)."""
    for k, node in enumerate(model.graph.node):
        if node_attr(node, OUTER_INPUTS) is not None:
            model.graph.node[k].CopyFrom(implicit_node(node)[0])


def one_copy_each(model: onnx.ModelProto) -> int:
    """Point every reader of an initializer at the first one holding the same tensor and drop the copies, in place;
    returns how many were dropped. PPQ gives each operator its own copy of a shared weight: a written-out
    recurrence's every step reads one ``R``, and a CRNN's ``quant_model.onnx`` was 3.2x its unique content. A graph
    input or output, and a tensor a subgraph reads, keep their names."""
    graph = model.graph
    fixed = {v.name for v in (*graph.input, *graph.output)}
    fixed.update(t for n in graph.node if n.op_type in CONTROL_FLOW_OP_TYPES for t in outer_inputs(n))
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for tensor in graph.initializer:
        if tensor.name in fixed or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if tensor.raw_data:
            content = tensor.raw_data
        else:
            bare = onnx.TensorProto()
            bare.CopyFrom(tensor)
            bare.name = ""
            content = bare.SerializeToString()
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(content).digest())
        alias[tensor.name] = first.setdefault(key, tensor.name)
    dropped = {name for name, kept in alias.items() if name != kept}
    if not dropped:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in dropped:
                node.input[k] = alias[name]
    kept_tensors = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept_tensors)
    kept_info = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return len(dropped)


#: Operators that move an output's elements without computing new values (:func:`concat_parts` looks through them).
_LAYOUT = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def concat_parts(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...]] | None]:
    """Per graph output, the parts a Concat assembled it from: ``(axis, bounds)`` with part ``i`` at
    ``bounds[i]:bounds[i + 1]`` along ``axis`` of the output (a detector's boxes beside its scores), traced through
    the operators that only move elements; a Concat of inputs that were each assembled alike (a detector's levels)
    keeps their parts. None where the output is not so assembled, or a shape on the way is not recorded (a
    prepared model records every shape)."""
    producer = {t: n for n in model.graph.node for t in n.output if t}
    shapes = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
              for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]
              if vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}

    def parts(name: str, depth: int = 0) -> tuple[int, tuple[int, ...]] | None:
        node = producer.get(name)
        if node is None or depth > 64 or node.domain not in DEFAULT_DOMAINS:
            return None
        if node.op_type == "Concat":
            inputs = [t for t in node.input if t]
            if len(inputs) < 2 or name not in shapes or any(t not in shapes for t in inputs):
                return None
            axis = int(node_attr(node, "axis")) % len(shapes[name])
            inner = [parts(t, depth + 1) for t in inputs]
            if inner[0] is not None and inner[0][0] != axis and all(p == inner[0] for p in inner):
                return inner[0]
            return axis, tuple(int(b) for b in np.cumsum([0, *(shapes[t][axis] for t in inputs)]))
        if node.op_type not in _LAYOUT or (inner := parts(node.input[0], depth + 1)) is None:
            return None
        axis, bounds = inner
        source, target = shapes.get(node.input[0]), shapes.get(name)
        if source is None or target is None:
            return None
        if node.op_type == "Transpose":
            perm = list(node_attr(node, "perm") or reversed(range(len(source))))
            return perm.index(axis), bounds
        lead = math.prod(source[:axis])  # the axis survives a reshape whole, after the same number of elements
        return next(((a, bounds) for a in range(len(target))
                     if target[a] == source[axis] and math.prod(target[:a]) == lead), None)

    return {o.name: parts(o.name) for o in model.graph.output}


def _order(graph: onnx.GraphProto) -> list[int]:
    """``graph``'s node positions in topological order, each node as near its place in the file as its inputs
    allow (the file's order where it is one; also where a cycle leaves none)."""
    producer = {t: i for i, node in enumerate(graph.node) for t in node.output if t}
    edges = nx.DiGraph()
    edges.add_nodes_from(range(len(graph.node)))
    edges.add_edges_from((producer[t], i) for i, node in enumerate(graph.node)
                         for t in [*node.input, *outer_inputs(node)] if t in producer)
    try:
        return list(nx.lexicographical_topological_sort(edges))
    except nx.NetworkXUnfeasible:
        return list(range(len(graph.node)))


def _in_order(graph: onnx.GraphProto) -> bool:
    """Whether ``graph``'s nodes, and each subgraph's, are in topological order."""
    return (_order(graph) == list(range(len(graph.node)))
            and all(_in_order(g) for node in graph.node for g in _subgraphs(node)))


def _sort(graph: onnx.GraphProto) -> int:
    """Put ``graph``'s nodes, and each subgraph's, in :func:`_order` in place; how many moved."""
    moved = sum(_sort(g) for node in graph.node for g in _subgraphs(node))
    order = _order(graph)
    nodes = [onnx.NodeProto.FromString(graph.node[i].SerializeToString()) for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return moved + sum(1 for position, i in enumerate(order) if position != i)


def in_topological_order(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with its nodes (and each subgraph's) in topological order, and how many nodes moved: ``model``
    itself where they are, else a sorted copy (an exporter that appends a node after its readers writes a graph
    onnxruntime sorts for itself, where every pass that walks the nodes in order goes wrong)."""
    if _in_order(model.graph):
        return model, 0
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result, _sort(result.graph)
