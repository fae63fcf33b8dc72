"""onnxruntime sessions of a model with added outputs, and the prepared float model's shared session.

Quantization reads the float model in several places: the equalization's channel ranges, the float
check of PPQ's kernels (every tensor, one sample), and the float side of the per-layer error report
(each computing operator's output at PPQ's seeded positions). Building a session of a large model
costs as much as several forwards (ResNet18: about 0.1 s, the same again to serialize it with the
added outputs), so quantize builds one :class:`FloatReference` for the equalization and the report,
and passes it on; the float check, which needs every tensor as an output, has its own.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.onnx_model import INEXACT_OPTIMIZERS, run_on_sample

log = logging.getLogger(__name__)

__all__ = ["FloatReference", "COMPUTING_OP_TYPES", "LCG_STATES", "fetch_nodes", "fetch_weights", "fetching_session",
           "with_outputs"]

#: PPQ's graphwise analysis compares each output at 4096 positions per sample, drawn from this seed
_FETCHES, _FETCH_SEED = 4096, 10086


def _lcg_states() -> np.ndarray:
    """The states of PPQ's ``generate_indexer`` generator from :data:`_FETCH_SEED`; position i of a
    tensor of n elements per sample is ``state[i] % n``."""
    states, seed = [], _FETCH_SEED
    for _ in range(_FETCHES):
        states.append(seed)
        seed = (0x343FD * seed + 0x269EC3) % (2 << 31)
    return np.array(states, dtype=np.int64)


LCG_STATES = _lcg_states()


def with_outputs(model: bytes, nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto],
                 outputs: Sequence[onnx.ValueInfoProto], what: str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of the serialized ``model`` with ``nodes``, ``initializers`` and graph
    ``outputs`` added; None where onnxruntime cannot load it.

    The additions are serialized on their own and appended: protobuf merges concatenated messages
    (repeated fields are appended), so the model (its weights) is not parsed or serialized again.
    ``threads``: onnxruntime's intra-op threads (default torch's count in the calling thread).
    """
    import onnxruntime as ort
    import torch

    extra = onnx.ModelProto(graph=onnx.GraphProto(node=nodes, initializer=initializers, output=outputs))
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its errors reach us as exceptions; logged, they print twice
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # no QDQ-specific rewrites, so constant folding computes each weight's QuantizeLinear/DequantizeLinear
    # once (ResNet18's QDQ forward: 0.42 -> 0.22 s for 8 samples); activations keep their nodes
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(model + extra.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=INEXACT_OPTIMIZERS)
    except Exception as e:  # noqa: BLE001  (the caller falls back on PPQ's forward)
        log.debug("onnxruntime cannot load %s (%s); PPQ's forward runs instead", what, e)
        return None


def fetch_name(tensor: str) -> str:
    """The output that carries ``tensor``'s values at PPQ's seeded positions, one row per sample."""
    return f"maptools_fetch:{tensor}"


def fetch_nodes(tensors: Mapping[str, int]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto],
                                                      list[onnx.ValueInfoProto]]:
    """Nodes, index initializers (one per distinct size) and outputs returning, for each ``tensor: elements
    per sample``, its values at PPQ's seeded positions (``batch_random_fetch``), one row per sample."""
    nodes, outputs, indices = [], [], {}
    for name, numel in tensors.items():
        out = fetch_name(name)
        outputs.append(onnx.helper.make_empty_tensor_value_info(out))
        if fetch_weights(numel) is not None:  # every position is fetched: the rows as they are
            nodes.append(onnx.helper.make_node("Flatten", [name], [out], axis=1))
            continue
        if numel not in indices:
            indices[numel] = onnx.numpy_helper.from_array(LCG_STATES % numel, f"maptools_fetch_index{numel}")
        nodes += [onnx.helper.make_node("Flatten", [name], [f"{out}_rows"], axis=1),
                  onnx.helper.make_node("Gather", [f"{out}_rows", indices[numel].name], [out], axis=1)]
    return nodes, list(indices.values()), outputs


def fetch_weights(numel: int) -> np.ndarray | None:
    """For a tensor of ``numel`` elements a row, fewer than the 4096 fetches: how often each position is among
    PPQ's seeded positions (its rows are fetched whole and weighted so: the gathered copy had 4096 values a row,
    411 MB for one of MaxViT's token Gemms, 25088 rows of 96). None where the positions themselves are fetched."""
    return np.bincount(LCG_STATES % numel, minlength=numel).astype(np.float64) if numel < _FETCHES else None


def fetching_session(model: bytes, produced: set[str], tensors: Mapping[str, int], what: str) -> Any:
    """A session of the serialized ``model`` (whose nodes produce ``produced``) returning :func:`fetch_nodes`'
    outputs for ``tensors``; None where a tensor is missing or onnxruntime cannot load the model."""
    if not set(tensors) <= produced:
        return None
    return with_outputs(model, *fetch_nodes(tensors), what)


def _static_numel(info: onnx.ValueInfoProto) -> int | None:
    """Elements per sample (all but axis 0) of a float tensor with a static shape, else None."""
    tensor = info.type.tensor_type
    if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if not tensor.HasField("shape") or any(d is None for d in dims):
        return None
    return math.prod(dims[1:]) if len(dims) > 1 else 1


#: operators whose outputs the per-layer error report compares (PPQ's computing operators)
COMPUTING_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: feeds whose fetched rows a reference keeps (the error report reads the first ``error_steps``, 8 by default),
#: while they take at most this many bytes (a later feed is run again when the report needs it)
_KEPT_FEEDS, _KEPT_BYTES = 16, 1 << 30


def _feed_key(feed: Mapping[str, np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(feed):
        value = np.ascontiguousarray(feed[name])
        digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
        digest.update(value.data)
    return digest.digest()


class FloatReference:
    """One session of a prepared float model returning the tensors it was built for, and the output of each
    computing operator (:data:`COMPUTING_OP_TYPES`) at PPQ's seeded positions (:func:`fetch_name`).

    Every run also keeps those positions' values, by the feed's content: the error report's float side then
    costs no forward for the samples the equalization or the float check already ran.
    """

    def __init__(self, session: Any, tensors: frozenset[str], fetched: Mapping[str, int]) -> None:
        self.session = session
        self.tensors = tensors  # returned whole
        self.fetched = dict(fetched)  # returned at the seeded positions: tensor -> elements per sample
        self._rows: dict[bytes, list[np.ndarray]] = {}
        self._kept = 0  # bytes in _rows

    @classmethod
    def build(cls, model: onnx.ModelProto, data: bytes | None = None, threads: int | None = None,
              tensors: Iterable[str] | None = (), fetch: bool = True) -> FloatReference | None:
        """The reference of ``model`` (``data``: its serialized bytes, when the caller has them) returning
        ``tensors`` whole (None: every tensor the model records a type for; a graph output always) and, with
        ``fetch``, the computing operators' outputs at the seeded positions; None where onnxruntime cannot
        load it with the added outputs.

        Every tensor returned whole is a graph output, which onnxruntime keeps for the whole run: name only
        those needed (all of them cost a 1024x1024 U-Net gigabytes per run).
        """
        produced = {t for n in model.graph.node for t in n.output}
        known = {o.name for o in model.graph.output}
        infos = {vi.name: vi for vi in model.graph.value_info if vi.name in produced and vi.name not in known}
        wanted = list(infos) if tensors is None else [t for t in dict.fromkeys(tensors) if t in produced - known]
        whole = [infos.get(t) or onnx.helper.make_empty_tensor_value_info(t) for t in wanted]
        computed = {n.output[0] for n in model.graph.node if n.op_type in COMPUTING_OP_TYPES and n.output}
        typed = [*infos.values(), *model.graph.output]
        numel = {vi.name: n for vi in typed if fetch and vi.name in computed and (n := _static_numel(vi)) is not None}
        nodes, initializers, fetches = fetch_nodes(numel)
        session = with_outputs(model.SerializeToString() if data is None else data, nodes, initializers,
                               [*whole, *fetches], "the float model", threads)
        if session is None:
            return None
        return cls(session, frozenset([*wanted, *known]), numel)

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """``names`` (tensors of :attr:`tensors`) for one feed."""
        key = _feed_key(feed)
        keep = key not in self._rows and len(self._rows) < _KEPT_FEEDS and self._kept < _KEPT_BYTES
        extra = [fetch_name(t) for t in self.fetched] if keep else []
        values = run_on_sample(self.session, [*names, *extra], feed)
        if keep:
            self._rows[key] = values[len(names):]
            self._kept += sum(v.nbytes for v in self._rows[key])
        return values[:len(names)]

    def fetch(self, tensors: Mapping[str, int], feeds: Iterable[Mapping[str, np.ndarray]]
              ) -> list[list[np.ndarray]] | None:
        """Per feed, each of ``tensors`` (name: elements per sample) at the seeded positions; None where one is
        not fetched here with that size."""
        if any(self.fetched.get(name) != numel for name, numel in tensors.items()):
            return None
        order = {t: i for i, t in enumerate(self.fetched)}
        names = [fetch_name(t) for t in tensors]
        found = []
        for feed in feeds:
            rows = self._rows.get(_feed_key(feed))
            found.append(run_on_sample(self.session, names, feed) if rows is None
                         else [rows[order[t]] for t in tensors])
        return found
