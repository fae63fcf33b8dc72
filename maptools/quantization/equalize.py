"""Outlier channels in front of a crossbar layer, rescaled into its weights (exact in float).

A lookup table whose output only convolutions read may give a few channels ranges ten times the
others' (PP-OCR's learnable hard-swish ``w0 * hswish(x) + w1``: 2 of 32 channels reach 57, the
median channel 5.8); one 8-bit grid for the tensor then clips them or starves the rest. Dividing
channel ``c`` by ``s_c`` (a per-channel ``Mul`` that joins the table before it, see
:mod:`maptools.placement`) and multiplying the convolutions' input-channel ``c`` weights by ``s_c``
computes the same function in float; ``s_c = sqrt(max_c / median)`` for the channels above the
median (SmoothQuant's balance of activation and weight ranges) shrinks the tensor's range to what
most channels use. Ranges come from the calibration samples, in onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.placement import FUSABLE_ACTIVATIONS, Role, place
from maptools.quantization.reference import FloatReference, with_outputs

log = logging.getLogger(__name__)

__all__ = ["equalize_channels", "equalization_tensors", "OUTLIER_RATIO"]

#: A tensor is rescaled when its largest channel range exceeds the median channel's by this factor.
OUTLIER_RATIO = 4.0


def _candidates(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor: the convolutions reading it}`` for LUT outputs read only by Conv layers as their input."""
    placement = place(model)
    producer = {t: n for n in model.graph.node for t in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    inits = {i.name for i in model.graph.initializer}
    weight_use = {t: len(consumers.get(t, [])) for t in inits}
    outputs = {o.name for o in model.graph.output}
    found = {}
    for node in model.graph.node:
        if placement.roles.get(node.name) is not Role.LUT or len(node.output) != 1 or node.output[0] in outputs:
            continue
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type in FUSABLE_ACTIVATIONS and source is not None and \
                placement.roles.get(source.name) is Role.CROSSBAR:
            continue  # fused into its crossbar operator's grid
        readers = consumers.get(node.output[0], [])
        if readers and all(r.op_type == "Conv" and r.input[0] == node.output[0] and r.input[1] in inits
                           and weight_use[r.input[1]] == 1 and placement.roles.get(r.name) is Role.CROSSBAR
                           for r in readers):
            found[node.output[0]] = readers
    return found


def equalization_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors whose channel ranges :func:`equalize_channels` reads (a reference must return them whole)."""
    return list(_candidates(model))


def _channel_maxima(model: onnx.ModelProto, tensors: list[str], samples: Iterable[Mapping[str, np.ndarray]],
                    reference: FloatReference | None) -> dict[str, np.ndarray]:
    if reference is None or not set(tensors) <= reference.tensors:
        have = {o.name for o in model.graph.output}
        session = with_outputs(model.SerializeToString(), [], [], [onnx.helper.make_empty_tensor_value_info(t)
                                                                   for t in tensors if t not in have], "the float model")
        if session is None:
            log.warning("no channel equalization: onnxruntime cannot return %s", ", ".join(tensors[:4]))
            return {}
        reference = FloatReference(session, frozenset(tensors), {})
    found: dict[str, np.ndarray] = {}
    for sample in samples:
        for name, value in zip(tensors, reference.run(tensors, sample)):
            axes = tuple(a for a in range(value.ndim) if a != 1)
            peak = np.abs(value).max(axis=axes).astype(np.float64)
            found[name] = peak if name not in found else np.maximum(found[name], peak)
    return found


def _scaled(conv: onnx.NodeProto, weight: onnx.TensorProto, scale: np.ndarray) -> np.ndarray | None:
    """``conv``'s weight with input channel ``c`` multiplied by ``scale[c]`` (None where its groups split the
    channels other than one per group)."""
    value = onnx.numpy_helper.to_array(weight).astype(np.float64)
    groups = next((a.i for a in conv.attribute if a.name == "group"), 1)
    tail = [1] * (value.ndim - 2)
    if groups == 1 and value.shape[1] == scale.size:
        return (value * scale.reshape(1, -1, *tail)).astype(np.float32)
    if groups == scale.size and value.shape[0] == scale.size and value.shape[1] == 1:  # depthwise
        return (value * scale.reshape(-1, 1, *tail)).astype(np.float32)
    return None


def equalize_channels(model: onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]],
                      reference: FloatReference | None = None) -> list[str]:
    """Rescale outlier channels of LUT outputs into the convolutions that read them, in place; returns the
    steps done (one per tensor). ``reference``: ``model``'s float session, where the caller has one."""
    candidates = _candidates(model)
    if not candidates:
        return []
    maxima = _channel_maxima(model, list(candidates), samples, reference)
    inits = {i.name: i for i in model.graph.initializer}
    infos = {vi.name: vi for vi in model.graph.value_info}
    steps = []
    for tensor, readers in candidates.items():
        peak = maxima.get(tensor)
        if peak is None or peak.size < 2:
            continue
        median = float(np.median(peak))
        if median <= 0 or float(peak.max()) < OUTLIER_RATIO * median:
            continue
        scale = np.sqrt(np.maximum(peak / median, 1.0))
        weights = [_scaled(conv, inits[conv.input[1]], scale) for conv in readers]
        if any(w is None for w in weights):
            continue  # a grouped convolution whose groups split the channels: left as it is
        for conv, weight in zip(readers, weights):
            inits[conv.input[1]].CopyFrom(onnx.numpy_helper.from_array(weight, conv.input[1]))
        shape = [1, scale.size] + [1] * (len(infos[tensor].type.tensor_type.shape.dim) - 2) \
            if tensor in infos else [1, scale.size, 1, 1]
        factor, out = f"{tensor}_equalizer", f"{tensor}_equalized"
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            (1.0 / scale).reshape(shape).astype(np.float32), factor))
        for conv in readers:
            conv.input[0] = out
        node = onnx.helper.make_node("Mul", [tensor, factor], [out], name=f"{tensor}_equalize")
        index = next(i for i, n in enumerate(model.graph.node) if tensor in n.output)
        model.graph.node.insert(index + 1, node)
        if tensor in infos:
            info = onnx.ValueInfoProto.FromString(infos[tensor].SerializeToString())
            info.name = out
            model.graph.value_info.append(info)
        steps.append(f"{tensor}: {int((scale > 1).sum())} of {scale.size} channels rescaled into "
                     f"{', '.join(c.name for c in readers)} (largest channel range {float(peak.max()):.3g}, "
                     f"median {median:.3g})")
    return steps
