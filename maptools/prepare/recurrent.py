"""``LSTM`` and ``GRU`` operators written out step by step as the Gemms, gates and state updates they compute.

Neither operator has a device form: on the host, its matrix work (nearly all of a text recogniser's recurrent
head, all of a character-level segmenter's) stays off the crossbars. With the sequence length fixed, each is
written in the form tf2onnx and TorchScript write an unrolled cell: the input projection of every step as one
Gemm on the rows ``[steps * batch, input]`` (with the biases that add to it), and per step the recurrent Gemm,
``Split`` into the gates (ONNX's orders: LSTM input, output, forget, cell; GRU update, reset, hidden),
``Sigmoid`` / ``Tanh``, and the state updates (LSTM ``c = f * c + i * g``, ``h = o * tanh(c)``; GRU
``h = h~ + z * (h - h~)``). The Gemms go to the crossbars (each step's recurrent Gemm holds the same weights
and shares its arrays with the others), the gates to lookup tables, and the products of two activations stay
on the host. The steps' copies of each tensor take one grid (:func:`~maptools.placement.record_tied`).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.helper

from maptools.onnx_model import node_attr
from maptools.placement import record_tied
from maptools.prepare.base import Names, _Context
from maptools.prepare.rewrites import _rewrite_each

__all__ = ["recurrent_as_gemms", "MAX_WRITTEN", "RECURRENT_OP_TYPES"]

#: The most operators one recurrent operator may be written out as (14 per step and direction for an LSTM, 15
#: for a GRU; 40 steps of a bidirectional LSTM, a CRNN's usual text line, are 1120): every one is an operator PPQ
#: calibrates and the simulation runs (Baidu LAC's two 32-step GRUs took its corpus test from 11 s to 48 s); a
#: longer sequence keeps its operator on the host.
MAX_WRITTEN = 2048
#: Per operator: gates, and the activations it is written out with (ONNX's defaults).
_CELLS = {"LSTM": (4, ("Sigmoid", "Tanh", "Tanh")), "GRU": (3, ("Sigmoid", "Tanh"))}
#: The operators :func:`recurrent_as_gemms` writes out.
RECURRENT_OP_TYPES = frozenset(_CELLS)
#: The tag of a tensor one step computes: its direction, step and what it is (the copies of one tensor take one grid).
_STEP = re.compile(r"(d\d+)_t\d+_(.+)")


def recurrent_as_gemms(ctx: _Context) -> int:
    """Write out every ``LSTM`` and ``GRU`` with constant weights, the default activations, no peepholes, clipping
    or coupled gates and every sequence at full length; returns how many."""
    return _rewrite_each(ctx, _CELLS, _written)


def _written(ctx: _Context, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    ins = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, lengths, h0 = ins[:6]
    c0, peep = ins[6:8] if node.op_type == "LSTM" else ("", "")
    gates, defaults = _CELLS[node.op_type]
    weights, recurrent = ctx.initializer(w), ctx.initializer(r)
    bias = ctx.initializer(b) if b else None
    layout = int(node_attr(node, "layout", 0))
    shape = ctx.shape(x)
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(
        str(node_attr(node, "direction", "forward")))
    activations = tuple(a.decode() if isinstance(a, bytes) else a
                        for a in node_attr(node, "activations", None) or defaults * len(directions or []))
    if weights is None or recurrent is None or (b and bias is None) or directions is None or shape is None or \
            len(shape) != 3 or -1 in shape or _given(ctx, peep) or node_attr(node, "clip") is not None or \
            int(node_attr(node, "input_forget", 0)) or activations != defaults * len(directions):
        return None
    steps, batch = (shape[1], shape[0]) if layout else (shape[0], shape[1])
    if lengths:
        full = ctx.initializer(lengths)
        if full is None or not np.all(full == steps):
            return None
    hidden = recurrent.shape[-1]
    written = steps * len(directions) * (14 if node.op_type == "LSTM" else 15)
    if written > MAX_WRITTEN:
        ctx.steps.append(f"{node.op_type} {node.name or node.output[0]} left as one operator, on the host: {steps} "
                         f"steps x {len(directions)} direction(s) written out would be {written} operators (at most "
                         f"{MAX_WRITTEN})")
        return None
    if bias is None:
        bias = np.zeros((len(directions), 2 * gates * hidden), np.float32)
    writer = _Writer(ctx, node, steps, batch, hidden)
    nodes = writer.nodes(x, weights, recurrent, bias, h0, c0, directions, layout)
    record_tied(ctx.model, writer.tied.values())
    return nodes


def _given(ctx: _Context, name: str) -> bool:
    """Whether an optional input is there and not a constant zero."""
    if not name:
        return False
    value = ctx.initializer(name)
    return value is None or bool(np.any(value))


class _Writer:
    """The nodes of one LSTM or GRU written out, named after it."""

    def __init__(self, ctx: _Context, node: onnx.NodeProto, steps: int, batch: int, hidden: int) -> None:
        self.ctx, self.node, self.steps, self.batch, self.hidden = ctx, node, steps, batch, hidden
        self.base = node.name or node.output[0]
        self.out: list[onnx.NodeProto] = []
        self.fresh = Names(ctx.graph).fresh
        self.tied: dict[str, list[str]] = {}  # a step's tensor, per direction: its copies, one per step

    def op(self, op_type: str, inputs: list[str], tag: str, outputs: int = 1, result: str | None = None,
           **attrs: object) -> str | list[str]:
        names = [result] if result else [self.fresh(f"{self.base}_{tag}" + (f"_{k}" if outputs > 1 else ""))
                                         for k in range(outputs)]
        self.out.append(onnx.helper.make_node(op_type, inputs, names, name=self.fresh(f"{self.base}_{tag}_node"),
                                              **attrs))
        step = _STEP.fullmatch(tag)  # (a step's tags are "d<direction>_t<step>_<what>")
        for k, name in enumerate(names if step else []):
            self.tied.setdefault(f"{step[1]}_{step[2]}_{k}", []).append(name)
        return names[0] if outputs == 1 else names

    def const(self, tag: str, value: np.ndarray) -> str:
        return self.ctx.add_initializer(self.fresh(f"{self.base}_{tag}"), value)

    def nodes(self, x: str, weights: np.ndarray, recurrent: np.ndarray, bias: np.ndarray, h0: str, c0: str,
              directions: list[bool], layout: int) -> list[onnx.NodeProto]:
        steps, batch, hidden = self.steps, self.batch, self.hidden
        gru = self.node.op_type == "GRU"
        width = (3 if gru else 4) * hidden
        y_out, h_out, c_out = (list(self.node.output) + ["", "", ""])[:3]
        rows = self.op("Transpose", [x], "time_major", perm=[1, 0, 2]) if layout else x
        rows = self.op("Reshape", [rows, self.const("rows", np.array([steps * batch, -1], np.int64))], "rows")
        ys, hs, cs = [], [], []
        for d, reverse in enumerate(directions):
            tag = f"d{d}"
            wb, rb = bias[d, :width].astype(np.float32), bias[d, width:].astype(np.float32)
            # the input projection takes every bias that adds to it: all of an LSTM's; a GRU's recurrent bias of
            # the update and reset gates, and of the hidden gate where the reset gate multiplies the state before R
            before_reset = gru and bool(int(node_attr(self.node, "linear_before_reset", 0)))
            kept = np.concatenate([np.zeros(2 * hidden), rb[2 * hidden:]]) if before_reset else np.zeros(width)
            projected = self.op("Gemm", [rows, self.const(f"{tag}_W", weights[d].astype(np.float32)),
                                         self.const(f"{tag}_B", (wb + rb - kept).astype(np.float32))],
                                f"{tag}_input", transB=1)
            projected = self.op("Reshape", [projected, self.const(f"{tag}_steps",
                                                                  np.array([steps, batch, width], np.int64))],
                                f"{tag}_steps")
            per_step = self.op("Split", [projected, self.const(f"{tag}_ones", np.ones(steps, np.int64))],
                               f"{tag}_split", outputs=steps, axis=0) if steps > 1 else [projected]
            axis0 = self.const(f"{tag}_axis0", np.array([0], np.int64))
            h = self._initial(h0, d, layout, f"{tag}_h0")
            c = self._initial(c0, d, layout, f"{tag}_c0")
            for state, what in ((h, "h"), (c, "c")):  # the state before the first step, on the states' grid
                if state:
                    self.tied.setdefault(f"{tag}_{what}_0", []).append(state)
            cell = _GruStep(self, recurrent[d], kept, before_reset, tag) if gru else None
            r = None if gru else self.const(f"{tag}_R", recurrent[d].astype(np.float32))
            quarters = None if gru else self.const(f"{tag}_quarters", np.full(4, hidden, np.int64))
            out_steps: list[str] = [""] * steps
            for t in (reversed(range(steps)) if reverse else range(steps)):
                s = f"{tag}_t{t}"
                gates = self.op("Squeeze", [per_step[t], axis0], f"{s}_x")
                if cell is not None:
                    h = out_steps[t] = cell.step(gates, h, s)
                    continue
                if h is not None:
                    gates = self.op("Add", [gates, self.op("Gemm", [h, r], f"{s}_recurrent", transB=1)],
                                    f"{s}_gates")
                i, o, f, g = self.op("Split", [gates, quarters], f"{s}_split", outputs=4, axis=1)
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
        for states, out, tag in ((hs, h_out, "h"), (cs, "" if gru else c_out, "c")):
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


class _GruStep:
    """One GRU step: ``z``, ``r`` and the candidate ``h~`` from the projected input and the state."""

    def __init__(self, writer: _Writer, recurrent: np.ndarray, kept: np.ndarray, before_reset: bool, tag: str
                 ) -> None:
        w, hidden = writer, writer.hidden
        self.w, self.before_reset = w, before_reset
        self.thirds = w.const(f"{tag}_thirds", np.full(3, hidden, np.int64))
        if before_reset:  # h~ = tanh(x_h + r * (h R_h + Rb_h)): one Gemm of the state, its hidden bias kept
            self.r_all = w.const(f"{tag}_R_all", recurrent.astype(np.float32))
            self.rb_all = w.const(f"{tag}_Rb_all", kept.astype(np.float32))
            self.rb_h = w.const(f"{tag}_Rb_h", kept[2 * hidden:].astype(np.float32))
        else:  # h~ = tanh(x_h + (r * h) R_h): the state's Gemm for z and r, and one of r * h for h~
            self.r_zr = w.const(f"{tag}_R_zr", recurrent[:2 * hidden].astype(np.float32))
            self.r_h = w.const(f"{tag}_R_h", recurrent[2 * hidden:].astype(np.float32))
            self.halves = w.const(f"{tag}_halves", np.full(2, hidden, np.int64))
        self.tag, self.one = tag, ""

    def step(self, x: str, h: str | None, s: str) -> str:
        w = self.w
        xz, xr, xh = w.op("Split", [x, self.thirds], f"{s}_split", outputs=3, axis=1)
        if h is None:  # a zero state: its products are its biases
            z = w.op("Sigmoid", [xz], f"{s}_z")
            candidate = xh
            if self.before_reset:
                r = w.op("Sigmoid", [xr], f"{s}_r")
                candidate = w.op("Add", [xh, w.op("Mul", [r, self.rb_h], f"{s}_r_rb")], f"{s}_xh")
            candidate = w.op("Tanh", [candidate], f"{s}_candidate")
            self.one = self.one or w.const(f"{self.tag}_one", np.array(1.0, np.float32))
            return w.op("Mul", [w.op("Sub", [self.one, z], f"{s}_keep"), candidate], f"{s}_h")
        if self.before_reset:
            hz, hr, hh = w.op("Split", [w.op("Gemm", [h, self.r_all, self.rb_all], f"{s}_recurrent", transB=1),
                                        self.thirds], f"{s}_state", outputs=3, axis=1)
        else:
            hz, hr = w.op("Split", [w.op("Gemm", [h, self.r_zr], f"{s}_recurrent", transB=1), self.halves],
                          f"{s}_state", outputs=2, axis=1)
        z = w.op("Sigmoid", [w.op("Add", [xz, hz], f"{s}_z_in")], f"{s}_z")
        r = w.op("Sigmoid", [w.op("Add", [xr, hr], f"{s}_r_in")], f"{s}_r")
        if self.before_reset:
            reset = w.op("Mul", [r, hh], f"{s}_reset")
        else:
            reset = w.op("Gemm", [w.op("Mul", [r, h], f"{s}_reset_h"), self.r_h], f"{s}_reset", transB=1)
        candidate = w.op("Tanh", [w.op("Add", [xh, reset], f"{s}_h_in")], f"{s}_candidate")
        change = w.op("Mul", [z, w.op("Sub", [h, candidate], f"{s}_delta")], f"{s}_change")
        return w.op("Add", [candidate, change], f"{s}_h")
