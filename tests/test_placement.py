"""Where operators run: roles by type, gated activations, and the two region rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from maptools.placement import Role, place


def _graph(nodes: list[onnx.NodeProto], outputs: list[str], **consts: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32), **consts}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _conv(src: str, dst: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [src, "w"], [dst], name=dst)


def test_gated_activations_are_one_table_on_the_device() -> None:
    """SiLU (x * Sigmoid(x)) and HardSwish (x * Clip(x + 3, 0, 6), then / 6): the chain stays float inside,
    the Div after the hard-swish's Mul is part of its table, and the convolution's accumulator goes into
    the SiLU unrounded."""
    nodes = [_conv("x", "a"), helper.make_node("Sigmoid", ["a"], ["s"], name="s"),
             helper.make_node("Mul", ["a", "s"], ["silu"], name="silu"),
             helper.make_node("Add", ["silu", "three"], ["p"], name="p"),
             helper.make_node("Clip", ["p", "zero", "six"], ["c"], name="c"),
             helper.make_node("Mul", ["silu", "c"], ["hs"], name="hs"),
             helper.make_node("Div", ["hs", "six"], ["d"], name="d"), _conv("d", "y")]
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    placed = place(_graph(nodes, ["y"], three=f32(3), zero=f32(0), six=f32(6)))
    r = placed.roles
    assert (r["a"], r["s"], r["silu"], r["p"], r["c"], r["hs"], r["d"], r["y"]) == (
        Role.CROSSBAR, Role.GATE, Role.LUT, Role.GATE, Role.GATE, Role.GATE, Role.LUT, Role.CROSSBAR)
    # the tables' insides, the accumulator read only by functions, and the head read by no device op
    assert placed.float_outputs == {"a", "s", "p", "c", "hs", "y"}


def test_chains_of_tables_are_one_table() -> None:
    """Elementwise functions each read only by the next compose into one table; a function read by
    two operators, a Relu fused into its crossbar operator, and a crossbar output that an adder reads
    too keep their own grid."""
    nodes = [_conv("x", "a"), helper.make_node("Relu", ["a"], ["r"], name="r"),
             helper.make_node("Mul", ["r", "k"], ["m"], name="m"),
             helper.make_node("Add", ["m", "k"], ["p"], name="p"),
             helper.make_node("Tanh", ["p"], ["t"], name="t"), _conv("t", "y"), _conv("p", "z"),
             _conv("x", "b"), helper.make_node("Sigmoid", ["b"], ["sb"], name="sb"),
             helper.make_node("Add", ["b", "sb"], ["both"], name="both"), _conv("both", "w2")]
    placed = place(_graph(nodes, ["y", "z", "w2"], k=np.asarray(0.5, np.float32)))
    r = placed.roles
    assert (r["a"], r["r"], r["m"], r["p"], r["t"]) == (Role.CROSSBAR, Role.LUT, Role.GATE, Role.LUT, Role.LUT)
    assert (r["b"], r["sb"], r["both"]) == (Role.CROSSBAR, Role.LUT, Role.ADD)
    assert placed.float_outputs == {"m", "y", "z", "w2"}


def test_squeeze_excitation_gate_runs_on_the_host() -> None:
    """x * HardSigmoid(conv(pool(x))) multiplies two activations: host; what only feeds it follows."""
    nodes = [_conv("x", "a"), helper.make_node("GlobalAveragePool", ["a"], ["g"], name="g"), _conv("g", "e"),
             helper.make_node("HardSigmoid", ["e"], ["h"], name="h"),
             helper.make_node("Mul", ["a", "h"], ["m"], name="m"), _conv("m", "y")]
    placed = place(_graph(nodes, ["y"]))
    r = placed.roles
    assert (r["g"], r["e"], r["h"], r["m"], r["y"]) == (Role.AVGPOOL, Role.CROSSBAR, Role.HOST, Role.HOST,
                                                       Role.CROSSBAR)
    assert "e" in placed.float_outputs and "a" not in placed.float_outputs


def test_region_rules_keep_mixed_ranges_off_one_grid() -> None:
    """A head whose outputs only the host combines: the Sigmoid and the Concat go to the host."""
    nodes = [_conv("x", "box"), _conv("x", "cls"), helper.make_node("Sigmoid", ["cls"], ["p"], name="p"),
             helper.make_node("Mul", ["box", "stride"], ["b"], name="b"),
             helper.make_node("Concat", ["b", "p"], ["y"], name="y", axis=1),
             helper.make_node("Add", ["box", "cls"], ["both"], name="both"), _conv("both", "z")]
    placed = place(_graph(nodes, ["y", "z"], stride=np.asarray(8, np.float32)))
    r = placed.roles
    assert (r["p"], r["b"], r["y"]) == (Role.HOST, Role.HOST, Role.HOST)
    assert r["both"] is Role.ADD and r["box"] is Role.CROSSBAR
    assert "box" not in placed.float_outputs and "z" in placed.float_outputs


def test_roles_by_type_and_constants() -> None:
    nodes = [_conv("x", "a"),
             helper.make_node("Resize", ["a", "", "scales"], ["n"], name="n", mode="nearest"),
             helper.make_node("Resize", ["a", "", "scales"], ["l"], name="l", mode="linear"),
             helper.make_node("Add", ["n", "bias"], ["k"], name="k"),  # per-channel constant: a table
             helper.make_node("Add", ["n", "plane"], ["q"], name="q"),  # a constant per pixel: host
             helper.make_node("Concat", ["k", "q", "l"], ["cat"], name="cat", axis=1), _conv("k", "y1"),
             helper.make_node("Conv", ["q", "w"], ["y2"], name="y2")]
    placed = place(_graph(nodes, ["cat", "y1", "y2"], scales=np.asarray([1, 1, 2, 2], np.float32),
                          bias=np.ones((1, 4, 1, 1), np.float32), plane=np.ones((1, 1, 16, 16), np.float32)))
    r = placed.roles
    assert (r["n"], r["l"], r["k"], r["q"], r["cat"]) == (Role.MOVE, Role.HOST, Role.LUT, Role.HOST, Role.HOST)


def test_functions_of_one_tensor_are_tables() -> None:
    """Neg, Abs, Exp, and a tensor multiplied by or added to itself (a square, a doubling) each read one
    tensor: lookup tables on the device, not 'of two activations' on the host."""
    nodes = [_conv("x", "a"), helper.make_node("Neg", ["a"], ["n"], name="n"),
             helper.make_node("Mul", ["n", "n"], ["sq"], name="sq"), helper.make_node("Add", ["sq", "sq"], ["d"], name="d"),
             helper.make_node("Abs", ["d"], ["ab"], name="ab"), helper.make_node("Exp", ["ab"], ["e"], name="e"),
             _conv("e", "y")]
    r = place(_graph(nodes, ["y"])).roles
    # (a table read only by the next one is part of it: a gate inside one table)
    assert {r[n] for n in ("n", "sq", "d", "ab")} <= {Role.LUT, Role.GATE} and r["e"] is Role.LUT


def test_an_operator_without_a_device_form_is_named_so() -> None:
    """An LSTM has three outputs, but what keeps it on the host is that it has no device form."""
    rng = np.random.default_rng(1)
    nodes = [_conv("x", "a"), helper.make_node("Reshape", ["a", "seq"], ["s"], name="s"),
             helper.make_node("LSTM", ["s", "lw", "lr"], ["all", "last", "cell"], name="lstm", hidden_size=4)]
    placed = place(_graph(nodes, ["all"], seq=np.asarray([4, 16, 4], np.int64),
                          lw=rng.standard_normal((1, 16, 4)).astype(np.float32),
                          lr=rng.standard_normal((1, 16, 4)).astype(np.float32)))
    assert placed.reasons["lstm"].startswith("LSTM has no device form as one operator")
    assert "the prepared steps say why not" in placed.reasons["lstm"]


def test_the_work_inside_control_flow_counts_toward_the_total() -> None:
    """openWakeWord's hey_jarvis: an If whose then-branch is a second Gemm network (on the host): its
    multiply-accumulates count (the larger branch), so the crossbars' share is not reported as all of them."""
    from maptools.placement import macs

    rng = np.random.default_rng(2)
    then = helper.make_graph([helper.make_node("Gemm", ["v", "big"], ["t"], name="then_gemm")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 32])])
    other = helper.make_graph([helper.make_node("Identity", ["v"], ["o"], name="else_id")], "else", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 32])])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "small"], ["v"], name="gemm"),
         helper.make_node("ReduceMax", ["v"], ["m"], name="m", keepdims=0),
         helper.make_node("Greater", ["m", "zero"], ["c"], name="c"),
         helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "small"),
         numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "big"),
         numpy_helper.from_array(np.asarray(0.0, np.float32), "zero")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    model.graph.node[3].attribute[0].g.ClearField("value_info")  # as the prepared model: outer shapes only
    assert macs(model) == {"gemm": 16 * 32, "if": 32 * 32}


def test_a_loop_counts_its_body_as_often_as_its_constant_trip_count() -> None:
    """A Keras recurrent layer through tf2onnx, a Loop too long to write out: its body's work counts once per step
    (it had counted once, and the crossbars' share read 90.6% where an LSTM operator's export read 3.1%); a
    ``while`` loop's trip count (the int64 maximum, its condition deciding) counts once."""
    from maptools.placement import macs

    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "i"], ["xt"], axis=1), helper.make_node("Gemm", ["xt", "w"], ["a"]),
         helper.make_node("Add", ["a", "h"], ["h_out"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "step", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])])
    loops = {"steps": np.asarray(3000, np.int64), "forever": np.asarray(np.iinfo(np.int64).max)}
    graph = helper.make_graph(
        [helper.make_node("Loop", [count, "", "h0"], [f"h_{count}"], name=count, body=body) for count in loops], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3000, 4])],
        [helper.make_tensor_value_info(f"h_{count}", TensorProto.FLOAT, [1, 8]) for count in loops],
        [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros((1, 8), np.float32), "h0"),
         *(numpy_helper.from_array(v, k) for k, v in loops.items())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert macs(model) == {"steps": 3000 * 4 * 8, "forever": 4 * 8}


def test_a_while_loop_and_a_scan_count_their_body_once_per_step() -> None:
    """A Keras GRU through tf2onnx is a Loop with no trip count, its condition deciding, and one scan output row per
    step (crema's chord model: its four counted once, the crossbars' share read 85.2% where it is 14.3%); a Scan's
    body runs once per row of its scan input."""
    from maptools.placement import macs

    rng = np.random.default_rng(4)
    steps = 50
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "i"], ["xt"], axis=1), helper.make_node("Gemm", ["xt", "w"], ["a"]),
         helper.make_node("Add", ["a", "h"], ["h_out"]), helper.make_node("Identity", ["h_out"], ["row"]),
         helper.make_node("Add", ["i", "one"], ["next"]), helper.make_node("Less", ["next", "n"], ["cond_out"])],
        "step", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 8])])
    scan_body = helper.make_graph(
        [helper.make_node("Gemm", ["xs", "w"], ["b"]), helper.make_node("Add", ["b", "s"], ["s_out"])], "scan",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("xs", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 8])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["", "go", "h0"], ["h_end", "rows"], name="while", body=body),
         helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0, 2]),
         helper.make_node("Scan", ["h0", "xT"], ["s_end"], name="scan", body=scan_body, num_scan_inputs=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, steps, 4])],
        [helper.make_tensor_value_info("h_end", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, [steps, 1, 8]),
         helper.make_tensor_value_info("s_end", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros((1, 8), np.float32), "h0"),
         numpy_helper.from_array(np.asarray(True), "go"), numpy_helper.from_array(np.asarray(1, np.int64), "one"),
         numpy_helper.from_array(np.asarray(steps, np.int64), "n")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    ort.InferenceSession(model.SerializeToString())  # (a valid model: onnxruntime runs it)
    assert macs(model) == {"while": steps * 4 * 8, "scan": steps * 4 * 8}


def test_a_recurrent_cell_counts_its_weights_work_where_its_input_shape_is_unknown() -> None:
    """silero-vad's decoder LSTM sits in an If branch whose input shape inference cannot give: the cell still
    computes at least one step of its weights (4 gates x hidden x (features + hidden)); with the shape known,
    every step of every sample."""
    from maptools.placement import macs

    rng = np.random.default_rng(3)
    features, hidden = 16, 8
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (1, 4 * hidden, features)), ("R", (1, 4 * hidden, hidden)))]
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden)
    known = helper.make_graph([lstm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    unknown = helper.make_graph([lstm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    step = 4 * hidden * (features + hidden)
    assert macs(helper.make_model(known)) == {"lstm": 5 * 2 * step}
    assert macs(helper.make_model(unknown)) == {"lstm": step}


def test_average_pools_the_periphery_cannot_take_run_on_the_host() -> None:
    """The device's window sums are 2-D, undilated and padded alike on both sides; an asymmetric pad, a 1-D
    window or a dilated one keeps the pool on the host, where the conversion does not refuse it."""
    pool = lambda name, **a: helper.make_node("AveragePool", ["a"], [name], name=name, **a)  # noqa: E731
    nodes = [_conv("x", "a"), pool("even", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             pool("uneven", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
             pool("dilated", kernel_shape=[3, 3], dilations=[2, 2]), _conv("even", "y1"), _conv("uneven", "y2"),
             _conv("dilated", "y3")]
    placed = place(_graph(nodes, ["y1", "y2", "y3"]))
    assert placed.roles["even"] is Role.AVGPOOL
    assert placed.roles["uneven"] is placed.roles["dilated"] is Role.HOST
    assert placed.reasons["uneven"].startswith("AveragePool other than 2-D")


def test_onnxruntimes_own_forms_of_matrix_work_count_it() -> None:
    """What onnxruntime writes for a convolution or a matrix product and preparation leaves as it is (its NCHWc
    layout, 4-bit MatMulNBits weights, a FusedMatMul that transposes batch axes) counts its work: the host's share
    then shows in the coverage, where it had read 100% of the rest."""
    from maptools.placement import macs

    rng = np.random.default_rng(4)
    packed = rng.integers(0, 255, (16, 2, 16)).astype(np.uint8)  # N=16 rows of K=64 in blocks of 32, 4 bits each
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="nchwc", domain="com.microsoft.nchwc"),
             helper.make_node("Reshape", ["c", "rows"], ["r"], name="rows"),
             helper.make_node("MatMulNBits", ["r", "packed", "scales"], ["y"], name="nbits", domain="com.microsoft",
                              K=64, N=16, bits=4, block_size=32)]
    model = _graph(nodes, ["y"], rows=np.array([1, 4, 64]), packed=packed,
                   scales=rng.random(32).astype(np.float32))
    inferred = {"c": [1, 4, 8, 8], "r": [1, 4, 64], "y": [1, 4, 16]}
    model.graph.value_info.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inferred.items())
    assert macs(model) == {"nchwc": 4 * 8 * 8 * 4, "nbits": 4 * 16 * 64}


def test_attention_on_the_host_counts_its_work() -> None:
    """An attention operator left on the host (onnxruntime's Attention with its packed Q/K/V projection, opset 23's
    Attention, onnxruntime's MultiHeadAttention) counts its matrix work: Q K^T, the weighted sum of V, and the
    projection; the coverage had read 100% of the rest."""
    from maptools.placement import macs

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Attention", ["x", "w", "b"], ["a"], name="packed", domain="com.microsoft", num_heads=4),
             helper.make_node("Attention", ["a", "a", "a"], ["o"], name="standard", q_num_heads=4, kv_num_heads=4),
             helper.make_node("MultiHeadAttention", ["o", "o", "o"], ["y"], name="multi", domain="com.microsoft",
                              num_heads=4)]
    model = _graph(nodes, ["y"], w=rng.standard_normal((32, 96)).astype(np.float32),
                   b=np.zeros(96, np.float32))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 32]))
    model.graph.value_info.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, [2, 16, 32]) for k in "ao")
    rows = 2 * 16 * 16 * (32 + 32)  # per batch, 16 query rows x 16 key rows x (the query's and the value's widths)
    assert macs(model) == {"packed": 2 * 16 * 32 * 96 + rows, "standard": rows, "multi": rows}


def test_an_integer_gemm_left_on_the_host_counts_its_work() -> None:
    """onnxruntime's QOperator Gemm (com.microsoft QGemm, its weight the fourth input) does a Gemm's work: a
    quantized transformer whose float rewrite was refused read '0.0% of 262,144' (its QLinearMatMuls alone)."""
    from maptools.placement import macs

    node = helper.make_node("QGemm", ["a", "as", "az", "b", "bs", "bz", "c", "ys", "yz"], ["y"], name="qgemm",
                            domain="com.microsoft", transB=1)
    model = _graph([node], ["y"], b=np.zeros((192, 64), np.int8))
    model.graph.value_info.extend(helper.make_tensor_value_info(k, TensorProto.UINT8, v)
                                  for k, v in {"a": [32, 64], "y": [32, 192]}.items())
    assert macs(model) == {"qgemm": 32 * 64 * 192}
