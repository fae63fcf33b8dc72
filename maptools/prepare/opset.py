"""Steps 1-3: fixed input dims, constants folded and functions inlined, opset 13 (up with onnx's converter,
down by rewriting the operators whose definition changed)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.defs
import onnx.helper
import onnx.numpy_helper

from maptools.errors import ModelError
from maptools.onnx_model import node_attr


from maptools.prepare.base import (TARGET_OPSET, _DEFAULT_DOMAINS, Names, _Context, _drop_attrs, _read, _set_opset,
                                    _where, opset_of)
from maptools.prepare.rewrites import _replace_node
log = logging.getLogger(__name__)

#: A Slice end past any axis.
_END = int(np.iinfo(np.int64).max)

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
            out.type.tensor_type.shape.SetInParent()  # (a 0-d output keeps a shape of no dims, not none)
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


def ort_operators(ctx: _Context) -> int:
    """Operators onnxruntime runs in the default domain where ONNX defines none, as the standard ones they compute:
    its LayerNormalization below opset 17 (its optimizers write it into models of opsets 11-16) and
    SimplifiedLayerNormalization (an RMS normalization, in no opset) in their ReduceMean/Sqrt/Div form, and so
    MeanVarianceNormalization below opset 9 (its experimental form); the experimental ImageScaler, Scale, Affine
    and ScaledTanh of opsets 1-9 (older converters' preprocessing) as Mul, Add and Tanh, and their Crop as a Slice.
    Also the forms onnx's version converter cannot take to opset 13: a BatchNormalization with ``spatial=0``
    (CNTK's, statistics per element) as its arithmetic, and Hardmax over an axis but the last (before opset 13,
    over every axis from it on) on its input flattened there. The count."""
    opset = max((o.version for o in ctx.model.opset_import if o.domain in _DEFAULT_DOMAINS), default=0)
    done = 0
    for node in [n for n in ctx.graph.node if n.domain in _DEFAULT_DOMAINS and (
            n.op_type in _ORT_ONLY or opset < _ORT_BEFORE.get(n.op_type, (0, None))[0])]:
        rewrite = _ORT_ONLY[node.op_type] if node.op_type in _ORT_ONLY else _ORT_BEFORE[node.op_type][1]
        nodes = rewrite(node, ctx)
        if nodes is not None:
            _replace_node(ctx, node, nodes)
            done += 1
    if done:
        ctx.invalidate()
    return done


def _affine(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``scale * x + bias`` of the experimental ImageScaler (a bias per channel), Scale and Affine."""
    scale = float(node_attr(node, "alpha" if node.op_type == "Affine" else "scale", 1.0))
    bias = node_attr(node, "bias", None) if node.op_type == "ImageScaler" else node_attr(node, "beta", 0.0)
    bias = np.asarray(bias if bias is not None else 0.0, dtype=np.float32)
    out, name = node.output[0], node.name or node.output[0]
    scaled = ctx.fresh(f"{out}_scaled") if np.any(bias) else out
    nodes = [onnx.helper.make_node("Mul", [node.input[0], ctx.add_initializer(
        ctx.fresh(f"{out}_scale"), np.asarray(scale, dtype=np.float32))], [scaled], name=f"{name}_scale")]
    if np.any(bias):
        shift = bias.reshape(-1, 1, 1) if node.op_type == "ImageScaler" else bias
        nodes.append(onnx.helper.make_node("Add", [scaled, ctx.add_initializer(ctx.fresh(f"{out}_bias"), shift)],
                                           [out], name=name))
    return nodes


def _scaled(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """The experimental ScaledTanh and ParametricSoftplus (onnxmltools' CoreML ``softplusParametric``):
    ``alpha * f(beta * x)``, ``f`` tanh or softplus."""
    out, name = node.output[0], node.name or node.output[0]
    f = {"ScaledTanh": "Tanh", "ParametricSoftplus": "Softplus"}[node.op_type]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("alpha", "beta", "inner", "f")}
    ctx.add_initializer(t["alpha"], np.asarray(float(node_attr(node, "alpha", 1.0)), dtype=np.float32))
    ctx.add_initializer(t["beta"], np.asarray(float(node_attr(node, "beta", 1.0)), dtype=np.float32))
    return [onnx.helper.make_node("Mul", [node.input[0], t["beta"]], [t["inner"]], name=f"{name}_beta"),
            onnx.helper.make_node(f, [t["inner"]], [t["f"]], name=f"{name}_{f.lower()}"),
            onnx.helper.make_node("Mul", [t["f"], t["alpha"]], [out], name=name)]


def _crop(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """The experimental Crop (onnxruntime runs it below opset 10): ``border`` (left, top, right, bottom) cut off,
    or a ``scale`` (height, width) window at its top left, as the Slice of those opsets."""
    left, top, right, bottom = [int(v) for v in node_attr(node, "border", [0, 0, 0, 0])]
    scale = node_attr(node, "scale", None)
    ends = [top + int(scale[0]), left + int(scale[1])] if scale else \
        [-bottom if bottom else _END, -right if right else _END]
    return [onnx.helper.make_node("Slice", [node.input[0]], [node.output[0]], name=node.name or node.output[0],
                                  starts=[top, left], ends=ends, axes=[2, 3])]


def _spatial_batchnorm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto] | None:
    """A BatchNormalization with ``spatial=0`` (opsets 7-8: one mean, variance, scale and bias per element of
    an input's sample, shaped like it) as ``x * k + (bias - mean * k)``, ``k = scale / sqrt(var + epsilon)``,
    which onnxsim folds to a Mul and an Add; None where ``spatial`` is 1 or its training outputs are read."""
    if node_attr(node, "spatial", 1) or set(node.output[1:]) & _read(ctx.graph):
        return None
    x, scale, bias, mean, var = node.input[:5]
    out, name = node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("epsilon", "shifted", "root", "k", "offset", "shift", "scaled")}
    ctx.add_initializer(t["epsilon"], np.asarray(float(node_attr(node, "epsilon", 1e-5)), dtype=np.float32))
    return [onnx.helper.make_node("Add", [var, t["epsilon"]], [t["shifted"]], name=f"{name}_epsilon"),
            onnx.helper.make_node("Sqrt", [t["shifted"]], [t["root"]], name=f"{name}_sqrt"),
            onnx.helper.make_node("Div", [scale, t["root"]], [t["k"]], name=f"{name}_k"),
            onnx.helper.make_node("Mul", [mean, t["k"]], [t["offset"]], name=f"{name}_offset"),
            onnx.helper.make_node("Sub", [bias, t["offset"]], [t["shift"]], name=f"{name}_shift"),
            onnx.helper.make_node("Mul", [x, t["k"]], [t["scaled"]], name=f"{name}_scale"),
            onnx.helper.make_node("Add", [t["scaled"], t["shift"]], [out], name=name)]


def _flat_hardmax(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto] | None:
    """Hardmax before opset 13 (over the axes from ``axis`` on, flattened) as Flatten, Hardmax over the last axis
    and Reshape back, which means the same at opset 13; None where ``axis`` is the last."""
    axis = int(node_attr(node, "axis", 1))
    shape = ctx.shape(node.input[0])
    if axis == -1 or shape is not None and axis == len(shape) - 1:
        return None
    out, name = node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("shape", "flat", "hardmax")}
    return [onnx.helper.make_node("Shape", [node.input[0]], [t["shape"]], name=f"{name}_shape"),
            onnx.helper.make_node("Flatten", [node.input[0]], [t["flat"]], name=f"{name}_flatten", axis=axis),
            onnx.helper.make_node("Hardmax", [t["flat"]], [t["hardmax"]], name=f"{name}_2d", axis=1),
            onnx.helper.make_node("Reshape", [t["hardmax"], t["shape"]], [out], name=name)]


def _mean_variance(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """MeanVarianceNormalization before opset 9 as onnxruntime computes it: over the batch and the spatial axes
    (and the channels with ``across_channels``), no epsilon; only centred without ``normalize_variance``."""
    axes = [0, 1, 2, 3] if node_attr(node, "across_channels", 0) else [0, 2, 3]
    if node_attr(node, "normalize_variance", 1):
        nodes, norm = _standardized(node, axes, ctx, epsilon=0.0)
        return _renamed(nodes, norm, node.output[0])
    mean = ctx.fresh(f"{node.output[0]}_mean")
    name = node.name or node.output[0]
    return [onnx.helper.make_node("ReduceMean", [node.input[0]], [mean], name=f"{name}_mean", axes=axes, keepdims=1),
            onnx.helper.make_node("Sub", [node.input[0], mean], [node.output[0]], name=name)]


def _renamed(nodes: list[onnx.NodeProto], tensor: str, to: str) -> list[onnx.NodeProto]:
    """``nodes`` with ``tensor`` (the last one's output) written as ``to``."""
    nodes[-1].output[:] = [to if t == tensor else t for t in nodes[-1].output]
    return nodes


def _layernorm(node: onnx.NodeProto, ctx: _Context, centre: bool = True) -> list[onnx.NodeProto]:
    if len([o for o in node.output if o]) > 1:
        raise ModelError(f"{_where(node)} uses its Mean/InvStdDev outputs, which opset 13 has no operator for.",
                         "re-export the model with opset 13 (torch.onnx.export(..., opset_version=13)).")
    axis = int(node_attr(node, "axis", -1))
    if axis >= 0:  # (a negative axis counts from the end: no rank needed)
        shape = ctx.shape(node.input[0])
        if shape is None:
            raise ModelError(f"the rank of {_where(node)}'s input is unknown.", "give input_shapes for every input.")
        axis -= len(shape)
    axes = list(range(axis, 0))
    out, name = node.output[0], node.name or node.output[0]
    nodes, norm = _standardized(node, axes, ctx, centre)
    has_bias = len(node.input) > 2 and node.input[2]
    scaled = ctx.fresh(f"{out}_scaled") if has_bias else out
    nodes.append(onnx.helper.make_node("Mul", [norm, node.input[1]], [scaled],
                                       name=f"{name}_scale" if has_bias else name))
    if has_bias:
        nodes.append(onnx.helper.make_node("Add", [scaled, node.input[2]], [out], name=name))
    return nodes


def _standardized(node: onnx.NodeProto, axes: list[int], ctx: _Context, centre: bool = True,
                  epsilon: float | None = None) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing ``node``'s first input less its mean over ``axes`` (``centre``; else the input itself: an
    RMS normalization), over the square root of its (biased) variance there (mean square) plus ``epsilon``
    (None: ``node``'s); and the tensor they write."""
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("mean", "diff", "sq", "var", "eps", "veps", "std", "norm")}
    epsilon = float(node_attr(node, "epsilon", 1e-5)) if epsilon is None else epsilon
    ctx.add_initializer(t["eps"], np.asarray(epsilon, dtype=np.float32))
    centring = [onnx.helper.make_node("ReduceMean", [x], [t["mean"]], name=f"{name}_mean", axes=axes, keepdims=1),
                onnx.helper.make_node("Sub", [x, t["mean"]], [t["diff"]], name=f"{name}_sub")] if centre else []
    if not centre:
        t["diff"] = x
    return [
        *centring,
        onnx.helper.make_node("Mul", [t["diff"], t["diff"]], [t["sq"]], name=f"{name}_square"),
        onnx.helper.make_node("ReduceMean", [t["sq"]], [t["var"]], name=f"{name}_var", axes=axes, keepdims=1),
        onnx.helper.make_node("Add", [t["var"], t["eps"]], [t["veps"]], name=f"{name}_eps"),
        onnx.helper.make_node("Sqrt", [t["veps"]], [t["std"]], name=f"{name}_sqrt"),
        onnx.helper.make_node("Div", [t["diff"], t["std"]], [t["norm"]], name=f"{name}_div"),
    ], t["norm"]


def _gelu(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("c", "half", "one", "a", "b", "e", "p")}
    ctx.add_initializer(t["half"], np.asarray(0.5, dtype=np.float32))
    ctx.add_initializer(t["one"], np.asarray(1.0, dtype=np.float32))
    if node_attr(node, "approximate", "none") == "tanh":  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        u = {k: ctx.fresh(f"{out}_{k}") for k in ("three", "k", "cube", "kcube", "inner", "tanh")}
        ctx.add_initializer(u["three"], np.asarray(3.0, dtype=np.float32))
        ctx.add_initializer(u["k"], np.asarray(0.044715, dtype=np.float32))
        ctx.add_initializer(t["c"], np.asarray(math.sqrt(2.0 / math.pi), dtype=np.float32))
        return [onnx.helper.make_node("Pow", [x, u["three"]], [u["cube"]], name=f"{name}_cube"),
                onnx.helper.make_node("Mul", [u["cube"], u["k"]], [u["kcube"]], name=f"{name}_kcube"),
                onnx.helper.make_node("Add", [x, u["kcube"]], [u["inner"]], name=f"{name}_inner"),
                onnx.helper.make_node("Mul", [u["inner"], t["c"]], [t["a"]], name=f"{name}_scale"),
                onnx.helper.make_node("Tanh", [t["a"]], [u["tanh"]], name=f"{name}_tanh"),
                onnx.helper.make_node("Add", [u["tanh"], t["one"]], [t["b"]], name=f"{name}_add"),
                onnx.helper.make_node("Mul", [x, t["b"]], [t["p"]], name=f"{name}_mul"),
                onnx.helper.make_node("Mul", [t["p"], t["half"]], [out], name=name)]
    ctx.add_initializer(t["c"], np.asarray(math.sqrt(2.0), dtype=np.float32))
    return [onnx.helper.make_node("Div", [x, t["c"]], [t["a"]], name=f"{name}_div"),
            onnx.helper.make_node("Erf", [t["a"]], [t["e"]], name=f"{name}_erf"),
            onnx.helper.make_node("Add", [t["e"], t["one"]], [t["b"]], name=f"{name}_add"),
            onnx.helper.make_node("Mul", [x, t["b"]], [t["p"]], name=f"{name}_mul"),
            onnx.helper.make_node("Mul", [t["p"], t["half"]], [out], name=name)]


def _batchnorm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """BatchNormalization with ``training_mode=1`` (opset 14; torch exports ``F.batch_norm(training=True)`` so, and
    timm's weight standardization of NF-Nets and BiT applies it to constant weights): the batch statistics
    written out (mean and biased variance over every axis but the channels'), which onnxsim folds where the
    input is constant. Its running-statistics outputs have no opset-13 form."""
    if not node_attr(node, "training_mode", 0):
        _drop_attrs(node, {"training_mode"})
        return [node]
    if set(node.output[1:]) & _read(ctx.graph):
        raise ModelError(f"{_where(node)} (training_mode=1) returns its running statistics, which opset 13 has no "
                         "operator for.", "re-export the model in eval mode (model.eval()) or with opset 13.")
    shape = ctx.shape(node.input[0])
    if shape is None or len(shape) < 2:
        raise ModelError(f"the rank of {_where(node)}'s input is unknown.", "give input_shapes for every input.")
    out, name = node.output[0], node.name or node.output[0]
    nodes, norm = _standardized(node, [0, *range(2, len(shape))], ctx)
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("per_channel", "scale", "bias", "scaled")}
    ctx.add_initializer(t["per_channel"], np.asarray([-1] + [1] * (len(shape) - 2), dtype=np.int64))
    return [
        *nodes,
        onnx.helper.make_node("Reshape", [node.input[1], t["per_channel"]], [t["scale"]], name=f"{name}_scale_shape"),
        onnx.helper.make_node("Reshape", [node.input[2], t["per_channel"]], [t["bias"]], name=f"{name}_bias_shape"),
        onnx.helper.make_node("Mul", [norm, t["scale"]], [t["scaled"]], name=f"{name}_scale"),
        onnx.helper.make_node("Add", [t["scaled"], t["bias"]], [out], name=name),
    ]


def _groupnorm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """GroupNormalization (18, 21) as an InstanceNormalization of the channels' groups, then the per-channel
    scale and bias (opset 18's per-group ones repeated over each group's channels)."""
    shape = ctx.shape(node.input[0])
    scale, bias = ctx.initializer(node.input[1]), ctx.initializer(node.input[2])
    if shape is None or min(shape) < 0 or scale is None or bias is None:
        raise ModelError(f"{_where(node)} has no static input shape or a computed scale or bias.",
                         "give input_shapes for every input, or re-export the model with opset 13.")
    groups, channels = int(node_attr(node, "num_groups")), shape[1]
    if scale.size != channels:  # opset 18: one scale and bias per group
        scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
    x, out, name = node.input[0], node.output[0], node.name or node.output[0]
    t = {k: ctx.fresh(f"{out}_{k}") for k in ("grouped", "gshape", "ones", "zeros", "normed", "back", "shape",
                                              "scale", "bias", "scaled")}
    ctx.add_initializer(t["gshape"], np.asarray([shape[0], groups, -1], dtype=np.int64))
    ctx.add_initializer(t["ones"], np.ones(groups, dtype=np.float32))
    ctx.add_initializer(t["zeros"], np.zeros(groups, dtype=np.float32))
    ctx.add_initializer(t["shape"], np.asarray(shape, dtype=np.int64))
    per_channel = [channels] + [1] * (len(shape) - 2)
    ctx.add_initializer(t["scale"], scale.astype(np.float32).reshape(per_channel))
    ctx.add_initializer(t["bias"], bias.astype(np.float32).reshape(per_channel))
    return [onnx.helper.make_node("Reshape", [x, t["gshape"]], [t["grouped"]], name=f"{name}_group"),
            onnx.helper.make_node("InstanceNormalization", [t["grouped"], t["ones"], t["zeros"]], [t["normed"]],
                                  name=f"{name}_norm", epsilon=float(node_attr(node, "epsilon", 1e-5))),
            onnx.helper.make_node("Reshape", [t["normed"], t["shape"]], [t["back"]], name=f"{name}_ungroup"),
            onnx.helper.make_node("Mul", [t["back"], t["scale"]], [t["scaled"]], name=f"{name}_scale"),
            onnx.helper.make_node("Add", [t["scaled"], t["bias"]], [out], name=name)]


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
    value = ctx.initializer(node.input[index])
    if value is None:
        raise ModelError(f"{_where(node)} takes input {index} from a computed tensor; opset 13 needs it constant.",
                         "simplify the model with fixed input shapes, or re-export it with opset 13.")
    return value


def _reshape(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``allowzero=1`` (opset 14) only changes what a 0 in the target shape means, an empty output axis; the flag
    goes unless the target (a constant) or the output's inferred shape holds a 0. A computed target whose
    values shape inference cannot follow is taken to hold none: onnxruntime's check of the prepared model
    against the original decides."""
    if node_attr(node, "allowzero", 0):
        target = ctx.initializer(node.input[1])
        if (target is not None and 0 in target) or 0 in (ctx.shape(node.output[0]) or []):
            raise ModelError(f"{_where(node)} sets allowzero=1 with a 0 in its target shape, which opset 13 cannot "
                             "express.", "re-export the model with opset 13.")
    _drop_attrs(node, {"allowzero"})
    return [node]


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


def _pad(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """Pad at opset 18 may name the axes it pads (a fourth input, its pads then one begin and one end per named
    axis); before, the pads cover every axis. Mode ``wrap`` (opset 19, a circular padding) is written as the
    Slices and Concats it computes."""
    mode = node_attr(node, "mode", "constant")
    axes = _constant_input(node, 3, ctx)
    if axes is None and mode != "wrap":
        del node.input[3:]
        return [node]
    pads, shape = _constant_input(node, 1, ctx), ctx.shape(node.input[0])
    if pads is None or shape is None:
        raise ModelError(f"the rank of {_where(node)}'s input is unknown.", "give input_shapes for every input.")
    rank = len(shape)
    named = list(range(rank)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    full = np.zeros(2 * rank, dtype=np.int64)
    for i, axis in enumerate(named):
        full[axis], full[rank + axis] = pads.reshape(-1)[i], pads.reshape(-1)[len(named) + i]
    if mode == "wrap":
        return _wrapped(node, full, ctx)
    inputs = [node.input[0], ctx.add_initializer(ctx.fresh(f"{node.output[0]}_pads"), full), *node.input[2:3]]
    return [onnx.helper.make_node("Pad", inputs, list(node.output), name=node.name, mode=mode)]


def _wrapped(node: onnx.NodeProto, pads: np.ndarray, ctx: _Context) -> list[onnx.NodeProto]:
    """A circular padding by ``pads`` (every axis' begin, then end) as, per padded axis, the Concat of the axis'
    last ``begin`` entries, the tensor and its first ``end`` entries."""
    rank = len(pads) // 2
    if np.any(pads < 0):
        raise ModelError(f"{_where(node)} wraps with negative pads, which opset 13 cannot express.",
                         "re-export the model with opset 13.")
    nodes, x, fresh = [], node.input[0], Names(ctx.graph).fresh
    for axis in [a for a in range(rank) if pads[a] or pads[rank + a]]:
        def piece(start: int, end: int) -> str:
            out = fresh(f"{node.output[0]}_wrap{axis}")
            bounds = [ctx.add_initializer(fresh(f"{out}_{k}"), np.asarray([v], np.int64))
                      for k, v in (("starts", start), ("ends", end), ("axes", axis))]
            nodes.append(onnx.helper.make_node("Slice", [x, *bounds], [out], name=out))
            return out
        begin, end = int(pads[axis]), int(pads[rank + axis])
        parts = [*([piece(-begin, _END)] if begin else []), x, *([piece(0, end)] if end else [])]
        x = fresh(f"{node.output[0]}_wrapped{axis}")
        nodes.append(onnx.helper.make_node("Concat", parts, [x], name=x, axis=axis))
    if not nodes:
        return [onnx.helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)]
    nodes[-1].output[0], nodes[-1].name = node.output[0], node.name
    return nodes


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


#: Default-domain operators onnxruntime runs that ONNX defines at no opset (:func:`ort_operators`).
_ORT_ONLY: dict[str, Rewrite] = {
    "SimplifiedLayerNormalization": lambda node, ctx: _layernorm(node, ctx, centre=False),
    "ImageScaler": _affine, "Scale": _affine, "Affine": _affine, "ScaledTanh": _scaled,
    "ParametricSoftplus": _scaled,
}
#: Experimental operators of opsets below 10 that opset 10 made standard as they were (DynamicSlice as Slice):
#: onnx's version converter has no adapter from their experimental version, so they cross it in a domain of their
#: own (:func:`convert_opset`), as the standard operator.
_STANDARD_FROM_10 = {"ThresholdedRelu": "ThresholdedRelu", "DynamicSlice": "Slice"}
_CROSSING = "maptools.crossing"
#: Default-domain operators onnxruntime runs below the opset where ONNX defines them (or defines them anew), and
#: forms onnx's version converter cannot take to opset 13 (a rewrite returns None where the node needs none).
_ORT_BEFORE: dict[str, tuple[int, Callable[[onnx.NodeProto, _Context], list[onnx.NodeProto] | None]]] = {
    "LayerNormalization": (17, _layernorm), "MeanVarianceNormalization": (9, _mean_variance), "Crop": (10, _crop),
    "BatchNormalization": (9, _spatial_batchnorm), "Hardmax": (13, _flat_hardmax),
}
_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
#: Rewrites of operators whose definition after opset 13 differs from (or is absent at) opset 13.
_DOWN: dict[str, Rewrite] = {
    "HardSwish": _hardswish, "LayerNormalization": _layernorm, "Gelu": _gelu, "Mish": _mish,
    "GroupNormalization": _groupnorm, "RMSNormalization": lambda node, ctx: _layernorm(node, ctx, centre=False),
    "Shape": _shape_slice, "CastLike": _castlike, "Split": _split, **{op: _reduce_axes for op in _REDUCE},
    "Reshape": _reshape,
    "BatchNormalization": _batchnorm,
    "LSTM": _only_defaults({"layout": 0}), "GRU": _only_defaults({"layout": 0}), "RNN": _only_defaults({"layout": 0}),
    "Resize": _only_defaults({"antialias": 0, "keep_aspect_ratio_policy": "stretch", "axes": None}),
    "Pad": _pad,
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
    """Rewrite operators defined after opset 13 into their opset-13 form, in control-flow bodies too (the model's
    opset is theirs); return what changed."""
    rewritten: dict[str, int] = {}
    problems: list[str] = []
    nodes = _downgrade_nodes(list(ctx.graph.node), ctx, opset, rewritten, problems)
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


def _downgrade_nodes(nodes: list[onnx.NodeProto], ctx: _Context, opset: int, rewritten: dict[str, int],
                     problems: list[str]) -> list[onnx.NodeProto]:
    """``nodes`` in their opset-13 form (counting rewrites and collecting what cannot be rewritten); the bodies
    of If/Loop/Scan nodes in place."""
    out: list[onnx.NodeProto] = []
    for node in nodes:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                         list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
                inner = _downgrade_nodes(list(body.node), ctx, opset, rewritten, problems)
                del body.node[:]
                body.node.extend(inner)
        now, old = _schema(node.op_type, opset), _schema(node.op_type, TARGET_OPSET)
        if node.domain not in _DEFAULT_DOMAINS or now is None or (old is not None and
                                                                  now.since_version == old.since_version):
            out.append(node)
            continue
        rewrite = _DOWN.get(node.op_type)
        try:
            if rewrite is not None:
                replaced = rewrite(node, ctx)
                if replaced != [node] or node.op_type in ("HardSwish", "LayerNormalization"):
                    rewritten[node.op_type] = rewritten.get(node.op_type, 0) + 1
                out.extend(replaced)
            elif old is not None and _same_signature(node, old):
                out.append(node)  # only its type list grew
            else:
                problems.append(f"{_where(node)}: defined at opset {now.since_version}"
                                + ("" if old else ", absent at opset 13"))
        except ModelError as e:
            problems.append(e.problem)
    return out


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
    """Bring the model to opset 13; return a description, or None if it already was (or has no standard
    operators to convert: onnxmltools' tree ensembles import ai.onnx.ml alone)."""
    opset = opset_of(ctx.model)
    standard = any(o.domain in _DEFAULT_DOMAINS for o in ctx.model.opset_import)
    if opset == TARGET_OPSET or not standard and all(n.domain not in _DEFAULT_DOMAINS for n in ctx.graph.node):
        return None
    if opset < TARGET_OPSET:
        from onnx import version_converter

        crossing = [n for n in ctx.graph.node if n.domain in _DEFAULT_DOMAINS and n.op_type in _STANDARD_FROM_10
                    and opset < 10]
        for node in crossing:  # (on failure the caller restores the model)
            node.domain, node.op_type = _CROSSING, _STANDARD_FROM_10[node.op_type]
        if crossing:
            ctx.model.opset_import.append(onnx.helper.make_opsetid(_CROSSING, 1))
        try:
            ctx.model = version_converter.convert_version(ctx.model, TARGET_OPSET)
        except Exception as e:
            raise ModelError(f"onnx's version converter cannot bring the model from opset {opset} to "
                             f"{TARGET_OPSET}: {str(e).strip()[:300]}",
                             "re-export the model with opset 13 (torch.onnx.export(..., opset_version=13)).") from e
        if crossing:
            for node in ctx.model.graph.node:
                if node.domain == _CROSSING:
                    node.domain = ""
            kept = [o for o in ctx.model.opset_import if o.domain != _CROSSING]
            del ctx.model.opset_import[:]
            ctx.model.opset_import.extend(kept)
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
