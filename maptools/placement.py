"""Which operators run on the CIM device and which on the host: the one home of operator types.

The crossbar computes Conv, ConvTranspose and Gemm with constant weights. Beside it, a tile's
digital periphery adds (Add of two activations), concatenates, pools, moves data (reshapes,
slices, nearest upsampling) and applies elementwise functions as lookup tables over the integer
codes: activations (Relu, Clip, Sigmoid, HardSigmoid, HardSwish, PRelu, LeakyRelu, Tanh, ...),
an Add/Sub/Mul/Div with a scalar or per-channel constant, and the gated activations
``x * f(x)`` (SiLU = ``x * Sigmoid(x)``, HardSwish = ``x * HardSigmoid(x)``) as one table over
``x``. Everything else (Mul of two activations, MatMul between activations, Softmax, LayerNorm
pieces, LSTM, shape arithmetic, box decoding) runs on the host in float.

Two region rules keep the device part connected to the crossbar work and keep ranges apart
where only the host reads them:

* an operator (other than the crossbar ones) runs on the device only if every activation input
  comes from a device operator;
* an operator (other than the crossbar ones) whose outputs feed only host operators or graph
  outputs runs on the host; a crossbar operator in that position keeps its output in float.

:func:`place` applies them to an ONNX model; PPQ's dispatching, the conversion and the integer
simulation all use its result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx
import onnx.numpy_helper

from maptools.onnx_model import node_attr

__all__ = ["Role", "Placement", "place", "nonnegative_tensors", "NONNEGATIVE_OP_TYPES", "CROSSBAR_OP_TYPES", "WEIGHTED_OP_TYPES", "LUT_UNARY_OP_TYPES",
           "LUT_BINARY_OP_TYPES", "MOVE_OP_TYPES", "FUSABLE_ACTIVATIONS", "DEVICE", "HOST"]

DEVICE, HOST = "device", "host"

#: Operators the crossbar computes (with a constant weight): key = their quantparams tag.
WEIGHTED_OP_TYPES = {"Conv": "conv", "ConvTranspose": "convtranspose", "Gemm": "gemm"}
CROSSBAR_OP_TYPES = frozenset(WEIGHTED_OP_TYPES)
#: Elementwise functions of one input: a lookup table over its codes.
LUT_UNARY_OP_TYPES = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                                "Elu", "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Erf"})
#: Elementwise binary operators: a lookup table when the other operand is a scalar/per-channel constant.
LUT_BINARY_OP_TYPES = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
#: Operators that move codes without changing them: the output keeps the input's grid.
MOVE_OP_TYPES = frozenset({"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                           "MaxPool", "GlobalMaxPool", "Resize", "DepthToSpace", "SpaceToDepth"})
#: Integer averaging over windows.
AVGPOOL_OP_TYPES = frozenset({"AveragePool", "GlobalAveragePool"})
#: Activations a crossbar operator fuses (its output goes straight to the activation's grid).
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


class Role(str, Enum):
    """What an operator does on the device (or that it runs on the host)."""

    CROSSBAR = "crossbar"  # Conv/ConvTranspose/Gemm: integer weights x codes
    ADD = "add"  # Add of two activations: integer add on a common grid
    CONCAT = "concat"
    AVGPOOL = "avgpool"  # integer window sums, requantized by 1/count
    MOVE = "move"  # codes move unchanged (reshape, slice, max pool, nearest resize)
    LUT = "lut"  # a lookup table over the codes of one activation input
    GATE = "gate"  # inside a gated LUT x * f(x): output stays float, read only by the gate
    HOST = "host"

    @property
    def part(self) -> str:
        return HOST if self is Role.HOST else DEVICE


@dataclass(frozen=True)
class Placement:
    """Roles per operator (by node name) and the device tensors that stay float."""

    roles: dict[str, Role]
    float_outputs: frozenset[str]

    def part(self, node_name: str) -> str:
        return self.roles[node_name].part

    @property
    def device_ops(self) -> list[str]:
        return [n for n, r in self.roles.items() if r is not Role.HOST]

    @property
    def host_ops(self) -> list[str]:
        return [n for n, r in self.roles.items() if r is Role.HOST]


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _channel_constant(value: np.ndarray) -> bool:
    """A scalar, or one value per channel (axis 1 of an NC... tensor, or a [C, 1, ...] shape)."""
    if value.size == 1:
        return True
    shape = [d for d in value.shape]
    while shape and shape[0] == 1:
        shape = shape[1:]
    return len(shape) >= 1 and all(d == 1 for d in shape[1:])


def _candidate(node: onnx.NodeProto, consts: Mapping[str, np.ndarray]) -> Role:
    """The role an operator can take on the device, judged on its own (HOST if none)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return Role.HOST
    acts = [t for t in node.input if t and t not in consts]
    if op in CROSSBAR_OP_TYPES:
        if len(node.input) > 1 and node.input[1] in consts and len(acts) == 1 and node.input[0] == acts[0]:
            if op == "Gemm" and node_attr(node, "transA", 0):
                return Role.HOST
            return Role.CROSSBAR
        return Role.HOST
    if len(node.output) != 1 and op != "Split":
        return Role.HOST
    if op in AVGPOOL_OP_TYPES:
        return Role.AVGPOOL
    if op == "Concat":
        return Role.CONCAT if acts and len(acts) == len(node.input) else Role.HOST
    if op == "Resize":
        return Role.MOVE if node_attr(node, "mode", "nearest") == "nearest" and len(acts) == 1 else Role.HOST
    if op in MOVE_OP_TYPES:
        return Role.MOVE if len(acts) == 1 and node.input[0] == acts[0] else Role.HOST
    if op in LUT_UNARY_OP_TYPES:
        others = [consts.get(t) for t in node.input[1:] if t]
        if len(acts) == 1 and node.input[0] == acts[0] and all(v is not None and _channel_constant(v) for v in others):
            return Role.LUT
        return Role.HOST
    if op in LUT_BINARY_OP_TYPES and len(node.input) == 2:
        if op == "Add" and len(acts) == 2 and acts[0] != acts[1]:
            return Role.ADD
        if len(acts) == 1 and all(_channel_constant(consts[t]) for t in node.input if t in consts):
            return Role.LUT
    return Role.HOST


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


def place(model: onnx.ModelProto) -> Placement:
    """Roles of every operator of ``model`` (nodes must have unique names; run ``prepare`` first)."""
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    consts = _constants(model)
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for t in node.input:
            if t:
                consumers.setdefault(t, []).append(node)
    roles = {n.name: _candidate(n, consts) for n in nodes}
    gates = _gates(nodes, roles, consumers, outputs, consts)
    for mul, chain in gates.items():
        roles[mul] = Role.LUT
        for name in chain:
            roles[name] = Role.GATE
    producer = {t: n for n in nodes for t in n.output}

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
                changed = True
        for mul, chain in gates.items():  # a gate without its Mul, or a Mul without its gate, is no gate
            if roles[mul] is Role.HOST and any(roles[n] is Role.GATE for n in chain):
                for name in chain:
                    roles[name] = Role.HOST
                changed = True
    roles.update({n.name: Role.HOST for n in model.graph.node if n.op_type == "Constant"})
    float_outputs = set()
    for node in nodes:
        role = roles[node.name]
        if role is Role.GATE:
            float_outputs.update(node.output)
        elif role is Role.CROSSBAR and not any(
                roles[c.name] is not Role.HOST for t in node.output for c in consumers.get(t, [])):
            float_outputs.update(node.output)
    return Placement(roles=roles, float_outputs=frozenset(float_outputs))


#: Operators whose output cannot be negative, whatever their input.
NONNEGATIVE_OP_TYPES = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softplus"})


def nonnegative_tensors(model: onnx.ModelProto, placement: Placement) -> frozenset[str]:
    """Device tensors that cannot be negative: outputs of Relu, Sigmoid, HardSigmoid, Softplus and
    Clip with a minimum >= 0, and what code movers, pools, concatenations and adds make of only such
    tensors. With unsigned activations they are quantized on ``[0, 2^b - 1]`` (zero offset)."""
    consts = _constants(model)
    found: set[str] = set()
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


