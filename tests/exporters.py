"""Small models written the way real exporters write them, built with ``onnx.helper`` (random weights).

Each builder returns ``(model, input_shapes)``: the model as the exporter ships it and the shapes a
user gives ``quantize``. They cover what differs between exporters rather than architectures:
paddle2onnx's Clip with ``min``/``max`` inputs and decomposed hard-swish, keras2onnx's NHWC input
behind a Transpose and Dense as MatMul + Add, old torch and caffe converters' IR 3 models (Caffe2's residual
``Sum``) with initializers listed as graph inputs (or, from OnnxMLTools, not) and opset 7-10 operators (Upsample,
BatchNormalization with ``spatial``, Pad with attributes), weights in Constant nodes, an LSTM unrolled into Gemm / Sigmoid /
Tanh, declared input shapes that are placeholders, stale ``value_info``, unused opset imports,
DepthToSpace, LeakyRelu, Max/Min with a constant, Resize and Upsample in every mode, an
onnxruntime contrib operator, squeeze-and-excitation pooled with ReduceMean, Keras' ZeroPadding2D,
constants shared between operators (3-D convolutions reading one bias), index arithmetic in int64, and
zero Pads of channels (dlib) and of channels-last tensors (madmom), GridSample at opset 16,
a spectral front end of Neg, Abs, Exp and squares, weights standardized in the graph (NF-Nets, BiT), Keras'
'same' max pool padded at the end only, outputs that are constants, torch's dynamo export unoptimized, and
``torch.jit.script``'s lists (sequences of a known length) and loops of a constant trip count, and tf2onnx's
``while`` loops on a counter, a graph whose nodes are not in topological order (AMD Quark), and normalizations
whose shift outweighs their scaled signal (pyannote's SincNet front end), tf2onnx's int32 frame indices (Range),
opset 18's Pad naming its axes, opset 19's circular Pad, opset 23's Attention, and onnxruntime's
LayerNormalization below opset 17 and SimplifiedLayerNormalization, the experimental ImageScaler, Scale,
Affine and ScaledTanh, and SegNet's MaxPool indices read by a MaxUnpool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["IDIOMS", "RESIZE_MODES", "resize_model"]


class _Builder:
    """Nodes and initializers of one graph, with He-initialised random weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value: np.ndarray | float | Sequence[float], dtype: type = np.float32, as_node: bool = False
              ) -> str:
        name = self.name("c")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, domain: str = "", **attrs: object
           ) -> str | list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type), domain=domain,
                                           **attrs))
        return names[0] if outputs == 1 else names

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, as_node: bool = False,
             pads: bool = True) -> str:
        w = self.rng.standard_normal([cout, cin // group, k, k]) * np.sqrt(2.0 / (cin // group * k * k))
        b = self.rng.standard_normal(cout) * 0.1
        p = k // 2 if pads else 0
        return self.op("Conv", [x, self.const(w, as_node=as_node), self.const(b, as_node=as_node)],
                       kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p], group=group)

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.rng.standard_normal([cout, cin]) * np.sqrt(2.0 / cin)
        return self.op("Gemm", [x, self.const(w), self.const(self.rng.standard_normal(cout) * 0.1)], transB=1)

    def head(self, x: str, channels: int, classes: int = 5) -> str:
        return self.gemm(self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1), channels, classes)

    def model(self, inputs: dict[str, Sequence[int | str]], outputs: Sequence[str], opset: int,
              ir_version: int | None = None, extra_opsets: Sequence[tuple[str, int]] = (),
              initializers_as_inputs: bool = False) -> onnx.ModelProto:
        graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()]
        if initializers_as_inputs:
            graph_inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in self.inits]
        graph = helper.make_graph(self.nodes, "exported", graph_inputs,
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        *(helper.make_opsetid(d, v) for d, v in extra_opsets)],
                                  producer_name="maptools-tests")
        model.ir_version = ir_version or min(model.ir_version, 8)
        return model


Built = tuple[onnx.ModelProto, dict[str, list[int]]]


def clip_inputs() -> Built:
    """paddle2onnx at opset 11+: ReLU6 as Clip with ``min``/``max`` as inputs (one of them absent)."""
    b = _Builder(1)
    x = b.op("Clip", [b.conv("x", 3, 8, stride=2), b.const(0.0), b.const(6.0)])
    y = b.op("Clip", [b.conv(x, 8, 8), "", b.const(4.0)])  # only a maximum
    return b.model({"x": ["N", 3, 16, 16]}, [b.head(y, 8)], 11), {"x": [1, 3, 16, 16]}


def hard_swish_decomposed() -> Built:
    """paddle2onnx's hard-swish ``x * Clip(x + 3, 0, 6) / 6`` and hard-sigmoid ``Clip(0.2 x + 0.5, 0, 1)``."""
    b = _Builder(2)
    y = b.conv("x", 3, 8, stride=2)
    gate = b.op("Clip", [b.op("Add", [y, b.const(3.0)]), b.const(0.0), b.const(6.0)])
    hs = b.op("Div", [b.op("Mul", [y, gate]), b.const(6.0)])
    z = b.conv(hs, 8, 8)
    sig = b.op("Clip", [b.op("Add", [b.op("Mul", [z, b.const(0.2)]), b.const(0.5)]), b.const(0.0), b.const(1.0)])
    return b.model({"x": ["N", 3, 16, 16]}, [b.head(b.op("Mul", [z, sig]), 8)], 12), {"x": [1, 3, 16, 16]}


def constant_weights() -> Built:
    """Weights, biases and BatchNorm statistics in Constant nodes (older torch exports, tf2onnx)."""
    b = _Builder(3)
    y = b.conv("x", 3, 8, stride=2, as_node=True)
    stats = [b.const(v, as_node=True) for v in (b.rng.uniform(0.5, 1.5, 8), b.rng.normal(0, 0.1, 8),
                                                b.rng.normal(0, 0.1, 8), b.rng.uniform(0.5, 1.5, 8))]
    y = b.op("Relu", [b.op("BatchNormalization", [y, *stats], epsilon=1e-5)])
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8, as_node=True), 8)], 11), {"x": [1, 3, 16, 16]}


def ir3_opset8() -> Built:
    """A caffe-era export: IR 3 (initializers also graph inputs), opset 8, BatchNormalization with
    ``spatial``, Upsample with a ``scales`` attribute."""
    b = _Builder(4)
    y = b.conv("data", 3, 8, stride=2)
    stats = [b.const(v) for v in (b.rng.uniform(0.5, 1.5, 8), b.rng.normal(0, 0.1, 8), b.rng.normal(0, 0.1, 8),
                                  b.rng.uniform(0.5, 1.5, 8))]
    y = b.op("Relu", [b.op("BatchNormalization", [y, *stats], epsilon=1e-5, spatial=1)])
    y = b.op("Upsample", [b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])], mode="nearest",
             scales=[1.0, 1.0, 2.0, 2.0])
    model = b.model({"data": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 8, ir_version=3,
                    initializers_as_inputs=True)
    return model, {"data": [1, 3, 16, 16]}


def caffe2_sum() -> Built:
    """The ONNX model zoo's Caffe2 conversions (onnx-caffe2, IR 3, opset 9): a residual shortcut as ``Sum`` (Caffe's
    ``Eltwise``), here also of three branches, weights made by ``ConstantOfShape``, and a ``Dropout`` declaring the
    mask nothing reads."""
    b = _Builder(39)
    y = b.op("Relu", [b.conv("data_0", 3, 8)])
    branch = b.op("Relu", [b.conv(y, 8, 8)])
    y = b.op("Relu", [b.op("Sum", [y, b.conv(branch, 8, 8)])])
    fill = b.op("ConstantOfShape", [b.const([8, 8, 1, 1], np.int64)],
                value=numpy_helper.from_array(np.array([0.05], np.float32)))
    mixed = b.op("Conv", [y, fill])
    y = b.op("Relu", [b.op("Sum", [y, mixed, b.conv(y, 8, 8, k=1)])])
    y = b.op("Dropout", [y], outputs=2, ratio=0.5)[0]
    model = b.model({"data_0": [1, 3, 16, 16]}, [b.head(y, 8)], 9, ir_version=3, initializers_as_inputs=True)
    return model, {"data_0": [1, 3, 16, 16]}


def ir3_valid_pads() -> Built:
    """OnnxMLTools 1.8 (waifu2x's upconv_7): IR 3 with the initializers not listed as inputs (onnx's converter,
    onnxsim and shape inference refuse that), opset 8, convolutions with ``auto_pad=VALID``."""
    b = _Builder(29)
    y = b.op("LeakyRelu", [b.conv("x", 3, 8, pads=False)], alpha=0.1)
    y = b.op("LeakyRelu", [b.conv(y, 8, 8, pads=False)], alpha=0.1)
    y = b.conv(y, 8, 8, pads=False)
    for node in b.nodes:
        if node.op_type == "Conv":
            node.ClearField("attribute")
            node.attribute.extend([helper.make_attribute("kernel_shape", [3, 3]),
                                   helper.make_attribute("auto_pad", "VALID")])
    return b.model({"x": [1, 3, 16, 16]}, [b.head(y, 8)], 8, ir_version=3), {"x": [1, 3, 16, 16]}


def opset9_pad_upsample() -> Built:
    """opset 9: Pad with ``pads`` as an attribute, Upsample with ``scales`` as an input (linear too)."""
    b = _Builder(5)
    y = b.op("Pad", [b.conv("x", 3, 8, stride=2)], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.0)
    y = b.conv(y, 8, 8, pads=False)
    up = b.op("Upsample", [y, b.const([1.0, 1.0, 2.0, 2.0])], mode="nearest")
    lin = b.op("Upsample", [y, b.const([1.0, 1.0, 2.0, 2.0])], mode="linear")
    y = b.op("Concat", [up, lin], axis=1)
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 16, 8), 8)], 9), {"x": [1, 3, 16, 16]}


def nhwc_keras() -> Built:
    """keras2onnx: an NHWC input behind a Transpose, PRelu, Dense as MatMul + Add, Softmax."""
    b = _Builder(6)
    x = b.op("Transpose", ["input_1"], perm=[0, 3, 1, 2])
    y = b.op("PRelu", [b.conv(x, 3, 8, stride=2), b.const(np.full([8, 1, 1], 0.25))])
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Flatten", [b.op("Transpose", [b.conv(y, 8, 8)], perm=[0, 2, 3, 1])], axis=1)
    w = b.const(b.rng.standard_normal([8 * 4 * 4, 5]) * np.sqrt(2.0 / 128))
    logits = b.op("Add", [b.op("MatMul", [y, w]), b.const(b.rng.normal(0, 0.1, 5))])
    return (b.model({"input_1": ["N", 16, 16, 3]}, [b.op("Softmax", [logits], axis=1)], 12),
            {"input_1": [1, 16, 16, 3]})


def unrolled_lstm(steps: int = 4, features: int = 8, hidden: int = 8) -> Built:
    """An LSTM unrolled step by step into Gemm, Split, Sigmoid, Tanh, Mul and Add (tf2onnx, TorchScript)."""
    b = _Builder(7)
    feats = b.op("Flatten", [b.op("GlobalAveragePool", [b.conv("x", 3, features, stride=2)])], axis=1)
    h = c = None
    w = b.rng.standard_normal([4 * hidden, features]) * np.sqrt(1.0 / features)
    r = b.rng.standard_normal([4 * hidden, hidden]) * np.sqrt(1.0 / hidden)
    for _ in range(steps):
        gates = b.op("Gemm", [feats, b.const(w), b.const(np.zeros(4 * hidden))], transB=1)
        if h is not None:
            gates = b.op("Add", [gates, b.op("Gemm", [h, b.const(r), b.const(np.zeros(4 * hidden))], transB=1)])
        i, f, g, o = b.op("Split", [gates], outputs=4, axis=1)
        i, f, o, g = (b.op("Sigmoid", [i]), b.op("Sigmoid", [f]), b.op("Sigmoid", [o]), b.op("Tanh", [g]))
        new = b.op("Mul", [i, g])
        c = new if c is None else b.op("Add", [b.op("Mul", [f, c]), new])
        h = b.op("Mul", [o, b.op("Tanh", [c])])
    return b.model({"x": ["N", 3, 16, 16]}, [b.gemm(h, hidden, 5)], 12), {"x": [1, 3, 16, 16]}


def gemm_computed_bias() -> Built:
    """keras2onnx's LSTM cell after onnxsim's fusion: ``Gemm(x, W, C=h R)``, the recurrent product as the bias; a
    residual ``Gemm(x, W, C=x)``; and a Gemm with ``transA``, ``alpha`` and ``beta`` (a Keras Dense on a transposed
    input)."""
    b = _Builder(17)
    feats = b.op("Flatten", [b.op("GlobalAveragePool", [b.conv("x", 3, 16, stride=2)])], axis=1)
    recurrent = b.op("MatMul", ["h", b.const(b.rng.standard_normal([8, 16]) * 0.3)])
    gates = b.op("Gemm", [feats, b.const(b.rng.standard_normal([16, 16]) * 0.3), recurrent])
    residual = b.op("Gemm", [gates, b.const(b.rng.standard_normal([16, 16]) * 0.3), gates], beta=0.5)
    moved = b.op("Transpose", [b.op("Relu", [residual])], perm=[1, 0])
    out = b.op("Gemm", [moved, b.const(b.rng.standard_normal([5, 16]) * 0.3), b.const(np.ones(5))], transA=1,
               transB=1, alpha=0.5, beta=2.0)
    return b.model({"x": ["N", 3, 16, 16], "h": ["N", 8]}, [out], 13), {"x": [1, 3, 16, 16], "h": [1, 8]}


def grouped_einsum() -> Built:
    """DeepFilterNet's grouped linear layer, ``einsum("btgi,gih->btgh", x, W)`` with four groups, and one group
    (a plain linear layer written that way)."""
    b = _Builder(19)
    grouped = b.op("Einsum", ["x", b.const(b.rng.standard_normal([4, 8, 6]) * 0.3)], equation="btgi,gih->btgh")
    flat = b.op("Reshape", [b.op("Relu", [grouped]), b.const([1, 10, 1, 24], np.int64)])
    single = b.op("Einsum", [flat, b.const(b.rng.standard_normal([1, 24, 5]) * 0.3)], equation="btgi,gih->btgh")
    return b.model({"x": [1, 10, 4, 8]}, [single], 13), {"x": [1, 10, 4, 8]}


def transposed_output_shape() -> Built:
    """Upsampling ConvTransposes sized as older tf2onnx and keras2onnx write them: by ``output_shape`` (an odd total
    padding, and one past the natural size that only ``output_padding`` gives) and by ``auto_pad`` SAME_UPPER and
    SAME_LOWER."""
    b = _Builder(23)

    def up(x: str, cin: int, cout: int, k: int, **attrs: object) -> str:
        w = b.const(b.rng.standard_normal([cin, cout, k, k]) * np.sqrt(2.0 / (cin * k * k)))
        return b.op("Relu", [b.op("ConvTranspose", [x, w, b.const(np.zeros(cout))], kernel_shape=[k, k],
                                  strides=[2, 2], **attrs)])

    y = up(b.conv("x", 3, 8), 8, 8, 3, output_shape=[16, 16])  # natural 17: one row and column cut
    y = up(y, 8, 6, 2, output_shape=[33, 33])  # natural 32: one more from output_padding
    y = up(b.conv(y, 6, 6, stride=2), 6, 4, 3, auto_pad="SAME_UPPER")
    y = up(y, 4, 4, 3, auto_pad="SAME_LOWER")
    return b.model({"x": ["N", 3, 8, 8]}, [b.head(y, 4)], 11), {"x": [1, 3, 8, 8]}


def placeholder_input() -> Built:
    """A declared input shape that is a placeholder ([10, 3, 32, 32]) the model's package rewrites at load."""
    b = _Builder(8)
    y = b.conv(b.conv("x", 3, 8, stride=2), 8, 8, stride=2)
    return b.model({"x": [10, 3, 32, 32]}, [b.head(y, 8)], 13), {"x": [1, 3, 32, 32]}


def stale_value_info() -> Built:
    """``value_info`` and output shapes from before a rewrite: wrong ranks and sizes that contradict inference."""
    b = _Builder(9)
    y = b.conv("x", 3, 8, stride=2)
    out = b.head(y, 8)
    model = b.model({"x": ["N", 3, 16, 16]}, [out], 12)
    model.graph.value_info.extend([helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 8]),
                                   helper.make_tensor_value_info(b.nodes[-3].output[0], TensorProto.FLOAT, [7, 7, 7])])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"]))
    return model, {"x": [1, 3, 16, 16]}


def unused_opsets() -> Built:
    """Opset imports of domains no node uses (onnxruntime's quantizer and converters list every domain)."""
    b = _Builder(10)
    model = b.model({"x": ["N", 3, 16, 16]}, [b.head(b.conv("x", 3, 8, stride=2), 8)], 12,
                    extra_opsets=[("com.microsoft", 1), ("ai.onnx.ml", 2), ("com.microsoft.nchwc", 1)])
    return model, {"x": [1, 3, 16, 16]}


def depth_to_space() -> Built:
    """DepthToSpace in both modes (DCR, what TensorFlow writes, and CRD, torch's PixelShuffle)."""
    b = _Builder(11)
    y = b.op("DepthToSpace", [b.conv("x", 3, 16, stride=2)], blocksize=2, mode="DCR")
    y = b.op("DepthToSpace", [b.conv(y, 4, 16)], blocksize=2, mode="CRD")
    return b.model({"x": ["N", 3, 16, 16]}, [b.head(b.conv(y, 4, 8), 8)], 13), {"x": [1, 3, 16, 16]}


def leaky_max_min() -> Built:
    """LeakyRelu, and ReLU6 written as Max/Min with constants (tf2onnx)."""
    b = _Builder(12)
    y = b.op("LeakyRelu", [b.conv("x", 3, 8, stride=2)], alpha=0.1)
    y = b.op("Min", [b.op("Max", [b.conv(y, 8, 8), b.const(0.0)]), b.const(6.0)])
    return b.model({"x": ["N", 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 12), {"x": [1, 3, 16, 16]}


def contrib_operator() -> Built:
    """An onnxruntime contrib operator (``com.microsoft.Gelu``, which its offline optimizer writes) between
    convolutions: written as the standard operators it computes, a gated table on the device."""
    b = _Builder(13)
    y = b.op("Gelu", [b.conv("x", 3, 8, stride=2)], domain="com.microsoft")
    return (b.model({"x": ["N", 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 13, extra_opsets=[("com.microsoft", 1)]),
            {"x": [1, 3, 16, 16]})


#: Resize at opset 13 as exporters write it: (mode, coordinate_transformation_mode, nearest_mode).
RESIZE_MODES = [
    ("nearest", "asymmetric", "floor"), ("nearest", "half_pixel", "round_prefer_floor"),
    ("nearest", "align_corners", "round_prefer_ceil"), ("nearest", "pytorch_half_pixel", "ceil"),
    ("linear", "half_pixel", "round_prefer_floor"), ("linear", "align_corners", "round_prefer_floor"),
    ("linear", "asymmetric", "round_prefer_floor"), ("linear", "pytorch_half_pixel", "round_prefer_floor"),
    ("cubic", "half_pixel", "round_prefer_floor"),
]


def resize_model(mode: str, transform: str, nearest: str, by_sizes: bool = False) -> Built:
    """Conv -> Resize (by scales, or by sizes with the other inputs left out) -> Conv."""
    b = _Builder(14)
    y = b.conv("x", 3, 8, stride=2)
    target = ["", "", b.const([1, 8, 16, 16], np.int64)] if by_sizes else ["", b.const([1.0, 1.0, 2.0, 2.0])]
    y = b.op("Resize", [y, *target], mode=mode, coordinate_transformation_mode=transform, nearest_mode=nearest)
    return b.model({"x": ["N", 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 13), {"x": [1, 3, 16, 16]}


def squeeze_excite_mean() -> Built:
    """A squeeze-and-excitation block pooled with ``ReduceMean`` over H and W (paddle2onnx, tf2onnx), and a
    head pooled with ``ReduceMean(keepdims=0)`` before its Gemm."""
    b = _Builder(21)
    y = b.conv("x", 3, 8, stride=2)
    squeezed = b.op("ReduceMean", [y], axes=[2, 3], keepdims=1)
    gate = b.op("HardSigmoid", [b.conv(b.op("Relu", [b.conv(squeezed, 8, 4, k=1)]), 4, 8, k=1)])
    y = b.conv(b.op("Mul", [y, gate]), 8, 8)
    pooled = b.op("ReduceMean", [y], axes=[-2, -1], keepdims=0)
    return b.model({"x": ["N", 3, 16, 16]}, [b.gemm(pooled, 8, 5)], 11), {"x": [1, 3, 16, 16]}


def zero_padding() -> Built:
    """Keras' ZeroPadding2D through tf2onnx: a zero Pad of the NHWC input before the Transpose to NCHW (an
    asymmetric one, as for a stride-2 'same' convolution), a Pad between two convolutions, and an edge Pad
    before a max pool (as torch's exporter writes a replicate-padded pool)."""
    b = _Builder(22)
    padded = b.op("Pad", ["input_1", b.const([0, 0, 0, 0, 0, 1, 1, 0], np.int64)])
    y = b.op("Relu", [b.conv(b.op("Transpose", [padded], perm=[0, 3, 1, 2]), 3, 8, stride=2, pads=False)])
    y = b.conv(b.op("Pad", [y, b.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64), b.const(0.0)]), 8, 8, pads=False)
    y = b.op("Pad", [b.op("Relu", [y]), b.const([0, 0, 0, 0, 0, 0, 1, 1], np.int64)], mode="edge")
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    return b.model({"input_1": ["N", 16, 16, 3]}, [b.head(y, 8)], 13), {"input_1": [1, 16, 16, 3]}


def shared_parameters() -> Built:
    """torch's exporter stores equal constants once, here in a video network (torchvision's r3d stem): two
    3-D convolutions read one zero bias (BatchNorms folded at initialisation), and a Mul and an Add one scalar.
    PPQ's kernel pads the (3, 7, 7) stem differently from ONNX, so that convolution runs in onnxruntime."""
    b = _Builder(23)
    bias = b.const(np.zeros(8))
    y = b.op("Conv", ["x", b.const(b.rng.standard_normal([8, 3, 3, 7, 7]) * 0.1), bias], kernel_shape=[3, 7, 7],
             strides=[1, 2, 2], pads=[1, 3, 3, 1, 3, 3])
    y = b.op("Conv", [b.op("Relu", [y]), b.const(b.rng.standard_normal([8, 8, 3, 3, 3]) * 0.1), bias],
             kernel_shape=[3, 3, 3], pads=[1, 1, 1, 1, 1, 1])
    half = b.const(0.5)
    y = b.op("Add", [b.op("Mul", [b.op("Relu", [y]), half]), half])
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    return b.model({"x": ["N", 3, 4, 16, 16]}, [b.gemm(pooled, 8, 5)], 13), {"x": [1, 3, 4, 16, 16]}


def index_arithmetic() -> Built:
    """Detection post-processing (torchvision's RoI pooling): an index computed from an activation in int64
    (Clip -> Cast -> Sub), which a Gather of the feature map then reads."""
    b = _Builder(24)
    y = b.conv("x", 3, 8, stride=2)
    level = b.op("ReduceMax", [b.op("Relu", [y])], keepdims=0)
    level = b.op("Cast", [b.op("Clip", [level, b.const(0.0), b.const(3.0)])], to=TensorProto.INT64)
    index = b.op("Sub", [level, b.const(3, np.int64)])  # -3..0: a channel counted from the end
    picked = b.op("Gather", [y, b.op("Unsqueeze", [index, b.const([0], np.int64)])], axis=1)
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8), picked], 13), {"x": [1, 3, 16, 16]}


def padded_shortcut() -> Built:
    """dlib's residual block (converted by hand): the shortcut pools and pads zero channels (8 -> 16), the
    strided branch pads a row and a column, and the two are added; then madmom's converter: a zero Pad of a
    channels-last tensor, Unsqueeze and a Transpose to NCHW before a convolution. Every Pad moves codes."""
    b = _Builder(26)
    r = b.op("Relu", [b.conv("x", 3, 8)])
    shortcut = b.op("Pad", [b.op("AveragePool", [r], kernel_shape=[2, 2], strides=[2, 2]),
                            b.const([0, 0, 0, 0, 0, 8, 0, 0], np.int64)])
    branch = b.op("Pad", [b.conv(r, 8, 16, stride=2, pads=False), b.const([0, 0, 0, 0, 0, 0, 1, 1], np.int64)])
    y = b.op("Relu", [b.op("Add", [shortcut, branch])])
    hwc = b.op("Transpose", [b.op("Squeeze", [y, b.const([0], np.int64)])], perm=[1, 2, 0])
    padded = b.op("Pad", [hwc, b.const([1, 1, 0, 1, 1, 0], np.int64), b.const(0.0)])
    nchw = b.op("Transpose", [b.op("Unsqueeze", [padded, b.const([0], np.int64)])], perm=[0, 3, 1, 2])
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(nchw, 16, 8, pads=False), 8)], 13), {"x": [1, 3, 16, 16]}


def grid_sample() -> Built:
    """torch's exporter at opset 16 (RAFT's correlation lookup): GridSample, which has no opset-13 form, so
    the model stays at 16, beside a nearest Resize (whose PPQ socket stops at opset 13)."""
    b = _Builder(27)
    y = b.op("Resize", [b.op("Relu", [b.conv("x", 3, 8, stride=2)]), "", b.const([1.0, 1.0, 2.0, 2.0])],
             mode="nearest")
    grid = b.const(b.rng.uniform(-1, 1, (1, 8, 8, 2)))
    y = b.op("GridSample", [b.conv(y, 8, 8, stride=2), grid], align_corners=0, mode="bilinear")
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 16), {"x": [1, 3, 16, 16]}


def spectral_front_end() -> Built:
    """tf2onnx's CQT front end (basic-pitch): 1-D convolutions for the real and imaginary parts, a Neg, squares
    written as ``Mul(x, x)``, a doubling ``Add(x, x)``, Abs and Exp; each a function of one tensor (a table)."""
    b = _Builder(28)

    def conv1d(x: str, cin: int, cout: int) -> str:
        w = b.rng.standard_normal([cout, cin, 5]) * np.sqrt(2.0 / (cin * 5))
        return b.op("Conv", [x, b.const(w), b.const(b.rng.standard_normal(cout) * 0.1)], kernel_shape=[5], pads=[2, 2])
    real, imag = conv1d("x", 1, 8), b.op("Neg", [conv1d("x", 1, 8)])
    power = b.op("Add", [b.op("Mul", [real, real]), b.op("Mul", [imag, imag])])
    y = b.op("Exp", [b.op("Mul", [b.op("Abs", [conv1d(b.op("Add", [power, power]), 8, 8)]), b.const(-0.5)])])
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [conv1d(y, 8, 8)])], axis=1)
    return b.model({"x": ["N", 1, 64]}, [b.gemm(pooled, 8, 5)], 13), {"x": [1, 1, 64]}


def global_max_and_training_bn() -> Built:
    """``torch.amax(x, (2, 3))`` (ReduceMax over two axes, keepdims 0) concatenated with a pooled branch, and a
    BatchNormalization exported in training mode (``TrainingMode.PRESERVE`` on a model in ``train()``:
    ``training_mode=1``: batch statistics, and the running ones as two more outputs), at opset 15."""
    b = _Builder(30)
    y = b.op("Relu", [b.conv("x", 3, 8, stride=2)])
    stats = [b.const(v) for v in (b.rng.uniform(0.5, 1.5, 8), b.rng.normal(0, 0.1, 8), b.rng.normal(0, 0.1, 8),
                                  b.rng.uniform(0.5, 1.5, 8))]
    normed = b.op("BatchNormalization", [b.conv(y, 8, 8), *stats], outputs=3, training_mode=1, momentum=0.9)[0]
    peak = b.op("ReduceMax", [b.op("Relu", [normed])], axes=[2, 3], keepdims=0)
    mean = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    return b.model({"x": [2, 3, 16, 16]}, [b.gemm(b.op("Concat", [peak, mean], axis=1), 16, 5)], 15), {
        "x": [2, 3, 16, 16]}


def uneven_average_pools() -> Built:
    """Average pools the periphery does not take: tf2onnx's ``auto_pad=SAME_UPPER`` on an even input (padded
    more at the end) and torch's AvgPool1d; they run on the host, and the map converts."""
    b = _Builder(31)
    y = b.op("AveragePool", [b.conv("x", 3, 8)], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    y = b.op("Reshape", [b.conv(y, 8, 8), b.const([1, 8, 64], np.int64)])
    y = b.op("AveragePool", [y], kernel_shape=[3], strides=[2], pads=[1, 1])
    return b.model({"x": [1, 3, 16, 16]}, [b.gemm(b.op("Flatten", [y], axis=1), 8 * 32, 5)], 13), {
        "x": [1, 3, 16, 16]}


def opset21_norms() -> Built:
    """torch's dynamo exporter at opset 21: GroupNormalization (per-channel scale), a LayerNormalization over
    the last axis of a channels-last tensor whose shape inference leaves unknown, and ``Gelu(approximate='tanh')``."""
    b = _Builder(32)
    y = b.conv("x", 3, 8, stride=2)
    y = b.op("GroupNormalization", [y, b.const(b.rng.uniform(0.5, 1.5, 8)), b.const(b.rng.normal(0, 0.1, 8))],
             num_groups=4, epsilon=1e-5)
    y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
    y = b.op("LayerNormalization", [y, b.const(b.rng.uniform(0.5, 1.5, 8)), b.const(b.rng.normal(0, 0.1, 8))],
             axis=-1, epsilon=1e-5)
    y = b.op("Gelu", [b.op("Transpose", [y], perm=[0, 3, 1, 2])], approximate="tanh")
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 21), {"x": [1, 3, 16, 16]}


def weight_standardization() -> Built:
    """timm's NF-Nets and BiT standardize each convolution's weight in the graph: ``F.batch_norm(training=True)``
    on the weight reshaped to [1, out, in*k*k], which torch writes at opset 15+ as a BatchNormalization with
    ``training_mode=1`` (and its unused running statistics as two more outputs) on a constant."""
    b = _Builder(33)
    w = b.const(b.rng.standard_normal([8, 3, 3, 3]))
    rows = b.op("Reshape", [w, b.const([1, 8, -1], np.int64)])
    standard = b.op("BatchNormalization", [rows, b.const(np.ones(8)), b.const(np.zeros(8)), b.const(np.zeros(8)),
                                           b.const(np.ones(8))], outputs=3, training_mode=1, epsilon=1e-5)[0]
    weight = b.op("Mul", [b.op("Reshape", [standard, b.const([8, 3, 3, 3], np.int64)]), b.const(0.2)])
    y = b.op("Relu", [b.op("Conv", ["x", weight, b.const(b.rng.standard_normal(8) * 0.1)], pads=[1, 1, 1, 1])])
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 17), {"x": [1, 3, 16, 16]}


def keras_same_max_pool() -> Built:
    """Keras' ``MaxPooling2D(3, strides=2, padding='same')`` on an even input, through tf2onnx: pads [0, 0, 1, 1],
    read after a convolution with no ReLU (mini-Xception's Conv -> BN -> MaxPool), so most values are negative and a
    pad of 0 would win the border windows."""
    b = _Builder(34)
    w = b.const(b.rng.standard_normal([8, 3, 3, 3]) * 0.3)
    y = b.op("Conv", ["x", w, b.const(np.full(8, -2.0))], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])
    return b.model({"x": [1, 3, 16, 16]}, [b.conv(y, 8, 4, k=1)], 13), {"x": [1, 3, 16, 16]}


def constant_outputs() -> Built:
    """Outputs no operator computes (torch: a registered buffer returned as ``Identity(buffer)``, which the model
    also subtracts from its input; a constant returned as a ``Constant`` node): PPQ links every output to one."""
    b = _Builder(35)
    mean = b.const(b.rng.uniform(0.3, 0.6, [1, 3, 1, 1]))
    y = b.conv(b.op("Sub", ["x", mean]), 3, 8)
    b.nodes.append(helper.make_node("Identity", [mean], ["mean_out"], name="buffer"))
    b.nodes.append(helper.make_node("Constant", [], ["zeros"], name="zeros",
                                    value=numpy_helper.from_array(np.zeros([1, 4], np.float32))))
    return b.model({"x": [1, 3, 16, 16]}, [b.head(y, 8), "mean_out", "zeros"], 13), {"x": [1, 3, 16, 16]}


def dynamo_unoptimized() -> Built:
    """torch's dynamo exporter with ``optimize=False`` (opset 18): a bias-less convolution's zero bias as
    ``Expand(CastLike(0, x), Shape(W))``, and a spatial mean's axes as a ``Reshape`` of Constant nodes (constant
    only once folded, which the conversion to opset 13 needs)."""
    b = _Builder(36)
    y = "x"
    for cin in (3, 8):
        w = b.const(b.rng.standard_normal([8, cin, 3, 3]) * 0.3)
        zero = b.op("Expand", [b.op("CastLike", [b.const(0.0), y]), b.op("Shape", [w], start=0, end=1)])
        y = b.op("Relu", [b.op("Conv", [y, w, zero], pads=[1, 1, 1, 1])])
    axes = b.op("Reshape", [b.const([-1, -2], np.int64, as_node=True), b.const([-1], np.int64, as_node=True)])
    y = b.op("ReduceMean", [y, axes], keepdims=0)
    return b.model({"x": [1, 3, 16, 16]}, [b.gemm(y, 8, 5)], 18), {"x": [1, 3, 16, 16]}


def scripted_sequences() -> Built:
    """``torch.jit.script`` writes ``torch.chunk`` / ``torch.split`` as ``SplitToSequence`` read by ``SequenceAt``,
    ``torch.stack`` / ``torch.cat`` of a list as ``ConcatFromSequence``, and list edits as ``SequenceInsert`` /
    ``SequenceErase``: sequences whose length the fixed input shapes decide."""
    b = _Builder(37)
    y = b.conv("x", 3, 8)
    seq = b.op("SplitToSequence", [y, b.const(4, np.int64)], axis=1)
    first, last = b.op("SequenceAt", [seq, b.const(0, np.int64)]), b.op("SequenceAt", [seq, b.const(-1, np.int64)])
    pair = b.op("SequenceInsert", [b.op("SequenceConstruct", [first]), last])
    pair = b.op("SequenceErase", [b.op("SequenceInsert", [pair, last, b.const(0, np.int64)]), b.const(0, np.int64)])
    stacked = b.op("ReduceSum", [b.op("ConcatFromSequence", [pair], axis=0, new_axis=1), b.const([0], np.int64)],
                   keepdims=0)
    channels = b.op("SplitToSequence", [last], axis=1, keepdims=0)
    regathered = b.op("ConcatFromSequence", [channels], axis=1, new_axis=1)
    y = b.op("Concat", [b.conv(first, 4, 4), stacked, regathered], axis=1)
    return b.model({"x": [1, 3, 16, 16]}, [b.head(y, 12)], 13), {"x": [1, 3, 16, 16]}


def scripted_loop() -> Built:
    """``torch.jit.script``'s ``for`` loops: over a list (``Loop`` to its ``SequenceLength``, the list read by
    ``SequenceAt`` at the iteration number and the results appended to a carried sequence) and over a range of a
    size taken from a shape (a residual block applied three times, each iteration's pooled features stacked as a
    scan output); the condition an ``Identity`` of the one it is given."""
    b = _Builder(38)
    y = b.conv("x", 3, 8)
    parts = b.op("SplitToSequence", [y, b.const(4, np.int64)], axis=1)
    weight = b.const(b.rng.standard_normal([4, 4, 3, 3]) * 0.3)
    listed = helper.make_graph(
        [helper.make_node("SequenceAt", [parts, "i"], ["part"]),
         helper.make_node("Conv", ["part", weight], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("SequenceInsert", ["acc_in", "conv"], ["acc_out"]),
         helper.make_node("Identity", ["go_in"], ["go_out"])], "over_list",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
         helper.make_value_info("acc_in", helper.make_sequence_type_proto(
             helper.make_tensor_type_proto(TensorProto.FLOAT, [None] * 4)))],
        [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
         helper.make_value_info("acc_out", helper.make_sequence_type_proto(
             helper.make_tensor_type_proto(TensorProto.FLOAT, [None] * 4)))])
    go = b.const(True, np.bool_)
    convs = b.op("Loop", [b.op("SequenceLength", [parts]), go, b.op("SequenceEmpty", [], dtype=TensorProto.FLOAT)],
                 body=listed)
    y = b.op("ConcatFromSequence", [convs], axis=1)
    trips = b.op("Div", [b.op("Gather", [b.op("Shape", [y]), b.const(1, np.int64)]), b.const(3, np.int64)])
    weight = b.const(b.rng.standard_normal([8, 8, 1, 1]) * 0.3)
    ranged = helper.make_graph(
        [helper.make_node("Conv", ["h_in", weight], ["mixed"]), helper.make_node("Relu", ["mixed"], ["act"]),
         helper.make_node("Add", ["h_in", "act"], ["h_out"]),
         helper.make_node("GlobalAveragePool", ["h_out"], ["pooled"]),
         helper.make_node("Identity", ["go_in"], ["go_out"])], "over_range",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [None] * 4)],
        [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [None] * 4),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [None] * 4)])
    y, pooled = b.op("Loop", [trips, go, y], outputs=2, body=ranged)
    features = b.op("Flatten", [b.op("ReduceMean", [pooled], axes=[0], keepdims=0)], axis=1)
    model = b.model({"x": [1, 3, 16, 16]}, [b.head(y, 8), b.gemm(features, 8, 3)], 13)
    for out, dims in zip(model.graph.output, ([1, 5], [1, 3])):  # (as torch declares them; onnxsim needs them here)
        out.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, dims))
    return model, {"x": [1, 3, 16, 16]}


def tf_while_loop() -> Built:
    """tf2onnx's ``tf.while_loop`` (``while i < 2`` under ``tf.function``): a ``Loop`` with no trip count, a counter
    carried from a constant and the condition ``Less(i + 1, 2)`` computed in the body, which runs a convolution whose
    HWIO weight it transposes each iteration."""
    b = _Builder(40)
    y = b.op("Relu", [b.conv("x", 3, 8)])
    hwio = b.const(b.rng.standard_normal([3, 3, 8, 8]) * 0.2)
    one, two = b.const(1, np.int32), b.const(2, np.int32)
    body = helper.make_graph(
        [helper.make_node("Add", ["i_in", one], ["i_out"]),
         helper.make_node("Transpose", [hwio], ["oihw"], perm=[3, 2, 0, 1]),
         helper.make_node("Conv", ["t_in", "oihw"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["t_out"]),
         helper.make_node("Cast", ["i_out"], ["count"], to=TensorProto.FLOAT),
         helper.make_node("Less", ["count", b.const(2.0)], ["go_out"])], "while_body",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("i_in", TensorProto.INT32, []),
         helper.make_tensor_value_info("t_in", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("i_out", TensorProto.INT32, []),
         helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8, 16, 16])])
    zero = b.const(0, np.int32)
    _, y = b.op("Loop", ["", b.op("Less", [zero, two]), zero, y], outputs=2, body=body)
    model = b.model({"x": [1, 3, 16, 16]}, [b.head(y, 8)], 13)
    model.graph.output[0].type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 5]))
    return model, {"x": [1, 3, 16, 16]}



def unsorted_nodes() -> Built:
    """AMD Quark's export: the Mul that rescales a global pool appended after the nodes that read it (onnxruntime
    sorts the graph itself; onnxsim refuses it)."""
    b = _Builder(6)
    y = b.op("Relu", [b.conv("x", 3, 8)])
    pooled = b.op("GlobalAveragePool", [y])
    b.nodes.append(helper.make_node("Mul", [pooled, b.const(1.0079)], ["rescaled"], name="rescale"))
    rescale = b.nodes.pop()
    out = b.gemm(b.op("Flatten", ["rescaled"], axis=1), 8, 5)
    b.nodes.append(rescale)
    return b.model({"x": [1, 3, 16, 16]}, [out], 13), {"x": [1, 3, 16, 16]}

def shifted_norms() -> Built:
    """Normalizations whose shift outweighs their scaled signal: pyannote's SincNet front end (the waveform
    instance-normalized to ``-0.0083 x + 0.312``, then an unpadded strided convolution), the same ahead of a padded
    convolution, a GroupNorm as torch writes it below opset 18 (an InstanceNormalization of the groups, then the
    per-channel scale and shift) before a 1x1 convolution, and a LayerNormalization before a linear layer."""
    b = _Builder(7)

    def conv1d(x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> str:
        w = b.rng.standard_normal([cout, cin, k]) * np.sqrt(2.0 / (cin * k))
        return b.op("Conv", [x, b.const(w), b.const(b.rng.standard_normal(cout) * 0.1)], kernel_shape=[k],
                    strides=[stride], pads=[pad, pad])

    def norm(x: str, channels: int) -> str:
        return b.op("InstanceNormalization", [x, b.const(b.rng.uniform(0.5, 1.5, channels)),
                                              b.const(b.rng.choice([-4.0, 4.0], channels))], epsilon=1e-5)

    y = b.op("InstanceNormalization", ["waveform", b.const([-0.0083]), b.const([0.312])], epsilon=1e-5)
    y = b.op("Abs", [conv1d(y, 1, 8, 65, stride=8)])
    y = b.op("Relu", [conv1d(norm(y, 8), 8, 8, 3, pad=1)])  # (padding sees no shift: it stays)
    groups = b.op("Reshape", [y, b.const([1, 2, -1], np.int64)])
    groups = b.op("InstanceNormalization", [groups, b.const(np.ones(2)), b.const(np.zeros(2))], epsilon=1e-5)
    y = b.op("Mul", [b.op("Reshape", [groups, b.const([1, 8, -1], np.int64)]), b.const(b.rng.uniform(0.5, 1, (8, 1)))])
    y = conv1d(b.op("Add", [y, b.const(b.rng.choice([-5.0, 5.0], (8, 1)))]), 8, 8, 1)
    y = b.op("LayerNormalization", [b.op("Transpose", [y], perm=[0, 2, 1]), b.const(b.rng.uniform(0.5, 1, 8)),
                                    b.const(b.rng.choice([-5.0, 5.0], 8))], axis=-1, epsilon=1e-5)
    out = b.op("MatMul", [y, b.const(b.rng.standard_normal([8, 5]) * 0.5)])
    return b.model({"waveform": ["N", 1, 4000]}, [out], 17), {"waveform": [1, 1, 4000]}


def int32_range() -> Built:
    """tf2onnx's frame indices: a Range of int32 bounds, one computed from the data (onnxsim cannot fold it),
    selecting the frames a Gather reads."""
    b = _Builder(8)
    y = b.op("Relu", [b.conv("x", 3, 8)])
    flag = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [b.op("Greater", [y, b.const(50.0)])], to=TensorProto.INT32)],
                                keepdims=0)], to=TensorProto.INT32)
    frames = b.op("Range", [b.const(0, np.int32), b.op("Add", [flag, b.const(8, np.int32)]), b.const(2, np.int32)])
    first = b.op("Slice", [frames, b.const([0], np.int64), b.const([4], np.int64)])
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.op("Gather", [y, first], axis=2), 8)], 13), {"x": [1, 3, 16, 16]}


def pad_axes() -> Built:
    """Opset 18's Pad naming the axes it pads (a fourth input; onnxscript-authored graphs write it), reflecting,
    and opset 19's circular ``wrap`` Pad (of W only, then of H and W), between convolutions."""
    b = _Builder(9)
    y = b.op("Relu", [b.conv("x", 3, 8)])
    y = b.op("Pad", [y, b.const([1, 2, 1, 2], np.int64), "", b.const([2, -1], np.int64)], mode="reflect")
    y = b.op("Pad", [b.conv(y, 8, 8, pads=False), b.const([1, 2], np.int64), "", b.const([3], np.int64)], mode="wrap")
    y = b.op("Pad", [b.conv(y, 8, 8, pads=False), b.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], mode="wrap")
    return b.model({"x": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8, pads=False), 8)], 19), {"x": [1, 3, 16, 16]}


def attention23() -> Built:
    """torch's dynamo exporter at opset 23 writes ``scaled_dot_product_attention`` as the default domain's
    ``Attention`` (no opset-13 form: the model stays at 23, the attention on the host, its projections on the
    crossbars)."""
    b = _Builder(10)
    q, k, v = (b.op("MatMul", ["x", b.const(b.rng.standard_normal((32, 32)) * 0.2)]) for _ in range(3))
    a = b.op("Attention", [q, k, v], q_num_heads=4, kv_num_heads=4, is_causal=0)
    out = b.op("MatMul", [a, b.const(b.rng.standard_normal((32, 32)) * 0.2)])
    return b.model({"x": ["N", 16, 32]}, [out], 23, ir_version=10), {"x": [1, 16, 32]}


def ort_layernorms() -> Built:
    """onnxruntime's transformers optimizer (or a session's saved model) on an opset-14 export: LayerNormalization,
    which ONNX defines only from opset 17, and SimplifiedLayerNormalization (an RMS normalization), which it never
    defines; onnxruntime runs both in the default domain."""
    b = _Builder(11)
    tokens = b.op("Transpose", [b.op("Reshape", [b.conv("x", 3, 8, stride=2), b.const([1, 8, -1], np.int64)])],
                  perm=[0, 2, 1])
    y = b.op("LayerNormalization", [tokens, b.const(b.rng.uniform(0.5, 1.5, 8)), b.const(b.rng.normal(0, 0.1, 8))],
             axis=-1, epsilon=1e-5)
    y = b.op("MatMul", [y, b.const(b.rng.standard_normal((8, 8)) * 0.3)])
    y = b.op("SimplifiedLayerNormalization", [y, b.const(b.rng.uniform(0.5, 1.5, 8))], axis=-1, epsilon=1e-6)
    out = b.op("MatMul", [y, b.const(b.rng.standard_normal((8, 5)) * 0.3)])
    return b.model({"x": ["N", 3, 16, 16]}, [out], 14), {"x": [1, 3, 16, 16]}


def experimental_operators() -> Built:
    """Older converters' (WinMLTools, the ONNX model zoo's tiny-YOLOv2) experimental operators of opsets 1-9, which
    onnxruntime still runs: ImageScaler's preprocessing, Scale, Affine, ScaledTanh, Crop, and the experimental forms
    of MeanVarianceNormalization (attributes, the batch in its mean) and ThresholdedRelu, at opset 8."""
    b = _Builder(12)
    y = b.op("ImageScaler", ["image"], scale=1 / 58.0, bias=[-2.1, -2.0, -1.8])
    y = b.op("Affine", [b.op("Relu", [b.conv(y, 3, 8)])], alpha=0.5, beta=0.1)
    y = b.op("ScaledTanh", [b.op("Scale", [b.conv(y, 8, 8)], scale=2.0)], alpha=1.5, beta=0.5)
    y = b.op("Crop", [b.op("MeanVarianceNormalization", [b.conv(y, 8, 8)], across_channels=0, normalize_variance=1)],
             border=[1, 2, 0, 1])
    y = b.op("ThresholdedRelu", [b.op("Crop", [b.conv(y, 8, 8)], border=[1, 1, 0, 0], scale=[10, 12])], alpha=0.3)
    return b.model({"image": [1, 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 8, ir_version=4), {"image": [1, 3, 16, 16]}


def old_converter_forms() -> Built:
    """Forms onnx's version converter cannot take to opset 13, at opset 8, IR 3: CNTK's BatchNormalization with
    ``spatial=0`` (statistics per element) on a feature map and after a dense layer, onnxmltools' experimental
    ParametricSoftplus (CoreML's softplusParametric) and torch 1.1's experimental DynamicSlice."""
    b = _Builder(47)
    y = b.conv("x", 3, 8, stride=2)
    stats = [b.const(v) for v in (b.rng.uniform(0.5, 1.5, (8, 8, 8)), b.rng.normal(0, 0.1, (8, 8, 8)),
                                  b.rng.normal(0, 0.1, (8, 8, 8)), b.rng.uniform(0.5, 1.5, (8, 8, 8)))]
    y = b.op("BatchNormalization", [y, *stats], epsilon=1e-5, spatial=0)
    y = b.op("ParametricSoftplus", [y], alpha=1.5, beta=0.7)
    y = b.op("DynamicSlice", [b.conv(y, 8, 8), b.const([1], np.int64), b.const([7], np.int64), b.const([2], np.int64)])
    dense = b.gemm(b.op("Flatten", [b.conv(y, 8, 8, stride=2)], axis=1), 8 * 3 * 4, 16)
    stats = [b.const(v) for v in (b.rng.uniform(0.5, 1.5, 16), b.rng.normal(0, 0.1, 16), b.rng.normal(0, 0.1, 16),
                                  b.rng.uniform(0.5, 1.5, 16))]
    y = b.op("Relu", [b.op("BatchNormalization", [dense, *stats], epsilon=1e-5, spatial=0)])
    return b.model({"x": [1, 3, 16, 16]}, [b.gemm(y, 16, 5)], 8, ir_version=3, initializers_as_inputs=True), \
        {"x": [1, 3, 16, 16]}


def pool_indices_unpool() -> Built:
    """SegNet's and ENet's decoder: a MaxPool that also returns its indices (PPQ's kernel computes the values only)
    and the MaxUnpool that puts the decoder's values back at them."""
    b = _Builder(48)
    y = b.op("Relu", [b.conv("x", 3, 8)])
    pooled, indices = b.op("MaxPool", [y], outputs=2, kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MaxUnpool", [b.op("Relu", [b.conv(pooled, 8, 8)]), indices], kernel_shape=[2, 2], strides=[2, 2])
    return b.model({"x": ["N", 3, 16, 16]}, [b.head(b.conv(y, 8, 8), 8)], 11), {"x": [1, 3, 16, 16]}


def log_mel() -> Built:
    """An in-graph log-mel front end (openwakeword's melspectrogram, swift-f0): a DFT as two MatMuls, the power
    spectrum as ``re^2 + im^2``, a mel filterbank MatMul, ``+ eps`` and Log, then a small classifier."""
    b = _Builder(13)
    frame, bins, mels = 128, 65, 16
    k = np.arange(frame)[:, None] * np.arange(bins)[None] * 2 * np.pi / frame
    window = np.hanning(frame)[:, None]
    re, im = (b.op("MatMul", ["frames", b.const(w * window)]) for w in (np.cos(k), -np.sin(k)))
    power = b.op("Add", [b.op("Pow", [re, b.const(2.0)]), b.op("Pow", [im, b.const(2.0)])])
    edges = np.linspace(0, bins - 1, mels + 2)
    fb = np.maximum(0, 1 - np.abs(np.arange(bins)[:, None] - edges[None, 1:-1]) / np.diff(edges)[0])
    y = b.op("Log", [b.op("Add", [b.op("MatMul", [power, b.const(fb)]), b.const(1e-6)])])
    y = b.op("Relu", [b.op("MatMul", [y, b.const(b.rng.standard_normal((mels, 16)) * 0.2)])])
    out = b.op("MatMul", [y, b.const(b.rng.standard_normal((16, 4)) * 0.3)])
    return b.model({"frames": [16, frame]}, [out], 13), {"frames": [16, frame]}


def conv1d_moved_bias() -> Built:
    """tf2onnx's Keras Conv1D: ``Unsqueeze -> Conv (no bias) -> Squeeze -> Add(bias [C, 1])``, and channels last
    (``... -> Squeeze -> Transpose -> Add(bias [C])``)."""
    b = _Builder(41)
    axis = b.const([2], np.int64)
    y = "x"
    for last in (False, True):
        conv = b.op("Conv", [b.op("Unsqueeze", [y, axis]), b.const(b.rng.standard_normal((8, 8, 1, 3)) / np.sqrt(24))],
                    pads=[0, 1, 0, 1])
        y = b.op("Squeeze", [conv, axis])
        if last:
            shifted = b.op("Add", [b.op("Transpose", [y], perm=[0, 2, 1]), b.const(b.rng.normal(0, 1, 8))])
            y = b.op("Transpose", [shifted], perm=[0, 2, 1])
        else:
            y = b.op("Add", [y, b.const(b.rng.normal(0, 1, (8, 1)))])
        y = b.op("Relu", [y])
    return b.model({"x": [1, 8, 32]}, [y], 13), {"x": [1, 8, 32]}


IDIOMS: dict[str, Callable[[], Built]] = {
    "clip_inputs": clip_inputs, "hard_swish_decomposed": hard_swish_decomposed, "constant_weights": constant_weights,
    "ir3_opset8": ir3_opset8, "opset9_pad_upsample": opset9_pad_upsample, "nhwc_keras": nhwc_keras,
    "unrolled_lstm": unrolled_lstm, "placeholder_input": placeholder_input, "stale_value_info": stale_value_info,
    "unused_opsets": unused_opsets, "depth_to_space": depth_to_space, "leaky_max_min": leaky_max_min,
    "contrib_operator": contrib_operator, "squeeze_excite_mean": squeeze_excite_mean, "zero_padding": zero_padding,
    "resize_by_sizes": lambda: resize_model("nearest", "asymmetric", "floor", by_sizes=True),
    "shared_parameters": shared_parameters, "index_arithmetic": index_arithmetic, "padded_shortcut": padded_shortcut,
    "grid_sample": grid_sample, "spectral_front_end": spectral_front_end, "ir3_valid_pads": ir3_valid_pads,
    "global_max_and_training_bn": global_max_and_training_bn, "uneven_average_pools": uneven_average_pools,
    "opset21_norms": opset21_norms, "weight_standardization": weight_standardization,
    "keras_same_max_pool": keras_same_max_pool, "constant_outputs": constant_outputs,
    "dynamo_unoptimized": dynamo_unoptimized, "scripted_sequences": scripted_sequences,
    "scripted_loop": scripted_loop, "caffe2_sum": caffe2_sum, "tf_while_loop": tf_while_loop,
    "gemm_computed_bias": gemm_computed_bias, "grouped_einsum": grouped_einsum,
    "transposed_output_shape": transposed_output_shape, "unsorted_nodes": unsorted_nodes,
    "shifted_norms": shifted_norms, "int32_range": int32_range, "pad_axes": pad_axes, "attention23": attention23,
    "ort_layernorms": ort_layernorms, "experimental_operators": experimental_operators, "log_mel": log_mel,
    "conv1d_moved_bias": conv1d_moved_bias, "old_converter_forms": old_converter_forms,
    "pool_indices_unpool": pool_indices_unpool,
}

