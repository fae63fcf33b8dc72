"""A model an integer quantizer already wrote, as its float equivalent, so that PPQ can quantize it for the
crossbars: onnxruntime's QDQ format (weights dequantized, each quantize -> dequantize pair on an activation
dropped), its QOperator format (``QLinearConv``, ``QGemm``, ``QLinearAdd``, ... as ``DequantizeLinear`` -> the
float operator -> ``QuantizeLinear``, then the pairs dropped) and its dynamic format (``DynamicQuantizeLinear`` ->
``ConvInteger`` / ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by the two scales, as one float ``Conv`` / ``MatMul``;
``DynamicQuantizeLSTM`` as an ``LSTM``). What matches none of these stays as it is, on the host.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.errors import ModelError
from maptools.onnx_model import constant_values

__all__ = ["dequantize", "input_ranges"]

_MS = "com.microsoft"
_ONNX = ("", "ai.onnx")
#: Where a QuantizeLinear / DequantizeLinear comes from: ONNX, or onnxruntime's own (16-bit codes before opset 21).
_QDQ = (*_ONNX, _MS)
#: Operators that move integer codes without computing on them: a quantizer's output may pass them before its
#: dequantize (the QOperator format's MaxPool and Reshape on uint8), so the pair is found past them.
_TRANSPARENT = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                          "DepthToSpace", "SpaceToDepth", "Slice", "Tile", "Expand"})
#: Operators whose outputs are never negative: a quantizer whose codes start at 0.0 after them needs no ReLU.
_NON_NEGATIVE = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp"})
#: QOperator-format unary operators (com.microsoft): their float operator and the attributes it keeps.
_UNARY = {"QLinearSigmoid": ("Sigmoid", ()), "QLinearLeakyRelu": ("LeakyRelu", ("alpha",)),
          "QLinearSoftmax": ("Softmax", ("axis",)), "QLinearGlobalAveragePool": ("GlobalAveragePool", ()),
          "QLinearAveragePool": ("AveragePool", ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape",
                                                 "pads", "strides"))}


class _Graph:
    """The model's graph with its constants by name, rewritten in place."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = model.graph
        self.consts = constant_values(model)
        self.counter = 0
        self._made = self.producers()  # (what value() follows: constants' producers, which no rewrite changes)

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {t: n for n in self.g.node for t in n.output if t}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        found: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for t in n.input:
                found.setdefault(t, []).append(n)
        return found

    def value(self, name: str) -> np.ndarray | None:
        """A constant tensor: an initializer, a Constant, a reshape or product of constants (the dynamic
        format's per-channel weight scales), or constant codes: a quantized or clipped constant (Brevitas writes
        a weight as ``QuantizeLinear -> Clip -> DequantizeLinear`` of its float values)."""
        if name in self.consts:
            return self.consts[name]
        node = self._made.get(name)
        if node is not None and node.op_type in ("QuantizeLinear", "Clip"):
            value = _quantized(self, node) if node.op_type == "QuantizeLinear" else _clipped(self, node)
            if value is not None:
                self.consts[name] = value
            return value
        if node is None or node.domain not in _ONNX or node.op_type not in ("Reshape", "Identity", "Mul"):
            return None
        ins = [self.value(t) for t in node.input[:2]]
        if any(v is None for v in ins):
            return None
        if node.op_type == "Reshape":
            value = ins[0].reshape([d if d != 0 else s for d, s in zip(ins[1].tolist(), ins[0].shape)]
                                   if 0 in ins[1].tolist() else ins[1].tolist())
        else:
            value = ins[0] if node.op_type == "Identity" else ins[0] * ins[1]
        self.consts[name] = value
        return value

    def constant(self, array: np.ndarray, hint: str) -> str:
        self.counter += 1
        name = f"{hint}_dequantized_{self.counter}"
        self.g.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.consts[name] = array
        return name

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_float_{self.counter}"


def _real(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """``(codes - zero) * scale`` in the scale's type (a DequantizeLinear's output type: float16 in a half-precision
    export), a 1-D ``scale``/``zero`` along ``axis`` (or of ``codes``' shape)."""
    dtype = np.asarray(scale).dtype
    dtype = dtype if dtype.name in ("float16", "bfloat16", "float32") else np.dtype(np.float32)
    scale = np.asarray(scale, np.float64)
    zero = np.zeros_like(scale) if zero is None else np.asarray(zero, np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((codes.astype(np.float64) - zero) * scale).astype(dtype)


def _code_limits(dtype: np.dtype) -> tuple[float, float] | None:
    """The lowest and highest code of a quantizer's code type: integers of any width (int4 too) or float8; None
    for another type."""
    for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
        try:
            limits = info(dtype)
        except (TypeError, ValueError):
            continue
        return float(limits.min), float(limits.max)
    return None


def _integer(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.iinfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def _quantized(graph: _Graph, q: onnx.NodeProto) -> np.ndarray | None:
    """The codes a QuantizeLinear of a constant computes (integers rounded half to even; saturated to its code
    type, int4 and float8 too), or None where its input, scale or zero point is not constant or its scales are
    blocked."""
    x, scale = graph.value(q.input[0]), graph.value(_arg(q, 1) or "")
    zero = graph.value(_arg(q, 2) or "")
    if x is None or scale is None or (zero is None and _arg(q, 2)) or _attrs(q).get("block_size", 0) \
            or q.domain not in _QDQ or np.ndim(scale) > 1:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(_code_type(graph, q))
    limits = _code_limits(dtype)
    if limits is None:
        return None
    axis = int(_attrs(q).get("axis", 1)) % max(x.ndim, 1)
    shape = [1] * x.ndim
    if np.size(scale) > 1:
        shape[axis] = np.size(scale)
    step, offset = (np.asarray(v, np.float64).reshape(shape if np.size(v) > 1 else [])
                    for v in (scale, np.zeros(1) if zero is None else zero))
    scaled = x.astype(np.float64) / step
    return np.clip((np.round(scaled) if _integer(dtype) else scaled) + offset, *limits).astype(dtype)


def _clip_bounds(graph: _Graph, clip: onnx.NodeProto) -> tuple[float, float] | None:
    """A Clip's bounds (its inputs since opset 11, its attributes before; absent: unbounded), or None where
    one is not constant."""
    bounds = []
    for i, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        name = _arg(clip, i)
        value = graph.value(name) if name else _attrs(clip).get(attr, default)
        if value is None:
            return None
        bounds.append(float(np.ravel(value)[0]))
    return bounds[0], bounds[1]


def _clipped(graph: _Graph, clip: onnx.NodeProto) -> np.ndarray | None:
    """A Clip of a constant, computed."""
    x, bounds = graph.value(clip.input[0]), _clip_bounds(graph, clip)
    if x is None or bounds is None or clip.domain not in _ONNX:
        return None
    return np.clip(x, *bounds).astype(x.dtype)


def _attrs(node: onnx.NodeProto, keep: tuple[str, ...] | None = None) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if keep is None or a.name in keep}


def _dq(graph: _Graph, new: list[onnx.NodeProto], x: str, scale: str, zero: str | None, axis: int = 1) -> str:
    """``x`` dequantized: a constant folded, else a DequantizeLinear node (appended to ``new``)."""
    codes, s = graph.value(x), graph.value(scale)
    if codes is not None and s is not None:
        return graph.constant(_real(codes, s, None if not zero else graph.value(zero), axis), x)
    out = graph.fresh(x)
    extra = {"axis": axis} if s is not None and s.size > 1 else {}
    new.append(onnx.helper.make_node("DequantizeLinear", [x, scale, *([zero] if zero else [])], [out], **extra))
    return out


def _q(new: list[onnx.NodeProto], x: str, scale: str, zero: str | None, out: str) -> None:
    new.append(onnx.helper.make_node("QuantizeLinear", [x, scale, *([zero] if zero else [])], [out]))


def _arg(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _qlinear_conv(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
    x, xs, xz, w, ws, wz, ys, yz = (_arg(node, i) for i in range(8))
    bias = _arg(node, 8)
    codes, wscale, xscale = graph.value(w), graph.value(ws), graph.value(xs)
    if codes is None or wscale is None or (bias is not None and (graph.value(bias) is None or xscale is None)):
        return False
    inputs = [_dq(graph, new, x, xs, xz), _dq(graph, new, w, ws, wz, axis=0)]
    if bias is not None:
        inputs.append(graph.constant((graph.value(bias).astype(np.float64) * float(np.ravel(xscale)[0])
                                      * np.ravel(wscale).astype(np.float64)).astype(np.float32), bias))
    y = graph.fresh(node.output[0])
    new.append(onnx.helper.make_node("Conv", inputs, [y], name=node.name, **_attrs(node)))
    _q(new, y, ys, yz, node.output[0])
    return True


def _qlinear_matmul(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
    a, as_, az, b, bs, bz, ys, yz = (_arg(node, i) for i in range(8))
    codes = graph.value(b)
    axis = codes.ndim - 1 if codes is not None else 1
    y = graph.fresh(node.output[0])
    new.append(onnx.helper.make_node("MatMul", [_dq(graph, new, a, as_, az), _dq(graph, new, b, bs, bz, axis)], [y],
                                     name=node.name))
    _q(new, y, ys, yz, node.output[0])
    return True


def _qgemm(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
    a, as_, az, b, bs, bz, c, ys, yz = (_arg(node, i) for i in range(9))
    attrs = _attrs(node, ("alpha", "transA", "transB"))
    ascale, bscale = graph.value(as_), graph.value(bs)
    if c is not None and (graph.value(c) is None or ascale is None or bscale is None):
        return False
    inputs = [_dq(graph, new, a, as_, az), _dq(graph, new, b, bs, bz, 0 if attrs.get("transB", 0) else 1)]
    if c is not None:  # an int32 bias at scale a_scale * b_scale
        inputs.append(graph.constant((graph.value(c).astype(np.float64) * float(np.ravel(ascale)[0])
                                      * np.ravel(bscale).astype(np.float64)).astype(np.float32), c))
    out = node.output[0]
    y = graph.fresh(out) if ys else out
    new.append(onnx.helper.make_node("Gemm", inputs, [y], name=node.name, **attrs))
    if ys:
        _q(new, y, ys, yz, out)
    return True


def _qlinear_binary(op: str) -> Callable[[_Graph, onnx.NodeProto, list[onnx.NodeProto]], bool]:
    def rewrite(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
        a, as_, az, b, bs, bz, cs, cz = (_arg(node, i) for i in range(8))
        y = graph.fresh(node.output[0])
        new.append(onnx.helper.make_node(op, [_dq(graph, new, a, as_, az), _dq(graph, new, b, bs, bz)], [y],
                                         name=node.name))
        _q(new, y, cs, cz, node.output[0])
        return True
    return rewrite


def _qlinear_unary(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
    op, keep = _UNARY[node.op_type]
    if _attrs(node).get("channels_last", 0):
        return False
    x, xs, xz, ys, yz = (_arg(node, i) for i in range(5))
    y = graph.fresh(node.output[0])
    new.append(onnx.helper.make_node(op, [_dq(graph, new, x, xs, xz)], [y], name=node.name, **_attrs(node, keep)))
    _q(new, y, ys, yz, node.output[0])
    return True


def _qlinear_concat(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
    ys, yz, rest = node.input[0], node.input[1] or None, list(node.input[2:])
    parts = [_dq(graph, new, rest[i], rest[i + 1], rest[i + 2] or None) for i in range(0, len(rest), 3)]
    y = graph.fresh(node.output[0])
    new.append(onnx.helper.make_node("Concat", parts, [y], name=node.name, **_attrs(node, ("axis",))))
    _q(new, y, ys, yz, node.output[0])
    return True


def _dynamic_lstm(graph: _Graph, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> bool:
    """``DynamicQuantizeLSTM`` (int8 weights, laid out ``[directions, inputs, 4 * hidden]``) as an ONNX LSTM."""
    weights = []
    for codes, scale, zero in ((1, 8, 9), (2, 10, 11)):
        q, s, z = (graph.value(_arg(node, i) or "") for i in (codes, scale, zero))
        if q is None or s is None or q.ndim != 3:
            return False
        s = np.asarray(s, np.float64).reshape(len(q), 1, -1)  # per direction, or per direction and gate column
        z = np.zeros_like(s) if z is None else np.asarray(z, np.float64).reshape(s.shape)
        weights.append(graph.constant(((q.astype(np.float64) - z) * s).transpose(0, 2, 1).astype(np.float32),
                                      node.input[codes]))
    inputs = [node.input[0], *weights, *(node.input[3:8])]
    while inputs and not inputs[-1]:
        inputs.pop()
    new.append(onnx.helper.make_node("LSTM", inputs, list(node.output), name=node.name, **_attrs(node)))
    return True


_QOPERATOR: dict[tuple[str, str], Callable[[_Graph, onnx.NodeProto, list[onnx.NodeProto]], bool]] = {
    (_MS, "DynamicQuantizeLSTM"): _dynamic_lstm,
    ("", "QLinearConv"): _qlinear_conv, ("", "QLinearMatMul"): _qlinear_matmul, (_MS, "QGemm"): _qgemm,
    (_MS, "QLinearAdd"): _qlinear_binary("Add"), (_MS, "QLinearMul"): _qlinear_binary("Mul"),
    (_MS, "QLinearConcat"): _qlinear_concat, **{(_MS, op): _qlinear_unary for op in _UNARY}}


def _dynamic(graph: _Graph, node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
             consumers: dict[str, list[onnx.NodeProto]], new: list[onnx.NodeProto], dead: set[int]) -> bool:
    """``DynamicQuantizeLinear(x) -> ConvInteger / MatMulInteger -> Cast -> Mul(x_scale * w_scale)`` as the float
    operator on ``x`` with the dequantized weight (onnxruntime's ``quantize_dynamic``)."""
    xq, wq, xz, wz = (_arg(node, i) for i in range(4))
    dql = producers.get(xq or "")
    codes = graph.value(wq or "")
    after, bias, skipped = node.output[0], None, []
    found = consumers.get(after, [])
    if len(found) == 1 and found[0].op_type == "Add":  # older releases add the bias as codes at the input's scale
        bias = _float_bias(graph, next((t for t in found[0].input if t != after), ""), producers)
        if bias is None:
            return False
        skipped, after = [found[0]], found[0].output[0]
    cast = consumers.get(after, [])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or codes is None or xz != dql.output[2] \
            or len(cast) != 1 or cast[0].op_type != "Cast":
        return False
    mul = consumers.get(cast[0].output[0], [])
    if len(mul) != 1 or mul[0].op_type != "Mul":
        return False
    other = next((t for t in mul[0].input if t != cast[0].output[0]), None)
    scales = producers.get(other or "")
    if scales is None or scales.op_type != "Mul" or dql.output[1] not in scales.input:
        return False
    wscale = graph.value(next(t for t in scales.input if t != dql.output[1]))
    if wscale is None:
        return False
    conv = node.op_type == "ConvInteger"
    channels = codes.shape[0] if conv else codes.shape[-1]
    flat = np.ravel(wscale)
    if flat.size not in (1, channels):
        return False
    zero = graph.value(wz) if wz else None
    zeros = None if zero is None else np.ravel(zero) if np.size(zero) > 1 else np.ravel(zero)[0]
    weight = _real(codes, flat if flat.size > 1 else flat[0], zeros, 0 if conv else codes.ndim - 1)
    inputs = [dql.input[0], graph.constant(weight, wq)]
    if bias is not None and conv and bias.size == channels:
        inputs.append(graph.constant(bias.reshape(-1).astype(np.float32), wq + "_bias"))
    elif bias is not None:
        return False
    new.append(onnx.helper.make_node("Conv" if conv else "MatMul", inputs, [mul[0].output[0]], name=node.name,
                                     **(_attrs(node) if conv else {})))
    dead.update({id(cast[0]), id(mul[0]), *map(id, skipped)})
    return True


def _float_bias(graph: _Graph, codes: str, producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The float bias behind ``Reshape(Cast(Floor(Div(bias, scales))))``: a bias quantized at run time."""
    node = producers.get(codes)
    for op in ("Reshape", "Cast", "Floor", "Div"):
        if node is None or node.op_type != op:
            return None
        if op == "Div":
            return graph.value(node.input[0])
        node = producers.get(node.input[0])
    return None


def _drop_pairs(graph: _Graph) -> tuple[int, int]:
    """Each ``QuantizeLinear -> DequantizeLinear`` pair of one scale and zero point on an activation (past any
    :data:`_TRANSPARENT` operators, which then move the float tensor, or a Clip of the codes: Brevitas' narrow
    and sub-8-bit ranges) as the float tensor, or its ReLU where the codes start at 0.0
    (:func:`_clips_below_zero`, or a Clip at the zero point), and each dynamic pair (:func:`_dynamic_pair`); the
    two counts. A constant's static pair is left to :func:`_fold_weights`, which folds the values the model
    computes with."""
    dropped = dynamic = 0
    changed = True
    while changed:
        changed = False
        producers, consumers = graph.producers(), graph.consumers()
        for node in list(graph.g.node):
            src = producers.get(node.input[0]) if node.input else None
            if src is not None and src.op_type == "DynamicQuantizeLinear" and src.domain in _ONNX \
                    and _dynamic_pair(graph, src, node, consumers):
                dynamic += int(node.op_type == "DequantizeLinear")
                changed = True
                break
            if src is None or src.op_type != "QuantizeLinear" or src.domain not in _QDQ:
                continue
            readers = consumers.get(node.output[0], []) if node.output else []
            if node.op_type == "DequantizeLinear" and node.domain in _QDQ and _same(graph, src, node) \
                    and graph.value(src.input[0]) is None:  # (a constant's codes: _fold_weights folds them)
                index = list(graph.g.node).index(node)
                graph.g.node.remove(node)
                before = producers.get(src.input[0])
                relu = _clips_below_zero(graph, src) and (before is None or before.op_type not in _NON_NEGATIVE)
                graph.g.node.insert(index, onnx.helper.make_node("Relu" if relu else "Identity", [src.input[0]],
                                                                 [node.output[0]], name=node.name))
                dropped += 1
                changed = True
            elif node.op_type == "Cast" and _attrs(node).get("to") == _code_type(graph, src):
                # torch's exporter writes QuantizeLinear -> Cast(to=UINT8) -> DequantizeLinear: a cast to what it is
                graph.g.node.insert(list(graph.g.node).index(node), onnx.helper.make_node(
                    "Identity", [node.input[0]], [node.output[0]], name=node.name))
                graph.g.node.remove(node)
                changed = True
            elif node.op_type == "Clip" and node.domain in _ONNX and readers and graph.value(src.input[0]) is None \
                    and (bounds := _clip_bounds(graph, node)) is not None and all(
                        c.op_type == "DequantizeLinear" and c.domain in _QDQ and _same(graph, src, c) for c in readers):
                zero = graph.value(_arg(src, 2)) if _arg(src, 2) else np.zeros(1)
                at_zero = zero is not None and bounds[0] >= float(np.max(zero.astype(np.float64)))
                before = producers.get(src.input[0])
                relu = (_clips_below_zero(graph, src) or at_zero) and (
                    before is None or before.op_type not in _NON_NEGATIVE)
                for dq in readers:
                    index = list(graph.g.node).index(dq)
                    graph.g.node.remove(dq)
                    graph.g.node.insert(index, onnx.helper.make_node("Relu" if relu else "Identity", [src.input[0]],
                                                                     [dq.output[0]], name=dq.name))
                graph.g.node.remove(node)
                dropped += len(readers)
                changed = True
            elif node.op_type in _TRANSPARENT and node.domain in _ONNX and len(node.output) == 1 and all(
                    c.op_type in ("DequantizeLinear", *_TRANSPARENT) for c in readers):
                moved = graph.fresh(node.output[0])  # the operator on the float tensor, then the quantizer
                index = list(graph.g.node).index(node)
                graph.g.node.remove(node)
                graph.g.node.insert(index, onnx.helper.make_node(
                    node.op_type, [src.input[0], *node.input[1:]], [moved], name=node.name, **_attrs(node)))
                graph.g.node.insert(index + 1, onnx.helper.make_node("QuantizeLinear", [moved, *src.input[1:]],
                                                                     [node.output[0]], **_attrs(src)))
                changed = True
            if changed:
                break
    return dropped, dynamic


#: Operators that only rearrange a tensor's elements: a dynamic quantizer's codes may pass them before their
#: dequantizer (its min/max is that of the same elements either way).
_REARRANGING = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "DepthToSpace",
                          "SpaceToDepth"})


def _dynamic_pair(graph: _Graph, dql: onnx.NodeProto, node: onnx.NodeProto,
                  consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """tf2onnx's TFLite dynamic-range layer, each input (activation or bias) quantized at its own min/max and back
    (``DynamicQuantizeLinear -> DequantizeLinear`` of its three outputs): an activation's pair as the float tensor,
    a constant's as the values the model computes with; a rearrangement of the codes between the two
    (:data:`_REARRANGING`) is moved before the quantizer. True where ``node`` (reading ``dql``'s codes) was
    rewritten."""
    readers = consumers.get(dql.output[0], [])
    index = list(graph.g.node).index(node)
    if node.op_type == "DequantizeLinear" and node.domain in _QDQ and list(node.input) == list(dql.output):
        graph.g.node.remove(node)
        constant = graph.value(dql.input[0])
        if constant is None:
            graph.g.node.insert(index, onnx.helper.make_node("Identity", [dql.input[0]], [node.output[0]],
                                                             name=node.name))
        else:
            graph.g.node.insert(index, onnx.helper.make_node("Identity", [graph.constant(
                _dynamic_rounded(constant), node.output[0])], [node.output[0]], name=node.name))
        return True
    if node.op_type in _REARRANGING and node.domain in _ONNX and readers == [node] and all(
            c.op_type == "DequantizeLinear" and list(c.input[1:]) == list(dql.output[1:])
            for c in consumers.get(node.output[0], [])):
        moved = graph.fresh(node.output[0])
        graph.g.node.remove(node)
        graph.g.node.insert(index, onnx.helper.make_node(node.op_type, [dql.input[0], *node.input[1:]], [moved],
                                                         name=node.name, **_attrs(node)))
        at = list(graph.g.node).index(dql)
        graph.g.node.remove(dql)
        graph.g.node.insert(at, onnx.helper.make_node("DynamicQuantizeLinear", [moved],
                                                      [node.output[0], *dql.output[1:]], name=dql.name))
        return True
    return False


def _dynamic_rounded(x: np.ndarray) -> np.ndarray:
    """``DequantizeLinear(DynamicQuantizeLinear(x))``: ``x`` on the uint8 grid of its own range (0 included)."""
    x = np.asarray(x, np.float32)
    low, high = min(0.0, float(x.min(initial=0.0))), max(0.0, float(x.max(initial=0.0)))
    scale = np.float32((high - low) / 255.0)
    if scale == 0:
        return x
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def _code_type(graph: _Graph, q: onnx.NodeProto) -> int:
    """The ONNX element type of a quantizer's codes: its zero point's, else ``output_dtype``, else uint8."""
    zero = graph.value(_arg(q, 2) or "")
    if zero is not None:
        return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(zero).dtype)
    return int(_attrs(q).get("output_dtype", 0)) or onnx.TensorProto.UINT8


def _clips_below_zero(graph: _Graph, q: onnx.NodeProto) -> bool:
    """True where the quantizer's codes start at 0.0 (uint8 at zero point 0, the default): it is a ReLU as well,
    and quantizers fold the ReLU before them into it."""
    zero = graph.value(_arg(q, 2) or "")
    if zero is None:
        return _arg(q, 2) is None
    limits = _code_limits(zero.dtype) if _integer(zero.dtype) else None
    return limits is not None and bool(np.all(zero.astype(np.float64) == limits[0]))


def _same(graph: _Graph, q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
    """A quantizer and a dequantizer of one scale, zero point and axis."""
    for i in (1, 2):
        a, b = _arg(q, i), _arg(dq, i)
        if a == b:
            continue
        va, vb = graph.value(a or ""), graph.value(b or "")
        if va is None or vb is None or not np.array_equal(np.asarray(va, np.float64), np.asarray(vb, np.float64)):
            return False
    return _attrs(q).get("axis", 1) == _attrs(dq).get("axis", 1)


def _fold_weights(graph: _Graph) -> int:
    """Each DequantizeLinear of constant codes as a float initializer; the count."""
    folded = 0
    for node in list(graph.g.node):
        if node.op_type != "DequantizeLinear" or node.domain not in _QDQ:
            continue
        codes, scale = graph.value(node.input[0]), graph.value(node.input[1])
        block = int(_attrs(node).get("block_size", 0))
        if codes is None or scale is None or (scale.ndim > 1 and not block):
            continue
        zero = graph.value(_arg(node, 2) or "")
        axis = _attrs(node).get("axis", 1)
        axis = axis if axis >= 0 else codes.ndim + axis
        if block:  # opset 21's blocked scales (4-bit weights): each covers ``block`` codes along the axis
            size = codes.shape[axis]
            scale, zero = (None if v is None else np.repeat(v, block, axis=axis).take(range(size), axis=axis)
                           for v in (scale, zero))
        real = _real(codes, scale, zero, axis)
        graph.g.initializer.append(onnx.numpy_helper.from_array(real, node.output[0]))
        graph.consts[node.output[0]] = real
        graph.g.node.remove(node)
        folded += 1
    return folded


#: Operators that only select or move the elements of their first input: a per-tensor dequantization commutes
#: with them.
_MOVES = frozenset({"Gather", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Identity",
                    "Expand"})


def _moved_weights(graph: _Graph) -> int:
    """Each per-tensor DequantizeLinear of constant codes that only moves have read (onnxruntime's dynamic
    quantization writes an embedding as an int8 table, a Gather, a Transpose, then the DequantizeLinear) as the same
    moves of the float table; the count."""
    producers = graph.producers()
    moved = 0
    for dq in [n for n in graph.g.node if n.op_type == "DequantizeLinear" and n.domain in _QDQ]:
        scale, zero = graph.value(dq.input[1]), graph.value(_arg(dq, 2) or "")
        if scale is None or scale.size != 1 or (zero is not None and zero.size != 1):
            continue
        chain, tensor = [], dq.input[0]
        while tensor not in graph.consts:
            node = producers.get(tensor)
            if node is None or node.op_type not in _MOVES or node.domain not in _ONNX:
                break
            chain.append(node)
            tensor = node.input[0]
        if not chain or tensor not in graph.consts:
            continue
        source, copies = graph.constant(_real(graph.consts[tensor], scale, zero, 0), tensor), []
        for node in reversed(chain):  # the same moves, of the float table (the codes' may have other readers)
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = graph.fresh(node.name or node.output[0])
            copy.input[0] = source
            del copy.output[:]
            source = dq.output[0] if node is chain[0] else graph.fresh(node.output[0])
            copy.output.append(source)
            copies.append(copy)
        nodes = list(graph.g.node)
        at = nodes.index(dq)
        del graph.g.node[:]
        graph.g.node.extend(nodes[:at] + copies + nodes[at + 1:])
        moved += 1
    return moved


def _prune(graph: _Graph) -> None:
    """Drop the nodes and initializers nothing reads (the quantizers left behind; an initializer that is also a
    graph input too from the inputs), and the Identities."""
    outputs = {o.name for o in graph.g.output}
    for node in [n for n in graph.g.node if n.op_type == "Identity" and n.output[0] not in outputs]:
        for other in graph.g.node:
            for i, t in enumerate(other.input):
                if t == node.output[0]:
                    other.input[i] = node.input[0]
        graph.g.node.remove(node)
    while True:
        read = {t for n in graph.g.node for t in n.input} | outputs
        unused = [n for n in graph.g.node if not any(t in read for t in n.output if t)]
        if not unused:
            break
        for node in unused:
            graph.g.node.remove(node)
    read = {t for n in graph.g.node for t in n.input} | outputs
    kept = [i for i in graph.g.initializer if i.name in read]
    dropped = {i.name for i in graph.g.initializer} - {i.name for i in kept}
    del graph.g.initializer[:]
    graph.g.initializer.extend(kept)
    inputs = [i for i in graph.g.input if i.name not in dropped]  # (an initializer listed as an input, IR < 4)
    del graph.g.input[:]
    graph.g.input.extend(inputs)


def dequantize(model: onnx.ModelProto, keep_quantizers: bool = False) -> tuple[onnx.ModelProto, Counter[str]]:
    """``model``'s float equivalent (a copy) and the quantized operators rewritten, by type.

    ``keep_quantizers`` keeps each ``QuantizeLinear -> DequantizeLinear`` pair: the float operators then compute
    what the integer ones did, rounding and clipping included (what checks the rewrite).

    Raises:
        ModelError: ``model`` has control flow around its quantized operators (not rewritten).
    """
    if any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
        raise ModelError("the quantized model has control flow (If, Loop, Scan).",
                         "quantize its float original to put its layers on the crossbars.")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = _Graph(copy)
    done: Counter[str] = Counter()
    rewritten: list[onnx.NodeProto] = []
    dead: set[int] = set()
    producers, consumers = graph.producers(), graph.consumers()
    for node in list(graph.g.node):
        new: list[onnx.NodeProto] = []
        rewrite = _QOPERATOR.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if rewrite is not None and rewrite(graph, node, new):
            done[node.op_type] += 1
            rewritten.extend(new)
        elif node.op_type in ("ConvInteger", "MatMulInteger") and _dynamic(graph, node, producers, consumers, new,
                                                                              dead):
            done[node.op_type] += 1
            rewritten.extend(new)
        else:
            rewritten.append(node)
    kept = [n for n in rewritten if id(n) not in dead]
    del graph.g.node[:]
    graph.g.node.extend(kept)
    pairs, dynamic = (0, 0) if keep_quantizers else _drop_pairs(graph)
    folded = _fold_weights(graph)
    moved = _moved_weights(graph)
    if moved:
        done["DequantizeLinear of gathered weights"] += moved
    if pairs:
        done["QuantizeLinear -> DequantizeLinear"] += pairs
    if dynamic:
        done["DynamicQuantizeLinear -> DequantizeLinear"] += dynamic
    if folded:
        done["DequantizeLinear of weights"] += folded
    _prune(graph)
    del graph.g.value_info[:]  # (the rewritten tensors' types changed: re-inferred)
    return copy, done


def input_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """The real range each graph input's quantizer covers (``QuantizeLinear`` reading the input, and a Clip of its
    codes): what the model was calibrated on, beyond which the quantized model clips and its float equivalent does
    not."""
    graph = _Graph(model)
    inputs = {i.name for i in model.graph.input} - set(graph.consts)
    consumers = graph.consumers()
    ranges: dict[str, tuple[float, float]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inputs:
            continue
        scale, zero = graph.value(node.input[1]), graph.value(_arg(node, 2) or "")
        if scale is None or np.size(scale) != 1:
            continue
        limits = _code_limits(np.dtype(np.uint8) if zero is None else zero.dtype)
        if limits is None:
            continue
        low, high = limits
        readers = consumers.get(node.output[0], [])
        bounds = _clip_bounds(graph, readers[0]) if len(readers) == 1 and readers[0].op_type == "Clip" else None
        if bounds is not None:  # (Brevitas' narrower codes)
            low, high = max(low, bounds[0]), min(high, bounds[1])
        offset = 0.0 if zero is None else float(np.ravel(zero)[0].astype(np.float64))
        s = float(np.ravel(scale)[0])
        ranges[node.input[0]] = ((low - offset) * s, (high - offset) * s)
    return ranges
