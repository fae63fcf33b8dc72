"""ONNX sequences of a known length written as the tensors they hold.

PPQ's graph carries tensors only, so a sequence between operators (``torch.jit.script``'s ``torch.split`` and
``torch.chunk`` export as ``SplitToSequence`` -> ``SequenceAt``) stops its trace. With the input shapes fixed and
the indices constant, every element is a tensor known at preparation: a ``SplitToSequence`` becomes a ``Split``,
``SequenceAt`` reads its element, ``SequenceLength`` is a constant and ``ConcatFromSequence`` a ``Concat``. A
sequence something else reads (a loop, a graph output) is rebuilt there by a ``SequenceConstruct``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper

from maptools.onnx_model import node_attr
from maptools.prepare.base import _DEFAULT_DOMAINS, _Context, _read, opset_of

__all__ = ["static_sequences"]


def static_sequences(ctx: _Context) -> int:
    """Rewrite the sequence operators of the main graph whose sequence has a known length; returns how many."""
    if not any(n.op_type.startswith("Sequence") or n.op_type.endswith("Sequence") for n in ctx.graph.node):
        return 0
    elements: dict[str, list[str]] = {}  # sequence -> its element tensors, in order
    done = 0
    for node in list(ctx.graph.node):
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        new = _rewritten(ctx, node, elements)
        if new is None:
            continue
        at = list(ctx.graph.node).index(node)
        ctx.graph.node.remove(node)
        for i, n in enumerate(new):
            ctx.graph.node.insert(at + i, n)
        done += 1
    _drop_unread(ctx, elements)
    ctx.invalidate()
    return done


def _constant(ctx: _Context, name: str) -> np.ndarray | None:
    return None if not name else ctx.initializer(name)


def _index(ctx: _Context, name: str, length: int, default: int) -> int | None:
    """A constant position into a sequence of ``length`` (negative counts from the end), or None."""
    if not name:
        return default
    value = _constant(ctx, name)
    if value is None or value.size != 1:
        return None
    i = int(value.reshape(()))
    return i + length if i < 0 else i


def _rewritten(ctx: _Context, node: onnx.NodeProto, elements: dict[str, list[str]]) -> list[onnx.NodeProto] | None:
    """The tensor nodes that replace ``node`` (recording any sequence it makes in ``elements``), or None where it
    stays as it is."""
    op, ins, out = node.op_type, list(node.input), node.output[0]
    if op in ("SequenceConstruct", "SequenceEmpty"):
        elements[out] = ins
        return None
    if op == "SplitToSequence":
        return _split(ctx, node, elements)
    seq = elements.get(ins[0]) if ins else None
    if seq is None:
        return None
    if op in ("SequenceInsert", "SequenceErase"):
        insert = op == "SequenceInsert"
        at = _index(ctx, ins[2 if insert else 1] if len(ins) > 1 + insert else "", len(seq), len(seq) - (not insert))
        if at is None or not 0 <= at <= len(seq) - (not insert):
            return None
        elements[out] = seq[:at] + [ins[1]] + seq[at:] if insert else seq[:at] + seq[at + 1:]
        return [_construct(ctx, out, elements[out], ins[0])]
    if op == "SequenceAt":
        at = _index(ctx, ins[1], len(seq), 0)
        return None if at is None or not 0 <= at < len(seq) else [onnx.helper.make_node("Identity", [seq[at]], [out])]
    if op == "SequenceLength":
        value = ctx.add_initializer(ctx.fresh(out + "_value"), np.array(len(seq), np.int64))
        return [onnx.helper.make_node("Identity", [value], [out])]
    if op == "ConcatFromSequence" and seq:
        return _concat(ctx, node, seq)
    return None


def _construct(ctx: _Context, out: str, items: list[str], like: str) -> onnx.NodeProto:
    """The sequence ``out`` built from ``items`` (dropped later if nothing reads it as a sequence)."""
    if items:
        return onnx.helper.make_node("SequenceConstruct", items, [out])
    t = ctx.types().get(like)
    dtype = t.sequence_type.elem_type.tensor_type.elem_type if t is not None else onnx.TensorProto.FLOAT
    return onnx.helper.make_node("SequenceEmpty", [], [out], dtype=dtype or onnx.TensorProto.FLOAT)


def _split(ctx: _Context, node: onnx.NodeProto, elements: dict[str, list[str]]) -> list[onnx.NodeProto] | None:
    x, out = node.input[0], node.output[0]
    shape = ctx.shape(x)
    axis = int(node_attr(node, "axis") or 0)
    keepdims = int(node_attr(node, "keepdims", 1))
    if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] < 1:
        return None
    axis %= len(shape)
    split = _constant(ctx, node.input[1] if len(node.input) > 1 else "")
    if len(node.input) > 1 and node.input[1] and split is None:
        return None
    length = shape[axis]
    if split is None:
        sizes = [1] * length
    elif split.ndim == 0:
        step = int(split)
        sizes = [min(step, length - i) for i in range(0, length, step)] if step > 0 else []
    else:
        sizes = [int(s) for s in split.reshape(-1)]
    if not sizes or sum(sizes) != length:
        return None
    parts = [ctx.fresh(f"{out}_{i}") for i in range(len(sizes))]
    new_opset = opset_of(ctx.model) >= 13
    if new_opset:
        sizes_name = ctx.add_initializer(ctx.fresh(out + "_sizes"), np.array(sizes, np.int64))
        nodes = [onnx.helper.make_node("Split", [x, sizes_name], parts, axis=axis)]
    else:
        nodes = [onnx.helper.make_node("Split", [x], parts, axis=axis, split=sizes)]
    if split is None and not keepdims:
        kept = parts
        parts = [ctx.fresh(f"{out}_{i}_squeezed") for i in range(len(sizes))]
        if new_opset:
            axes = ctx.add_initializer(ctx.fresh(out + "_axis"), np.array([axis], np.int64))
            nodes += [onnx.helper.make_node("Squeeze", [k, axes], [p]) for k, p in zip(kept, parts)]
        else:
            nodes += [onnx.helper.make_node("Squeeze", [k], [p], axes=[axis]) for k, p in zip(kept, parts)]
    elements[out] = parts
    return [*nodes, _construct(ctx, out, parts, out)]


def _concat(ctx: _Context, node: onnx.NodeProto, seq: list[str]) -> list[onnx.NodeProto] | None:
    out = node.output[0]
    axis = int(node_attr(node, "axis", 0))
    if not int(node_attr(node, "new_axis", 0)):
        return [onnx.helper.make_node("Concat", seq, [out], axis=axis)]
    shape = ctx.shape(seq[0])
    if shape is None:
        return None
    axis %= len(shape) + 1
    parts = [ctx.fresh(f"{t}_unsqueezed") for t in seq]
    if opset_of(ctx.model) >= 13:
        axes = ctx.add_initializer(ctx.fresh(out + "_axis"), np.array([axis], np.int64))
        nodes = [onnx.helper.make_node("Unsqueeze", [t, axes], [p]) for t, p in zip(seq, parts)]
    else:
        nodes = [onnx.helper.make_node("Unsqueeze", [t], [p], axes=[axis]) for t, p in zip(seq, parts)]
    return [*nodes, onnx.helper.make_node("Concat", parts, [out], axis=axis)]


def _drop_unread(ctx: _Context, elements: dict[str, list[str]]) -> None:
    """Remove the sequence builders nothing reads any more (their elements are read directly)."""
    while True:
        read = _read(ctx.graph)
        unread = [n for n in ctx.graph.node if n.op_type in ("SequenceConstruct", "SequenceEmpty")
                  and n.output[0] in elements and n.output[0] not in read]
        if not unread:
            return
        for n in unread:
            ctx.graph.node.remove(n)
