"""An ``LSTM`` operator written out step by step as the Gemms, gates and state updates it computes.

The ``LSTM`` operator has no device form: on the host, its matrix work (nearly all of a text recogniser's
recurrent head, all of a character-level segmenter's) stays off the crossbars. With the sequence length fixed,
it is the form tf2onnx and TorchScript write for an unrolled LSTM: the input projection of every step as one
Gemm on the rows ``[steps * batch, input]``, and per step the recurrent Gemm, ``Split`` into the gates
(ONNX's order: input, output, forget, cell), ``Sigmoid`` / ``Tanh`` and the state updates
``c = f * c + i * g``, ``h = o * tanh(c)``. The Gemms go to the crossbars (each step's recurrent Gemm holds the
same weights, and shares its arrays with the others), the gates to lookup tables, and the products of two
activations stay on the host.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper

from maptools.onnx_model import node_attr
from maptools.prepare.base import _DEFAULT_DOMAINS, _Context

__all__ = ["lstm_as_gemms", "MAX_WRITTEN"]

#: The most operators one LSTM may be written out as (about 14 per step and direction).
MAX_WRITTEN = 4096
_DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


def lstm_as_gemms(ctx: _Context) -> int:
    """Write out every ``LSTM`` with constant weights, the default activations, no peepholes, clipping or
    coupled gates and every sequence at full length; returns how many."""
    done = 0
    for node in [n for n in ctx.graph.node if n.op_type == "LSTM" and n.domain in _DEFAULT_DOMAINS]:
        nodes = _written(ctx, node)
        if nodes is None:
            continue
        at = list(ctx.graph.node).index(node)
        ctx.graph.node.remove(node)
        for i, n in enumerate(nodes):
            ctx.graph.node.insert(at + i, n)
        done += 1
    if done:
        ctx.invalidate()
    return done


def _written(ctx: _Context, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    ins = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, lengths, h0, c0, peep = ins[:8]
    weights, recurrent = ctx.initializer(w), ctx.initializer(r)
    bias = ctx.initializer(b) if b else None
    layout = int(node_attr(node, "layout", 0))
    shape = ctx.shape(x)
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(
        str(node_attr(node, "direction", "forward")))
    activations = tuple(a.decode() if isinstance(a, bytes) else a
                        for a in node_attr(node, "activations", None) or _DEFAULT_ACTIVATIONS * len(directions or []))
    if weights is None or recurrent is None or (b and bias is None) or directions is None or shape is None or \
            len(shape) != 3 or -1 in shape or _given(ctx, peep) or node_attr(node, "clip") is not None or \
            int(node_attr(node, "input_forget", 0)) or activations != _DEFAULT_ACTIVATIONS * len(directions):
        return None
    steps, batch = (shape[1], shape[0]) if layout else (shape[0], shape[1])
    if lengths:
        full = ctx.initializer(lengths)
        if full is None or not np.all(full == steps):
            return None
    hidden = recurrent.shape[-1]
    if steps * len(directions) * 14 > MAX_WRITTEN:
        return None
    return _Writer(ctx, node, steps, batch, hidden).nodes(x, weights, recurrent, bias, h0, c0, directions, layout)


def _given(ctx: _Context, name: str) -> bool:
    """Whether an optional input is there and not a constant zero."""
    if not name:
        return False
    value = ctx.initializer(name)
    return value is None or bool(np.any(value))


class _Writer:
    """The nodes of one LSTM written out, named after it."""

    def __init__(self, ctx: _Context, node: onnx.NodeProto, steps: int, batch: int, hidden: int) -> None:
        self.ctx, self.node, self.steps, self.batch, self.hidden = ctx, node, steps, batch, hidden
        self.base = node.name or node.output[0]
        self.out: list[onnx.NodeProto] = []
        self.used = {t for n in ctx.graph.node for t in [*n.input, *n.output]} | {i.name for i in ctx.graph.initializer}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], tag: str, outputs: int = 1, result: str | None = None,
           **attrs: object) -> str | list[str]:
        names = [result] if result else [self.fresh(f"{self.base}_{tag}" + (f"_{k}" if outputs > 1 else ""))
                                         for k in range(outputs)]
        self.out.append(onnx.helper.make_node(op_type, inputs, names, name=self.fresh(f"{self.base}_{tag}_node"),
                                              **attrs))
        return names[0] if outputs == 1 else names

    def const(self, tag: str, value: np.ndarray) -> str:
        return self.ctx.add_initializer(self.fresh(f"{self.base}_{tag}"), value)

    def nodes(self, x: str, weights: np.ndarray, recurrent: np.ndarray, bias: np.ndarray | None, h0: str, c0: str,
              directions: list[bool], layout: int) -> list[onnx.NodeProto]:
        steps, batch, hidden = self.steps, self.batch, self.hidden
        y_out, h_out, c_out = (list(self.node.output) + ["", "", ""])[:3]
        rows = self.op("Transpose", [x], "time_major", perm=[1, 0, 2]) if layout else x
        rows = self.op("Reshape", [rows, self.const("rows", np.array([steps * batch, -1], np.int64))], "rows")
        ys, hs, cs = [], [], []
        for d, reverse in enumerate(directions):
            tag = f"d{d}"
            gate_bias = (bias[d, :4 * hidden] + bias[d, 4 * hidden:] if bias is not None
                         else np.zeros(4 * hidden)).astype(np.float32)
            projected = self.op("Gemm", [rows, self.const(f"{tag}_W", weights[d].astype(np.float32)),
                                         self.const(f"{tag}_B", gate_bias)], f"{tag}_input", transB=1)
            projected = self.op("Reshape", [projected, self.const(f"{tag}_steps",
                                                                  np.array([steps, batch, 4 * hidden], np.int64))],
                                f"{tag}_steps")
            per_step = self.op("Split", [projected, self.const(f"{tag}_ones", np.ones(steps, np.int64))],
                               f"{tag}_split", outputs=steps, axis=0) if steps > 1 else [projected]
            axis0 = self.const(f"{tag}_axis0", np.array([0], np.int64))
            h = self._initial(h0, d, layout, f"{tag}_h0")
            c = self._initial(c0, d, layout, f"{tag}_c0")
            r = self.const(f"{tag}_R", recurrent[d].astype(np.float32))
            out_steps: list[str] = [""] * steps
            for t in (reversed(range(steps)) if reverse else range(steps)):
                s = f"{tag}_t{t}"
                gates = self.op("Squeeze", [per_step[t], axis0], f"{s}_x")
                if h is not None:
                    gates = self.op("Add", [gates, self.op("Gemm", [h, r], f"{s}_recurrent", transB=1)],
                                    f"{s}_gates")
                i, o, f, g = self.op("Split", [gates, self.const(f"{s}_quarters", np.full(4, hidden, np.int64))],
                                     f"{s}_split", outputs=4, axis=1)
                i, o, f = (self.op("Sigmoid", [v], f"{s}_{k}") for v, k in ((i, "i"), (o, "o"), (f, "f")))
                update = self.op("Mul", [i, self.op("Tanh", [g], f"{s}_g")], f"{s}_ig")
                c = update if c is None else self.op("Add", [self.op("Mul", [f, c], f"{s}_fc"), update], f"{s}_c")
                h = self.op("Mul", [o, self.op("Tanh", [c], f"{s}_tanh_c")], f"{s}_h")
                out_steps[t] = h
            if y_out:
                ys.append(self.op("Concat", [self.op("Unsqueeze", [v, axis0], f"{tag}_y{t}")
                                             for t, v in enumerate(out_steps)], f"{tag}_y", axis=0))
            hs.append(h)
            cs.append(c)
        if y_out:  # [steps, directions, batch, hidden] (layout 1: [batch, steps, directions, hidden])
            axis1 = self.const("axis1", np.array([1], np.int64))
            stacked = [self.op("Unsqueeze", [v, axis1], f"y{d}") for d, v in enumerate(ys)]
            y = self.op("Concat", stacked, "y", axis=1, result=None if layout else y_out)
            if layout:
                self.op("Transpose", [y], "y_batch_major", result=y_out, perm=[2, 0, 1, 3])
        for states, out, tag in ((hs, h_out, "h"), (cs, c_out, "c")):
            if out:  # [directions, batch, hidden] (layout 1: [batch, directions, hidden])
                axis0 = self.const(f"{tag}_axis0", np.array([0], np.int64))
                both = self.op("Concat", [self.op("Unsqueeze", [v, axis0], f"{tag}_last{d}")
                                          for d, v in enumerate(states)], f"{tag}_last", axis=0,
                               result=None if layout else out)
                if layout:
                    self.op("Transpose", [both], f"{tag}_batch_major", result=out, perm=[1, 0, 2])
        return self.out

    def _initial(self, state: str, direction: int, layout: int, tag: str) -> str | None:
        """One direction's initial state ``[batch, hidden]``, None where it is absent or zero."""
        if not _given(self.ctx, state):
            return None
        index = self.const(f"{tag}_index", np.array(direction, np.int64))
        return self.op("Gather", [state, index], tag, axis=layout)
