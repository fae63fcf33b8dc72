"""The operator graph: the intermediate representation the later stages share.

:func:`build_graph` parses a prepared ONNX model into an :class:`OperatorGraph`, one node per
operator, edges in data order, shapes from ONNX shape inference, attributes normalised, each
operator placed on the device or the host (:mod:`maptools.placement`). Quantization records the
datapath on it (:func:`maptools.requant.record_requant`), conversion writes it into the map, the
integer and crossbar simulations run it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx.defs
import onnx.numpy_helper
import onnx.shape_inference

from maptools.errors import ArtifactError, ConversionError, MissingArtifactError, ModelError
from maptools.maps.artifacts import MODEL, atomic_write, sha256_file
from maptools.onnx_model import auto_pads, constant_values, explicit_outer_inputs, index_limits, load_model
from maptools.placement import CROSSBAR_OP_TYPES, DEVICE, HOST, Role, place, recorded_sizes
from maptools.quantinfo import QuantConfig

__all__ = ["OperatorGraph", "build_graph", "dumps", "DEVICE", "HOST"]

GRAPH_FORMAT = "maptools.operator_graph/2"
#: Largest constant or attribute (elements) kept inline in the graph for an operator other than Conv/Gemm.
MAX_INLINE_CONSTANT = 4096


def _config_gap(node: Mapping[str, Any], config: QuantConfig | None) -> str:
    """What a device operator's config lacks that its kernel reads ('' where nothing)."""
    if config is None:
        return "no config"
    if node["op_type"] in CROSSBAR_OP_TYPES and not config.has_weights:
        return "no weight scales"
    if node["role"] in (Role.ADD.value, Role.CONCAT.value) and config.output_scale is None:
        return "no output scale: its inputs meet on that grid"
    return ""


class OperatorGraph:
    """An operator graph on a ``networkx.MultiDiGraph``.

    Nodes are operator names (ONNX order, which is topological) with attributes ``op_type``,
    ``inputs``/``outputs`` (activation tensor names), ``input_shapes``/``output_shapes``,
    ``params`` (constant inputs, {name: shape}: the weight and bias of Conv/ConvTranspose/Gemm,
    anything else's constants), ``constants`` (small constants of operators other than those,
    {input index: value}), ``attrs`` (normalised), ``part`` (``'device'``/``'host'``), ``role``
    (see :class:`maptools.placement.Role`) and ``quant`` (a QuantConfig or None). An edge
    producer -> consumer carries ``tensor``, ``index`` (the consumer's input position, also the
    edge key) and ``shape``. ``graph.graph`` holds ``inputs``/``outputs`` ({name: shape}),
    ``input_types`` ({name: numpy dtype name} of the inputs that are not float32: token ids, a sample
    rate), ``input_limits`` ({name: n} of integer inputs that index a table of n rows,
    :func:`maptools.onnx_model.index_limits`) and ``meta`` (where the graph came from).
    """

    def __init__(self, graph: nx.MultiDiGraph, folder: Path | None = None) -> None:
        self.graph = graph
        self.folder = folder  # the map folder it was read from (where model.onnx is), if any

    # --- views ---------------------------------------------------------------------------------
    @property
    def inputs(self) -> dict[str, list[int]]:
        return self.graph.graph["inputs"]

    @property
    def input_types(self) -> dict[str, np.dtype]:
        """Every input's dtype (float32 unless the model declares another)."""
        declared = self.graph.graph.get("input_types", {})
        return {name: np.dtype(declared.get(name, "float32")) for name in self.inputs}

    @property
    def input_limits(self) -> dict[str, int]:
        """``{name: n}``: random values of these integer inputs stay below n (they index a table of n rows)."""
        return dict(self.graph.graph.get("input_limits", {}))

    @property
    def outputs(self) -> dict[str, list[int]]:
        return self.graph.graph["outputs"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.graph.graph["meta"]

    def node(self, name: str) -> dict[str, Any]:
        return self.graph.nodes[name]

    def operators(self) -> list[str]:
        """Operator names in execution order: topological, ties broken by ONNX order."""
        order = {name: i for i, name in enumerate(self.graph.nodes)}
        return list(nx.lexicographical_topological_sort(self.graph, key=order.__getitem__))

    def part(self, which: str) -> OperatorGraph:
        """The device or host part as its own graph (a copy)."""
        names = [n for n, d in self.graph.nodes(data=True) if d["part"] == which]
        return OperatorGraph(self.graph.subgraph(names).copy(), self.folder)

    def device_part(self) -> OperatorGraph:
        return self.part(DEVICE)

    def host_part(self) -> OperatorGraph:
        return self.part(HOST)

    # --- quantinfo ------------------------------------------------------------------------------
    def attach_quantinfo(self, quantinfo: Mapping[str, QuantConfig]) -> None:
        """Attach each device operator's QuantConfig by name; raise ConversionError listing what is wrong.

        quantinfo holds a config for exactly the device operators of :func:`maptools.placement.place`
        (PPQ quantized those and left the host ones in float); Conv/ConvTranspose/Gemm configs carry
        weight scales.
        """
        foreign = sorted(set(quantinfo) - set(self.graph.nodes))
        if foreign:
            raise ConversionError(
                f"quantinfo has configs for {len(foreign)} operator(s) this model does not have: {_listing(foreign)}.",
                "the quantinfo comes from another model: re-run quantize on this model.")
        wrong = [f"{n} ({c.op_type} in quantinfo, {self.node(n)['op_type']} in the model)"
                 for n, c in quantinfo.items() if c.op_type != self.node(n)["op_type"]]
        if wrong:
            raise ConversionError(f"operator types disagree: {_listing(wrong)}.", "re-run quantize on this model.")
        missing = [f"{n} ({gap})" for n, d in self.graph.nodes(data=True) if d["part"] == DEVICE
                   for gap in [_config_gap(d, quantinfo.get(n))] if gap]
        if missing:
            raise ConversionError(
                f"{len(missing)} device operator(s) lack their quantization config: {_listing(missing)}.",
                "quantize the model with maptools.quantize (it quantizes every device operator), or convert "
                "without quantization.")
        extra = sorted(n for n in quantinfo if self.node(n)["part"] != DEVICE)
        if extra:
            raise ConversionError(f"quantinfo quantizes {len(extra)} operator(s) this version of maptools runs on "
                                  f"the host: {_listing(extra)}.", "re-run quantize on this model.")
        for name in self.graph.nodes:
            self.graph.nodes[name]["quant"] = quantinfo.get(name)
        self.meta["quantized"] = True

    # --- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        nodes = []
        for name, d in self.graph.nodes(data=True):
            nodes.append({"name": name, **{k: d[k] for k in _NODE_KEYS if k != "quant"},
                          "quant": None if d["quant"] is None else d["quant"].to_json()})
        edges = [{"src": u, "dst": v, "tensor": d["tensor"], "index": d["index"], "shape": d["shape"]}
                 for u, v, d in self.graph.edges(data=True)]
        types = {key: self.graph.graph[key] for key in ("input_types", "input_limits") if self.graph.graph.get(key)}
        return {"format": GRAPH_FORMAT, "meta": self.meta, "inputs": self.inputs, **types, "outputs": self.outputs,
                "nodes": nodes, "edges": edges}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], folder: Path | None = None) -> OperatorGraph:
        if data.get("format") != GRAPH_FORMAT:
            raise ArtifactError(f"operator graph format {data.get('format')!r} is not {GRAPH_FORMAT!r}.",
                                "re-run `maptools convert` for this map.")
        g = nx.MultiDiGraph(inputs=dict(data["inputs"]), input_types=dict(data.get("input_types", {})),
                            input_limits=dict(data.get("input_limits", {})), outputs=dict(data["outputs"]),
                            meta=dict(data["meta"]))
        for node in data["nodes"]:
            attrs = {k: node[k] for k in _NODE_KEYS if k != "quant"}
            attrs["quant"] = None if node["quant"] is None else QuantConfig.from_json(node["quant"])
            g.add_node(node["name"], **attrs)
        for e in data["edges"]:
            g.add_edge(e["src"], e["dst"], key=e["index"], tensor=e["tensor"], index=e["index"], shape=e["shape"])
        return cls(g, folder)

    def save(self, path: Path) -> Path:
        """Write the graph as JSON, atomically (temp file in the same folder, then rename)."""
        return atomic_write(path, dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> OperatorGraph:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MissingArtifactError(f"{path} does not exist.", "run `maptools convert --mapname M` first.") from None
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is not valid JSON ({e}).", "re-run `maptools convert` for this map.") from e
        return cls.from_json(data, Path(path).parent)

    def model(self) -> onnx.ModelProto:
        """The ONNX model this graph was built from (the map's ``model.onnx``), checked by sha256."""
        candidates = ([self.folder / MODEL] if self.folder is not None else []) + [Path(self.meta["model_path"])]
        for path in candidates:
            if path.is_file() and sha256_file(path) == self.meta["model_sha256"]:
                return load_model(path)
        raise ArtifactError(f"the model of this operator graph ({self.meta.get('model_path')}, sha256 "
                            f"{str(self.meta.get('model_sha256'))[:12]}) is missing or changed.",
                            "re-run quantize and convert for this map.")


_NODE_KEYS = ("op_type", "inputs", "outputs", "input_shapes", "output_shapes", "params", "constants", "attrs",
              "part", "role", "quant")


_SCALAR = r"(?:-?[0-9.eE+-]+|null|true|false)"
_SCALAR_LIST = re.compile(rf"\[\s*({_SCALAR}(?:,\s*{_SCALAR})*)\s*\]")


def dumps(data: Any) -> str:
    """Indented JSON with lists of numbers kept on one line (shapes, pads, scales)."""
    text = json.dumps(data, indent=1)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- building ---------------------------------------------------------------------------------------

def _shape(vi: onnx.ValueInfoProto) -> list[int] | None:
    dims = vi.type.tensor_type.shape.dim
    if not vi.type.tensor_type.HasField("shape") or not all(d.HasField("dim_value") for d in dims):
        return None
    return [int(d.dim_value) for d in dims]


def _plain(value: Any) -> Any:
    """An ONNX attribute value as JSON (lists, not tuples; str, not bytes); one of more than
    :data:`MAX_INLINE_CONSTANT` elements (a tree ensemble's nodes: it runs from the model) as its size, which the
    graph leaves out as it does a control-flow body."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if len(value) <= MAX_INLINE_CONSTANT else {"elements": len(value)}
    if isinstance(value, onnx.TensorProto):
        dims = list(value.dims)
        return onnx.numpy_helper.to_array(value).tolist() if math.prod(dims) <= MAX_INLINE_CONSTANT else {
            "tensor": dims}
    if isinstance(value, onnx.GraphProto):  # a control-flow body: it runs in onnxruntime, from the model
        return {"subgraph": value.name, "operators": len(value.node)}
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def _window_attrs(raw: dict[str, Any], kernel: list[int], in_shape: list[int]) -> dict[str, Any]:
    """kernel, strides, dilations, pads ([begin..., end...]) made explicit, auto_pad resolved."""
    rank = len(kernel)
    strides = list(raw.get("strides", [1] * rank))
    dilations = list(raw.get("dilations", [1] * rank))
    pads = list(raw.get("pads", [0] * 2 * rank))
    auto_pad = raw.get("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        pads = auto_pads(auto_pad, in_shape[2:], kernel, strides, dilations)
    return {"kernel": list(kernel), "strides": strides, "dilations": dilations, "pads": pads}


def _normalise(op_type: str, raw: dict[str, Any], in_shapes: list[list[int] | None],
               params: dict[str, np.ndarray], inputs: list[str]) -> dict[str, Any]:
    """Explicit, defaulted attributes per operator type."""
    if op_type == "Conv" and inputs[1] in params:
        weight = params[inputs[1]]
        attrs = _window_attrs(raw, list(weight.shape[2:]), in_shapes[0])
        group = int(raw.get("group", 1))
        return {**attrs, "groups": group, "in_channels": int(weight.shape[1]) * group,
                "out_channels": int(weight.shape[0]), "bias": len(inputs) > 2 and bool(inputs[2])}
    if op_type == "ConvTranspose" and inputs[1] in params:
        weight = params[inputs[1]]
        rank = weight.ndim - 2
        group = int(raw.get("group", 1))
        return {"kernel": list(weight.shape[2:]), "strides": list(raw.get("strides", [1] * rank)),
                "dilations": list(raw.get("dilations", [1] * rank)), "pads": list(raw.get("pads", [0] * 2 * rank)),
                "output_padding": list(raw.get("output_padding", [0] * rank)), "groups": group,
                "in_channels": int(weight.shape[0]), "out_channels": int(weight.shape[1]) * group,
                "auto_pad": raw.get("auto_pad", "NOTSET"), "output_shape": raw.get("output_shape"),
                "bias": len(inputs) > 2 and bool(inputs[2])}
    if op_type in ("MaxPool", "AveragePool"):
        attrs = _window_attrs(raw, list(raw["kernel_shape"]), in_shapes[0])
        attrs["ceil_mode"] = int(raw.get("ceil_mode", 0))
        if op_type == "AveragePool":
            attrs["count_include_pad"] = int(raw.get("count_include_pad", 0))
        return attrs
    if op_type == "Gemm" and inputs[1] in params:
        weight = params[inputs[1]]
        trans_b = int(raw.get("transB", 0))
        return {"alpha": float(raw.get("alpha", 1.0)), "beta": float(raw.get("beta", 1.0)),
                "transA": int(raw.get("transA", 0)), "transB": trans_b,
                "in_features": int(weight.shape[1 if trans_b else 0]),
                "out_features": int(weight.shape[0 if trans_b else 1]), "bias": len(inputs) > 2 and bool(inputs[2])}
    if op_type in ("Flatten", "Concat", "Softmax"):
        return {"axis": int(raw.get("axis", 1 if op_type != "Softmax" else -1))}
    if op_type == "Clip":
        bounds = [params[t].item() if t in params else None for t in (inputs + ["", ""])[1:3]]
        low, high = raw.get("min", bounds[0]), raw.get("max", bounds[1])  # attributes before opset 11
        return {"min": None if low is None else float(low), "max": None if high is None else float(high)}
    if op_type == "LeakyRelu":
        return {"alpha": float(raw.get("alpha", 0.01))}
    if op_type == "HardSigmoid":
        return {"alpha": float(raw.get("alpha", 0.2)), "beta": float(raw.get("beta", 0.5))}
    if op_type == "Transpose":
        return {"perm": list(raw.get("perm", list(range(len(in_shapes[0] or []))[::-1])))}
    return {k: v for k, v in raw.items() if not isinstance(v, (dict,))}  # anything else: as exported


def _check_supported(model: onnx.ModelProto) -> None:
    """Standard operators must exist at the model's opset (operators of other domains run on the host)."""
    opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 13)
    problems = [f"{node.name or node.output[0]} ({node.op_type}): not an ONNX operator at opset {opset}"
                for node in model.graph.node if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, opset)]
    if problems:
        raise ConversionError(
            f"the conversion does not support {len(problems)} operator(s): {_listing(problems)}.",
            "re-export the model with standard ONNX operators (any of them runs on the host).")


def _shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    """Every tensor's shape: as the prepared model records them (one run's where the data sets it), else from ONNX
    shape inference."""
    recorded = {vi.name: _shape(vi) for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    recorded.update({t: dims for t, dims in recorded_sizes(model).items() if recorded.get(t) is None})
    if all(recorded.get(t) is not None for n in model.graph.node for t in n.output if t):
        return recorded
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        raise ModelError(f"ONNX shape inference failed: {e}", "prepare the model with fixed input shapes "
                         "(maptools.prepare.prepare_model; quantize does it).") from e
    g = inferred.graph
    return {**recorded, **{vi.name: _shape(vi) for vi in [*g.input, *g.value_info, *g.output]}}


def build_graph(model: onnx.ModelProto | str | Path) -> OperatorGraph:
    """Parse a prepared ONNX model into an :class:`OperatorGraph` (not yet quantized).

    Device and host parts follow :func:`maptools.placement.place`, as in quantization.
    """
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    model = explicit_outer_inputs(model)  # what a subgraph reads from the graph is an edge to it
    params = constant_values(model)
    _check_supported(model)
    shapes = _shapes(model)
    graph_inputs = {vi.name: shapes[vi.name] for vi in model.graph.input if vi.name not in params}
    unknown = [t for n in model.graph.node for t in [*n.input, *n.output]
               if t and t not in params and shapes.get(t) is None]
    if unknown:
        raise ModelError(f"shape inference left tensors without a static shape: {_listing(sorted(set(unknown)))}.",
                         "prepare the model with fixed input shapes (maptools.prepare.prepare_model).")
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(model.graph.node)]
    if len(set(names)) != len(names):
        raise ConversionError("two operators share a name.", "give every ONNX node a unique name "
                              "(maptools.prepare.prepare_model does).")
    roles = place(_named(model, names)).roles

    types = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
             for vi in model.graph.input if vi.name in graph_inputs and vi.type.tensor_type.elem_type}
    g = nx.MultiDiGraph(inputs=graph_inputs, input_types={k: t for k, t in types.items() if t != "float32"},
                        input_limits=index_limits(model), outputs={o.name: shapes[o.name] for o in model.graph.output},
                        meta={"quantized": False})
    producer: dict[str, str] = {}
    for name, node in zip(names, model.graph.node):
        if node.output[0] in params:
            continue  # a Constant node, folded into params
        raw = {a.name: _plain(onnx.helper.get_attribute_value(a)) for a in node.attribute}
        inputs = list(node.input)
        acts = [t for t in inputs if t and t not in params]
        role = roles[name]
        crossbar = role is Role.CROSSBAR
        consts = {str(k): t for k, t in enumerate(inputs) if t in params}
        g.add_node(
            name, op_type=node.op_type, inputs=acts, outputs=[t for t in node.output if t],
            input_shapes=[shapes[t] for t in acts], output_shapes=[shapes[t] for t in node.output if t],
            params={t: list(params[t].shape) for t in consts.values()},
            constants={} if crossbar else {k: params[t].tolist() for k, t in consts.items()
                                           if params[t].size <= MAX_INLINE_CONSTANT},
            attrs=_normalise(node.op_type, raw, [shapes.get(t) for t in inputs], params, inputs),
            part=role.part, role=role.value, quant=None,
        )
        for index, tensor in enumerate(acts):
            if tensor in producer:
                g.add_edge(producer[tensor], name, key=index, tensor=tensor, index=index, shape=shapes[tensor])
        for tensor in node.output:
            if tensor:
                producer[tensor] = name
    return OperatorGraph(g)


def _named(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    if all(n.name == name for n, name in zip(model.graph.node, names)):
        return model
    named = onnx.ModelProto.FromString(model.SerializeToString())
    for node, name in zip(named.graph.node, names):
        node.name = name
    return named
