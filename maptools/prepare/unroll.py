"""Sequences and loops of a known length written out as the tensors and operators they stand for.

PPQ's graph carries tensors only, so a sequence between operators (``torch.jit.script``'s ``torch.split`` and
``torch.chunk`` export as ``SplitToSequence`` -> ``SequenceAt``) stops its trace. With the input shapes fixed and
the indices constant, every element is a tensor known at preparation: a ``SplitToSequence`` becomes a ``Split``,
``SequenceAt`` reads its element, ``SequenceLength`` is a constant and ``ConcatFromSequence`` a ``Concat``. A
sequence something else reads (a loop, a graph output) is rebuilt there by a ``SequenceConstruct``.

A ``Loop`` whose trip count preparation knows (a scripted ``for`` over a list or a range, tf2onnx's ``while`` on
a counter) runs the same operators each time: written out once per iteration, its convolutions reach the
crossbars instead of running on the host inside the loop, and a list it appends to becomes a sequence of known
length. The copies of each body tensor are recorded as one grid (:func:`~maptools.placement.record_tied`): each
iteration calibrated alone would fit its grid to what that step saw (a time step's rare spike clipped where the
calibration saw none; a Keras LSTM through tf2onnx read 25% off float, against NNCF's 6%).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.onnx_model import node_attr
from maptools.placement import record_tied
from maptools.prepare.base import _DEFAULT_DOMAINS, Names, _Context, _read, opset_of
from maptools.prepare.rewrites import _replace_node

__all__ = ["static_sequences", "unroll_loops"]

log = logging.getLogger(__name__)

#: The most operators an unrolled loop may add to the graph: each is an operator PPQ calibrates and the simulation
#: runs (an LSTM or GRU may be written out to twice as many, :data:`maptools.prepare.recurrent.MAX_WRITTEN`, which
#: a CRNN's 40-step bidirectional LSTM needs).
MAX_UNROLLED = 1024


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
        _replace_node(ctx, node, new)
        done += 1
    _drop_unread(ctx, set(elements))
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
    if op == "Identity":  # (an unrolled loop's result)
        elements[out] = seq
        return [_construct(ctx, out, seq, ins[0])]
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
    if op == "SequenceLength":  # (a constant: a loop over the sequence then has a constant trip count)
        ctx.add_initializer(out, np.array(len(seq), np.int64))
        return []
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
    nodes = [_unsqueeze(ctx, t, p, axis) for t, p in zip(seq, parts)]
    return [*nodes, onnx.helper.make_node("Concat", parts, [out], axis=axis)]


def _unsqueeze(ctx: _Context, x: str, out: str, axis: int) -> onnx.NodeProto:
    """``Unsqueeze`` at ``axis``, its axes an input from opset 13 and an attribute before."""
    if opset_of(ctx.model) < 13:
        return onnx.helper.make_node("Unsqueeze", [x], [out], axes=[axis])
    axes = ctx.add_initializer(ctx.fresh(out + "_axis"), np.array([axis], np.int64))
    return onnx.helper.make_node("Unsqueeze", [x, axes], [out])


def _drop_unread(ctx: _Context, made: set[str]) -> None:
    """Remove the nodes this module wrote (those with an output in ``made``) that nothing reads any more: sequence
    builders whose elements are read directly, an unrolled loop's condition arithmetic."""
    while True:
        read = _read(ctx.graph)
        unread = [n for n in ctx.graph.node if n.output and n.output[0] in made and not set(n.output) & read]
        if not unread:
            return
        for n in unread:
            ctx.graph.node.remove(n)


def unroll_loops(ctx: _Context) -> int:
    """Write out each main-graph ``Loop`` whose trip count :func:`_trip_count` knows; returns how many."""
    done, made = 0, set()
    for node in list(ctx.graph.node):
        if node.op_type != "Loop" or node.domain not in _DEFAULT_DOMAINS:
            continue
        unrolled = _unrolled(ctx, node)
        if unrolled is None:
            continue
        new, copies = unrolled
        _replace_node(ctx, node, new)
        record_tied(ctx.model, copies)
        made |= {t for n in new for t in n.output}
        done += 1
    if done:
        _drop_unread(ctx, made)
        ctx.invalidate()
    return done


def _always_true(ctx: _Context, body: onnx.GraphProto, name: str) -> bool:
    """Whether the body's condition output ``name`` is true whenever the loop's own condition is."""
    producers = {o: n for n in body.node for o in n.output}
    inner = {i.name: i for i in body.initializer}
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    if name == body.input[1].name:
        return True
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        value = onnx.numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
    elif name in inner:
        value = onnx.numpy_helper.to_array(inner[name])
    elif node is None:
        value = ctx.initializer(name)
    else:
        return False
    return value is not None and value.size == 1 and bool(value.reshape(()))


def _nested(nodes: Sequence[onnx.NodeProto]) -> bool:
    """Whether any of ``nodes`` holds a subgraph (control flow of its own)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute)


def _trip_count(ctx: _Context, node: onnx.NodeProto, body: onnx.GraphProto) -> int | None:
    """How many times ``node``'s body runs, where preparation can know it: a constant count with a condition
    that stays true, or a condition computed from constants and from carried values that start constant and
    change by constant arithmetic (tf2onnx's ``while`` loops: ``Less(i + 1, n)`` on a carried counter), which is
    evaluated here, iteration by iteration (at most :data:`MAX_UNROLLED` of them)."""
    limit = _constant(ctx, node.input[0])
    condition = _constant(ctx, node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(True)
    if (node.input[0] and (limit is None or limit.size != 1)) or condition is None or condition.size != 1:
        return None
    limit = min(int(limit.reshape(())), MAX_UNROLLED + 1) if limit is not None else MAX_UNROLLED + 1
    if not bool(condition.reshape(())):
        return 0
    if _always_true(ctx, body, body.output[0].name):
        return limit if node.input[0] else None
    step = _condition_step(ctx, node, body)
    if step is None:
        return None
    run, values = step
    trips = 0
    try:
        while trips < limit:
            trips += 1
            going, *values = run(trips - 1, values)
            if not bool(np.asarray(going).reshape(())):
                return trips
    except Exception as e:  # noqa: BLE001  (onnx's reference evaluator cannot run it: the loop stays as it is)
        log.debug("the trip count of %s is not evaluated: %s", node.name or node.output[0], e)
        return None
    return trips if node.input[0] else None


def _condition_step(ctx: _Context, node: onnx.NodeProto, body: onnx.GraphProto) -> tuple[Any, list] | None:
    """The part of ``body`` its condition depends on, as a function ``(iteration, carried) -> [condition,
    *carried]`` with the carried values' constant starts; None where it reads anything else (an activation)."""
    producers = {o: n for n in body.node for o in n.output}
    inner = {i.name for i in body.initializer}
    index = {b.name: j for j, b in enumerate(body.input[2:])}
    wanted, slice_nodes, carried = [body.output[0].name], [], []
    while wanted:
        name = wanted.pop()
        if name in index:
            if index[name] not in carried:
                carried.append(index[name])
                wanted.append(body.output[1 + index[name]].name)
            continue
        n = producers.get(name)
        if n is not None:
            if n not in slice_nodes:
                slice_nodes.append(n)
                wanted += [t for t in n.input if t]
        elif name not in inner and name != body.input[0].name and name != body.input[1].name and \
                ctx.initializer(name) is None:
            return None
    starts = [_constant(ctx, node.input[2 + j]) for j in carried]
    if any(v is None for v in starts) or _nested(slice_nodes) or \
            any(n.domain not in _DEFAULT_DOMAINS for n in slice_nodes):
        return None
    order = [n for n in body.node if n in slice_nodes]
    outer = {t for n in order for t in n.input if t and t not in producers and t not in inner} - \
        {b.name for b in body.input}
    graph = onnx.helper.make_graph(
        order, "condition", [onnx.helper.make_value_info(b.name, b.type) for b in
                             [body.input[0], body.input[1], *(body.input[2 + j] for j in carried)]],
        [onnx.ValueInfoProto(name=o) for o in [body.output[0].name, *(body.output[1 + j].name for j in carried)]],
        [*body.initializer, *(onnx.numpy_helper.from_array(ctx.initializer(t), t) for t in sorted(outer))])
    model = onnx.helper.make_model(graph, opset_imports=list(ctx.model.opset_import))
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(model)
    except Exception as e:  # noqa: BLE001  (as above)
        log.debug("the condition of %s cannot be evaluated: %s", node.name or node.output[0], e)
        return None
    names = [body.input[0].name, body.input[1].name, *(body.input[2 + j].name for j in carried)]

    def run(iteration: int, values: list) -> list:
        return evaluator.run(None, dict(zip(names, [np.array(iteration, np.int64), np.array(True), *values])))

    return run, starts


def _unrolled(ctx: _Context, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[list[str]]] | None:
    """The operators of every iteration of ``node``, and per body tensor its copies, one per iteration (None where
    its count is unknown or over the limit, or its body holds control flow of its own)."""
    body = node_attr(node, "body")
    carried = list(node.input[2:])
    if len(body.output) != 1 + len(node.output) or _nested(body.node):
        return None
    trips = _trip_count(ctx, node, body)
    if trips is None or not 0 < trips * max(len(body.node), 1) <= MAX_UNROLLED:
        return None
    fresh = Names(ctx.graph).fresh

    def constant(base: str, value: np.ndarray) -> str:
        return ctx.add_initializer(fresh(f"{node.output[0]}_{base}"), value)

    renamed = {i.name: constant(i.name, onnx.numpy_helper.to_array(i)) for i in body.initializer}
    true = constant("continue", np.array(True))
    nodes: list[onnx.NodeProto] = []
    copies: dict[str, list[str]] = {}
    scans: list[list[str]] = [[] for _ in node.output[len(carried):]]
    for it in range(trips):
        names = {**renamed, body.input[0].name: constant(f"iteration{it}", np.array(it, np.int64)),
                 body.input[1].name: true, **{b.name: v for b, v in zip(body.input[2:], carried)}}
        for n in body.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"{n.name}_iteration{it}" if n.name else ""
            copy.input[:] = [names.get(t, t) for t in n.input]
            for k, t in enumerate(n.output):
                if t:
                    names[t] = copy.output[k] = fresh(f"{t}_iteration{it}")
                    copies.setdefault(t, []).append(names[t])
            nodes.append(copy)
        outs = [names.get(o.name, o.name) for o in body.output[1:]]
        carried = outs[:len(carried)]
        for scan, value in zip(scans, outs[len(carried):]):
            scan.append(value)
    nodes += [onnx.helper.make_node("Identity", [value], [out]) for value, out in zip(carried, node.output)]
    for scan, out in zip(scans, node.output[len(carried):]):
        stacked = [fresh(f"{v}_stacked") for v in scan]
        nodes += [_unsqueeze(ctx, v, s, 0) for v, s in zip(scan, stacked)]
        nodes.append(onnx.helper.make_node("Concat", stacked, [out], axis=0))
    return nodes, list(copies.values())
