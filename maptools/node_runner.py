"""Run one ONNX operator in onnxruntime: the reference semantics for any standard operator.

PPQ's own kernels cover a few dozen operators, some only at some opsets; the integer simulation's
host part must run every standard operator. :class:`NodeRunner` wraps one ``NodeProto`` as a
one-node model (inputs without fixed shapes) and runs it in an onnxruntime session built once per
input signature, single-threaded so it never competes with the caller's thread pool.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference

from maptools.errors import ModelError
from maptools.onnx_model import implicit_node

__all__ = ["NodeRunner"]


class NodeRunner:
    """One ONNX operator, executable on numpy arrays.

    Args:
        node: the operator; a control-flow node may list its subgraphs' outer-scope reads after its own
            inputs (:func:`maptools.onnx_model.explicit_outer_inputs`), and :meth:`run` then takes them too.
        opsets: the model's opset imports, ``{domain: version}`` (:func:`maptools.onnx_model.opsets`).
        constants: values of the node's constant inputs, built into the session (onnxruntime infers some
            operators' shapes from them, a Resize's ``sizes`` for one); other inputs are passed to :meth:`run`.
        functions: the model's local functions (a call preparation could not inline runs with them).
    """

    def __init__(self, node: onnx.NodeProto, opsets: Mapping[str, int],
                 constants: Mapping[str, np.ndarray] | None = None,
                 functions: Sequence[onnx.FunctionProto] = ()) -> None:
        self.node, outer = implicit_node(node)
        self.functions = list(functions)
        self.inputs = [*self.node.input, *outer]  # a control-flow node's outer-scope reads come last
        self.opsets = dict(opsets)
        self.constants = {name: np.asarray(value) for name, value in (constants or {}).items() if name in self.inputs}
        self._sessions: dict[tuple, object] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    def _session(self, feed: dict[str, np.ndarray]) -> object:
        key = tuple((name, value.dtype.str, tuple(_dims(value))) for name, value in feed.items())
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = self._build(feed)
            return session

    def _build(self, feed: dict[str, np.ndarray]) -> object:
        import onnxruntime as ort

        inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), _dims(v))
                  for name, v in feed.items()]
        outputs = [onnx.ValueInfoProto(name=o) for o in self.node.output if o]
        graph = onnx.helper.make_graph([self.node], "node", inputs, outputs,
                                       [onnx.numpy_helper.from_array(v, k) for k, v in self.constants.items()])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(domain, version)
                                                             for domain, version in self.opsets.items()],
                                       functions=self.functions)
        model.ir_version = min(model.ir_version, 10)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)  # output types where onnx knows them
            types = {vi.name: vi.type for vi in [*inferred.graph.value_info, *inferred.graph.output]}
        except Exception:  # noqa: BLE001  (onnxruntime infers them itself)
            types = {}
        for out in model.graph.output:
            if out.name in types and types[out.name].tensor_type.elem_type:
                out.type.CopyFrom(types[out.name])
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.log_severity_level = 4  # its errors reach us as exceptions; logged, they print twice
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnx and onnxruntime raise many types for unsupported content
            raise ModelError(f"onnxruntime cannot run operator {self.name} ({self.node.op_type}) at opsets "
                             f"{self.opsets}: {str(e).strip()[:300]}",
                             "re-export the model with standard ONNX operators (opset 11-17).") from e

    def run(self, values: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Outputs for input ``values`` in the node's input order (``None`` for an empty optional input; the
        values of :attr:`constants` are ignored)."""
        feed: dict[str, np.ndarray] = {}
        for name, value in zip(self.inputs, values):
            if name and value is not None and name not in self.constants:
                feed[name] = np.asarray(value, order="C")  # (ascontiguousarray makes scalars 1-D)
        session = self._session(feed)
        try:
            return session.run(None, feed)  # type: ignore[attr-defined]
        except Exception as e:
            shapes = {k: list(v.shape) for k, v in feed.items()}
            raise ModelError(f"onnxruntime failed on operator {self.name} ({self.node.op_type}) with inputs {shapes}: "
                             f"{str(e).strip()[:300]}", "check the model runs in onnxruntime on these inputs: their "
                             "shapes, and an integer input's values (random inputs make them up: a sample rate, "
                             "a mode flag; pass real samples).") from e


def _dims(value: np.ndarray) -> list[int | None]:
    """The dims an input is declared with: open, but a 1-D integer tensor's length (a shape: onnxruntime refuses a
    Resize whose computed ``sizes`` have no declared length)."""
    return list(value.shape) if value.ndim == 1 and value.dtype.kind in "iu" else [None] * value.ndim
