"""Prepare a model as shipped for PPQ: fixed dims, opset 13, folded constants, PPQ-ready operators.

Real exports have dynamic or symbolic input dims (``batch``, ``dim_value: -1``), opsets from 11 to
18+, ``Constant`` nodes, BatchNorm and bias ``Add`` nodes beside convolutions, and operators that
PPQ 0.6.6 does not dispatch (``Resize`` above opset 13) or whose opset-13 form differs
(``HardSwish``, ``LayerNormalization``). :func:`prepare_model` turns such a model, given concrete
``input_shapes``, into one that PPQ, the conversion and the simulation all read node for node:

1. fix the input dims to ``input_shapes`` and drop stale intermediate shapes;
2. fold ``Constant`` nodes into initializers, inline local functions;
3. convert to opset 13 (PPQ's dispatch and its ONNX export speak opset 13): upward with onnx's
   version converter, downward by rewriting the few operators whose definition changed;
4. simplify with onnxsim (constant folding of shape arithmetic, BatchNorm into Conv, ...); then write
   sequences of a known length as their tensors and loops of a known trip count once per iteration
   (``torch.jit.script``'s lists and ``for`` loops, tf2onnx's ``while`` on a counter), and simplify again;
5. the rewrites PPQ would otherwise do inside its own graph (so operator names stay the ONNX
   ones): BatchNorm into the Conv/Gemm before it (or a per-channel Mul+Add), a bias ``Add`` into
   the Conv before it, Identity and Dropout removed, every node uniquely named;
6. record every tensor's static shape (ONNX shape inference, or one onnxruntime run where it fails);
7. check the result against the original model in onnxruntime on seeded random inputs.

Every step is recorded. A model onnxruntime runs is never refused for a step of ours: a step that
fails is skipped (and recorded so), and a result that differs from the original is prepared again
with fewer rewrites. Only a model onnxruntime cannot run at ``input_shapes`` is a
:class:`~maptools.errors.ModelError` / :class:`~maptools.errors.InputShapeError`, raised before
anything is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.errors import InputShapeError, MaptoolsError, ModelError
from maptools.maps.folder import atomic_link, atomic_write, sha256_file, storage_errors
from maptools.metrics import rel_l2
from maptools.onnx_model import (CONTROL_FLOW_OP_TYPES, _subgraphs, check_input_shapes, in_topological_order,
                                 load_model, ort_session, overridable_initializers, with_inputs)
from maptools.placement import QUANTIZED_OP_TYPES, record_sizes, recorded_sizes


from maptools.prepare.base import TARGET_OPSET, _DEFAULT_DOMAINS, PreparedModel, _Context, _where, opset_of
from maptools.prepare.dequantize import dequantize, input_ranges
from maptools.prepare.checks import Reference, _random_feed, _static_shapes, check_equivalent, reference_outputs
from maptools.prepare.opset import (_schema, convert_opset, fix_input_dims, fold_constant_nodes, opset_report,
                                    ort_operators)
from maptools.prepare.recurrent import RECURRENT_OP_TYPES, recurrent_as_gemms
from maptools.prepare.unroll import static_sequences, unroll_loops
from maptools.prepare.rewrites import (_einsum_as_matmul, _explicit_pads, _fold_batchnorm, _fold_bias_add,
                                       _fold_norm_shift, _fold_pad, _gemm_device_form, _matmul_as_gemm, _mean_as_pool,
                                       _remove_passthrough, _stft_as_conv, _sum_as_add, _transposed_pads, _unfuse,
                                       name_nodes, simplify)
log = logging.getLogger(__name__)

__all__ = ["PreparedModel", "prepare_model", "prepare", "opset_report", "fingerprint", "TARGET_OPSET", "opset_of",
           "PREPARED_KEY", "DEQUANTIZED", "Reference", "reference_outputs", "check_equivalent"]


# --- the stage ------------------------------------------------------------------------------------------

#: What preparation may leave out, from the most to the least: each level runs fewer rewrites, for a
#: model whose full preparation fails onnxruntime's check against the original (a long recurrence written out
#: drifts from onnxruntime's fused LSTM in float: the next level keeps it one operator, on the host).
_LEVELS = ("full", "no recurrent forms", "no device forms", "no onnxsim", "minimal")


def _optional(ctx: _Context, what: str, step: Callable[[_Context], list[str]]) -> None:
    """Run a rewrite that the model can do without: on any failure the model stays as it was before it,
    and the step is recorded as skipped (with the reason) instead of failing the preparation."""
    saved = onnx.ModelProto()
    saved.CopyFrom(ctx.model)
    try:
        done = step(ctx)
    except Exception as e:  # noqa: BLE001  (onnx, onnxsim and the rewrites raise many types)
        ctx.model = saved
        ctx.invalidate()
        reason = e.problem if isinstance(e, MaptoolsError) else f"{type(e).__name__}: {str(e).strip()[:200]}"
        ctx.steps.append(f"{what} skipped ({reason})")
        ctx.skipped.append(ctx.steps[-1])
        log.warning("preparation: %s skipped: %s", what, reason)
        return
    ctx.steps.extend(done)


def _counted(text: str, count: int) -> list[str]:
    return [text.format(count)] if count else []


def _fold_constants(ctx: _Context) -> list[str]:
    return _counted("{} Constant nodes folded into initializers", fold_constant_nodes(ctx))


def _float32(ctx: _Context) -> list[str]:
    """float16, bfloat16 and float64 weights, constants, casts and tensors (a half-precision export, a model
    converted in double) as float32: PPQ, the crossbar weights and the simulation compute in float32 (the prepared
    model then takes float32 inputs)."""
    other = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}

    def widen(tensor: onnx.TensorProto) -> bool:
        if tensor.data_type not in other:
            return False
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float32),
                                                     tensor.name))
        return True

    def graph(g: onnx.GraphProto) -> int:
        count = sum(widen(t) for t in g.initializer)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in other:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
                count += 1
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    count += widen(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    count += graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    count += sum(graph(sub) for sub in attr.graphs)
                elif node.op_type in ("Cast", "CastLike", "EyeLike", "RandomNormal", "RandomUniform") and \
                        attr.name in ("to", "dtype") and attr.i in other:
                    attr.i = onnx.TensorProto.FLOAT
                    count += 1
        return count

    changed = graph(ctx.model.graph)
    if changed:
        ctx.invalidate()
    return _counted("float16, bfloat16 and float64 made float32 ({} tensors and casts)", changed)


def _inline(ctx: _Context) -> list[str]:
    """Local functions inlined, where onnx's inliner can read them (:func:`_inlinable`); a call it cannot stays a
    host operator that onnxruntime runs with the function."""
    if not ctx.model.functions:
        return []
    from onnx import inliner

    _inlinable(ctx.model)
    ctx.model = inliner.inline_local_functions(ctx.model)
    ctx.invalidate()
    left = sorted({f"{n.domain}.{n.op_type}" for n in ctx.graph.node
                   if any((f.domain, f.name) == (n.domain, n.op_type) for f in ctx.model.functions)})
    return ["local functions inlined" + (f" (calls of {', '.join(left)} left as they are)" if left else "")]


def _inlinable(model: onnx.ModelProto) -> None:
    """Two things onnx's inliner gets wrong, put right in place: a function importing another version of the
    standard domain than the model's is left uninlined (onnxscript writes ``opset18`` functions into an opset-21
    model), so its import is set to the model's where every operator it calls has one definition across both
    versions; and an attribute a call leaves out is dropped, not given the function's default (the operator's own
    default then applies: a LeakyRelu's slope 0.01, not the function's 0.2), so the call gets the default."""
    version = opset_of(model)
    for function in model.functions:
        for opset in function.opset_import:
            if opset.domain in _DEFAULT_DOMAINS and opset.version != version and all(
                    (mine := _schema(n.op_type, opset.version)) is not None and
                    (theirs := _schema(n.op_type, version)) is not None and mine.since_version == theirs.since_version
                    for n in function.node if n.domain in _DEFAULT_DOMAINS):
                opset.version = version
    defaults = {(f.domain, f.name): list(f.attribute_proto) for f in model.functions if f.attribute_proto}
    for node in _all_nodes(model):
        given = {a.name for a in node.attribute}
        node.attribute.extend(a for a in defaults.get((node.domain, node.op_type), []) if a.name not in given)


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of the model: the main graph's, its subgraphs' and its functions'."""
    found: list[onnx.NodeProto] = []

    def walk(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            found.append(node)
            for graph in _subgraphs(node):
                walk(graph.node)
    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return found


def _stft(ctx: _Context) -> list[str]:
    return _counted("{} STFT written as a strided convolution", _stft_as_conv(ctx))


def _sequences(ctx: _Context) -> list[str]:
    """Sequences of a known length as their tensors, and loops of a known trip count written out (then the
    sequences their bodies used)."""
    sequences = static_sequences(ctx)
    loops = unroll_loops(ctx)
    if loops:
        fold_constant_nodes(ctx)
        sequences += static_sequences(ctx)
    return [*_counted("{} Loop nodes of a known trip count unrolled", loops),
            *_counted("{} sequence operators written as the tensors they hold", sequences)]


def _convert(ctx: _Context) -> list[str]:
    converted = convert_opset(ctx)
    return [converted] if converted else []


def _simplify(shapes: Mapping[str, Sequence[int]]) -> Callable[[_Context], list[str]]:
    def step(ctx: _Context) -> list[str]:
        before = len(ctx.graph.node)
        simplify(ctx, shapes)
        fold_constant_nodes(ctx)
        return [f"onnxsim: {before} -> {len(ctx.graph.node)} nodes"]

    return step


def _explicit(ctx: _Context) -> list[str]:
    """``auto_pad`` as explicit ``pads`` (exact; PPQ computes SAME padding wrongly for even kernels), and a
    ConvTranspose's ``output_shape`` too."""
    return [*_counted("{} auto_pad made explicit pads", _explicit_pads(ctx)),
            *_counted("{} ConvTranspose output_shape/auto_pad made explicit pads", _transposed_pads(ctx))]


def _ppq_ready(device_forms: bool, recurrent: bool) -> Callable[[_Context], list[str]]:
    """The rewrites PPQ would otherwise do in its own graph, and (``device_forms``) the operators written in
    the form the device takes, LSTM and GRU too where ``recurrent``; those compute the same in exact arithmetic,
    and in float may round otherwise (a deep detector amplified a GlobalAveragePool's summation order to 1.6e-3
    of its output)."""
    def step(ctx: _Context) -> list[str]:
        done = _counted("{} Identity/Dropout removed", _remove_passthrough(ctx))
        done += _explicit(ctx)
        folded, replaced = _fold_batchnorm(ctx)
        done += [*_counted("{} BatchNormalization folded into Conv/Gemm", folded),
                 *_counted("{} BatchNormalization replaced by a per-channel Mul + Add", replaced),
                 *_counted("{} bias Add folded into Conv", _fold_bias_add(ctx))]
        if device_forms:
            done += [*_counted("{} Gemm written in the crossbar's form (transA, alpha, beta, a computed C as an Add)",
                               _gemm_device_form(ctx)),
                     *_counted("{} Einsum by a constant matrix written as MatMul", _einsum_as_matmul(ctx)),
                     *_counted("{} MatMul by a constant matrix written as Gemm", _matmul_as_gemm(ctx)),
                     *_counted("{} spatial ReduceMean written as GlobalAveragePool", _mean_as_pool(ctx)),
                     *_counted("{} Sum written as Add", _sum_as_add(ctx)),
                     *(_counted("{} LSTM/GRU written out step by step as Gemms and gates", recurrent_as_gemms(ctx))
                       if recurrent else []),
                     *_counted("{} Pad folded into the convolutions or max pools it feeds", _fold_pad(ctx)),
                     *_counted("{} normalization shifts moved into the biases of the Conv/Gemm reading them",
                               _fold_norm_shift(ctx))]
        return done
    return step


def prepare(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], *, simplify_model: bool = True,
            level: str = "full", output_shapes: Mapping[str, Sequence[int]] | None = None,
            sample: Mapping[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Steps 1-5 on a model in memory; returns the prepared model, what was done and the steps skipped.

    Only fixing the input dims, naming the nodes and recording every tensor's shape are required;
    every other step is skipped (and recorded so) where it fails. ``level`` leaves out more: ``'no recurrent
    forms'`` (LSTM and GRU stay operators), ``'no device forms'`` (none of the rewrites into the forms the device
    takes), ``'no onnxsim'`` (neither), or ``'minimal'``
    (dims, explicit pads, names and shapes only). ``output_shapes``: the graph outputs'
    shapes as onnxruntime computes them (:class:`Reference`), which replace the declared ones. ``sample``: a
    calibration sample, whose integer and rank-0/1 inputs the onnxruntime runs take
    (:func:`~maptools.prepare.checks.from_sample`).
    """
    ctx = _Context(onnx.ModelProto.FromString(model.SerializeToString()),
                   observe=lambda m: _observed_dims(m, shapes, sample))
    # IR 4 at least, where initializers need not be graph inputs: onnx's converter, onnxsim and shape inference
    # refuse an IR-3 model whose initializers are not (OnnxMLTools wrote such files)
    ctx.model.ir_version = max(ctx.model.ir_version, 4)
    _default_domain_named(ctx.model)
    _drop_unused_opsets(ctx.model)
    if fix_input_dims(ctx.model, shapes, output_shapes):
        ctx.steps.append("input dims fixed to " + ", ".join(f"{k}={list(v)}" for k, v in shapes.items()))
    _optional(ctx, "float16, bfloat16 and float64 to float32", _float32)
    _optional(ctx, "onnxruntime's fused operators", lambda c: _counted(
        "{} onnxruntime fused operators (FusedConv, FusedGemm, FusedMatMul, Gelu) written as standard ones",
        _unfuse(c)))
    _optional(ctx, "onnxruntime's operators outside ONNX", lambda c: _counted(
        "{} operators onnxruntime runs but ONNX does not define at this opset (LayerNormalization before 17, "
        "SimplifiedLayerNormalization, ImageScaler, ...) or in a form onnx's version converter cannot take (CNTK's "
        "spatial=0 BatchNormalization, Hardmax before opset 13) written as standard ones", ort_operators(c)))
    device_forms = level in ("full", "no recurrent forms")
    if level != "minimal":
        _optional(ctx, "inlining local functions", _inline)
        _optional(ctx, "folding Constant nodes", _fold_constants)
        if device_forms:  # (before the conversion, which STFT, an opset-17 operator, stops)
            _optional(ctx, "STFT as a convolution", _stft)
        _optional(ctx, f"converting to opset {TARGET_OPSET}", _convert)
        _optional(ctx, "folding Constant nodes", _fold_constants)  # the converter writes some
        if simplify_model and level != "no onnxsim":
            _optional(ctx, "onnxsim", _simplify(shapes))
            if opset_of(ctx.model) > TARGET_OPSET:  # what the conversion needs constant, onnxsim may have folded
                steps, skipped = list(ctx.steps), list(ctx.skipped)  # (torch's dynamo export unoptimized)
                _optional(ctx, f"converting to opset {TARGET_OPSET} after onnxsim", _convert)
                if opset_of(ctx.model) == TARGET_OPSET:
                    ctx.skipped[:] = [s for s in skipped if not s.startswith(f"converting to opset {TARGET_OPSET}")]
                    _optional(ctx, "onnxsim", _simplify(shapes))  # (a CastLike the conversion made a Cast folds)
                else:  # skipped for the reason recorded before
                    ctx.steps[:], ctx.skipped[:] = steps, skipped
        for _ in range(3):  # onnxsim then folds what an iteration computes from constants (a weight's transpose),
            before = len(ctx.steps)  # and a loop's count may be shape arithmetic it folds once a sequence is gone
            _optional(ctx, "sequences and loops written out", _sequences)
            if len(ctx.steps) == before or not simplify_model or level == "no onnxsim":
                break
            _optional(ctx, "onnxsim", _simplify(shapes))
            if not any(n.op_type == "Loop" or "Sequence" in n.op_type for n in ctx.graph.node):
                break
        _optional(ctx, "the PPQ-ready rewrites", _ppq_ready(device_forms, recurrent=level == "full"))
    else:  # (PPQ reads a 1-element Constant node as a scalar: a Concat of it and a 1-D tensor fails in onnxruntime)
        _optional(ctx, "folding Constant nodes", _fold_constants)
        _optional(ctx, "explicit pads", _explicit)
        _optional(ctx, "sequences and loops written out", _sequences)
    control = sorted({_where(n) for n in ctx.graph.node if n.op_type in CONTROL_FLOW_OP_TYPES})
    if control:  # data-dependent: it runs on the host, in onnxruntime
        ctx.steps.append(f"control flow kept on the host: {', '.join(control[:5])}")
    constant = _produce_constant_outputs(ctx)
    if constant:
        ctx.steps.append(f"{constant} constant outputs written by an Identity (PPQ links every output to a node)")
    renamed = name_nodes(ctx)
    if renamed:
        ctx.steps.append(f"{renamed} nodes named")
    _record_shapes(ctx, shapes, sample)
    try:
        onnx.checker.check_model(ctx.model)
    except Exception as e:  # noqa: BLE001  (onnxruntime's check against the original decides)
        log.debug("onnx's checker objects to the prepared model (%s); onnxruntime's check decides", e)
    return ctx.model, ctx.steps, ctx.skipped


def _produce_constant_outputs(ctx: _Context) -> int:
    """Give each graph output that is a constant (an exported buffer, a folded ``Constant`` node) an ``Identity``
    producer reading the constant under another name: PPQ's parser refuses an output no operator writes."""
    outputs = {o.name for o in ctx.graph.output}
    constants = [i for i in ctx.graph.initializer if i.name in outputs]
    for init in constants:
        output, init.name = init.name, ctx.fresh(init.name + "_value")
        for node in ctx.graph.node:  # (the operators that read the constant read it as it was)
            node.input[:] = [init.name if t == output else t for t in node.input]
        ctx.graph.node.insert(0, onnx.helper.make_node("Identity", [init.name], [output]))
    return len(constants)


def _default_domain_named(model: onnx.ModelProto) -> None:
    """The default domain written '' everywhere: 'ai.onnx' is its other name (PPQ's exporter, some converters),
    which onnxruntime reads and onnxsim does not."""
    for node in _all_nodes(model):
        if node.domain == "ai.onnx":
            node.domain = ""
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        versions = [o.version for o in imports if o.domain in _DEFAULT_DOMAINS]
        if any(o.domain == "ai.onnx" for o in imports):
            kept = [o for o in imports if o.domain not in _DEFAULT_DOMAINS]
            del imports[:]
            imports.extend([onnx.helper.make_opsetid("", max(versions)), *kept])


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Forget opset imports of domains no node uses (converters list every domain they know of)."""
    used = {n.domain for n in model.graph.node} | {d for f in model.functions for d in [f.domain]
                                                   } | set(_DEFAULT_DOMAINS)
    kept = [o for o in model.opset_import if o.domain in used]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _record_shapes(ctx: _Context, shapes: Mapping[str, Sequence[int]],
                   sample: Mapping[str, np.ndarray] | None = None) -> None:
    """Write every tensor's static type and shape into ``value_info`` (and the outputs'): from ONNX shape
    inference, or where it fails or leaves a shape open, from one onnxruntime run of the model."""
    live = {t for n in ctx.graph.node for t in n.output}  # the tensors a rewrite removed keep no stale entry
    for vi in [vi for vi in ctx.graph.value_info if vi.name not in live]:
        ctx.graph.value_info.remove(vi)
    try:
        inferred = _static_shapes(ctx.model)
    except ModelError as e:
        log.info("preparation: %s; shapes are taken from onnxruntime instead", e.problem)
        inferred = _observed_shapes(ctx.model, shapes, sample)
        ctx.steps.append("shapes recorded from onnxruntime (ONNX shape inference fails on this model)")
    del ctx.graph.value_info[:]
    ctx.graph.value_info.extend(inferred.graph.value_info)
    for out, done in zip(ctx.graph.output, inferred.graph.output):
        out.type.CopyFrom(done.type)
    record_sizes(ctx.model, recorded_sizes(inferred))
    ctx.invalidate()


def _observed_dims(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                   sample: Mapping[str, np.ndarray] | None = None) -> dict[str, list[int]]:
    """Every tensor's dims as onnxruntime computes them (:func:`_observed_shapes`; -1 where the data sets one)."""
    g = _observed_shapes(model, shapes, sample).graph
    return {vi.name: [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            for vi in [*g.value_info, *g.output]}


#: Operators whose output's size follows the values of their input (and TopK where k is computed).
DATA_SIZED = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})


def _sized_by_data(model: onnx.ModelProto) -> set[str]:
    """The tensors whose size may follow the values of the data: the outputs of :data:`DATA_SIZED` operators and
    of TopK with a computed k, and every tensor computed from them."""
    fixed = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    todo = [t for n in model.graph.node if n.op_type in DATA_SIZED
            or (n.op_type == "TopK" and len(n.input) > 1 and n.input[1] not in fixed) for t in n.output if t]
    found: set[str] = set()
    while todo:
        t = todo.pop()
        if t not in found:
            found.add(t)
            todo.extend(o for node in readers.get(t, []) for o in node.output if o)
    return found


def _observed_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                     sample: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """``model`` with the type and shape of every tensor as onnxruntime computes them on one input (its integer
    inputs ``sample``'s, where given)."""
    names = [t for n in model.graph.node for t in n.output if t]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in known)
    try:
        values = ort_session(probe).run(names, _random_feed(model, shapes, np.random.default_rng(0), sample=sample))
    except Exception as e:
        raise InputShapeError(f"the model does not run in onnxruntime with input_shapes "
                              f"{ {k: list(v) for k, v in shapes.items()} }: {str(e).strip()[:300]}",
                              "give the shapes the model was exported for.") from e
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.value_info[:]
    sized = _sized_by_data(model)
    if sized:  # one run's size of such a tensor is not the next input's: a dim inference leaves open stays open
        for out in probe.graph.output:
            if out.name in sized:
                out.type.tensor_type.ClearField("shape")  # (the size one run gave it, written by fix_input_dims)
        try:
            g = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph
            inferred = {vi.name: vi.type.tensor_type.shape.dim for vi in [*g.value_info, *g.output]}
        except Exception:  # noqa: BLE001 - no inference: every such dim stays open
            inferred = {}
    found, seen = {}, {}
    for name, value in zip(names, values):
        if not isinstance(value, np.ndarray):
            continue  # a sequence (a list) or an absent optional: ONNX shape inference types it, if anything
        value = np.asarray(value)
        dims: list[int | str | None] = list(value.shape)
        if name in sized:
            seen[name] = [int(d) for d in value.shape]
            known = inferred.get(name)
            same_rank = known is not None and len(known) == len(dims)
            dims = [known[i].dim_value if same_rank and known[i].HasField("dim_value") else f"{name}_{i}"
                    for i in range(len(dims))]
        found[name] = onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), dims)
    outputs = {o.name for o in model.graph.output}
    record_sizes(result, seen)
    result.graph.value_info.extend(vi for name, vi in found.items() if name not in outputs)
    for out in result.graph.output:
        if out.name in found:
            out.type.CopyFrom(found[out.name].type)
    return result


#: metadata_props key of a prepared model: what it was prepared for and how (JSON).
PREPARED_KEY = "maptools.prepared"


def fingerprint() -> str:
    """What besides the model and the options decides the prepared bytes: this code and the converters."""
    import hashlib

    from maptools.versions import package_versions

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):  # this package's code
        digest.update(path.name.encode() + path.read_bytes())
    versions = package_versions()
    digest.update(json.dumps({k: versions.get(k) for k in ("onnx", "onnxsim")}, sort_keys=True).encode())
    return digest.hexdigest()


def _already_prepared(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], simplify: bool
                      ) -> dict[str, Any] | None:
    """The record of a model this code prepared for the same shapes and options, or None."""
    for prop in model.metadata_props:
        if prop.key == PREPARED_KEY:
            try:
                record = json.loads(prop.value)
            except ValueError:
                return None
            wanted = {"input_shapes": {k: [int(d) for d in v] for k, v in shapes.items()}, "simplify": simplify,
                      "code": fingerprint()}
            return record if all(record.get(k) == v for k, v in wanted.items()) else None
    return None


def prepare_model(src: str | Path, dst: str | Path, input_shapes: Mapping[str, Sequence[int]], *,
                  simplify: bool = True, checks: int = 3, seed: int = 0, strict: bool = False,
                  loaded: onnx.ModelProto | None = None, source_sha256: str | None = None,
                  link: bool = False, sample: Mapping[str, np.ndarray] | None = None) -> PreparedModel:
    """Prepare ``src`` for quantization with concrete ``input_shapes`` and write it to ``dst`` atomically.

    The prepared model records what it was prepared for (``metadata_props['maptools.prepared']``);
    a model this code already prepared for the same shapes and options is copied as it is (the flow
    prepares in its own task, then quantizes the prepared file). ``link``: ``dst`` may then be a hard link
    to ``src`` (for a scratch ``dst`` that is read, or replaced whole, never written in place).
    ``loaded``, ``source_sha256``: ``src`` as the caller already loaded (:func:`maptools.onnx_model.load_model`)
    and hashed it, so that neither is done twice. ``sample``: a calibration sample, whose integer and rank-0/1
    inputs the checks in onnxruntime take (:func:`~maptools.prepare.checks.from_sample`).

    A rewrite that fails is skipped (recorded in ``steps``); where the result does not match the
    original in onnxruntime, the model is prepared again with fewer rewrites (``no device forms``, ``no
    onnxsim``, then ``minimal``: fixed dims, explicit pads, node names and recorded shapes only); ``strict``
    makes any of them an error.

    Raises:
        ModelError: onnxruntime cannot run the model, or (``strict``) a step had to be left out; nothing is
            written.
        InputShapeError: ``input_shapes`` do not fit the model (onnxruntime cannot run it with them).
    """
    src = Path(src)
    model = with_inputs(load_model(src) if loaded is None else loaded, input_shapes)
    shapes = check_input_shapes(model, input_shapes)
    dst = Path(dst)
    with storage_errors(f"create {dst.parent}"):
        dst.parent.mkdir(parents=True, exist_ok=True)
    record = _already_prepared(model, shapes, simplify)
    if record is not None:
        _check_strict(strict, record.get("fallbacks", []), src)
        # a file holding less than the loaded model kept its weights in external data: the prepared model is one
        # file, with them written into it (no second parse of the file: ByteSize only sums field sizes)
        inline = src.stat().st_size != model.ByteSize()
        if inline:
            atomic_write(dst, model.SerializeToString())
        elif not (link and atomic_link(src, dst)):
            atomic_write(dst, src.read_bytes())
        return PreparedModel(path=dst, sha256=sha256_file(dst) if inline else source_sha256 or sha256_file(dst),
                             input_shapes=record["input_shapes"],
                             source_opset=record["source_opset"], opset=opset_of(model), steps=tuple(record["steps"]),
                             max_abs_diff=record["max_abs_diff"], max_rel_diff=record["max_rel_diff"],
                             nodes_before=record["nodes_before"], nodes_after=len(model.graph.node),
                             fallbacks=tuple(record.get("fallbacks", [])), source_sha256=record.get("source_sha256"))
    original_nodes = len(model.graph.node)
    model, moved = in_topological_order(model)
    ordered = [f"{moved} nodes put in topological order (the file lists them after operators that read them)"
               ] if moved else []
    ordered += _kept_defaults(model)
    model, unzipped = _unzipped(model)
    model, dequantized, fallbacks = _dequantized(model, shapes, checks, seed, sample)
    dequantized, fallbacks = [*unzipped, *dequantized], [*unzipped, *fallbacks]
    reference = reference_outputs(model, shapes, checks=checks, seed=seed, sample=sample)
    notes: list[str] = []
    recurrent = any(n.op_type in RECURRENT_OP_TYPES for n in model.graph.node)
    for level in _LEVELS:
        if level == "no recurrent forms" and not recurrent:  # (the same model as full's)
            continue
        try:
            prepared, steps, skipped = prepare(model, shapes, simplify_model=simplify, level=level,
                                               output_shapes=reference.output_shapes, sample=sample)
            worst_abs, worst_rel = check_equivalent(reference, prepared)
            break
        except InputShapeError:
            raise
        except Exception as e:  # noqa: BLE001  (onnx raises many types on content it cannot take)
            reason = e.problem if isinstance(e, MaptoolsError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            if level == _LEVELS[-1]:
                raise ModelError(f"preparing {src} failed: {reason}",
                                 "check the model with onnxruntime; report it to the maptools maintainers if it "
                                 "runs there.") from e
            notes.append(f"preparation ({level}) gave a model that failed the check against the original ({reason}); "
                         "prepared again with fewer rewrites")
            log.warning("%s", notes[-1])
    steps, fallbacks = [*ordered, *dequantized, *notes, *steps], [*fallbacks, *notes, *skipped]
    _check_strict(strict, fallbacks, src)
    record = {"input_shapes": {k: list(v) for k, v in shapes.items()}, "simplify": simplify, "code": fingerprint(),
              "source_opset": opset_of(model), "steps": list(steps), "max_abs_diff": worst_abs,
              "max_rel_diff": worst_rel, "nodes_before": original_nodes, "fallbacks": fallbacks,
              "source_sha256": source_sha256 or sha256_file(src)}
    onnx.helper.set_model_props(prepared, {**{p.key: p.value for p in prepared.metadata_props
                                              if p.key != PREPARED_KEY}, PREPARED_KEY: json.dumps(record)})
    atomic_write(dst, prepared.SerializeToString())
    return PreparedModel(path=dst, sha256=sha256_file(dst), input_shapes=record["input_shapes"],
                         source_opset=opset_of(model), opset=opset_of(prepared), steps=tuple(steps),
                         max_abs_diff=worst_abs, max_rel_diff=worst_rel, nodes_before=original_nodes,
                         nodes_after=len(prepared.graph.node), fallbacks=tuple(fallbacks),
                         source_sha256=record["source_sha256"])


#: How far a dequantized model, its quantizers kept, may be from the quantized original (rel. L2 on the check
#: inputs): it computes what the integer operators did, up to their rounding; farther, a rewrite went wrong.
DEQUANTIZED_TOLERANCE = 0.5
#: The same for a recurrent model: a DynamicQuantizeLSTM's float LSTM leaves out its run-time quantizers, whose
#: noise its time steps amplify on random inputs (a speaker embedder's 3 LSTMs over 80 frames: 0.8% apart at the
#: first step, 61% at the output); a wrong rewrite leaves the outputs uncorrelated (about 140%).
DEQUANTIZED_TOLERANCE_RECURRENT = 1.0


#: How the step of a quantized model rewritten as float (:func:`_dequantized`) begins.
DEQUANTIZED = "the model is quantized: rewritten as float"


def _dequantized(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], checks: int, seed: int,
                 sample: Mapping[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A model an integer quantizer wrote (:data:`QUANTIZED_OP_TYPES`) as its float equivalent
    (:func:`dequantize`), which the steps say with its distance from the original; as it is where that fails (a
    fallback: its quantized operators then stay on the host).

    The rewrite is checked with its quantizers kept: without them the float model does not clip where the
    quantized one does, and random inputs over a quantizer's range (wider than what it was calibrated on) clip
    at every activation quantizer (a squeezenet quantized on N(0, 1) data: 54.6% apart, the rewrite 0.5%)."""
    if not any(n.op_type in QUANTIZED_OP_TYPES for n in model.graph.node):
        return model, [], []
    try:
        floated, done = dequantize(model)
        if not done:
            return model, [], []
        rounded, _ = dequantize(model, keep_quantizers=True)
        recurrent = any(n.op_type in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM") for n in model.graph.node)
        tolerance = DEQUANTIZED_TOLERANCE_RECURRENT if recurrent else DEQUANTIZED_TOLERANCE
        ranges = input_ranges(model)  # random inputs over each input quantizer's range (byte values for bytes)
        where = " in its input quantizers' ranges" if ranges else ""
        original = reference_outputs(model, shapes, checks=checks, seed=seed, ranges=ranges, sample=sample).outputs
        error = rel_l2(reference_outputs(rounded, shapes, checks=checks, seed=seed, ranges=ranges,
                                         sample=sample).outputs, original)
        unrounded = rel_l2(reference_outputs(floated, shapes, checks=checks, seed=seed, ranges=ranges,
                                             sample=sample).outputs, original)
    except Exception as e:  # noqa: BLE001  (onnx and onnxruntime raise many types)
        reason = e.problem if isinstance(e, MaptoolsError) else f"{type(e).__name__}: {str(e).strip()[:200]}"
        skipped = f"the model is quantized; rewriting it as float skipped ({reason})"
        return model, [skipped], [skipped]
    if not error <= tolerance:
        skipped = (f"the model is quantized; rewriting it as float skipped (with its quantizers kept, its outputs "
                   f"differ by {error:.1%} rel. L2 on random inputs{where})")
        return model, [skipped], [skipped]
    what = ", ".join(f"{count} {op}" for op, count in done.items())
    return floated, [f"{DEQUANTIZED} ({what}); with its quantizers kept, its outputs "
                     f"{error:.2%} (rel. L2) from the quantized model's on random inputs{where}, without them "
                     f"{unrounded:.2%}"], []


def _unzipped(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """skl2onnx's classifiers end in a ZipMap (``ai.onnx.ml``) by default: its output, a sequence of ``{class:
    probability}`` maps that no stage carries, is given as the tensor of probabilities it maps, under its name
    (a copy of ``model``, and the step saying so; ``strict`` refuses it)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    zipped = [o.name for o in model.graph.output if o.type.WhichOneof("value") == "sequence_type"
              and (node := producers.get(o.name)) is not None and node.op_type == "ZipMap"]
    if not zipped:
        return model, []
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        if node.op_type == "ZipMap" and node.output[0] in zipped:
            copy.graph.node[index].CopyFrom(onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                                                  name=node.name))
    for output in copy.graph.output:
        if output.name in zipped:
            output.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None))
    names = ", ".join(repr(n) for n in zipped)
    return copy, [f"output {names} is the tensor of class probabilities its ZipMap turned into a sequence of maps, "
                  "which no stage carries (skl2onnx: options={id(model): {'zipmap': False}} exports it so)"]


def _kept_defaults(model: onnx.ModelProto) -> list[str]:
    """A step naming the overridable scalars left at their defaults (:func:`with_inputs` makes one an input): flags
    and rates, not weights (torch's ``keep_initializers_as_inputs`` and IR-3 files list every initializer)."""
    values = {i.name: i for i in model.graph.initializer}
    kept = [(name, onnx.numpy_helper.to_array(values[name])) for name in overridable_initializers(model)
            if int(np.prod(values[name].dims)) == 1]
    if not kept:
        return []
    shown = ", ".join(f"{name!r} = {a.reshape(()).item()}" for name, a in kept[:4])
    step = (f"{len(kept)} initializer(s) a caller may feed instead (onnxruntime's overridable initializers) kept at "
            f"their defaults: {shown}{', ...' if len(kept) > 4 else ''}; to quantize the model as its package runs "
            "it (a training flag fed False), name it in input_shapes and feed it in the calibration samples")
    log.warning("%s", step)
    return [step]


def _check_strict(strict: bool, fallbacks: Sequence[str], src: Path) -> None:
    if strict and fallbacks:
        raise ModelError(f"preparing {src} left steps out: {'; '.join(fallbacks)}.",
                         "prepare without strict=True (--strict) to go on without them, or re-export the model with "
                         "opset 13.")
