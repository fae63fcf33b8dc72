"""Steps 4-5: onnxsim, and the rewrites PPQ would otherwise do inside its own graph (BatchNorm and bias Add
into the convolution, pass-through nodes removed, explicit pads, unique node names), a MatMul by a
constant matrix written as the Gemm the crossbar computes, a spatial ReduceMean as GlobalAveragePool and a
zero Pad folded into the convolutions it feeds."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.errors import ModelError
from maptools.onnx_model import auto_pads, node_attr, ort_session


from maptools.prepare.base import _DEFAULT_DOMAINS, _Context, _drop_attrs, _read
log = logging.getLogger(__name__)

# --- 4. onnxsim -------------------------------------------------------------------------------------

#: onnxsim's passes left out: its fusions into operators of other domains or later opsets (com.microsoft's Attention
#: and GroupQueryAttention, RotaryEmbedding, RMSNormalization), which would keep a transformer's linear layers on the
#: host, their work uncounted; and its loop unrolling, whose copies of a body tensor carry fresh names: maptools'
#: own (:mod:`maptools.prepare.unroll`) records which tensors are copies of one, and they take one grid.
_SKIPPED_FUSIONS = ["fuse_attention", "fuse_gqa", "fuse_rope", "fuse_rms_norm", "eliminate_loop_with_const_trip_count"]


def simplify(ctx: _Context, shapes: Mapping[str, Sequence[int]]) -> None:
    """onnxsim at ``shapes``, without :data:`_SKIPPED_FUSIONS`.

    Raises:
        ModelError: onnxsim fails, or writes an operator of a domain the model did not use (the step is then
            skipped: the model goes on as it was).
    """
    from onnxsim import simplify as onnxsim

    try:  # (older onnxsim releases filter their passes by these names, and have none of them)
        simplified, ok = onnxsim(ctx.model, overwrite_input_shapes={k: list(v) for k, v in shapes.items()},
                                 skipped_optimizers=list(_SKIPPED_FUSIONS))
    except Exception as e:
        raise ModelError(f"onnxsim cannot simplify the model: {str(e).strip()[:300]}",
                         "check the model runs in onnxruntime with these input shapes, or pass simplify=False.") from e
    if not ok:
        raise ModelError("onnxsim's own check of the simplified model failed.", "pass simplify=False.")
    before = {n.domain for n in ctx.graph.node}
    added = sorted({f"{n.domain}.{n.op_type}" for n in simplified.graph.node if n.domain not in before})
    if added:
        raise ModelError(f"onnxsim fused operators into {', '.join(added)}, which run on the host only.",
                         "the model goes on without onnxsim's simplification.")
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
    """Every read of ``old`` in ``graph`` reads ``new``, also in the If/Loop/Scan bodies that read it from outside
    (not in one that defines a tensor of that name itself)."""
    for node in graph.node:
        for i, t in enumerate(node.input):
            if t == old:
                node.input[i] = new
        bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        for body in [*bodies, *(g for a in node.attribute for g in a.graphs)]:
            defined = {t for n in body.node for t in n.output} | {i.name for i in [*body.input, *body.initializer]}
            if old not in defined:
                _replace_tensor(body, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new


def _replace_node(ctx: _Context, old: onnx.NodeProto, new: Sequence[onnx.NodeProto]) -> None:
    """``old`` replaced by the nodes ``new``, in order, where it stood (the graph stays in topological order)."""
    at = list(ctx.graph.node).index(old)
    ctx.graph.node.remove(old)
    for i, node in enumerate(new):
        ctx.graph.node.insert(at + i, node)


def _remove_passthrough(ctx: _Context) -> int:
    """Drop Identity and inference-time Dropout nodes, also those declaring a mask nothing reads (PPQ removes them
    from its own graph)."""
    removed = 0
    outputs, read = {o.name for o in ctx.graph.output}, _read(ctx.graph)
    for node in list(ctx.graph.node):
        if node.op_type not in ("Identity", "Dropout") or node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type == "Dropout" and (any(o in read for o in node.output[1:] if o) or _training(ctx, node)):
            continue  # its mask is read (Caffe2 and torch declare it unread), or it drops in training mode
        src, dst = node.input[0], node.output[0]
        if dst in outputs and (src in outputs or src not in {t for n in ctx.graph.node for t in n.output}):
            continue  # an output that is another output, an input or a constant: keep the node
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


def _training(ctx: _Context, dropout: onnx.NodeProto) -> bool:
    """Whether a Dropout may drop: its ``training_mode`` input (opset 12+) is given and not a constant false."""
    if len(dropout.input) < 3 or not dropout.input[2]:
        return False
    mode = ctx.initializer(dropout.input[2])
    return mode is None or bool(mode.any())


_WINDOW_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")


def _explicit_pads(ctx: _Context) -> int:
    """``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID; keras2onnx and tf2onnx write it) as explicit ``pads`` of
    the fixed input shape: PPQ's exporter writes both, which onnxruntime refuses."""
    changed = 0
    for node in ctx.graph.node:
        mode = node_attr(node, "auto_pad", "NOTSET")
        if node.op_type not in _WINDOW_OPS or mode == "NOTSET":
            continue
        weight = ctx.shape(node.input[1]) if node.op_type == "Conv" else None
        kernel = node_attr(node, "kernel_shape", None if weight is None else weight[2:])
        shape = ctx.shape(node.input[0])
        if kernel is None or (mode != "VALID" and (shape is None or min(shape) < 0)):
            continue
        rank = len(kernel)
        pads = [0] * 2 * rank if mode == "VALID" else auto_pads(  # VALID: no padding, whatever the shape
            mode, shape[2:], list(kernel), list(node_attr(node, "strides", [1] * rank)),
            list(node_attr(node, "dilations", [1] * rank)))
        _drop_attrs(node, {"auto_pad", "pads"})
        node.attribute.append(onnx.helper.make_attribute("pads", pads))
        changed += 1
    if changed:
        ctx.invalidate()
    return changed


_UNPADDED = ("NOTSET", "VALID")


def _transposed_pads(ctx: _Context) -> int:
    """A ``ConvTranspose`` sized by ``output_shape`` or ``auto_pad`` (tf2onnx and keras2onnx write them) with the
    explicit ``pads`` and ``output_padding`` that give the same output at the fixed input shape. Runtimes split an
    odd padding differently, so each candidate is run beside the operator in onnxruntime and the first that computes
    the same is kept; where none does, the operator stays as it was (on the host). The count."""
    changed = 0
    sized = [n for n in ctx.graph.node if n.op_type == "ConvTranspose" and n.domain in _DEFAULT_DOMAINS
             and (node_attr(n, "output_shape") is not None or node_attr(n, "auto_pad", "NOTSET") not in _UNPADDED)]
    for node in sized:
        shape, out = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        params = {t: ctx.initializer(t) for t in node.input[1:] if t}
        if shape is None or out is None or min(shape + out) <= 0 or any(v is None for v in params.values()):
            continue
        rank = len(shape) - 2
        kernel = list(node_attr(node, "kernel_shape", params[node.input[1]].shape[2:]))
        strides, dilations = (list(node_attr(node, k, [1] * rank)) for k in ("strides", "dilations"))
        adjust = list(node_attr(node, "output_padding", [0] * rank))
        natural = [strides[i] * (shape[2 + i] - 1) + adjust[i] + (kernel[i] - 1) * dilations[i] + 1
                   for i in range(rank)]
        total = [natural[i] - out[2 + i] for i in range(rank)]
        extra = [adjust[i] + max(-t, 0) for i, t in enumerate(total)]
        total = [max(t, 0) for t in total]
        sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        want = _run_alone(ctx, node, params, sample)
        for head in ([t // 2 for t in total], [t - t // 2 for t in total]):
            candidate = onnx.NodeProto()
            candidate.CopyFrom(node)
            _drop_attrs(candidate, {"auto_pad", "output_shape", "pads", "output_padding"})
            candidate.attribute.extend([onnx.helper.make_attribute("pads", head + [t - h for t, h in zip(total, head)]),
                                        onnx.helper.make_attribute("output_padding", extra)])
            got = _run_alone(ctx, candidate, params, sample)
            if want is not None and got is not None and want.shape == got.shape and \
                    np.allclose(want, got, rtol=1e-4, atol=1e-5 * float(np.abs(want).max() or 1.0)):
                node.CopyFrom(candidate)
                changed += 1
                break
    if changed:
        ctx.invalidate()
    return changed


def _run_alone(ctx: _Context, node: onnx.NodeProto, params: Mapping[str, np.ndarray], sample: np.ndarray
               ) -> np.ndarray | None:
    """``node`` alone in onnxruntime on ``sample`` (its other inputs the constants ``params``); None where
    onnxruntime refuses it."""
    graph = onnx.helper.make_graph(
        [node], "one", [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, sample.shape)],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, t) for t, v in params.items()])
    try:
        return ort_session(onnx.helper.make_model(graph, opset_imports=ctx.model.opset_import)).run(
            None, {node.input[0]: sample})[0]
    except Exception:  # noqa: BLE001  (a candidate onnxruntime refuses is not the one)
        return None


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
        if not rank:
            continue  # (its input's rank unknown: the channel axis cannot be broadcast; it stays a BatchNormalization)
        shape = [-1] + [1] * (len(rank) - 2)
        mul_c = ctx.fresh(f"{bn.output[0]}_scale")
        add_c = ctx.fresh(f"{bn.output[0]}_shift")
        set_init(mul_c, scale.reshape(shape))
        set_init(add_c, shift.reshape(shape))
        mid = ctx.fresh(f"{bn.output[0]}_scaled")
        name = bn.name or bn.output[0]
        _replace_node(ctx, bn, [onnx.helper.make_node("Mul", [bn.input[0], mul_c], [mid], name=f"{name}_scale"),
                                onnx.helper.make_node("Add", [mid, add_c], [bn.output[0]], name=name)])
        replaced += 1
    if folded or replaced:
        _drop_unused_initializers(ctx)
    return folded, replaced


def _set_bias(node: onnx.NodeProto, name: str) -> None:
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


#: Operators that only move a tensor's elements, which a bias Add may follow between a Conv and itself (tf2onnx's
#: Conv1D: ``Unsqueeze -> Conv -> Squeeze -> Add``).
_MOVES = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Transpose"})


def _fold_bias_add(ctx: _Context) -> int:
    """``Conv -> Add(per-channel constant)`` (the Conv read only by the Add) into the Conv's bias; also with
    reshapes and transposes between them (each read only by the next), where the constant is one value per
    channel as they move the channels."""
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
        chain: list[onnx.NodeProto] = []
        tensor = acts[0]
        while producer.get(tensor) is not None and producer[tensor].op_type in _MOVES and \
                len(consumers.get(tensor, [])) == 1 and tensor not in outputs:
            chain.insert(0, producer[tensor])
            tensor = chain[0].input[0]
        conv = producer.get(tensor)
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(consumers.get(tensor, [])) != 1 or \
                tensor in outputs:
            continue
        weight = inits.get(conv.input[1])
        if weight is None:
            continue
        value = inits[consts[0]]
        channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * int(node_attr(conv, "group", 1))
        if chain:
            shift = _channel_values(chain, value, channels, ctx.shape(tensor), inits)
        else:
            shift = np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)) \
                if _per_channel(value, channels, weight.ndim) else None
        if shift is None:
            continue
        if len(conv.input) > 2 and conv.input[2] and (conv.input[2] not in inits or len(consumers[conv.input[2]]) != 1):
            continue
        bias = inits[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else \
            np.zeros(channels)
        name = ctx.fresh(f"{add.output[0]}_bias")
        ctx.add_initializer(name, (bias + shift).astype(np.float32))
        _set_bias(conv, name)
        (chain[-1] if chain else conv).output[0] = add.output[0]
        ctx.graph.node.remove(add)
        fused += 1
    if fused:
        _drop_unused_initializers(ctx)
    return fused


def _channel_values(chain: Sequence[onnx.NodeProto], value: np.ndarray, channels: int, shape: list[int] | None,
                    inits: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The per-channel values ``value`` adds after ``chain`` moved a convolution's output of ``shape`` (None: it
    adds anything else, or a move's parameters are not constants)."""
    if shape is None or len(shape) < 2 or shape[1] != channels or any(d <= 0 for d in shape):
        return None
    index = np.broadcast_to(np.arange(channels, dtype=np.int32).reshape(1, -1, *[1] * (len(shape) - 2)), shape)
    for node in chain:
        index = _moved(node, index, inits)
        if index is None:
            return None
    if np.broadcast_shapes(np.shape(value), index.shape) != index.shape:
        return None  # the Add widens the tensor: not a bias
    added = np.broadcast_to(value, index.shape).astype(np.float64).ravel()
    per_channel = np.zeros(channels)
    per_channel[index.ravel()] = added
    return per_channel if np.array_equal(per_channel[index.ravel()], added) else None


def _moved(node: onnx.NodeProto, value: np.ndarray, inits: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """``value`` as the element-moving ``node`` (:data:`_MOVES`) moves its input; None where its shape, perm or axes
    are not constants."""
    if node.op_type == "Transpose":
        perm = node_attr(node, "perm")
        return np.transpose(value, None if perm is None else list(perm))
    second = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if second is not None and second not in inits:
        return None
    if node.op_type == "Reshape":
        if second is None or node_attr(node, "allowzero", 0):
            return None
        target = [value.shape[i] if d == 0 else int(d) for i, d in enumerate(inits[second].tolist())]
        return value.reshape(target)
    axes = inits[second].tolist() if second is not None else node_attr(node, "axes")
    if node.op_type == "Squeeze":
        return np.squeeze(value, axis=None if axes is None else tuple(int(a) % value.ndim for a in axes))
    if axes is None:
        return None
    rank = value.ndim + len(axes)
    return np.expand_dims(value, tuple(sorted(int(a) % rank for a in axes)))


#: onnxruntime's fused activations (``activation`` and ``activation_params`` of FusedConv; FusedGemm names them
#: ``activation_alpha``, ``activation_beta``, ``activation_gamma``): the standard operator and its attributes.
_FUSED_ACTIVATIONS = {"Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": ("alpha",),
                      "HardSigmoid": ("alpha", "beta"), "Clip": ("min", "max")}


def _unfuse(ctx: _Context) -> int:
    """onnxruntime's offline optimizer (``optimized_model_filepath`` at the extended level) writes com.microsoft
    ``FusedConv`` (a convolution, an optional sum input and an activation), ``FusedGemm``, ``FusedMatMul``, and
    ``Gelu``, ``BiasGelu`` and ``QuickGelu``: each as the standard operators it computes, which the device takes
    (a GELU as torch writes it at opset 13, ``x * 0.5 * (1 + Erf(x / sqrt(2)))``: a gated table). The count."""
    rewritten = 0
    for node in [n for n in ctx.graph.node if n.domain == "com.microsoft" and n.op_type in ("Gelu", "BiasGelu",
                                                                                            "QuickGelu")]:
        _replace_node(ctx, node, _unfused_gelu(ctx, node))
        rewritten += 1
    for node in [n for n in ctx.graph.node if n.domain == "com.microsoft"
                 and n.op_type in ("FusedConv", "FusedGemm", "FusedMatMul")]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        act = attrs.pop("activation", None)
        act = act.decode() if isinstance(act, bytes) else act
        if act is not None and act not in _FUSED_ACTIVATIONS:
            continue
        out, nodes = node.output[0], []
        if node.op_type == "FusedMatMul":
            nodes = _unfused_matmul(ctx, node, attrs)
            if nodes:
                _replace_node(ctx, node, nodes)
                rewritten += 1
            continue
        if node.op_type == "FusedConv":
            params = list(attrs.pop("activation_params", []))
            inputs, summand = list(node.input[:3]), node.input[3] if len(node.input) > 3 else ""
        else:
            params = [attrs.pop(k) for k in ("activation_alpha", "activation_beta", "activation_gamma") if k in attrs]
            inputs, summand = list(node.input), ""
        base = "Conv" if node.op_type == "FusedConv" else "Gemm"
        value = ctx.fresh(f"{out}_linear") if act or summand else out
        nodes.append(onnx.helper.make_node(base, inputs, [value], name=node.name, **attrs))
        if summand:
            total = ctx.fresh(f"{out}_sum") if act else out
            nodes.append(onnx.helper.make_node("Add", [value, summand], [total], name=f"{node.name}_sum"))
            value = total
        if act == "Clip":
            bounds = [ctx.add_initializer(ctx.fresh(f"{out}_{k}"), np.asarray(v, np.float32))
                      for k, v in zip(("min", "max"), params or [-np.inf, np.inf])]
            nodes.append(onnx.helper.make_node("Clip", [value, *bounds], [out], name=f"{node.name}_{act}"))
        elif act:
            names = _FUSED_ACTIVATIONS[act]
            nodes.append(onnx.helper.make_node(act, [value], [out], name=f"{node.name}_{act}",
                                               **dict(zip(names, params[:len(names)]))))
        _replace_node(ctx, node, nodes)
        rewritten += 1
    return rewritten


def _unfused_gelu(ctx: _Context, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """com.microsoft ``Gelu(x)``, ``BiasGelu(x, bias)`` (of ``x + bias``) and ``QuickGelu(x)`` (``x * Sigmoid(alpha
    * x)``) in standard operators."""
    out, name, nodes = node.output[0], node.name or node.output[0], []

    def const(tag: str, value: float) -> str:
        return ctx.add_initializer(ctx.fresh(f"{out}_{tag}"), np.asarray(value, np.float32))

    def step(op: str, inputs: list[str], tag: str, last: bool = False) -> str:
        result = out if last else ctx.fresh(f"{out}_{tag}")
        nodes.append(onnx.helper.make_node(op, inputs, [result], name=f"{name}_{tag}"))
        return result

    x = node.input[0]
    if node.op_type == "BiasGelu":
        x = step("Add", [x, node.input[1]], "bias")
    if node.op_type == "QuickGelu":
        alpha = float(next((a.f for a in node.attribute if a.name == "alpha"), 1.702))
        gate = step("Sigmoid", [step("Mul", [x, const("alpha", alpha)], "scaled")], "gate")
        step("Mul", [x, gate], "gated", last=True)
        return nodes
    erf = step("Erf", [step("Div", [x, const("sqrt2", math.sqrt(2.0))], "div")], "erf")
    gated = step("Mul", [x, step("Add", [erf, const("one", 1.0)], "add")], "mul")
    step("Mul", [gated, const("half", 0.5)], "half", last=True)
    return nodes


def _unfused_matmul(ctx: _Context, node: onnx.NodeProto, attrs: dict) -> list[onnx.NodeProto]:
    """``FusedMatMul``: ``alpha * op(A) @ op(B)``, ``op`` transposing the last two axes where ``transA``/``transB``
    say (none where it also moves batch axes: ``transBatchA``/``transBatchB``)."""
    if attrs.get("transBatchA") or attrs.get("transBatchB"):
        return []
    ins, out, nodes = list(node.input[:2]), node.output[0], []
    for i, flag in ((0, "transA"), (1, "transB")):
        if not attrs.get(flag):
            continue
        rank = len(ctx.shape(ins[i]) or [])
        if rank < 2:
            return []
        moved = ctx.fresh(f"{ins[i]}_t")
        nodes.append(onnx.helper.make_node("Transpose", [ins[i]], [moved], name=f"{node.name}_{flag}",
                                           perm=[*range(rank - 2), rank - 1, rank - 2]))
        ins[i] = moved
    alpha = float(attrs.get("alpha", 1.0))
    product = out if alpha == 1.0 else ctx.fresh(f"{out}_product")
    nodes.append(onnx.helper.make_node("MatMul", ins, [product], name=node.name))
    if alpha != 1.0:
        scale = ctx.add_initializer(ctx.fresh(f"{out}_alpha"), np.asarray(alpha, np.float32))
        nodes.append(onnx.helper.make_node("Mul", [product, scale], [out], name=f"{node.name}_alpha"))
    return nodes


def _gemm_device_form(ctx: _Context) -> int:
    """A ``Gemm`` by a constant ``B`` in the form the crossbar takes: ``transA`` as a Transpose of ``A``, ``alpha``
    folded into ``B``, ``beta`` into a constant ``C``, and a computed ``C`` (onnxsim fuses ``MatMul + Add`` of two
    activations into one Gemm: keras2onnx's LSTM cell ``x W + h R``, a residual ``x W + x``) as an ``Add`` after
    it. The count."""
    constants = {i.name for i in ctx.graph.initializer}
    return _rewrite_each(ctx, ("Gemm",), lambda c, node: _gemm_form(c, node, constants))


def _gemm_form(ctx: _Context, node: onnx.NodeProto, constants: Collection[str]) -> list[onnx.NodeProto] | None:
    a, b, c = (list(node.input) + ["", ""])[:3]
    trans_a, alpha = int(node_attr(node, "transA", 0)), float(node_attr(node, "alpha", 1.0))
    beta = float(node_attr(node, "beta", 1.0))
    computed = bool(c) and c not in constants
    if b not in constants or a in constants or not (trans_a or alpha != 1.0 or (c and beta != 1.0) or computed):
        return None
    name, out, nodes = node.name or node.output[0], node.output[0], []

    def scaled(tensor: str, factor: float) -> str:
        value = ctx.initializer(tensor)
        return ctx.add_initializer(ctx.fresh(f"{tensor}_scaled"), (value * np.float32(factor)).astype(value.dtype))

    if trans_a:
        moved = ctx.fresh(f"{a}_t")
        nodes.append(onnx.helper.make_node("Transpose", [a], [moved], name=f"{name}_transA", perm=[1, 0]))
        a = moved
    inputs = [a, b if alpha == 1.0 else scaled(b, alpha)]
    if c and not computed:
        inputs.append(c if beta == 1.0 else scaled(c, beta))
    product = ctx.fresh(f"{out}_product") if computed else out
    nodes.append(onnx.helper.make_node("Gemm", inputs, [product], name=name, transB=int(node_attr(node, "transB", 0))))
    if computed:
        if beta != 1.0:
            factor = ctx.add_initializer(ctx.fresh(f"{c}_beta"), np.asarray(beta, np.float32))
            times = ctx.fresh(f"{c}_times_beta")
            nodes.append(onnx.helper.make_node("Mul", [c, factor], [times], name=f"{name}_beta"))
            c = times
        nodes.append(onnx.helper.make_node("Add", [product, c], [out], name=f"{name}_c"))
    return nodes


def _einsum_as_matmul(ctx: _Context) -> int:
    """``Einsum`` of an activation and a constant tensor with no index both share with the output (a linear layer
    ``einsum("bld,de->ble", x, W)``, a channels-first 1x1 convolution ``"bchw,oc->bohw"``, a projection contracting
    several indices ``"bhnd,chd->bcn"``) as the ``MatMul`` it computes: the activation transposed so that the
    contracted indices come last and flattened into one, the weight as a ``[K, N]`` matrix, and the result
    reshaped and transposed into the output's order. :func:`_matmul_as_gemm` then writes it as a Gemm."""
    constants = {i.name for i in ctx.graph.initializer}
    return _rewrite_each(ctx, ("Einsum",), lambda c, node: _einsum_form(c, node, constants))


def _einsum_form(ctx: _Context, node: onnx.NodeProto, constants: Collection[str]) -> list[onnx.NodeProto] | None:
    equation = str(node_attr(node, "equation", "")).replace(" ", "")
    if "->" not in equation or "..." in equation or len(node.input) != 2:
        return None
    (first, second), out = equation.split("->")[0].split(","), equation.split("->")[1]
    (x, xl), (w, wl) = ((node.input[0], first), (node.input[1], second))
    if x in constants and w not in constants:
        (x, xl), (w, wl) = (w, wl), (x, xl)
    weight, shape = ctx.initializer(w), ctx.shape(x)
    if x in constants or weight is None or shape is None or -1 in shape or len(shape) != len(xl) or \
            weight.ndim != len(wl) or any(len(set(t)) != len(t) for t in (xl, wl, out)):
        return None
    groups = [c for c in xl if c in wl and c in out]  # (a grouped linear layer's "btgi,gih->btgh")
    labels = (xl, wl, out)
    if len(groups) > 1:
        return None
    if groups:
        xl, wl, out = (t.replace(groups[0], "") for t in labels)
    contracted = [c for c in xl if c in wl and c not in out]
    free_x, free_w = [c for c in xl if c not in wl], [c for c in wl if c not in xl]
    if not contracted or not free_x or not free_w or sorted(out) != sorted(free_x + free_w) or \
            set(xl) | set(wl) != set(out) | set(contracted):
        return None
    dims = dict(zip(labels[0], shape))
    return (_grouped_einsum(ctx, node, x, weight, labels, groups[0], dims, contracted, free_x, free_w) if groups
            else _einsum_nodes(ctx, node, x, xl, weight, wl, out, dims, contracted, free_x, free_w))


def _grouped_einsum(ctx: _Context, node: onnx.NodeProto, x: str, weight: np.ndarray, labels: tuple[str, str, str],
                    group: str, dims: dict[str, int], contracted: list[str], free_x: list[str], free_w: list[str]
                    ) -> list[onnx.NodeProto]:
    """An Einsum whose index ``group`` is in the activation, the weight and the output (DeepFilterNet's grouped
    linear layer) as one MatMul per group: the group's slice of the activation, its own weight, and the results
    concatenated along the group's axis."""
    xl, wl, out = labels
    dims = {**dims, **dict(zip(wl, weight.shape))}
    name, nodes, parts = node.name or node.output[0], [], []
    count, axis_x, axis_w, axis_out = dims[group], xl.index(group), wl.index(group), out.index(group)
    drop = {k: v for k, v in dims.items() if k != group}
    out_dims = [dims[c] if c != group else 1 for c in out]

    def const(tag: str, value: np.ndarray) -> str:
        return ctx.add_initializer(ctx.fresh(f"{node.output[0]}_{tag}"), value)

    for j in range(count):
        tag = f"g{j}"
        sliced = ctx.fresh(f"{node.output[0]}_{tag}_in")
        nodes.append(onnx.helper.make_node("Slice", [x, const(f"{tag}_start", np.array([j], np.int64)),
                                                     const(f"{tag}_end", np.array([j + 1], np.int64)),
                                                     const(f"{tag}_axis", np.array([axis_x], np.int64))],
                                           [sliced], name=f"{name}_{tag}_slice"))
        flat = ctx.fresh(f"{node.output[0]}_{tag}_x")
        nodes.append(onnx.helper.make_node("Reshape", [sliced, const(f"{tag}_x_shape", np.array(
            [dims[c] for c in xl if c != group], np.int64))], [flat], name=f"{name}_{tag}_x"))
        result = ctx.fresh(f"{node.output[0]}_{tag}_y")
        proxy = onnx.helper.make_node("Einsum", [], [result], name=f"{name}_{tag}")
        nodes += _einsum_nodes(ctx, proxy, flat, xl.replace(group, ""), np.take(weight, j, axis=axis_w),
                               wl.replace(group, ""), out.replace(group, ""), dict(drop), contracted, free_x, free_w)
        part = node.output[0] if count == 1 else ctx.fresh(f"{node.output[0]}_{tag}")
        nodes.append(onnx.helper.make_node("Reshape", [result, const(f"{tag}_shape", np.array(out_dims, np.int64))],
                                           [part], name=f"{name}_{tag}_out"))
        parts.append(part)
    if count > 1:
        nodes.append(onnx.helper.make_node("Concat", parts, [node.output[0]], name=f"{name}_groups", axis=axis_out))
    return nodes


def _einsum_nodes(ctx: _Context, node: onnx.NodeProto, x: str, xl: str, weight: np.ndarray, wl: str, out: str,
                  dims: dict[str, int], contracted: list[str], free_x: list[str], free_w: list[str]
                  ) -> list[onnx.NodeProto]:
    """Transpose -> Reshape -> MatMul -> Reshape -> Transpose (each only where needed) for :func:`_einsum_as_matmul`."""
    name, nodes = node.name or node.output[0], []
    dims.update(zip(wl, weight.shape))
    k, n = math.prod(dims[c] for c in contracted), math.prod(dims[c] for c in free_w)

    def step(op: str, inputs: list[str], tag: str, last: bool, **attrs: object) -> str:
        result = node.output[0] if last else ctx.fresh(f"{node.output[0]}_{tag}")
        nodes.append(onnx.helper.make_node(op, inputs, [result], name=name if op == "MatMul" else f"{name}_{tag}",
                                           **attrs))
        return result

    def reshape(value: str, target: list[int], tag: str, last: bool) -> str:
        return step("Reshape", [value, ctx.add_initializer(ctx.fresh(f"{node.output[0]}_{tag}_shape"),
                                                           np.array(target, np.int64))], tag, last)

    order = free_x + contracted
    if list(xl) != order:
        x = step("Transpose", [x], "rows", False, perm=[xl.index(c) for c in order])
    if len(contracted) > 1:
        x = reshape(x, [dims[c] for c in free_x] + [k], "flat", False)
    matrix = weight.transpose([wl.index(c) for c in contracted + free_w]).reshape(k, n)
    result = free_x + free_w
    last_shape, last_order = len(free_w) > 1, result != list(out)
    y = step("MatMul", [x, ctx.add_initializer(ctx.fresh(f"{node.output[0]}_matrix"), np.ascontiguousarray(matrix))],
             "matmul", not (last_shape or last_order))
    if last_shape:
        y = reshape(y, [dims[c] for c in result], "unflat", not last_order)
    if last_order:
        step("Transpose", [y], "order", True, perm=[result.index(c) for c in out])
    return nodes


def _matmul_as_gemm(ctx: _Context) -> int:
    """``MatMul(x, W)`` with ``W`` a constant ``[K, N]`` (a linear layer applied to every row of a sequence or
    feature map, as exporters write ``nn.Linear`` on a 3-D input) into a ``Gemm`` on the rows, which the
    crossbar computes: ``Reshape [-1, K] -> Gemm -> Reshape [-1, ..., N]`` (no Reshape for a 2-D ``x``), with a
    following ``Add`` of a constant ``[N]`` as the Gemm's bias. The weight is stored ``[N, K]`` with
    ``transB=1``, as torch writes ``nn.Linear``."""
    _constant_first(ctx)  # (each counted below, as the MatMul by a constant it becomes)
    rewritten = 0
    inits = ctx.initializers()
    consumers = _consumers(ctx.graph)
    outputs = {o.name for o in ctx.graph.output}
    for mm in [n for n in ctx.graph.node if n.op_type == "MatMul"]:
        x, w = mm.input
        shape = ctx.shape(x)
        if w not in inits or x in inits or inits[w].ndim != 2 or not shape or len(shape) < 2 or min(shape) <= 0:
            continue
        weight = inits[w]
        k, n = weight.shape
        end, bias, add = mm.output[0], None, None
        readers = consumers.get(end, [])
        if len(readers) == 1 and readers[0].op_type == "Add" and end not in outputs:
            other = [t for t in readers[0].input if t != end]
            value = inits.get(other[0]) if len(other) == 1 else None
            if value is not None and value.ndim <= len(shape) and value.shape[-1:] == (n,) and value.size == n:
                add, bias, end = readers[0], value.reshape(n).astype(np.float32), readers[0].output[0]
        base = mm.output[0]
        gemm_in = [ctx.add_initializer(ctx.fresh(f"{base}_weight"), np.ascontiguousarray(weight.T))]
        if bias is not None:
            gemm_in.append(ctx.add_initializer(ctx.fresh(f"{base}_bias"), bias))
        if len(shape) == 2:
            nodes = [onnx.helper.make_node("Gemm", [x, *gemm_in], [end], name=mm.name, transB=1)]
        else:
            rows, out = ctx.fresh(f"{base}_rows"), ctx.fresh(f"{base}_gemm")
            to_rows = ctx.add_initializer(ctx.fresh(f"{base}_rows_shape"), np.asarray([-1, k], np.int64))
            back = ctx.add_initializer(ctx.fresh(f"{base}_shape"), np.asarray([-1, *shape[1:-1], n], np.int64))
            nodes = [onnx.helper.make_node("Reshape", [x, to_rows], [rows], name=f"{mm.name}_rows"),
                     onnx.helper.make_node("Gemm", [rows, *gemm_in], [out], name=mm.name, transB=1),
                     onnx.helper.make_node("Reshape", [out, back], [end], name=f"{mm.name}_back")]
        _replace_node(ctx, mm, nodes)
        if add is not None:
            ctx.graph.node.remove(add)
        rewritten += 1
    if rewritten:
        _drop_unused_initializers(ctx)
    return rewritten


def _constant_first(ctx: _Context) -> None:
    """``MatMul(W, x)`` with ``W`` a constant ``[M, K]`` (a 1x1 convolution written ``weight @ x.flatten(2)``,
    hummingbird's trees as matrices) as ``(x^T W^T)^T``: transposes of ``x``'s last two axes around a MatMul by
    the constant ``W^T``, which :func:`_matmul_as_gemm` then writes as a Gemm."""
    inits = ctx.initializers()
    for mm in [n for n in ctx.graph.node if n.op_type == "MatMul"]:
        w, x = mm.input
        shape = ctx.shape(x)
        if w not in inits or x in inits or inits[w].ndim != 2 or not shape or len(shape) < 2 or min(shape) <= 0:
            continue
        perm = [*range(len(shape) - 2), len(shape) - 1, len(shape) - 2]
        rows, product = ctx.fresh(f"{x}_t"), ctx.fresh(f"{mm.output[0]}_t")
        weight = ctx.add_initializer(ctx.fresh(f"{w}_t"), np.ascontiguousarray(inits[w].T))
        _replace_node(ctx, mm, [
            onnx.helper.make_node("Transpose", [x], [rows], name=f"{mm.name}_rows", perm=perm),
            onnx.helper.make_node("MatMul", [rows, weight], [product], name=mm.name),
            onnx.helper.make_node("Transpose", [product], [mm.output[0]], name=f"{mm.name}_back", perm=perm)])
    ctx.invalidate()  # (the new tensors' shapes, for the Gemm rewrite)


def _pad_of(ctx: _Context, pad: onnx.NodeProto) -> tuple[str, list[int], float] | None:
    """A ``Pad``'s mode, pads and constant where they are known and it crops nothing, else None."""
    mode = node_attr(pad, "mode", "constant")
    pads = ctx.initializer(pad.input[1]) if len(pad.input) > 1 and pad.input[1] else node_attr(pad, "pads")
    value = ctx.initializer(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else node_attr(pad, "value", 0.0)
    if pads is None or value is None or np.asarray(value).size != 1 or len(pad.input) > 3:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    return (mode, pads, float(np.asarray(value).reshape(()))) if min(pads, default=0) >= 0 else None


def _absorbs(node: onnx.NodeProto, tensor: str, mode: str, value: float, spatial: list[tuple[int, int]]) -> bool:
    """Whether ``node`` computes the same on ``tensor`` padded so (the spatial axes' begin and end) with the
    padding in its own ``pads``: a convolution pads with zeros; a max pool (no dilation, no ceil mode) with
    -inf, which an edge padding narrower than its window also amounts to (the edge value is in the window)."""
    if not node.input or node.input[0] != tensor or node_attr(node, "auto_pad", "NOTSET") != "NOTSET":
        return False
    if node.op_type == "Conv":
        return mode == "constant" and value == 0.0
    if node.op_type != "MaxPool" or node_attr(node, "ceil_mode", 0) or \
            any(d != 1 for d in node_attr(node, "dilations", [1] * len(spatial))):
        return False
    kernel = list(node_attr(node, "kernel_shape", []))
    return (mode == "constant" and value == -np.inf) or (
        mode == "edge" and len(kernel) == len(spatial) and all(max(b, e) < k for (b, e), k in zip(spatial, kernel)))


def _fold_pad(ctx: _Context) -> int:
    """A ``Pad`` of the spatial axes in front of convolutions or max pools (Keras' ZeroPadding2D, tf2onnx's
    explicit padding, an edge padding before a pool) into their own ``pads``, which the device computes; a Pad
    that only a Transpose reads (an NHWC input padded before the layout change) moves behind it first."""
    outputs = {o.name for o in ctx.graph.output}
    folded = 0
    for pad in [n for n in ctx.graph.node if n.op_type == "Pad" and n.domain in _DEFAULT_DOMAINS]:
        found = _pad_of(ctx, pad)
        consumers = _consumers(ctx.graph)
        readers = consumers.get(pad.output[0], [])
        if found is None or pad.output[0] in outputs or not readers:
            continue
        mode, pads, value = found
        rank = len(pads) // 2
        if len(readers) == 1 and readers[0].op_type == "Transpose" and readers[0].output[0] not in outputs:
            turn = readers[0]
            perm = list(node_attr(turn, "perm", list(range(rank))[::-1]))
            moved = [pads[p] for p in perm] + [pads[rank + p] for p in perm]
            later = consumers.get(turn.output[0], [])
            spatial = list(zip(moved[2:rank], moved[rank + 2:]))
            if any(moved[i] or moved[rank + i] for i in (0, 1)) or not later or \
                    not all(_absorbs(r, turn.output[0], mode, value, spatial) for r in later):
                continue
            turn.input[0] = pad.input[0]  # x -> Transpose -> Pad -> (the Transpose's readers)
            turned = ctx.fresh(f"{turn.output[0]}_unpadded")
            pad.input[0], pad.output[0], turn.output[0] = turned, turn.output[0], turned
            ctx.graph.node.remove(pad)
            ctx.graph.node.insert(list(ctx.graph.node).index(turn) + 1, pad)
            pads, readers = moved, later
            ctx.invalidate()
        spatial = list(zip(pads[2:rank], pads[rank + 2:]))
        if any(pads[i] or pads[rank + i] for i in (0, 1)) or \
                not all(_absorbs(r, pad.output[0], mode, value, spatial) for r in readers):
            continue
        for node in readers:
            own = list(node_attr(node, "pads", [0] * (2 * len(spatial))))
            _drop_attrs(node, {"pads"})
            node.attribute.append(onnx.helper.make_attribute("pads", [
                own[i] + b for i, (b, _) in enumerate(spatial)] + [own[len(spatial) + i] + e
                                                                   for i, (_, e) in enumerate(spatial)]))
            node.input[0] = pad.input[0]
        ctx.graph.node.remove(pad)
        folded += 1
    if folded:
        _drop_unused_initializers(ctx)
    return folded


#: How many of its standard deviations a normalization's scaled signal spans, for :func:`_fold_norm_shift`'s
#: estimate of what its shift adds to the input's range.
_NORM_SPAN = 3.0


def _fold_norm_shift(ctx: _Context) -> int:
    """A normalization's shift (InstanceNormalization's ``B``; the ``Add`` after LayerNorm's or GroupNorm's scaled,
    centred output) into the bias of the linear operators that read it: an unpadded Conv, a Gemm (also behind
    Reshapes and Transposes that keep the last axis, as :func:`_matmul_as_gemm` writes a Linear on a sequence).
    They compute ``W(s + b) + c = Ws + (Wb + c)`` exactly, and their input's symmetric grid then spans the
    centred ``s`` alone. Done where the shift is as large as the scaled signal's span (:data:`_NORM_SPAN`
    standard deviations), so that it frees at least one bit of that grid: pyannote's SincNet normalizes the
    waveform to a shift of 0.31 beside a signal of 0.008, three steps of an 8-bit grid. The count."""
    inits = ctx.initializers()
    producer = {t: n for n in ctx.graph.node for t in n.output}
    outputs = {o.name for o in ctx.graph.output}
    moved = 0
    for node in list(ctx.graph.node):
        found = _norm_shift(ctx, node, inits, producer)
        if found is None or node.output[0] in outputs:
            continue
        centred, shift, scale = found
        if float(np.abs(shift).max()) < _NORM_SPAN * scale:
            continue
        readers = _consumers(ctx.graph).get(node.output[0], [])
        biases = [_shifted_bias(ctx, r, node.output[0], shift, inits) for r in readers]
        if not readers or any(b is None for b in biases):
            continue
        for linear, bias in [pair for found in biases if found for pair in found]:
            _set_bias(linear, ctx.add_initializer(ctx.fresh(f"{linear.output[0]}_bias"), bias))
        if node.op_type == "InstanceNormalization":
            node.input[2] = ctx.add_initializer(ctx.fresh(f"{node.output[0]}_unshifted"),
                                                np.zeros_like(inits[node.input[2]]))
        else:
            for reader in readers:
                reader.input[:] = [centred if t == node.output[0] else t for t in reader.input]
            ctx.graph.node.remove(node)
        moved += 1
    if moved:
        _drop_unused_initializers(ctx)
    return moved


def _norm_shift(ctx: _Context, node: onnx.NodeProto, inits: Mapping[str, np.ndarray],
                producer: Mapping[str, onnx.NodeProto]) -> tuple[str, np.ndarray, float] | None:
    """The centred tensor, the constant shift and the largest scale of a normalization's output ``node`` (None:
    it is none, or it shifts by nothing)."""
    if node.op_type == "InstanceNormalization":
        scale, shift = inits.get(node.input[1]), inits.get(node.input[2])
        rank = len(ctx.shape(node.input[0]) or [])
        if scale is None or shift is None or not np.any(shift) or rank < 2:
            return None
        return node.output[0], shift.reshape([1, -1] + [1] * (rank - 2)), float(np.abs(scale).max())
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    consts = [t for t in node.input if t in inits]
    acts = [t for t in node.input if t not in inits]
    scale = _centred_scale(acts[0], inits, producer) if len(consts) == 1 and len(acts) == 1 else None
    return None if scale is None or not np.any(inits[consts[0]]) else (acts[0], inits[consts[0]], scale)


def _centred_scale(tensor: str, inits: Mapping[str, np.ndarray], producer: Mapping[str, onnx.NodeProto]
                   ) -> float | None:
    """The largest scale of ``tensor`` if it is a normalization's centred output times constants, through
    Reshapes (None: it is not): an InstanceNormalization without shift (GroupNorm's groups), or
    ``(x - mean(x)) / d`` (LayerNorm; the mean a ReduceMean, or the GlobalAveragePool :func:`_mean_as_pool`
    wrote for it)."""
    scale, node = 1.0, producer.get(tensor)
    while node is not None and node.op_type in ("Mul", "Reshape"):
        source = node.input[0]
        if node.op_type == "Mul":
            acts = [t for t in node.input if t not in inits]
            if len(acts) != 1:
                return None
            scale *= max(float(np.abs(inits[t]).max()) for t in node.input if t in inits)
            source = acts[0]
        node = producer.get(source)
    if node is not None and node.op_type == "InstanceNormalization":
        own, shift = inits.get(node.input[1]), inits.get(node.input[2])
        if own is None or shift is None or np.any(shift):
            return None
        return scale * float(np.abs(own).max())
    sub = producer.get(node.input[0]) if node is not None and node.op_type == "Div" else None
    if sub is None or sub.op_type != "Sub":
        return None
    mean = producer.get(sub.input[1])
    centred = mean is not None and mean.op_type in ("ReduceMean", "GlobalAveragePool") and mean.input[0] == sub.input[0]
    return scale if centred else None


def _shifted_bias(ctx: _Context, reader: onnx.NodeProto, tensor: str, shift: np.ndarray,
                  inits: Mapping[str, np.ndarray]) -> list[tuple[onnx.NodeProto, np.ndarray]] | None:
    """The linear operators that read ``tensor`` through ``reader`` (and the Reshapes and Transposes that keep its
    last axis) and the biases that take its ``shift`` for them; None where one of them cannot (padding, a computed
    weight or bias, a shift that varies along rows)."""
    shape = ctx.shape(tensor)
    if not shape or reader.input[0] != tensor or tensor in reader.input[1:]:
        return None
    if reader.op_type in ("Reshape", "Transpose"):  # (a shift along the last axis, which they keep, to Gemms)
        out = ctx.shape(reader.output[0])
        readers = _consumers(ctx.graph).get(reader.output[0], [])
        keeps = bool(out) and out[-1] == shape[-1] if reader.op_type == "Reshape" else \
            list(node_attr(reader, "perm", []))[-1:] == [len(shape) - 1]
        along_last = shift.size == 1 or (shift.ndim >= 1 and shift.size == shift.shape[-1] == shape[-1])
        if not keeps or not along_last:
            return None
        if not readers or reader.output[0] in {o.name for o in ctx.graph.output} or \
                any(r.op_type not in ("Reshape", "Transpose", "Gemm") for r in readers):
            return None
        found = [_shifted_bias(ctx, r, reader.output[0], shift, inits) for r in readers]
        return None if any(f is None for f in found) else [pair for f in found if f for pair in f]
    weight = inits.get(reader.input[1]) if len(reader.input) > 1 else None
    bias_name = reader.input[2] if len(reader.input) > 2 and reader.input[2] else None
    if weight is None or (bias_name is not None and bias_name not in inits):
        return None
    bias = inits[bias_name].astype(np.float64) if bias_name else np.zeros(1)
    if reader.op_type == "Conv":
        channels, groups = shape[1], int(node_attr(reader, "group", 1))
        if any(node_attr(reader, "pads", [0])) or node_attr(reader, "auto_pad", "NOTSET") not in _UNPADDED or \
                not _per_channel(shift, channels, len(shape)) or weight.shape[1] * groups != channels or \
                weight.shape[0] % groups:
            return None
        summed = weight.astype(np.float64).sum(axis=tuple(range(2, weight.ndim)))
        per_in = np.broadcast_to(shift.astype(np.float64).reshape(-1), (channels,))
        added = np.einsum("gok,gk->go", summed.reshape(groups, -1, channels // groups),
                          per_in.reshape(groups, -1)).reshape(-1)
        return [(reader, (bias + added).astype(np.float32))]
    if reader.op_type == "Gemm" and len(shape) == 2 and not node_attr(reader, "transA", 0) and \
            node_attr(reader, "alpha", 1.0) == 1.0 and node_attr(reader, "beta", 1.0) == 1.0 and \
            (shift.size == 1 or shift.shape[-1] == shape[-1] and shift.size == shape[-1]):
        per_in = np.broadcast_to(shift.astype(np.float64).reshape(-1), (shape[-1],))
        w = weight.astype(np.float64) if node_attr(reader, "transB", 0) else weight.astype(np.float64).T
        if w.ndim != 2 or w.shape[1] != shape[-1] or bias.size not in (1, w.shape[0]):
            return None  # (a bias per row: leave it)
        return [(reader, (bias.reshape(-1) + w @ per_in).astype(np.float32))]
    return None


def _mean_as_pool(ctx: _Context) -> int:
    """``ReduceMean`` over every spatial axis of an ``[N, C, ...]`` tensor (a squeeze-and-excitation block's
    pooling, as paddle2onnx and tf2onnx write it) into the ``GlobalAveragePool`` it computes, which the device
    takes; with ``keepdims=0`` a ``Reshape`` to ``[N, C]`` follows. Over the middle axes of an ``[N, ..., C]``
    tensor (channels last), the pool reads it transposed to channels first and its result is transposed back."""
    rewritten = 0
    for mean in [n for n in ctx.graph.node if n.op_type == "ReduceMean" and n.domain in _DEFAULT_DOMAINS]:
        shape = ctx.shape(mean.input[0])
        axes = node_attr(mean, "axes")
        if len(mean.input) > 1 and mean.input[1]:
            value = ctx.initializer(mean.input[1])
            axes = None if value is None else value.tolist()
        if not shape or len(shape) < 3 or axes is None:
            continue
        rank, reduced = len(shape), sorted(int(a) % len(shape) for a in axes)
        channels_last = reduced == list(range(1, rank - 1))  # (tf2onnx's NHWC between Transposes)
        if reduced != list(range(2, rank)) and not channels_last:
            continue
        keep = node_attr(mean, "keepdims") in (None, 1)
        source, nodes = mean.input[0], []
        if channels_last:
            source = ctx.fresh(f"{mean.output[0]}_channels_first")
            nodes.append(onnx.helper.make_node("Transpose", [mean.input[0]], [source],
                                               name=f"{mean.name}_channels_first",
                                               perm=[0, rank - 1, *range(1, rank - 1)]))
        pooled = mean.output[0] if keep and not channels_last else ctx.fresh(f"{mean.output[0]}_pooled")
        nodes.append(onnx.helper.make_node("GlobalAveragePool", [source], [pooled], name=mean.name))
        if not keep:
            channels = shape[-1] if channels_last else shape[1]
            flat = ctx.add_initializer(ctx.fresh(f"{mean.output[0]}_shape"), np.asarray([shape[0], channels], np.int64))
            nodes.append(onnx.helper.make_node("Reshape", [pooled, flat], [mean.output[0]], name=f"{mean.name}_flat"))
        elif channels_last:
            nodes.append(onnx.helper.make_node("Transpose", [pooled], [mean.output[0]],
                                               name=f"{mean.name}_channels_last", perm=[0, *range(2, rank), 1]))
        _replace_node(ctx, mean, nodes)
        rewritten += 1
    if rewritten:
        _drop_unused_initializers(ctx)
    return rewritten


def _sum_as_add(ctx: _Context) -> int:
    """An n-ary ``Sum`` (Caffe's ``Eltwise`` as its converters write it: ResNet's shortcut in Caffe2 exports) as
    the chain of ``Add`` it computes, which the device takes; one input is an ``Identity``."""
    rewritten = 0
    for node in [n for n in ctx.graph.node if n.op_type == "Sum" and n.domain in _DEFAULT_DOMAINS]:
        name = node.name or node.output[0]
        total, nodes = node.input[0], []
        for i, term in enumerate(node.input[1:], 1):
            out = node.output[0] if i == len(node.input) - 1 else ctx.fresh(f"{node.output[0]}_partial{i}")
            nodes.append(onnx.helper.make_node("Add", [total, term], [out], name=name if i == 1 else f"{name}_{i}"))
            total = out
        _replace_node(ctx, node, nodes or [onnx.helper.make_node("Identity", [total], [node.output[0]], name=name)])
        rewritten += 1
    return rewritten


def _stft_as_conv(ctx: _Context) -> int:
    """``STFT`` of a real signal with a constant frame step, window and length (torch.stft's export) as the
    strided convolution it computes: the frames against each bin's windowed cosine and sine, which the device
    takes (``[N, L]`` or ``[N, L, 1]`` -> ``Reshape [N, 1, L]`` -> ``Conv`` -> ``[N, frames, bins, 2]``)."""
    return _rewrite_each(ctx, ("STFT",), _stft_conv)


def _stft_conv(ctx: _Context, stft: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    signal, step, window, length = (list(stft.input) + ["", "", ""])[:4]
    shape = ctx.shape(signal)
    step_value = ctx.initializer(step)
    window_value = ctx.initializer(window) if window else None
    length_value = ctx.initializer(length) if length else None
    if not shape or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 1) or step_value is None \
            or (window and window_value is None) or (length and length_value is None):
        return None
    size = int(length_value) if length_value is not None else (len(window_value) if window_value is not None else 0)
    if size < 1:
        return None
    bins = size // 2 + 1 if node_attr(stft, "onesided", 1) else size
    taps = np.ones(size) if window_value is None else window_value.astype(np.float64)
    angle = 2 * np.pi * np.outer(np.arange(bins), np.arange(size)) / size
    weight = np.concatenate([np.cos(angle) * taps, -np.sin(angle) * taps])[:, None, :].astype(np.float32)
    name = stft.name or stft.output[0]
    flat, conv, parts = (ctx.fresh(f"{stft.output[0]}_{k}") for k in ("signal", "conv", "parts"))
    return [onnx.helper.make_node("Reshape", [signal, ctx.add_initializer(ctx.fresh(f"{name}_signal_shape"),
                                                                          np.array([0, 1, -1], np.int64))],
                                  [flat], name=f"{name}_signal"),
            onnx.helper.make_node("Conv", [flat, ctx.add_initializer(ctx.fresh(f"{name}_dft"), weight)], [conv],
                                  name=name, strides=[int(step_value)], kernel_shape=[size]),
            onnx.helper.make_node("Reshape", [conv, ctx.add_initializer(ctx.fresh(f"{name}_parts_shape"),
                                                                        np.array([0, 2, bins, -1], np.int64))],
                                  [parts], name=f"{name}_parts"),
            onnx.helper.make_node("Transpose", [parts], [stft.output[0]], name=f"{name}_frames", perm=[0, 3, 2, 1])]


def _per_channel(value: np.ndarray, channels: int, rank: int) -> bool:
    """A scalar, or one value per channel of an ``[N, C, ...]`` tensor of ``rank`` under broadcasting."""
    if value.size == 1:
        return True
    if value.ndim > rank:
        return False
    padded = [1] * (rank - value.ndim) + list(value.shape)
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _rewrite_each(ctx: _Context, op_types: Collection[str],
                  rewrite: Callable[[_Context, onnx.NodeProto], list[onnx.NodeProto] | None]) -> int:
    """Replace every default-domain node of ``op_types`` by the nodes ``rewrite`` gives (None: kept); returns how
    many were replaced."""
    done = 0
    for node in [n for n in ctx.graph.node if n.op_type in op_types and n.domain in _DEFAULT_DOMAINS]:
        nodes = rewrite(ctx, node)
        if nodes is not None:
            _replace_node(ctx, node, nodes)
            done += 1
    if done:
        _drop_unused_initializers(ctx)
        ctx.invalidate()
    return done


def _drop_unused_initializers(ctx: _Context) -> None:
    used = _read(ctx.graph)  # (a loop's body reads its weights from around it)
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
