"""Which operators run on the CIM device and which on the host: the one home of operator types.

The crossbar computes Conv, ConvTranspose and Gemm with constant weights. Beside it, a tile's
digital periphery adds (Add of two activations), concatenates, pools, moves data (reshapes,
slices, nearest upsampling) and applies elementwise functions as lookup tables over the integer
codes: activations (Relu, Clip, Sigmoid, HardSigmoid, HardSwish, PRelu, LeakyRelu, Tanh, ...),
an Add/Sub/Mul/Div with a scalar or per-channel constant, and the gated activations
``x * f(x)`` (SiLU = ``x * Sigmoid(x)``, HardSwish = ``x * HardSigmoid(x)``) as one table over
``x``; a chain of such functions (``Add -> Clip -> Div``) is one table too. Everything else (Mul of two activations, MatMul between activations, Softmax, LayerNorm
pieces, LSTM, shape arithmetic, box decoding) runs on the host in float.

Two region rules keep the device part connected to the crossbar work and keep ranges apart
where only the host reads them:

* an operator (other than the crossbar ones) runs on the device only if every activation input
  comes from a device operator;
* an operator (other than the crossbar ones) whose outputs feed only host operators or graph
  outputs runs on the host; a crossbar operator in that position keeps its output in float.

Two rules round once where functions follow each other: a LUT operator read only by the next
LUT operator is part of that table (its output stays float, role GATE), and a crossbar operator
read only by LUT operators other than a fused Relu/Clip hands them its accumulator in float
(the periphery applies the function, then rounds).

An operator that a later part of the stack cannot take (PPQ fails on it, the integer simulation
has no form for it) is kept on the host in float: quantization records those in the model
(:data:`HOST_KEY`), and :func:`place` honours the record, so every stage reads the same split.
:func:`place` applies the rules to an ONNX model; PPQ's dispatching, the conversion and the integer
simulation all use its result, which says why each host operator is there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import json
import math

import numpy as np
import onnx
import onnx.helper
import onnx.shape_inference

from pydantic import BaseModel, ConfigDict, Field

from maptools.onnx_model import constant_values, node_attr

__all__ = ["Role", "Placement", "place", "HOST_KEY", "record_host", "recorded_host", "NONNEGATIVE_KEY",
           "record_nonnegative_inputs", "TIED_KEY", "record_tied", "SIZED_KEY", "record_sizes", "recorded_sizes",
           "macs",
           "PlacementReport", "placement_report", "nonnegative_tensors", "NONNEGATIVE_OP_TYPES", "CROSSBAR_OP_TYPES",
           "WEIGHTED_OP_TYPES", "LUT_UNARY_OP_TYPES", "LUT_BINARY_OP_TYPES", "MOVE_OP_TYPES", "FUSABLE_ACTIVATIONS",
           "QUANTIZED_OP_TYPES", "DEVICE", "HOST"]

DEVICE, HOST = "device", "host"
#: ``metadata_props`` key of a model: operators kept on the host in float, ``{name: why}`` (JSON).
HOST_KEY = "maptools.host"
#: ``metadata_props`` key of a model: the graph inputs no calibration sample makes negative (JSON list).
NONNEGATIVE_KEY = "maptools.nonnegative_inputs"
#: ``metadata_props`` key of a model: groups of tensors that take one grid, the copies of one tensor that a loop or a
#: recurrent operator written out step by step computes once per step (JSON list of lists).
TIED_KEY = "maptools.tied"
#: ``metadata_props`` key of a model: the dims one onnxruntime run gave the tensors whose size follows the data
#: (after NonZero, NonMaxSuppression, ...), which ``value_info`` leaves open, ``{tensor: dims}`` (JSON).
SIZED_KEY = "maptools.data_sized"

#: Operators the crossbar computes (with a constant weight): key = their quantparams tag.
WEIGHTED_OP_TYPES = {"Conv": "conv", "ConvTranspose": "convtranspose", "Gemm": "gemm"}
CROSSBAR_OP_TYPES = frozenset(WEIGHTED_OP_TYPES)
#: Elementwise functions of one input: a lookup table over its codes.
LUT_UNARY_OP_TYPES = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                                "Elu", "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Neg", "Abs",
                                "Exp"})
#: Elementwise binary operators: a lookup table when the other operand is a scalar/per-channel constant.
LUT_BINARY_OP_TYPES = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
#: Operators that move codes without changing them: the output keeps the input's grid.
MOVE_OP_TYPES = frozenset({"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                           "MaxPool", "GlobalMaxPool", "Resize", "DepthToSpace", "SpaceToDepth"})
#: Integer averaging over windows.
AVGPOOL_OP_TYPES = frozenset({"AveragePool", "GlobalAveragePool"})
_DEVICE_OP_TYPES = LUT_UNARY_OP_TYPES | LUT_BINARY_OP_TYPES | MOVE_OP_TYPES | AVGPOOL_OP_TYPES | {"Concat", "Pad"}
#: What may stand between a crossbar operator and the Log it feeds (:func:`_log_source`).
_LOG_PATH = MOVE_OP_TYPES | LUT_BINARY_OP_TYPES | {"Clip", "Relu"}
#: Activations a crossbar operator fuses (its output goes straight to the activation's grid).
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


class Role(str, Enum):
    """What an operator does on the device (or that it runs on the host)."""

    CROSSBAR = "crossbar"  # Conv/ConvTranspose/Gemm: integer weights x codes
    ADD = "add"  # Add or Sub of two activations: integer add (subtract) on a common grid
    CONCAT = "concat"
    AVGPOOL = "avgpool"  # integer window sums, requantized by 1/count
    MOVE = "move"  # codes move unchanged (reshape, slice, max pool, nearest resize)
    LUT = "lut"  # a lookup table over the codes of one activation input
    GATE = "gate"  # inside a lookup table's function (x * f(x), or f(g(x))): output stays float, read only by it
    HOST = "host"

    @property
    def part(self) -> str:
        return HOST if self is Role.HOST else DEVICE


@dataclass(frozen=True)
class Placement:
    """Roles per operator (by node name) and the device tensors that stay float."""

    roles: dict[str, Role]
    float_outputs: frozenset[str]
    #: why each host operator runs on the host
    reasons: dict[str, str]
    #: tensors that take one grid (:data:`TIED_KEY`): one step's values are not all its copies will see
    tied: tuple[tuple[str, ...], ...] = ()

    def part(self, node_name: str) -> str:
        return self.roles[node_name].part

    @property
    def device_ops(self) -> list[str]:
        return [n for n, r in self.roles.items() if r is not Role.HOST]

    @property
    def host_ops(self) -> list[str]:
        return [n for n, r in self.roles.items() if r is Role.HOST]


def _channel_constant(value: np.ndarray) -> bool:
    """A scalar, or one value per channel (axis 1 of an NC... tensor, or a [C, 1, ...] shape)."""
    if value.size == 1:
        return True
    shape = [d for d in value.shape]
    while shape and shape[0] == 1:
        shape = shape[1:]
    return len(shape) >= 1 and all(d == 1 for d in shape[1:])


def _candidate(node: onnx.NodeProto, consts: Mapping[str, np.ndarray]) -> tuple[Role, str]:
    """The role an operator can take on the device, judged on its own; for HOST, why."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return Role.HOST, f"an operator of domain {node.domain!r}"
    acts = [t for t in node.input if t and t not in consts]
    if op in CROSSBAR_OP_TYPES:
        if not (len(node.input) > 1 and node.input[1] in consts and len(acts) == 1 and node.input[0] == acts[0]):
            weighted = len(node.input) > 1 and node.input[1] in consts and node.input[0] in acts
            return Role.HOST, f"{op} with a computed {'bias' if weighted else 'weight'}"
        if op == "Gemm" and node_attr(node, "transA", 0):
            return Role.HOST, "Gemm with transA"
        if op == "Gemm" and len(node.input) > 2 and node.input[2] and float(node_attr(node, "beta", 1.0)) != 1.0:
            return Role.HOST, "Gemm with a bias scale (beta) other than 1"
        if op == "ConvTranspose" and (node_attr(node, "output_shape") or
                                      node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            return Role.HOST, "ConvTranspose with output_shape or auto_pad"
        return Role.CROSSBAR, ""
    return _device_role(node, consts, acts)


def _device_role(node: onnx.NodeProto, consts: Mapping[str, np.ndarray], acts: list[str]) -> tuple[Role, str]:
    op = node.op_type
    if op in ("LSTM", "GRU"):  # (the forms preparation writes out; an RNN never is)
        return Role.HOST, (f"{op} has no device form as one operator (preparation writes an LSTM or GRU out as Gemms "
                           "where its weights are constant, its activations the defaults and its length fits: the "
                           "prepared steps say why not)")
    if op not in _DEVICE_OP_TYPES:
        return Role.HOST, f"{op} has no device form"
    if len(node.output) != 1 and op != "Split":
        return Role.HOST, f"{op} with several outputs"
    if op == "AveragePool":  # the periphery's window sums: 2-D windows, undilated, padded alike on both sides
        pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
        if len(node_attr(node, "kernel_shape", [])) != 2 or any(d != 1 for d in node_attr(node, "dilations", [1])) \
                or pads[:2] != pads[2:] or node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return Role.HOST, "AveragePool other than 2-D, undilated and padded alike on both sides"
    if op in AVGPOOL_OP_TYPES:
        return Role.AVGPOOL, ""
    if op == "Concat":
        return (Role.CONCAT, "") if acts and len(acts) == len(node.input) else (Role.HOST, "Concat with a constant")
    if op == "Resize":
        mode = node_attr(node, "mode", "nearest")
        if mode != "nearest":
            return Role.HOST, f"Resize in {mode} mode"
        return (Role.MOVE, "") if len(acts) == 1 else (Role.HOST, "Resize to a computed size")
    if op == "Pad":  # zeros (a code of 0 is 0.0 at a zero offset) or the input's own edge values: codes moved
        value = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if node_attr(node, "mode", "constant") == "constant" and value is not None and np.any(value):
            return Role.HOST, "Pad with a constant other than zero"
    if op in MOVE_OP_TYPES or op == "Pad":
        ok = len(acts) == 1 and node.input[0] == acts[0]
        return (Role.MOVE, "") if ok else (Role.HOST, f"{op} with computed parameters")
    if op in LUT_UNARY_OP_TYPES:
        others = [consts.get(t) for t in node.input[1:] if t]
        if len(acts) == 1 and node.input[0] == acts[0] and all(v is not None and _channel_constant(v) for v in others):
            return Role.LUT, ""
        return Role.HOST, f"{op} with computed parameters"
    if op in LUT_BINARY_OP_TYPES and len(node.input) == 2:
        if op in ("Add", "Sub") and len(acts) == 2 and acts[0] != acts[1]:
            return Role.ADD, ""  # (FastViT's token mixer subtracts: x + s (pool(x) - x))
        if len(set(acts)) == 1 and all(_channel_constant(consts[t]) for t in node.input if t in consts):
            return Role.LUT, ""  # a function of one activation: with a constant, or of itself (a square)
        return Role.HOST, f"{op} of two activations" if len(acts) == 2 else f"{op} with a constant that is not " \
                                                                          "per channel"
    return Role.HOST, f"{op} has no device form"


def _power(node: onnx.NodeProto | None, consts: Mapping[str, np.ndarray]) -> float:
    """The constant scalar exponent of a ``Pow`` node; 0 for any other node."""
    if node is None or node.op_type != "Pow" or node.input[1] not in consts or consts[node.input[1]].size != 1:
        return 0.0
    return float(consts[node.input[1]].reshape(()))


def _log_source(node: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto],
                consts: Mapping[str, np.ndarray]) -> onnx.NodeProto | None:
    """For a ``Log``, the operator computing its input through steps of one activation input that move values or
    combine them with a constant (a reshape, the ``+ eps``, a ``Max``/``Clip`` floor, a scale); None for any other
    node."""
    if node.op_type != "Log":
        return None
    source = producer.get(node.input[0])
    while source is not None and source.op_type in _LOG_PATH and sum(t not in consts for t in source.input if t) == 1:
        source = producer.get(next(t for t in source.input if t and t not in consts))
    return source


def _recorded(model: onnx.ModelProto, key: str) -> Any:
    """The JSON value ``model`` records under ``key`` in its ``metadata_props`` (None where it has none)."""
    return next((json.loads(p.value) for p in model.metadata_props if p.key == key), None)


def _record(model: onnx.ModelProto, key: str, value: Any) -> None:
    """Record ``value`` (JSON) in ``model``'s ``metadata_props`` under ``key``, in place; an empty one removes it."""
    props = {p.key: p.value for p in model.metadata_props if p.key != key}
    if value:
        props[key] = json.dumps(value)
    onnx.helper.set_model_props(model, props)


def recorded_sizes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The dims one run gave the tensors whose size follows the data (:data:`SIZED_KEY`), ``{tensor: dims}``."""
    return dict(_recorded(model, SIZED_KEY) or {})


def record_sizes(model: onnx.ModelProto, sizes: dict[str, list[int]]) -> None:
    """Record :data:`SIZED_KEY` in ``model``, in place (none: the key is removed)."""
    _record(model, SIZED_KEY, sizes)


def recorded_host(model: onnx.ModelProto) -> dict[str, str]:
    """The operators ``model`` records as kept on the host (:data:`HOST_KEY`), ``{name: why}``."""
    return dict(_recorded(model, HOST_KEY) or {})


def record_host(model: onnx.ModelProto, host: Mapping[str, str]) -> None:
    """Record in ``model`` (in place) that the operators of ``host`` stay on the host, and why."""
    _record(model, HOST_KEY, dict(host))


def record_tied(model: onnx.ModelProto, groups: Iterable[Sequence[str]]) -> None:
    """Add ``groups`` to the tensors ``model`` records as taking one grid each (:data:`TIED_KEY`), in place."""
    _record(model, TIED_KEY, [*(_recorded(model, TIED_KEY) or []), *(list(g) for g in groups if len(g) > 1)])


def record_nonnegative_inputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Record in ``model`` (in place) the graph inputs the calibration samples never make negative
    (:data:`NONNEGATIVE_KEY`; :func:`nonnegative_tensors` reads it)."""
    _record(model, NONNEGATIVE_KEY, sorted(names))


def _gates(nodes: list[onnx.NodeProto], roles: dict[str, Role], consumers: Mapping[str, list[onnx.NodeProto]],
           outputs: set[str], consts: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Gated activations ``Mul(x, f(x))``: {Mul name: names of the chain computing f(x) from x}.

    The chain is one or more LUT operators from ``x`` to the Mul, each read only by the next.
    """
    producer = {t: n for n in nodes for t in n.output}
    gates: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type != "Mul" or len(node.input) != 2 or node.input[0] == node.input[1]:
            continue
        for x, g in (node.input, node.input[::-1]):
            chain, tensor = [], g
            while tensor in producer and tensor != x:
                step = producer[tensor]
                if roles.get(step.name) is not Role.LUT or len(consumers[tensor]) != 1 or tensor in outputs:
                    break
                chain.append(step.name)
                tensor = next(t for t in step.input if t and t not in consts)  # its one activation input
            if chain and tensor == x:
                gates[node.name] = chain
                break
    return gates


def _compose(nodes: list[onnx.NodeProto], roles: dict[str, Role], consumers: Mapping[str, list[onnx.NodeProto]],
             outputs: set[str], consts: Mapping[str, np.ndarray], producer: Mapping[str, onnx.NodeProto]) -> None:
    """Chains of lookup tables become one table: a LUT operator whose output only the next LUT
    operator reads (as its one activation input) keeps that output float (role GATE), and the next
    table maps the first one's input codes through both functions. ``Mul -> Div`` of a hard-swish,
    ``Add -> Clip -> Div`` of a hard-sigmoid: one table and one rounding instead of two or three.

    A Relu/Clip right after a crossbar operator keeps its own grid: the crossbar output is fused
    into it.
    """
    for node in nodes:
        if roles[node.name] is not Role.LUT or len(node.output) != 1 or node.output[0] in outputs:
            continue
        readers = consumers.get(node.output[0], [])
        if len(readers) != 1 or roles[readers[0].name] is not Role.LUT:
            continue
        if [t for t in readers[0].input if t and t not in consts] != [node.output[0]]:
            continue
        source = producer.get(next((t for t in node.input if t and t not in consts), ""))
        if node.op_type in FUSABLE_ACTIVATIONS and source is not None and roles[source.name] is Role.CROSSBAR:
            continue
        roles[node.name] = Role.GATE


def _into_function(node: onnx.NodeProto, roles: Mapping[str, Role], consumers: Mapping[str, list[onnx.NodeProto]],
                   outputs: set[str]) -> bool:
    """Whether crossbar operator ``node`` feeds only elementwise functions (lookup tables, gates) other than
    a Relu/Clip: the periphery applies them to the accumulator and rounds once, after the function (a
    hard-swish or SiLU after a convolution), as it rounds once after a fused Relu/Clip."""
    readers = consumers.get(node.output[0], [])
    return bool(readers) and node.output[0] not in outputs and all(
        roles[r.name] in (Role.LUT, Role.GATE) and r.op_type not in FUSABLE_ACTIVATIONS for r in readers)


def place(model: onnx.ModelProto, host: Mapping[str, str] | None = None) -> Placement:
    """Roles of every operator of ``model`` (nodes must have unique names; run ``prepare`` first).

    ``host`` (``{name: why}``) and the model's own record (:func:`recorded_host`) keep operators on
    the host whatever they are.
    """
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    consts = constant_values(model)
    forced = {**recorded_host(model), **(host or {})}
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for t in node.input:
            if t:
                consumers.setdefault(t, []).append(node)
    roles: dict[str, Role] = {}
    reasons: dict[str, str] = {}
    for node in nodes:
        roles[node.name], why = (Role.HOST, forced[node.name]) if node.name in forced else _candidate(node, consts)
        if why:
            reasons[node.name] = why
    producer = {t: n for n in nodes for t in n.output}
    for node in nodes:
        source = _log_source(node, producer, consts)
        if source is not None and roles[source.name] is Role.CROSSBAR and source.name not in forced:
            roles[source.name] = Role.HOST
            reasons[source.name] = (f"feeds {node.name} (Log): a log spreads its input's orders of magnitude evenly, "
                                    "and the 8-bit linear grid of this operator's input (a power spectrum before a "
                                    "mel filterbank) rounds the quiet values to zero, so it is computed in float")
    for node in nodes:
        if roles[node.name] is Role.AVGPOOL and _power(producer.get(node.input[0]), consts) > 1:
            roles[node.name] = Role.HOST
            reasons[node.name] = ("averages x^p with p > 1 (a normalization's variance, or GeM pooling's power "
                                  "mean): on one 8-bit grid x^p keeps only its largest values, so the mean and what "
                                  "reads it are computed in float")
    gates = {mul: chain for mul, chain in _gates(nodes, roles, consumers, outputs, consts).items() if mul not in forced}
    for mul, chain in gates.items():
        roles[mul] = Role.LUT
        reasons.pop(mul, None)
        for name in chain:
            roles[name] = Role.GATE

    changed = True
    while changed:
        changed = False
        for node in nodes:  # topological order
            role = roles[node.name]
            if role in (Role.HOST, Role.CROSSBAR):
                continue
            acts = [t for t in node.input if t and t not in consts]
            fed = all(t in producer and roles[producer[t].name] is not Role.HOST for t in acts)
            read = any(roles[c.name] is not Role.HOST for t in node.output for c in consumers.get(t, []))
            if not fed or not read:
                roles[node.name] = Role.HOST
                reasons[node.name] = "reads a host tensor" if not fed else "only the host reads its output"
                changed = True
        for mul, chain in gates.items():  # a gate without its Mul, or a Mul without its gate, is no gate
            if roles[mul] is Role.HOST and any(roles[n] is Role.GATE for n in chain):
                for name in chain:
                    roles[name] = Role.HOST
                    reasons[name] = f"computes the gate of {mul}, which runs on the host"
                changed = True
    _compose(nodes, roles, consumers, outputs, consts, producer)
    roles.update({n.name: Role.HOST for n in model.graph.node if n.op_type == "Constant"})
    float_outputs = set()
    for node in nodes:
        role = roles[node.name]
        readers = [roles[c.name] for t in node.output for c in consumers.get(t, [])]
        if role is Role.GATE:
            float_outputs.update(node.output)
        elif role is Role.CROSSBAR and (all(r is Role.HOST for r in readers) or _into_function(node, roles, consumers,
                                                                                                  outputs)):
            float_outputs.update(node.output)
    return Placement(roles=roles, float_outputs=frozenset(float_outputs),
                     reasons={n: reasons[n] for n, r in roles.items() if r is Role.HOST and n in reasons},
                     tied=tuple(tuple(g) for g in _recorded(model, TIED_KEY) or ()))


def _dims(graph: onnx.GraphProto, outer: Mapping[str, list[int]] | None = None) -> dict[str, list[int]]:
    dims = {**(outer or {}), **{i.name: list(i.dims) for i in graph.initializer}}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        shape = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape):
            dims[vi.name] = [int(d.dim_value) for d in shape]
    return dims


#: Integer forms of the matrix operators (onnxruntime's quantizers write them): (domain, type) -> (the float
#: operator whose work it does, the index of its weight input).
_INTEGER_FORMS = {("", "MatMulInteger"): ("MatMul", 1), ("", "QLinearMatMul"): ("MatMul", 3),
                  ("", "ConvInteger"): ("Conv", 1), ("", "QLinearConv"): ("Conv", 3),
                  ("com.microsoft", "QGemm"): ("Gemm", 3), ("com.microsoft", "DynamicQuantizeMatMul"): ("MatMul", 1),
                  ("com.microsoft", "MatMulIntegerToFloat"): ("MatMul", 1)}


#: onnxruntime's forms of a standard operator's work (its offline optimizer's fusions, its NCHWc layout, its
#: 4-bit weights: MatMulNBits' output times its input's last axis), where preparation left them.
_CONTRIB_FORMS = {("com.microsoft", "FusedConv"): "Conv", ("com.microsoft", "FusedGemm"): "Gemm",
                  ("com.microsoft", "FusedMatMul"): "MatMul", ("com.microsoft.nchwc", "Conv"): "Conv",
                  ("com.microsoft", "MatMulNBits"): "MatMul"}

#: Operators of a model an integer quantizer has already written (onnxruntime's static and dynamic ones).
QUANTIZED_OP_TYPES = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                                "DynamicQuantizeLSTM", "QAttention", *(op for _, op in _INTEGER_FORMS)})


#: Attention operators of onnxruntime's contrib domain (opset 23's ``Attention`` is the default domain's).
_ATTENTION = {("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention")}


def _attention_macs(node: onnx.NodeProto, ins: list[list[int] | None]) -> int:
    """An attention operator's matrix work: ``Q K^T`` and the weighted sum of ``V`` (query rows x key rows x the
    query's and the value's widths), and for com.microsoft's Attention its packed Q/K/V projection of the input
    too. 0 where a shape is unknown."""
    if node.domain == "com.microsoft" and node.op_type == "Attention":  # input [B, S, D], weights [D, 3 H]
        x, w = (ins + [None, None])[:2]
        if x is None or w is None or len(x) != 3 or len(w) != 2:
            return 0
        batch, rows, width = x
        return batch * rows * width * w[1] + 2 * batch * rows * rows * (w[1] // 3)
    q, k, v = (ins + [None, None, None])[:3]
    if q is None or k is None or v is None or len(q) != len(k) or len(q) not in (3, 4):
        return 0
    if len(q) == 3:  # [B, S, heads x width]
        return q[0] * q[1] * k[1] * (q[2] + v[2])
    return q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])  # [B, heads, S, width]


def _function_macs(node: onnx.NodeProto, function: onnx.FunctionProto, dims: Mapping[str, list[int]],
                   functions: Mapping[tuple[str, str], onnx.FunctionProto]) -> int:
    """A call of a model-local function (one preparation could not inline): its body's multiply-accumulates, with
    the shapes ONNX infers from the call's input shapes; 0 where those are unknown or inference fails."""
    shapes = [dims.get(t) for t in node.input]
    if len(shapes) > len(function.input) or any(s is None for s in shapes):
        return 0
    body = onnx.helper.make_graph(
        list(function.node), function.name,
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
         for name, shape in zip(function.input, shapes)],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in function.output])
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(
            body, opset_imports=list(function.opset_import), functions=list(functions.values())))
    except Exception:  # noqa: BLE001  (attribute references, types other than float: its work is not known)
        return 0
    inner = _dims(inferred.graph)
    return sum(_node_macs(n, inner, functions) for n in inferred.graph.node)


def _node_macs(node: onnx.NodeProto, dims: Mapping[str, list[int]],
               functions: Mapping[tuple[str, str], onnx.FunctionProto] | None = None) -> int:
    """One operator's multiply-accumulates; a control-flow operator's are its bodies' (an If's larger branch,
    a Loop's or Scan's body once: :func:`macs` multiplies them by their trip counts, :func:`_trips`), a call of one
    of the model's ``functions`` its body's."""
    bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    if bodies:
        return max(sum(_node_macs(n, inner, functions) for n in body.node) for body in bodies
                   for inner in [_dims(body, dims)])
    if functions and (node.domain, node.op_type) in functions:
        return _function_macs(node, functions[node.domain, node.op_type], dims, functions)
    op, ins = node.op_type, [dims.get(t) for t in node.input]
    out = dims.get(node.output[0]) if node.output else None
    if (node.domain, op) in _INTEGER_FORMS:  # an already-quantized model's integer operators: the same work
        op, weight = _INTEGER_FORMS[node.domain, op]
        ins = [ins[0], ins[weight] if len(ins) > weight else None]
    elif (node.domain, op) in _CONTRIB_FORMS:  # onnxruntime's fused and blocked forms of the same work
        op = _CONTRIB_FORMS[node.domain, op]
    elif node.domain not in ("", "ai.onnx") and (node.domain, op) not in _ATTENTION:
        return 0
    if op in ("LSTM", "GRU", "RNN") and len(ins) > 1 and ins[1] is not None and len(ins[1]) == 3:
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        directions, rows, features = ins[1]
        hidden = rows // gates
        # steps x batch from the input's shape; unknown (a body whose shapes inference cannot follow): one step
        # of one sample, the least the cell computes
        steps = ins[0][0] * ins[0][1] if ins[0] is not None and len(ins[0]) == 3 else 1
        return steps * directions * gates * hidden * (features + hidden)
    if op == "Einsum":
        return _einsum_macs(str(node_attr(node, "equation", "")), ins)
    if op in ("Attention", "MultiHeadAttention"):
        return _attention_macs(node, ins)
    if op in ("STFT", "DFT") and out is not None and ins[0] is not None:  # each output value: a sum over a frame
        if op == "STFT":
            points = ins[2][0] if len(ins) > 2 and ins[2] else 2 * (out[2] - 1)  # (the window's length, else onesided)
        else:
            axis = int(node_attr(node, "axis", 1))
            points = ins[0][axis % len(ins[0])]
        return math.prod(out) * points
    if len(ins) < 2 or ins[0] is None or ins[1] is None:
        return 0
    x, w = ins[0], ins[1]
    if op == "Conv" and out is not None:
        return math.prod(out) * math.prod(w[1:])
    if op == "ConvTranspose":
        return math.prod(x) * math.prod(w[1:])
    if op == "Gemm" and out is not None:
        return math.prod(out) * x[0 if node_attr(node, "transA", 0) else 1]
    if op == "MatMul" and out is not None:
        return math.prod(out) * x[-1]
    return 0


def _einsum_macs(equation: str, shapes: list[list[int] | None]) -> int:
    """An Einsum's multiply-accumulates: the product of every index's size (each output value sums over the
    indices it contracts); 0 where an operand's shape is unknown or the equation has an ellipsis."""
    operands = equation.replace(" ", "").split("->")[0].split(",")
    if "..." in equation or len(operands) != len(shapes) or any(s is None for s in shapes):
        return 0
    sizes: dict[str, int] = {}
    for letters, shape in zip(operands, shapes):
        if len(letters) != len(shape or []):
            return 0
        sizes.update(zip(letters, shape or []))
    return math.prod(sizes.values()) if len(operands) > 1 else 0


def macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates of every operator that does matrix work (Conv, ConvTranspose, Gemm, MatMul,
    LSTM, GRU, RNN, STFT, DFT, Einsum, attention, their integer forms, control flow whose bodies do: a Loop's or
    Scan's body as many times as it runs (:func:`_trips`), and calls of local functions whose bodies do), from the
    shapes the prepared model records; operators without known shapes count 0 (a recurrent cell whose input shape
    is unknown: one step)."""
    if any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
        try:  # the bodies' own tensors: the prepared model records the outer graph's shapes only
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001  (the bodies' work then counts where their shapes are known)
            pass
    dims, consts = _dims(model.graph), constant_values(model)
    functions = {(f.domain, f.name): f for f in model.functions}
    return {node.name: count * _trips(node, consts, dims) for node in model.graph.node
            if (count := _node_macs(node, dims, functions))}


#: The largest constant trip count a Loop's work is multiplied by: tf2onnx writes a ``while`` loop's as the int64
#: maximum, its condition deciding.
MAX_TRIPS = 1 << 20


def _trips(node: onnx.NodeProto, consts: Mapping[str, np.ndarray], dims: Mapping[str, list[int]]) -> int:
    """How many times a ``Loop`` or ``Scan`` runs its body: a Loop's constant trip count (at most :data:`MAX_TRIPS`;
    its condition may end it sooner), else the length of its first scan output where the model records it (a
    ``while`` loop tf2onnx writes for a Keras RNN: no trip count, one row per step); a Scan's scan length; else 1."""
    if node.op_type == "Scan":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        first = len(node.input) - int(attrs.get("num_scan_inputs", 0))
        axis = (list(attrs.get("scan_input_axes", [])) or [0])[0]
        shape = dims.get(node.input[first]) if 0 <= first < len(node.input) else None
        return shape[axis] if shape and -len(shape) <= axis < len(shape) and shape[axis] > 0 else 1
    if node.op_type != "Loop":
        return 1
    count = consts.get(node.input[0]) if node.input and node.input[0] else None
    if count is not None and count.size == 1 and 0 < count.reshape(()) <= MAX_TRIPS:
        return int(count.reshape(()))
    scanned = node.output[len(node.input) - 2:]  # (after the loop-carried values' final ones)
    shape = dims.get(scanned[0]) if scanned else None
    return shape[0] if shape and 0 < shape[0] <= MAX_TRIPS else 1


class PlacementReport(BaseModel):
    """What runs where and why, and the share of the matrix work the crossbars do."""

    model_config = ConfigDict(frozen=True)

    device_ops: int = Field(description="operators on the CIM device (crossbars and their digital periphery)")
    host_ops: dict[str, str] = Field(description="every operator kept on the host in float, and why")
    fallbacks: dict[str, str] = Field(default_factory=dict, description="operators recorded as kept on the host in "
                                      "float, and why: quantizing them failed, or the user asked (keep_on_host)")
    device_macs: int = Field(description="multiply-accumulates the crossbars compute")
    total_macs: int = Field(description="multiply-accumulates of the whole model (Conv, Gemm, MatMul, LSTM, ...)")

    @property
    def crossbar_coverage(self) -> float | None:
        """Share of the model's multiply-accumulates on the crossbars (None: the model has none)."""
        return self.device_macs / self.total_macs if self.total_macs else None

    def summary(self) -> str:
        """One line: coverage, and how many operators stay on the host (and how many fell back)."""
        share = self.crossbar_coverage
        text = (f"{share:.1%} of {self.total_macs:,} multiply-accumulates on the crossbars" if share is not None
                else "no multiply-accumulates")
        text += f"; {self.device_ops} operators on the device, {len(self.host_ops)} on the host"
        if self.fallbacks:
            names = list(self.fallbacks)
            text += (f" ({len(names)} kept there on record: {', '.join(names[:8])}"
                     + (f" and {len(names) - 8} more" if len(names) > 8 else "") + ")")
        return text


def placement_report(model: onnx.ModelProto, placement: Placement | None = None) -> PlacementReport:
    """The :class:`PlacementReport` of a prepared ``model`` (with its recorded fallbacks)."""
    placement = placement or place(model)
    work = macs(model)
    return PlacementReport(
        device_ops=len(placement.device_ops), host_ops={n: placement.reasons.get(n, "") for n in placement.host_ops
                                                         if n in placement.reasons},
        fallbacks=recorded_host(model), total_macs=sum(work.values()),
        device_macs=sum(n for name, n in work.items() if placement.roles.get(name) is Role.CROSSBAR))


#: Operators whose output cannot be negative, whatever their input.
NONNEGATIVE_OP_TYPES = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softplus"})


def nonnegative_tensors(model: onnx.ModelProto, placement: Placement) -> frozenset[str]:
    """Device tensors that cannot be negative: outputs of Relu, Sigmoid, HardSigmoid, Softplus and
    Clip with a minimum >= 0, the graph inputs the model records as never negative on the calibration samples (an
    image scaled to [0, 1]; :func:`record_nonnegative_inputs`), and what code movers, pools, concatenations and
    adds make of only such tensors. With unsigned activations they are quantized on ``[0, 2^b - 1]`` (zero
    offset)."""
    consts = constant_values(model)
    found: set[str] = set(_recorded(model, NONNEGATIVE_KEY) or ())
    for node in model.graph.node:  # topological
        role = placement.roles.get(node.name, Role.HOST)
        if role in (Role.HOST, Role.CROSSBAR, Role.GATE) or not node.output:
            continue
        acts = [t for t in node.input if t and t not in consts]
        if node.op_type == "Clip":
            low = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else node_attr(node, "min")
            yes = low is not None and float(np.asarray(low).reshape(-1)[0]) >= 0
        elif node.op_type in NONNEGATIVE_OP_TYPES:
            yes = True
        elif role in (Role.MOVE, Role.CONCAT, Role.AVGPOOL, Role.ADD):
            yes = bool(acts) and all(t in found for t in acts)
        else:
            yes = False
        if yes:
            found.update(t for t in node.output if t)
    return frozenset(found)


