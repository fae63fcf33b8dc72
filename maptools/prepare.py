"""Prepare a model as shipped for PPQ: fixed dims, opset 13, folded constants, PPQ-ready operators.

Real exports have dynamic or symbolic input dims (``batch``, ``dim_value: -1``), opsets from 11 to
18+, ``Constant`` nodes, BatchNorm and bias ``Add`` nodes beside convolutions, and operators that
PPQ 0.6.6 does not dispatch (``Resize`` above opset 13) or whose opset-13 form differs
(``HardSwish``, ``LayerNormalization``). :func:`prepare_model` turns such a model, given concrete
``input_shapes``, into one that PPQ, the conversion and the simulation all read node for node:

1. fix the input dims to ``input_shapes`` and drop stale intermediate shapes;
2. fold ``Constant`` nodes into initializers, inline local functions;
3. convert to opset 13 (PPQ's dispatch and its ONNX export speak opset 13): upward with onnx's
   version converter, downward by rewriting the few operators whose definition changed;
4. simplify with onnxsim (constant folding of shape arithmetic, BatchNorm into Conv, ...);
5. the rewrites PPQ would otherwise do inside its own graph (so operator names stay the ONNX
   ones): BatchNorm into the Conv/Gemm before it (or a per-channel Mul+Add), a bias ``Add`` into
   the Conv before it, Identity and Dropout removed, every node uniquely named;
6. record every tensor's static shape (ONNX shape inference, or one onnxruntime run where it fails);
7. check the result against the original model in onnxruntime on seeded random inputs.

Every step is recorded. A model onnxruntime runs is never refused for a step of ours: a step that
fails is skipped (and recorded so), and a result that differs from the original is prepared again
with fewer rewrites. Only a model onnxruntime cannot run at ``input_shapes`` is a
:class:`~maptools.errors.ModelError` / :class:`~maptools.errors.InputShapeError`, raised before
anything is written.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.defs
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference

from maptools.errors import InputShapeError, MaptoolsError, ModelError
from maptools.mapfolder import atomic_write, sha256_file, storage_errors
from maptools.onnx_model import (CONTROL_FLOW_OP_TYPES, auto_pads, check_input_shapes, load_model, model_inputs,
                                 node_attr, ort_session)

log = logging.getLogger(__name__)

__all__ = ["PreparedModel", "prepare_model", "prepare", "opset_report", "fingerprint", "TARGET_OPSET", "opset_of",
           "PREPARED_KEY", "Reference", "reference_outputs", "check_equivalent"]

#: The opset PPQ 0.6.6 dispatches and exports (its ONNX Runtime exporter writes ai.onnx 13).
TARGET_OPSET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class PreparedModel:
    """The prepared model file and what was done to get it."""

    path: Path
    sha256: str
    input_shapes: dict[str, list[int]]
    source_opset: int
    opset: int
    steps: tuple[str, ...]
    max_abs_diff: float
    max_rel_diff: float
    nodes_before: int
    nodes_after: int
    #: what preparation left undone: steps that failed and were skipped, levels it fell back from
    fallbacks: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "input_shapes": self.input_shapes, "source_opset": self.source_opset,
                "opset": self.opset, "steps": list(self.steps), "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "fallbacks": list(self.fallbacks)}


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 1


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            entry.version = version


@dataclass
class _Context:
    """The model being rewritten, with the lookups rewrites need."""

    model: onnx.ModelProto
    steps: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _shapes: dict[str, onnx.TypeProto] | None = None

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def initializers(self) -> dict[str, np.ndarray]:
        return {i.name: onnx.numpy_helper.to_array(i) for i in self.graph.initializer}

    def types(self) -> dict[str, onnx.TypeProto]:
        if self._shapes is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # noqa: BLE001  (best effort: rewrites that need a shape say so)
                inferred = self.model
            g = inferred.graph
            self._shapes = {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}
            for init in g.initializer:
                t = onnx.TypeProto()
                t.tensor_type.elem_type = init.data_type
                for d in init.dims:
                    t.tensor_type.shape.dim.add().dim_value = d
                self._shapes[init.name] = t
        return self._shapes

    def invalidate(self) -> None:
        self._shapes = None

    def shape(self, tensor: str) -> list[int] | None:
        t = self.types().get(tensor)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]

    def elem_type(self, tensor: str) -> int:
        t = self.types().get(tensor)
        return int(t.tensor_type.elem_type) if t is not None else 0

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def fresh(self, base: str) -> str:
        used = {t for n in self.graph.node for t in [*n.input, *n.output]} | {i.name for i in self.graph.initializer}
        name, i = base, 0
        while name in used:
            i += 1
            name = f"{base}_{i}"
        return name


def _drop_attrs(node: onnx.NodeProto, names: set[str]) -> None:
    kept = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


def _where(node: onnx.NodeProto) -> str:
    return f"{node.name or node.output[0]} ({node.op_type})"


# --- 1. dims --------------------------------------------------------------------------------------

def fix_input_dims(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                   output_shapes: Mapping[str, Sequence[int]] | None = None) -> bool:
    """Set every graph input's dims to ``shapes`` and drop intermediate shapes (re-inferred).

    Graph outputs get ``output_shapes`` where given (what onnxruntime computed: exporters write stale
    ranks and sizes there), else keep their rank with the sizes forgotten.
    """
    changed = False
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        for d, value in zip(dims, shapes[vi.name]):
            if not d.HasField("dim_value") or d.dim_value != value:
                changed = True
            d.Clear()
            d.dim_value = int(value)
    del model.graph.value_info[:]
    for out in model.graph.output:
        known = (output_shapes or {}).get(out.name)
        if known is not None:
            out.type.tensor_type.ClearField("shape")
            for size in known:
                out.type.tensor_type.shape.dim.add().dim_value = int(size)
            continue
        for d in out.type.tensor_type.shape.dim:
            d.Clear()
    return changed


# --- 2. constants and functions ------------------------------------------------------------------

def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    if not node.attribute:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return onnx.numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
        value = onnx.helper.get_attribute_value(attr)
        return np.asarray(value, dtype=np.float32 if "float" in attr.name else np.int64)
    return None


def fold_constant_nodes(ctx: _Context) -> int:
    """Replace ``Constant`` nodes by initializers of the same name."""
    kept, folded = [], 0
    for node in ctx.graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS else None
        if value is None:
            kept.append(node)
            continue
        ctx.add_initializer(node.output[0], value)
        folded += 1
    if folded:
        del ctx.graph.node[:]
        ctx.graph.node.extend(kept)
        ctx.model.ir_version = max(ctx.model.ir_version, 4)  # initializers need not be inputs
    return folded


# --- 3. opset -------------------------------------------------------------------------------------

def _schema(op_type: str, version: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return None


Rewrite = Callable[[onnx.NodeProto, _Context], list[onnx.NodeProto]]


def _hardswish(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    gate = ctx.fresh(f"{node.output[0]}_hardsigmoid")
    return [onnx.helper.make_node("HardSigmoid", [node.input[0]], [gate], name=f"{node.name}_hardsigmoid",
                                  alpha=1.0 / 6, beta=0.5),
            onnx.helper.make_node("Mul", [node.input[0], gate], [node.output[0]], name=node.name)]


def _layernorm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    if len([o for o in node.output if o]) > 1:
        raise ModelError(f"{_where(node)} uses its Mean/InvStdDev outputs, which opset 13 has no operator for.",
                         "re-export the model with opset 13 (torch.onnx.export(..., opset_version=13)).")
    shape = ctx.shape(node.input[0])
    if shape is None:
        raise ModelError(f"the rank of {_where(node)}'s input is unknown.", "give input_shapes for every input.")
    axis = int(node_attr(node, "axis", -1)) % len(shape)
    axes = list(range(axis, len(shape)))
    eps = float(node_attr(node, "epsilon", 1e-5))
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("mean", "diff", "sq", "var", "eps", "veps", "std", "norm", "scaled")}
    ctx.add_initializer(t["eps"], np.asarray(eps, dtype=np.float32))
    nodes = [
        onnx.helper.make_node("ReduceMean", [x], [t["mean"]], name=f"{name}_mean", axes=axes, keepdims=1),
        onnx.helper.make_node("Sub", [x, t["mean"]], [t["diff"]], name=f"{name}_sub"),
        onnx.helper.make_node("Mul", [t["diff"], t["diff"]], [t["sq"]], name=f"{name}_square"),
        onnx.helper.make_node("ReduceMean", [t["sq"]], [t["var"]], name=f"{name}_var", axes=axes, keepdims=1),
        onnx.helper.make_node("Add", [t["var"], t["eps"]], [t["veps"]], name=f"{name}_eps"),
        onnx.helper.make_node("Sqrt", [t["veps"]], [t["std"]], name=f"{name}_sqrt"),
    ]
    has_bias = len(node.input) > 2 and node.input[2]
    nodes.append(onnx.helper.make_node("Div", [t["diff"], t["std"]], [t["norm"]], name=f"{name}_div"))
    nodes.append(onnx.helper.make_node("Mul", [t["norm"], node.input[1]], [t["scaled"] if has_bias else out],
                                       name=f"{name}_scale" if has_bias else name))
    if has_bias:
        nodes.append(onnx.helper.make_node("Add", [t["scaled"], node.input[2]], [out], name=name))
    return nodes


def _gelu(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("c", "half", "one", "a", "b", "e", "p")}
    ctx.add_initializer(t["half"], np.asarray(0.5, dtype=np.float32))
    ctx.add_initializer(t["one"], np.asarray(1.0, dtype=np.float32))
    if node_attr(node, "approximate", "none") == "tanh":
        raise ModelError(f"{_where(node)} uses the tanh approximation, which maptools does not rewrite.",
                         "re-export the model with opset 13 or with the exact GELU.")
    ctx.add_initializer(t["c"], np.asarray(math.sqrt(2.0), dtype=np.float32))
    return [onnx.helper.make_node("Div", [x, t["c"]], [t["a"]], name=f"{name}_div"),
            onnx.helper.make_node("Erf", [t["a"]], [t["e"]], name=f"{name}_erf"),
            onnx.helper.make_node("Add", [t["e"], t["one"]], [t["b"]], name=f"{name}_add"),
            onnx.helper.make_node("Mul", [x, t["b"]], [t["p"]], name=f"{name}_mul"),
            onnx.helper.make_node("Mul", [t["p"], t["half"]], [out], name=name)]


def _mish(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    sp, th = ctx.fresh(f"{out}_softplus"), ctx.fresh(f"{out}_tanh")
    return [onnx.helper.make_node("Softplus", [x], [sp], name=f"{name}_softplus"),
            onnx.helper.make_node("Tanh", [sp], [th], name=f"{name}_tanh"),
            onnx.helper.make_node("Mul", [x, th], [out], name=name)]


def _shape_slice(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    start, end = node_attr(node, "start"), node_attr(node, "end")
    if start is None and end is None:
        return [node]
    full = ctx.fresh(f"{node.output[0]}_full")
    starts = ctx.add_initializer(ctx.fresh(f"{node.output[0]}_starts"), np.asarray([start or 0], dtype=np.int64))
    ends = ctx.add_initializer(ctx.fresh(f"{node.output[0]}_ends"),
                               np.asarray([end if end is not None else 2**62], dtype=np.int64))
    plain = onnx.helper.make_node("Shape", [node.input[0]], [full], name=f"{node.name}_full")
    return [plain, onnx.helper.make_node("Slice", [full, starts, ends], [node.output[0]], name=node.name)]


def _castlike(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    to = ctx.elem_type(node.input[1])
    if not to:
        raise ModelError(f"the target type of {_where(node)} is unknown.", "re-export the model with opset 13.")
    return [onnx.helper.make_node("Cast", [node.input[0]], [node.output[0]], name=node.name, to=to)]


def _constant_input(node: onnx.NodeProto, index: int, ctx: _Context) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    value = ctx.initializers().get(node.input[index])
    if value is None:
        raise ModelError(f"{_where(node)} takes input {index} from a computed tensor; opset 13 needs it constant.",
                         "simplify the model with fixed input shapes, or re-export it with opset 13.")
    return value


def _reduce_axes(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """Reduce* at opset 18 takes axes as an input; before, as an attribute (ReduceSum: input since 13)."""
    if node.op_type == "ReduceSum":
        return [node]
    axes = _constant_input(node, 1, ctx)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if axes is None or axes.size == 0:
        if attrs.pop("noop_with_empty_axes", 0):
            return [onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)]
    else:
        attrs["axes"] = [int(a) for a in axes.reshape(-1)]
    attrs.pop("noop_with_empty_axes", None)
    return [onnx.helper.make_node(node.op_type, [node.input[0]], list(node.output), name=node.name, **attrs)]


def _split(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    parts = node_attr(node, "num_outputs")
    if parts is None:
        return [node]
    shape = ctx.shape(node.input[0])
    axis = int(node_attr(node, "axis", 0))
    if shape is None or shape[axis] < 0:
        raise ModelError(f"the split axis of {_where(node)} has no static size.", "give input_shapes for every input.")
    size = shape[axis]
    chunk = -(-size // parts)
    sizes = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
    split = ctx.add_initializer(ctx.fresh(f"{node.output[0]}_split"), np.asarray(sizes, dtype=np.int64))
    return [onnx.helper.make_node("Split", [node.input[0], split], list(node.output), name=node.name, axis=axis)]


def _only_defaults(defaults: dict[str, Any], max_inputs: int | None = None) -> Rewrite:
    """Accept the operator when the attributes added after opset 13 keep their defaults; drop them."""

    def rewrite(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
        for name, default in defaults.items():
            value = node_attr(node, name, default)
            if value != default:
                raise ModelError(f"{_where(node)} sets {name}={value!r}, which opset 13 cannot express.",
                                 "re-export the model with opset 13.")
        if max_inputs is not None and len([i for i in node.input[max_inputs:] if i]):
            raise ModelError(f"{_where(node)} uses inputs that opset 13 does not have.",
                             "re-export the model with opset 13.")
        _drop_attrs(node, set(defaults))
        del node.input[max_inputs if max_inputs is not None else len(node.input):]
        return [node]

    return rewrite


_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
#: Rewrites of operators whose definition after opset 13 differs from (or is absent at) opset 13.
_DOWN: dict[str, Rewrite] = {
    "HardSwish": _hardswish, "LayerNormalization": _layernorm, "Gelu": _gelu, "Mish": _mish,
    "Shape": _shape_slice, "CastLike": _castlike, "Split": _split, **{op: _reduce_axes for op in _REDUCE},
    "Reshape": _only_defaults({"allowzero": 0}),
    "BatchNormalization": _only_defaults({"training_mode": 0}),
    "LSTM": _only_defaults({"layout": 0}), "GRU": _only_defaults({"layout": 0}), "RNN": _only_defaults({"layout": 0}),
    "Resize": _only_defaults({"antialias": 0, "keep_aspect_ratio_policy": "stretch", "axes": None}),
    "Pad": _only_defaults({}, max_inputs=3),
    "AveragePool": _only_defaults({"dilations": None}),
    "Cast": _only_defaults({"saturate": 1}),
    "ScatterElements": _only_defaults({"reduction": "none"}), "ScatterND": _only_defaults({"reduction": "none"}),
}


def _same_signature(node: onnx.NodeProto, old: onnx.defs.OpSchema) -> bool:
    """True when the node uses only attributes and inputs/outputs the opset-13 schema has."""
    if any(a.name not in old.attributes for a in node.attribute):
        return False
    max_in = old.max_input if old.max_input < 2**31 - 1 else len(node.input)
    max_out = old.max_output if old.max_output < 2**31 - 1 else len(node.output)
    return len([i for i in node.input[max_in:] if i]) == 0 and len([o for o in node.output[max_out:] if o]) == 0


def downgrade_to_13(ctx: _Context, opset: int) -> list[str]:
    """Rewrite operators defined after opset 13 into their opset-13 form; return what changed."""
    rewritten: dict[str, int] = {}
    problems: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in list(ctx.graph.node):
        now, old = _schema(node.op_type, opset), _schema(node.op_type, TARGET_OPSET)
        if node.domain not in _DEFAULT_DOMAINS or now is None or (old is not None and
                                                                  now.since_version == old.since_version):
            nodes.append(node)
            continue
        rewrite = _DOWN.get(node.op_type)
        try:
            if rewrite is not None:
                replaced = rewrite(node, ctx)
                if replaced != [node] or node.op_type in ("HardSwish", "LayerNormalization"):
                    rewritten[node.op_type] = rewritten.get(node.op_type, 0) + 1
                nodes.extend(replaced)
            elif old is not None and _same_signature(node, old):
                nodes.append(node)  # only its type list grew
            else:
                problems.append(f"{_where(node)}: defined at opset {now.since_version}"
                                + ("" if old else ", absent at opset 13"))
        except ModelError as e:
            problems.append(e.problem)
    if problems:
        raise ModelError(f"maptools cannot bring these operators from opset {opset} to opset {TARGET_OPSET}, "
                         f"which PPQ dispatches: {'; '.join(problems[:10])}"
                         + (f" and {len(problems) - 10} more" if len(problems) > 10 else "") + ".",
                         "re-export the model with opset 13 (torch.onnx.export(..., opset_version=13)), or "
                         "replace those operators.")
    del ctx.graph.node[:]
    ctx.graph.node.extend(nodes)
    _set_opset(ctx.model, TARGET_OPSET)
    ctx.invalidate()
    return [f"{op} x{n}" for op, n in sorted(rewritten.items())]


def opset_report(model: onnx.ModelProto) -> tuple[dict[str, int], list[str]]:
    """What bringing ``model`` to opset 13 involves, without doing it: operator types maptools rewrites
    (with counts) and operators it cannot bring there (empty for opset 13 and below)."""
    opset = opset_of(model)
    rewrites: dict[str, int] = {}
    problems: list[str] = []
    if opset <= TARGET_OPSET:
        return rewrites, problems
    for node in model.graph.node:
        now, old = _schema(node.op_type, opset), _schema(node.op_type, TARGET_OPSET)
        if node.domain not in _DEFAULT_DOMAINS or now is None or (old is not None and
                                                                  now.since_version == old.since_version):
            continue
        if node.op_type in _DOWN:
            rewrites[node.op_type] = rewrites.get(node.op_type, 0) + 1
        elif old is None or not _same_signature(node, old):
            problems.append(f"{_where(node)}: defined at opset {now.since_version}"
                            + ("" if old else ", absent at opset 13"))
    return rewrites, problems


def convert_opset(ctx: _Context) -> str | None:
    """Bring the model to opset 13; return a description, or None if it already was."""
    opset = opset_of(ctx.model)
    if opset == TARGET_OPSET:
        return None
    if opset < TARGET_OPSET:
        from onnx import version_converter

        try:
            ctx.model = version_converter.convert_version(ctx.model, TARGET_OPSET)
        except Exception as e:
            raise ModelError(f"onnx's version converter cannot bring the model from opset {opset} to "
                             f"{TARGET_OPSET}: {str(e).strip()[:300]}",
                             "re-export the model with opset 13 (torch.onnx.export(..., opset_version=13)).") from e
        for node in ctx.graph.node:  # before opset 11, Upsample and Resize computed asymmetric, floor; the
            # converter leaves Resize-11's defaults (half_pixel), which differ for linear modes
            if opset < 11 and node.op_type == "Resize" and node_attr(node, "coordinate_transformation_mode") is None:
                _drop_attrs(node, {"coordinate_transformation_mode", "nearest_mode"})
                node.attribute.extend([onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"),
                                       onnx.helper.make_attribute("nearest_mode", "floor")])
        ctx.invalidate()
        return f"opset {opset} -> {TARGET_OPSET} (onnx version converter)"
    rewritten = downgrade_to_13(ctx, opset)
    return f"opset {opset} -> {TARGET_OPSET}" + (f" (rewrote {', '.join(rewritten)})" if rewritten else "")


# --- 4. onnxsim -------------------------------------------------------------------------------------

def simplify(ctx: _Context, shapes: Mapping[str, Sequence[int]]) -> None:
    from onnxsim import simplify as onnxsim

    try:
        simplified, ok = onnxsim(ctx.model, overwrite_input_shapes={k: list(v) for k, v in shapes.items()})
    except Exception as e:
        raise ModelError(f"onnxsim cannot simplify the model: {str(e).strip()[:300]}",
                         "check the model runs in onnxruntime with these input shapes, or pass simplify=False.") from e
    if not ok:
        raise ModelError("onnxsim's own check of the simplified model failed.", "pass simplify=False.")
    ctx.model = simplified
    ctx.invalidate()


# --- 5. PPQ-ready rewrites ---------------------------------------------------------------------------

def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            if t:
                out.setdefault(t, []).append(node)
    return out


def _replace_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, t in enumerate(node.input):
            if t == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def _remove_passthrough(ctx: _Context) -> int:
    """Drop Identity and inference-time Dropout nodes (PPQ removes them from its own graph)."""
    removed = 0
    outputs = {o.name for o in ctx.graph.output}
    for node in list(ctx.graph.node):
        if node.op_type not in ("Identity", "Dropout") or node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type == "Dropout" and len([o for o in node.output if o]) > 1:
            continue
        src, dst = node.input[0], node.output[0]
        if dst in outputs and (src in outputs or src in {i.name for i in ctx.graph.input}):
            continue  # an output that is another output or an input: keep the node
        ctx.graph.node.remove(node)
        if dst in outputs:  # the producer of src writes the graph output directly
            for other in ctx.graph.node:
                for i, t in enumerate(other.output):
                    if t == src:
                        other.output[i] = dst
            _replace_tensor(ctx.graph, src, dst)
        else:
            _replace_tensor(ctx.graph, dst, src)
        removed += 1
    return removed


_WINDOW_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")


def _explicit_pads(ctx: _Context) -> int:
    """``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID; keras2onnx and tf2onnx write it) as explicit ``pads`` of
    the fixed input shape: PPQ's exporter writes both, which onnxruntime refuses."""
    changed = 0
    for node in ctx.graph.node:
        mode = node_attr(node, "auto_pad", "NOTSET")
        shape = ctx.shape(node.input[0]) if node.op_type in _WINDOW_OPS and mode != "NOTSET" else None
        if shape is None or min(shape) < 0:
            continue
        if node.op_type == "Conv":
            weight = ctx.shape(node.input[1])
            if weight is None:
                continue
            kernel = list(node_attr(node, "kernel_shape", weight[2:]))
        else:
            kernel = list(node_attr(node, "kernel_shape"))
        rank = len(kernel)
        pads = auto_pads(mode, shape[2:], kernel, list(node_attr(node, "strides", [1] * rank)),
                         list(node_attr(node, "dilations", [1] * rank)))
        _drop_attrs(node, {"auto_pad", "pads"})
        node.attribute.append(onnx.helper.make_attribute("pads", pads))
        changed += 1
    if changed:
        ctx.invalidate()
    return changed


def _bn_affine(bn: onnx.NodeProto, inits: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        gamma, beta, mean, var = (inits[t].astype(np.float64) for t in bn.input[1:5])
    except KeyError:
        return None
    scale = gamma / np.sqrt(var + float(node_attr(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def _fold_batchnorm(ctx: _Context) -> tuple[int, int]:
    """BatchNorm after a Conv/ConvTranspose/Gemm read only by it: folded into its weights; other
    BatchNorms become a per-channel Mul + Add. Returns (folded, replaced)."""
    folded = replaced = 0
    inits = ctx.initializers()
    init_index = {i.name: k for k, i in enumerate(ctx.graph.initializer)}
    consumers = _consumers(ctx.graph)
    producer = {t: n for n in ctx.graph.node for t in n.output}
    outputs = {o.name for o in ctx.graph.output}

    def set_init(name: str, value: np.ndarray) -> None:
        tensor = onnx.numpy_helper.from_array(value.astype(np.float32), name)
        if name in init_index:
            ctx.graph.initializer[init_index[name]].CopyFrom(tensor)
        else:
            init_index[name] = len(ctx.graph.initializer)
            ctx.graph.initializer.append(tensor)
        inits[name] = value

    for bn in [n for n in ctx.graph.node if n.op_type == "BatchNormalization"]:
        affine = _bn_affine(bn, inits)
        if affine is None or len([o for o in bn.output if o]) != 1:
            continue
        scale, shift = affine
        src = producer.get(bn.input[0])
        weight = inits.get(src.input[1]) if src is not None and len(src.input) > 1 else None
        foldable = (src is not None and src.op_type in ("Conv", "ConvTranspose", "Gemm") and weight is not None
                    and len(consumers.get(bn.input[0], [])) == 1 and bn.input[0] not in outputs
                    and len(consumers.get(src.input[1], [])) == 1
                    and not (len(src.input) > 2 and src.input[2] and (src.input[2] not in inits
                                                                      or len(consumers[src.input[2]]) != 1)))
        if foldable and src.op_type == "Gemm":
            foldable = not node_attr(src, "transA", 0) and float(node_attr(src, "alpha", 1.0)) == 1.0 and \
                float(node_attr(src, "beta", 1.0)) == 1.0
        if foldable:
            w = weight.astype(np.float64)
            if src.op_type == "Conv":
                w = w * scale.reshape([-1] + [1] * (w.ndim - 1))
            elif src.op_type == "ConvTranspose":
                groups = int(node_attr(src, "group", 1))
                w = (w.reshape(groups, -1, *w.shape[1:]) * scale.reshape(groups, 1, -1, *[1] * (w.ndim - 2))
                     ).reshape(w.shape)
            else:
                w = w * (scale[:, None] if node_attr(src, "transB", 0) else scale[None, :])
            bias = inits[src.input[2]].astype(np.float64) if len(src.input) > 2 and src.input[2] else 0.0
            new_w = ctx.fresh(f"{src.input[1]}_bnfold")
            set_init(new_w, w)
            src.input[1] = new_w
            new_b = ctx.fresh(f"{src.output[0]}_bias")
            set_init(new_b, np.asarray(bias * scale + shift).reshape(-1))
            _set_bias(src, new_b)
            src.output[0] = bn.output[0]
            ctx.graph.node.remove(bn)
            folded += 1
            continue
        rank = ctx.shape(bn.input[0])
        shape = [-1] + [1] * (len(rank) - 2) if rank else [-1, 1, 1]
        mul_c = ctx.fresh(f"{bn.output[0]}_scale")
        add_c = ctx.fresh(f"{bn.output[0]}_shift")
        set_init(mul_c, scale.reshape(shape))
        set_init(add_c, shift.reshape(shape))
        mid = ctx.fresh(f"{bn.output[0]}_scaled")
        name = bn.name or bn.output[0]
        index = list(ctx.graph.node).index(bn)
        ctx.graph.node.remove(bn)
        ctx.graph.node.insert(index, onnx.helper.make_node("Add", [mid, add_c], [bn.output[0]], name=name))
        ctx.graph.node.insert(index, onnx.helper.make_node("Mul", [bn.input[0], mul_c], [mid], name=f"{name}_scale"))
        replaced += 1
    if folded or replaced:
        _drop_unused_initializers(ctx)
    return folded, replaced


def _set_bias(node: onnx.NodeProto, name: str) -> None:
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def _fold_bias_add(ctx: _Context) -> int:
    """``Conv -> Add(per-channel constant)`` (the Conv read only by the Add) into the Conv's bias."""
    fused = 0
    inits = ctx.initializers()
    consumers = _consumers(ctx.graph)
    producer = {t: n for n in ctx.graph.node for t in n.output}
    outputs = {o.name for o in ctx.graph.output}
    for add in [n for n in ctx.graph.node if n.op_type == "Add"]:
        consts = [t for t in add.input if t in inits]
        acts = [t for t in add.input if t not in inits]
        if len(consts) != 1 or len(acts) != 1 or acts[0] not in producer:
            continue
        conv = producer[acts[0]]
        if conv.op_type not in ("Conv", "ConvTranspose") or len(consumers.get(acts[0], [])) != 1 or acts[0] in outputs:
            continue
        weight = inits.get(conv.input[1])
        if weight is None:
            continue
        value = inits[consts[0]]
        channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * int(node_attr(conv, "group", 1))
        if not _per_channel(value, channels, weight.ndim):
            continue
        if len(conv.input) > 2 and conv.input[2] and (conv.input[2] not in inits or len(consumers[conv.input[2]]) != 1):
            continue
        bias = inits[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else \
            np.zeros(channels)
        name = ctx.fresh(f"{add.output[0]}_bias")
        ctx.add_initializer(name, (bias + np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))
                                   ).astype(np.float32))
        _set_bias(conv, name)
        conv.output[0] = add.output[0]
        ctx.graph.node.remove(add)
        fused += 1
    if fused:
        _drop_unused_initializers(ctx)
    return fused


def _per_channel(value: np.ndarray, channels: int, rank: int) -> bool:
    """A scalar, or one value per channel of an ``[N, C, ...]`` tensor of ``rank`` under broadcasting."""
    if value.size == 1:
        return True
    if value.ndim > rank:
        return False
    padded = [1] * (rank - value.ndim) + list(value.shape)
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _drop_unused_initializers(ctx: _Context) -> None:
    used = {t for n in ctx.graph.node for t in n.input} | {o.name for o in ctx.graph.output}
    constants = {i.name for i in ctx.graph.initializer}
    kept = [i for i in ctx.graph.initializer if i.name in used]
    del ctx.graph.initializer[:]
    ctx.graph.initializer.extend(kept)
    inputs = [i for i in ctx.graph.input if i.name in used or i.name not in constants]
    del ctx.graph.input[:]
    ctx.graph.input.extend(inputs)
    ctx.invalidate()


def name_nodes(ctx: _Context) -> int:
    """Give every node a unique, stable name (PPQ, quantinfo and the operator graph key on it)."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(ctx.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        if name != node.name:
            node.name = name
            renamed += 1
        seen.add(name)
    return renamed


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


def _random_feed(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    feed = {}
    for spec in model_inputs(model):
        shape = list(shapes[spec.name])
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feed


@dataclass(frozen=True)
class Reference:
    """The original model's outputs on seeded random inputs, as onnxruntime computes them."""

    feeds: tuple[dict[str, np.ndarray], ...]
    names: tuple[str, ...]
    outputs: tuple[tuple[np.ndarray, ...], ...]

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
                      seed: int = 0) -> Reference:
    """Run ``original`` at ``shapes`` (its declared input dims replaced, as its own package may do at load).

    Raises:
        ModelError: onnxruntime cannot load the model.
        InputShapeError: the model does not run with ``shapes``.
    """
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
    feeds = tuple(_random_feed(original, shapes, rng) for _ in range(checks))
    outputs = []
    for feed in feeds:
        try:
            outputs.append(tuple(session.run(list(names), feed)))
        except Exception as e:
            raise _misfit(original, shapes, e) from e
    return Reference(feeds, names, tuple(outputs))


def _misfit(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], error: Exception) -> InputShapeError:
    declared = _declared(model, shapes)
    return InputShapeError(
        f"the model does not run with input_shapes { {k: list(v) for k, v in shapes.items()} }"
        + (f" ({declared})" if declared else "") + f": {' '.join(str(error).split())[:300]}",
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
            diff = np.abs(r.astype(np.float64) - g)
            peak = float(np.abs(r).max(initial=0.0))
            if r.dtype == np.float16:  # the original rounds every tensor to 11 bits: compare at that precision
                rtol, atol = max(rtol, 2e-2), max(atol, 2e-2)
            worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
            worst_rel = max(worst_rel, float(diff.max(initial=0.0)) / max(peak, 1e-12))
            if not np.all(diff <= atol * max(1.0, peak) + rtol * np.abs(r)):
                raise ModelError(f"the prepared model's output {name!r} differs from the original's by up to "
                                 f"{float(diff.max()):.3g} (largest value {peak:.3g}).",
                                 "report this model to the maptools maintainers.")
    return worst_abs, worst_rel


# --- the stage ------------------------------------------------------------------------------------------

#: What preparation may leave out, from the most to the least: each level runs fewer rewrites, for a
#: model whose full preparation fails onnxruntime's check against the original.
_LEVELS = ("full", "no onnxsim", "minimal")


def _optional(ctx: _Context, what: str, step: Callable[[_Context], list[str]]) -> None:
    """Run a rewrite that the model can do without: on any failure the model stays as it was before it,
    and the step is recorded as skipped (with the reason) instead of failing the preparation."""
    saved = onnx.ModelProto()
    saved.CopyFrom(ctx.model)
    try:
        done = step(ctx)
    except Exception as e:  # noqa: BLE001  (onnx, onnxsim and the rewrites raise many types)
        ctx.model = saved
        ctx.invalidate()
        reason = e.problem if isinstance(e, MaptoolsError) else f"{type(e).__name__}: {str(e).strip()[:200]}"
        ctx.steps.append(f"{what} skipped ({reason})")
        ctx.skipped.append(ctx.steps[-1])
        log.warning("preparation: %s skipped: %s", what, reason)
        return
    ctx.steps.extend(done)


def _counted(text: str, count: int) -> list[str]:
    return [text.format(count)] if count else []


def _fold_constants(ctx: _Context) -> list[str]:
    return _counted("{} Constant nodes folded into initializers", fold_constant_nodes(ctx))


def _float32(ctx: _Context) -> list[str]:
    """float16 weights, constants, casts and tensors (a half-precision export) as float32: PPQ, the
    crossbar weights and the simulation compute in float32 (the prepared model then takes float32 inputs)."""
    half = onnx.TensorProto.FLOAT16

    def widen(tensor: onnx.TensorProto) -> bool:
        if tensor.data_type != half:
            return False
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float32),
                                                     tensor.name))
        return True

    def graph(g: onnx.GraphProto) -> int:
        count = sum(widen(t) for t in g.initializer)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type == half:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
                count += 1
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    count += widen(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    count += graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    count += sum(graph(sub) for sub in attr.graphs)
                elif node.op_type in ("Cast", "CastLike", "EyeLike", "RandomNormal", "RandomUniform") and \
                        attr.name in ("to", "dtype") and attr.i == half:
                    attr.i = onnx.TensorProto.FLOAT
                    count += 1
        return count

    changed = graph(ctx.model.graph)
    if changed:
        ctx.invalidate()
    return _counted("float16 made float32 ({} tensors and casts)", changed)


def _inline(ctx: _Context) -> list[str]:
    if not ctx.model.functions:
        return []
    from onnx import inliner

    ctx.model = inliner.inline_local_functions(ctx.model)
    ctx.invalidate()
    return ["local functions inlined"]


def _convert(ctx: _Context) -> list[str]:
    converted = convert_opset(ctx)
    return [converted] if converted else []


def _simplify(shapes: Mapping[str, Sequence[int]]) -> Callable[[_Context], list[str]]:
    def step(ctx: _Context) -> list[str]:
        before = len(ctx.graph.node)
        simplify(ctx, shapes)
        fold_constant_nodes(ctx)
        return [f"onnxsim: {before} -> {len(ctx.graph.node)} nodes"]

    return step


def _ppq_ready(ctx: _Context) -> list[str]:
    done = _counted("{} Identity/Dropout removed", _remove_passthrough(ctx))
    done += _counted("{} auto_pad made explicit pads", _explicit_pads(ctx))
    folded, replaced = _fold_batchnorm(ctx)
    return [*done, *_counted("{} BatchNormalization folded into Conv/Gemm", folded),
            *_counted("{} BatchNormalization replaced by a per-channel Mul + Add", replaced),
            *_counted("{} bias Add folded into Conv", _fold_bias_add(ctx))]


def prepare(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], *, simplify_model: bool = True,
            level: str = "full", output_shapes: Mapping[str, Sequence[int]] | None = None
            ) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Steps 1-5 on a model in memory; returns the prepared model, what was done and the steps skipped.

    Only fixing the input dims, naming the nodes and recording every tensor's shape are required;
    every other step is skipped (and recorded so) where it fails. ``level`` leaves out more: ``'no
    onnxsim'``, or ``'minimal'`` (dims, names and shapes only). ``output_shapes``: the graph outputs'
    shapes as onnxruntime computes them (:class:`Reference`), which replace the declared ones.
    """
    ctx = _Context(onnx.ModelProto.FromString(model.SerializeToString()))
    _drop_unused_opsets(ctx.model)
    if fix_input_dims(ctx.model, shapes, output_shapes):
        ctx.steps.append("input dims fixed to " + ", ".join(f"{k}={list(v)}" for k, v in shapes.items()))
    _optional(ctx, "float16 to float32", _float32)
    if level != "minimal":
        _optional(ctx, "inlining local functions", _inline)
        _optional(ctx, "folding Constant nodes", _fold_constants)
        _optional(ctx, f"converting to opset {TARGET_OPSET}", _convert)
        _optional(ctx, "folding Constant nodes", _fold_constants)  # the converter writes some
        if simplify_model and level == "full":
            _optional(ctx, "onnxsim", _simplify(shapes))
        _optional(ctx, "the PPQ-ready rewrites", _ppq_ready)
    control = sorted({_where(n) for n in ctx.graph.node if n.op_type in CONTROL_FLOW_OP_TYPES})
    if control:  # data-dependent: it runs on the host, in onnxruntime
        ctx.steps.append(f"control flow kept on the host: {', '.join(control[:5])}")
    renamed = name_nodes(ctx)
    if renamed:
        ctx.steps.append(f"{renamed} nodes named")
    _record_shapes(ctx, shapes)
    try:
        onnx.checker.check_model(ctx.model)
    except Exception as e:  # noqa: BLE001  (onnxruntime's check against the original decides)
        log.debug("onnx's checker objects to the prepared model (%s); onnxruntime's check decides", e)
    return ctx.model, ctx.steps, ctx.skipped


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Forget opset imports of domains no node uses (converters list every domain they know of)."""
    used = {n.domain for n in model.graph.node} | {d for f in model.functions for d in [f.domain]
                                                   } | set(_DEFAULT_DOMAINS)
    kept = [o for o in model.opset_import if o.domain in used]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _record_shapes(ctx: _Context, shapes: Mapping[str, Sequence[int]]) -> None:
    """Write every tensor's static type and shape into ``value_info`` (and the outputs'): from ONNX shape
    inference, or where it fails or leaves a shape open, from one onnxruntime run of the model."""
    try:
        inferred = _static_shapes(ctx.model)
    except ModelError as e:
        log.info("preparation: %s; shapes are taken from onnxruntime instead", e.problem)
        inferred = _observed_shapes(ctx.model, shapes)
        ctx.steps.append("shapes recorded from onnxruntime (ONNX shape inference fails on this model)")
    del ctx.graph.value_info[:]
    ctx.graph.value_info.extend(inferred.graph.value_info)
    for out, done in zip(ctx.graph.output, inferred.graph.output):
        out.type.CopyFrom(done.type)
    ctx.invalidate()


def _observed_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """``model`` with the type and shape of every tensor as onnxruntime computes them on one input."""
    names = [t for n in model.graph.node for t in n.output if t]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in known)
    try:
        values = ort_session(probe).run(names, _random_feed(model, shapes, np.random.default_rng(0)))
    except Exception as e:
        raise InputShapeError(f"the model does not run in onnxruntime with input_shapes "
                              f"{ {k: list(v) for k, v in shapes.items()} }: {str(e).strip()[:300]}",
                              "give the shapes the model was exported for.") from e
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.value_info[:]
    found = {}
    for name, value in zip(names, values):
        value = np.asarray(value)
        found[name] = onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
    outputs = {o.name for o in model.graph.output}
    result.graph.value_info.extend(vi for name, vi in found.items() if name not in outputs)
    for out in result.graph.output:
        if out.name in found:
            out.type.CopyFrom(found[out.name].type)
    return result


#: metadata_props key of a prepared model: what it was prepared for and how (JSON).
PREPARED_KEY = "maptools.prepared"


def fingerprint() -> str:
    """What besides the model and the options decides the prepared bytes: this code and the converters."""
    import hashlib

    from maptools.versions import package_versions

    digest = hashlib.sha256(Path(__file__).read_bytes())
    versions = package_versions()
    digest.update(json.dumps({k: versions.get(k) for k in ("onnx", "onnxsim")}, sort_keys=True).encode())
    return digest.hexdigest()


def _already_prepared(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], simplify: bool
                      ) -> dict[str, Any] | None:
    """The record of a model this code prepared for the same shapes and options, or None."""
    for prop in model.metadata_props:
        if prop.key == PREPARED_KEY:
            try:
                record = json.loads(prop.value)
            except ValueError:
                return None
            wanted = {"input_shapes": {k: [int(d) for d in v] for k, v in shapes.items()}, "simplify": simplify,
                      "code": fingerprint()}
            return record if all(record.get(k) == v for k, v in wanted.items()) else None
    return None


def prepare_model(src: str | Path, dst: str | Path, input_shapes: Mapping[str, Sequence[int]], *,
                  simplify: bool = True, checks: int = 3, seed: int = 0, strict: bool = False) -> PreparedModel:
    """Prepare ``src`` for quantization with concrete ``input_shapes`` and write it to ``dst`` atomically.

    The prepared model records what it was prepared for (``metadata_props['maptools.prepared']``);
    a model this code already prepared for the same shapes and options is copied as it is (the flow
    prepares in its own task, then quantizes the prepared file).

    A rewrite that fails is skipped (recorded in ``steps``); where the result does not match the
    original in onnxruntime, the model is prepared again with fewer rewrites (``no onnxsim``, then
    ``minimal``: fixed dims, node names and recorded shapes only); ``strict`` makes either an error.

    Raises:
        ModelError: onnxruntime cannot run the model, or (``strict``) a step had to be left out; nothing is
            written.
        InputShapeError: ``input_shapes`` do not fit the model (onnxruntime cannot run it with them).
    """
    src = Path(src)
    model = load_model(src)
    shapes = check_input_shapes(model, input_shapes)
    dst = Path(dst)
    with storage_errors(f"create {dst.parent}"):
        dst.parent.mkdir(parents=True, exist_ok=True)
    record = _already_prepared(model, shapes, simplify)
    if record is not None:
        _check_strict(strict, record.get("fallbacks", []), src)
        atomic_write(dst, src.read_bytes())
        return PreparedModel(path=dst, sha256=sha256_file(dst), input_shapes=record["input_shapes"],
                             source_opset=record["source_opset"], opset=opset_of(model), steps=tuple(record["steps"]),
                             max_abs_diff=record["max_abs_diff"], max_rel_diff=record["max_rel_diff"],
                             nodes_before=record["nodes_before"], nodes_after=len(model.graph.node),
                             fallbacks=tuple(record.get("fallbacks", [])))
    reference = reference_outputs(model, shapes, checks=checks, seed=seed)
    notes: list[str] = []
    for level in _LEVELS:
        try:
            prepared, steps, skipped = prepare(model, shapes, simplify_model=simplify, level=level,
                                               output_shapes=reference.output_shapes)
            worst_abs, worst_rel = check_equivalent(reference, prepared)
            break
        except InputShapeError:
            raise
        except Exception as e:  # noqa: BLE001  (onnx raises many types on content it cannot take)
            reason = e.problem if isinstance(e, MaptoolsError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            if level == _LEVELS[-1]:
                raise ModelError(f"preparing {src} failed: {reason}",
                                 "check the model with onnxruntime; report it to the maptools maintainers if it "
                                 "runs there.") from e
            notes.append(f"preparation ({level}) gave a model that failed the check against the original ({reason}); "
                         "prepared again with fewer rewrites")
            log.warning("%s", notes[-1])
    steps, fallbacks = [*notes, *steps], [*notes, *skipped]
    _check_strict(strict, fallbacks, src)
    record = {"input_shapes": {k: list(v) for k, v in shapes.items()}, "simplify": simplify, "code": fingerprint(),
              "source_opset": opset_of(model), "steps": list(steps), "max_abs_diff": worst_abs,
              "max_rel_diff": worst_rel, "nodes_before": len(model.graph.node), "fallbacks": fallbacks}
    onnx.helper.set_model_props(prepared, {**{p.key: p.value for p in prepared.metadata_props
                                              if p.key != PREPARED_KEY}, PREPARED_KEY: json.dumps(record)})
    atomic_write(dst, prepared.SerializeToString())
    return PreparedModel(path=dst, sha256=sha256_file(dst), input_shapes=record["input_shapes"],
                         source_opset=opset_of(model), opset=opset_of(prepared), steps=tuple(steps),
                         max_abs_diff=worst_abs, max_rel_diff=worst_rel, nodes_before=len(model.graph.node),
                         nodes_after=len(prepared.graph.node), fallbacks=tuple(fallbacks))


def _check_strict(strict: bool, fallbacks: Sequence[str], src: Path) -> None:
    if strict and fallbacks:
        raise ModelError(f"preparing {src} left steps out: {'; '.join(fallbacks)}.",
                         "prepare without strict=True (--strict) to go on without them, or re-export the model with "
                         "opset 13.")
