"""What every preparation step shares: the opset target, the prepared result, and the step context."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference



log = logging.getLogger(__name__)

#: The opset PPQ 0.6.6 dispatches and exports (its ONNX Runtime exporter writes ai.onnx 13).
TARGET_OPSET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class PreparedModel:
    """The prepared model file and what was done to get it."""

    path: Path
    sha256: str
    input_shapes: dict[str, list[int]]
    source_opset: int
    opset: int
    steps: tuple[str, ...]
    max_abs_diff: float
    max_rel_diff: float
    nodes_before: int
    nodes_after: int
    #: what preparation left undone: steps that failed and were skipped, levels it fell back from
    fallbacks: tuple[str, ...] = ()
    #: sha256 of the file it was prepared from (for an already prepared file, as its preparation recorded it)
    source_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "input_shapes": self.input_shapes, "source_opset": self.source_opset,
                "opset": self.opset, "steps": list(self.steps), "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "fallbacks": list(self.fallbacks),
                "source_sha256": self.source_sha256}


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 1


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            entry.version = version


@dataclass
class _Context:
    """The model being rewritten, with the lookups rewrites need."""

    model: onnx.ModelProto
    steps: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: the shapes one onnxruntime run of a model gives, for the tensors ONNX shape inference leaves open (behind
    #: an operator of another domain that has none, ai.onnx.ml's Scaler); run once, when first needed
    observe: Callable[[onnx.ModelProto], dict[str, list[int]]] | None = None
    _shapes: dict[str, onnx.TypeProto] | None = None
    _observed: dict[str, list[int]] | None = None
    #: the graph's tensor names and every name :meth:`fresh` gave since (read once per :meth:`invalidate`: reading
    #: them per call made a rewrite of an 11k-operator graph's 800 MatMuls take 72 s)
    _names: set[str] | None = None

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def initializers(self) -> dict[str, np.ndarray]:
        return {i.name: onnx.numpy_helper.to_array(i) for i in self.graph.initializer}

    def initializer(self, name: str) -> np.ndarray | None:
        """One initializer's value (None: not an initializer), without converting the others."""
        return next((onnx.numpy_helper.to_array(i) for i in self.graph.initializer if i.name == name), None)

    def types(self) -> dict[str, onnx.TypeProto]:
        if self._shapes is None:
            inferred = self.model
            for data_prop in (True, False):  # with the values of shape arithmetic (Shape -> Concat) where it can
                try:
                    inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=data_prop)
                    break
                except Exception:  # noqa: BLE001  (best effort: rewrites that need a shape say so)
                    continue
            g = inferred.graph
            self._shapes = {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}
            for init in g.initializer:
                t = onnx.TypeProto()
                t.tensor_type.elem_type = init.data_type
                for d in init.dims:
                    t.tensor_type.shape.dim.add().dim_value = d
                self._shapes[init.name] = t
        return self._shapes

    def invalidate(self) -> None:
        self._shapes = None
        self._names = None

    def shape(self, tensor: str) -> list[int] | None:
        """``tensor``'s dims (-1 where inference leaves one open), from :attr:`observe` where it has no shape."""
        t = self.types().get(tensor)
        if t is None or not t.tensor_type.HasField("shape"):
            return self._observation().get(tensor)
        dims = t.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]

    def _observation(self) -> dict[str, list[int]]:
        if self._observed is None:
            self._observed = {}
            if self.observe is not None:
                try:
                    self._observed = self.observe(self.model)
                except Exception as e:  # noqa: BLE001  (best effort, as inference: rewrites that need a shape say so)
                    log.debug("onnxruntime could not give the shapes inference leaves open: %s", e)
        return self._observed

    def elem_type(self, tensor: str) -> int:
        t = self.types().get(tensor)
        return int(t.tensor_type.elem_type) if t is not None else 0

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def fresh(self, base: str) -> str:
        """A tensor name no tensor of the graph has, nor any name this gave since the last :meth:`invalidate`."""
        if self._names is None:
            self._names = {t for n in self.graph.node for t in [*n.input, *n.output]} | \
                {i.name for i in self.graph.initializer}
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name


class Names:
    """Fresh tensor and node names for a rewrite that writes many nodes before any is in the graph: the graph's
    names are read once, and each name given is taken."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {t for n in graph.node for t in [*n.input, *n.output, n.name]} | {i.name for i in graph.initializer}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` (or of its bodies) reads, and its outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _read(body)
    return names


def _drop_attrs(node: onnx.NodeProto, names: set[str]) -> None:
    kept = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


def _where(node: onnx.NodeProto) -> str:
    return f"{node.name or node.output[0]} ({node.op_type})"
