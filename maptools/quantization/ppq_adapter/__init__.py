"""maptools' adapter around PPQ 0.6.6, the one home of ``import ppq``, split by concern:

* :mod:`.core`: the shims that let PPQ import on a current stack, and the ppq imports;
* :mod:`.kernels`: operators run in onnxruntime where PPQ's kernels fall short;
* :mod:`.quantizer`: the quantizer, its configs and the passes of the crossbar contract;
* :mod:`.calibration`: batching, observers and statistics;
* :mod:`.graph`: :class:`QuantizedGraph`, what the rest of maptools reads;
* :mod:`.export`: the exact ``quant_model.onnx``;
* here: loading a model into PPQ, the float check, fast bias correction and :func:`quantize_graph`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch

from maptools.errors import ModelError, QuantizationFailed, SettingsError
from maptools.node_runner import NodeRunner
from maptools.onnx_model import OUTER_INPUTS, explicit_outer_inputs, node_attr, opsets
from maptools.placement import CROSSBAR_OP_TYPES, DEVICE, Role, nonnegative_tensors, place
from maptools.prepare.base import TARGET_OPSET
from maptools.settings import FBC_SAMPLES, Optimization, QuantSettings
from maptools.quantization.ppq_adapter.core import (GraphCommand, GraphCommandType, GraphFormatter, NetworkFramework,
                                                    QuantableOperation, TargetPlatform, TorchExecutor, _APPLIED,
                                                    load_graph)

from maptools.quantization.ppq_adapter.calibration import (_Batches, _batch_size, _doubled_batch_shapes, _float_shapes,
                                                           _no_gc_between_passes)
from maptools.quantization.ppq_adapter.export import _check_zero_offsets
from maptools.quantization.ppq_adapter.graph import QuantizedGraph, _setting
from maptools.quantization.ppq_adapter.kernels import _probe, _register
from maptools.quantization.ppq_adapter.quantizer import _MaptoolsQuantizer
from maptools.quantization.ppq_adapter.steps import ppq_step, _quiet
from maptools.quantization.reference import FloatReference
log = logging.getLogger(__name__)

__all__ = ["QuantizedGraph", "quantize_graph", "correct_biases", "restore_biases", "ppq_version", "load_ppq_graph",
           "ppq_step", "TargetPlatform", "TorchExecutor"]


def load_ppq_graph(model_path: Path, model: onnx.ModelProto) -> Any:
    """PPQ's graph of a prepared model, operator for operator.

    PPQ's own loader also fuses BatchNorm and bias Adds and drops Identity nodes inside its graph;
    ``maptools.prepare`` does that in the ONNX model instead, so only the format conversions run
    here and every PPQ operation is an ONNX node of the same name (quantinfo, the operator graph
    and the simulation key on it).
    """
    model = explicit_outer_inputs(model)  # PPQ follows edges: a subgraph's outer reads become inputs
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="maptools-load-") as scratch:
            if any(node_attr(n, OUTER_INPUTS) is not None for n in model.graph.node):
                model_path = Path(scratch) / model_path.name
                onnx.save(model, str(model_path))
            graph = load_graph(str(model_path), from_framework=NetworkFramework.ONNX)
            for op in graph.operations.values():  # PPQ's sockets stop at opset 13; a model left at a later
                op.opset.version = min(op.opset.version, TARGET_OPSET)  # one runs its nodes at that in onnxruntime
            formatter = GraphFormatter(graph)
            for command in (GraphCommandType.CONVERT_TO_TENSOR, GraphCommandType.FORMAT_PARAMETERS,
                            GraphCommandType.FORMAT_CAST, GraphCommandType.FORMAT_SLICE, GraphCommandType.FORMAT_CLIP,
                            GraphCommandType.FORMAT_PAD, GraphCommandType.FORMAT_RESIZE):
                formatter(GraphCommand(command))
    except Exception as e:  # ppq raises bare exceptions for unsupported content
        raise ModelError(f"PPQ cannot parse {model_path}: {type(e).__name__}: {str(e)[:300]}",
                         "prepare the model with maptools.prepare.prepare_model (quantize does it by default).") from e
    nodes = {n.name: n for n in model.graph.node}
    missing = sorted(set(nodes) ^ set(graph.operations))
    if missing:
        raise QuantizationFailed(f"PPQ's graph and the model disagree on operators: {', '.join(missing[:10])}.",
                                 "quantize the model through maptools.quantize, which prepares it first.")
    _register({op.type for op in graph.operations.values()})
    constants = {i.name: i for i in model.graph.initializer}
    for name, op in graph.operations.items():
        node = nodes[name]
        held = () if op.type in CROSSBAR_OP_TYPES else node.input  # a crossbar operator's weights: PPQ's, quantized
        op._maptools_runner = NodeRunner(node, opsets(model), {t: onnx.numpy_helper.to_array(constants[t])
                                                               for t in held if t in constants}, model.functions)
    return graph


def _agrees(out: np.ndarray, ref: np.ndarray, tolerance: float) -> bool:
    """``out`` within ``tolerance`` of ``ref``'s largest finite magnitude, infinities and NaNs where ``ref`` has
    them (an attention mask's -inf)."""
    finite = np.isfinite(ref)
    peak = float(np.abs(ref[finite]).max(initial=0.0))
    same = (out == ref) | (np.isnan(out) & np.isnan(ref))
    with np.errstate(invalid="ignore"):
        close = np.abs(out - ref) <= tolerance * peak + 1e-3 * np.abs(ref) + 1e-6
    return bool(np.all(same | (close & finite)))


#: Bytes of one sample's tensors the kernel check takes from onnxruntime at a time: a model whose tensors take more
#: (torchvision's mvit_v2_s at 16x224x224: 10.9 GiB) is checked a group of operators at a time.
CHECK_BYTES = 1 << 29


def _tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of one float32 sample of each tensor with a static shape in ``model``'s value_info and outputs."""
    return {vi.name: 4 * math.prod(d.dim_value for d in vi.type.tensor_type.shape.dim)
            for vi in [*model.graph.value_info, *model.graph.output]}


def _grouped(ops: list[Any], tensors: Callable[[list[Any]], list[str]], size: Mapping[str, int],
             budget: int) -> list[list[Any]]:
    """``ops`` in order, in consecutive groups whose ``tensors`` take at most ``budget`` bytes (one op at least)."""
    groups: list[list[Any]] = [[]]
    for op in ops:
        if groups[-1] and sum(size.get(t, 0) for t in tensors([*groups[-1], op])) > budget:
            groups.append([])
        groups[-1].append(op)
    return groups


def _float_check(executor: Any, graph: Any, model: onnx.ModelProto, model_bytes: bytes,
                 feed: Mapping[str, torch.Tensor], device: str) -> list[str]:
    """Switch to onnxruntime every operator whose PPQ kernel computes something else than ONNX.

    onnxruntime runs the model on one sample with every tensor as an output (a group of operators' tensors
    at a time, one session each, where they take over :data:`CHECK_BYTES`); PPQ's float graph then
    runs with each operator fed those reference values (not its own upstream results, so an
    operator that amplifies tiny differences, a rounding or a dynamic quantization, is judged on
    its own) and its outputs are compared with the reference. Returns the names of the switched
    operators; one that still differs in onnxruntime is left there (it computes ONNX's semantics).
    """
    from ppq.executor.base import RuntimeHook

    names = {n for n, v in graph.variables.items() if n and not v.is_parameter and v.source_op is not None}
    sample = {k: v.detach().cpu().numpy() for k, v in feed.items()}
    order = graph.topological_sort()

    def tensors(ops: list[Any]) -> list[str]:
        return list(dict.fromkeys(v.name for op in ops for v in [*op.inputs, *op.outputs] if v.name in names))

    groups = _grouped(order, tensors, _tensor_bytes(model), CHECK_BYTES)
    # a session holds every tensor it may return (onnxruntime does not reuse an output's buffer): one per group
    first = FloatReference.build(model, model_bytes, tensors=tensors(groups[0]), fetch=False)
    if first is None:
        log.warning("onnxruntime cannot load the prepared model with its intermediate tensors as outputs; PPQ's "
                    "kernels are not checked against it")
        return []
    # CUDA convolutions and matrix products run in TF32 by default (10-bit mantissas): a kernel that
    # computes something else than ONNX differs by far more than that
    tolerance = 1e-2 if str(device).startswith("cuda") else 1e-4

    class _Substitute(RuntimeHook):
        def __init__(self, op: Any, values: dict[str, np.ndarray], bad: set[str]) -> None:
            super().__init__(op)
            self._values, self._bad = values, bad

        def pre_forward_hook(self, inputs: list, **kwargs: Any) -> list:
            return [torch.from_numpy(np.array(self._values[var.name])).to(device) if var.name in self._values
                    else value for var, value in zip(self._hook_to.inputs, inputs)]

        def post_forward_hook(self, outputs: list, **kwargs: Any) -> list:
            for var, value in zip(self._hook_to.outputs, outputs):  # compared here: no output is held
                ref = self._values.get(var.name)
                if ref is None or not isinstance(value, torch.Tensor) or not np.issubdtype(ref.dtype, np.floating):
                    continue
                out = value.detach().cpu().numpy()
                if ref.shape != out.shape or not _agrees(out, ref, tolerance):
                    self._bad.add(self._hook_to.name)
            return outputs

    def differing() -> list[Any]:
        bad: set[str] = set()
        for index, group in enumerate(groups):
            reference = first if index == 0 else FloatReference.build(
                model, model_bytes, tensors=tensors(group), fetch=False)
            if reference is None:
                continue  # (onnxruntime loaded the first group's session: it would load this one)
            wanted = [t for t in tensors(group) if t in reference.tensors]
            values = dict(zip(wanted, reference.run(wanted, sample)))
            with torch.no_grad(), _quiet():
                executor.forward(inputs=dict(feed), hooks={op.name: _Substitute(op, values, bad) for op in group})
            del values, reference
        return [op for op in order if op.name in bad]

    switched = [op for op in differing() if not getattr(op, "_maptools_ort", False)]
    for op in switched:
        op._maptools_ort = True
    if switched:
        still = [f"{op.name} ({op.type})" for op in differing() if op in switched]
        if still:
            log.info("onnxruntime's own result differs between runs at %s (given the same inputs)", ", ".join(still))
    return [op.name for op in switched]


#: A layer's bias is left as it is where the correction would move some element of it by this many times itself
#: (or where an element is zero): NNCF's threshold.
FBC_THRESHOLD = 2.0
#: Bytes of one sample's layer tensors (inputs and outputs) one float run of the correction returns: a model whose
#: layers' take more (a 1024x1024 U-Net's, 2.3 GB a sample) is corrected a group of layers at a time.
FBC_BYTES = 1 << 29


def correct_biases(quantized: QuantizedGraph, calibration: Iterable[Mapping[str, torch.Tensor]], steps: int
                   ) -> dict[str, torch.Tensor]:
    """The fast bias correction on ``quantized``, in place; the biases it replaced, by operator (see
    :func:`restore_biases`)."""
    return _fast_bias_correction(quantized._graph, quantized._model, quantized._model_bytes, calibration, steps)


def restore_biases(quantized: QuantizedGraph, previous: Mapping[str, torch.Tensor]) -> None:
    """Undo :func:`correct_biases`: each operator's bias as it was."""
    for name, bias in previous.items():
        quantized._graph.operations[name].inputs[2].value = bias


def _fast_bias_correction(graph: Any, model: onnx.ModelProto, model_bytes: bytes,
                          calibration: Iterable[Mapping[str, torch.Tensor]], steps: int) -> dict[str, torch.Tensor]:
    """NNCF's fast bias correction on the crossbar layers: each layer, run quantized (its input on its input
    grid, its baked weights) on the float model's input to it, shifts its output's mean per channel from the
    float output's; that shift, averaged over the samples, is added to its bias unless it would move an
    element by :data:`FBC_THRESHOLD` times itself (heads reading a clipped input moved by 5x). One float
    forward per sample (per group of layers whose tensors take :data:`FBC_BYTES`), each layer judged on its own
    (no layer-by-layer passes). NNCF runs each layer on the mean input instead; measured on three real models,
    that corrected less well."""
    layers = [op for op in graph.topological_sort() if isinstance(op, QuantableOperation)
              and op.type in CROSSBAR_OP_TYPES and op.platform != TargetPlatform.FP32 and len(op.inputs) > 2
              and op.inputs[2].value is not None and not (op.type == "Gemm" and op.attributes.get("transA"))
              # an input on its producer's grid (PPQ's OVERLAPPED) counts as its producer's
              and op.config.input_quantization_config[0].dominated_by.state in _APPLIED]
    if not layers:
        return {}
    inputs = {i.name for i in model.graph.input}

    def tensors(ops: list[Any]) -> list[str]:
        return list(dict.fromkeys(t for op in ops for t in (op.inputs[0].name, op.outputs[0].name) if t not in inputs))

    groups = _grouped(layers, tensors, _tensor_bytes(model), FBC_BYTES)
    feeds: Iterable[dict[str, np.ndarray]] = ({k: v.detach().cpu().numpy() for k, v in sample.items()}
                                              for _, sample in zip(range(min(steps, FBC_SAMPLES)), calibration))
    if len(groups) > 1:  # (held for the groups after the first; one group streams them)
        feeds = list(feeds)
    shift: dict[str, np.ndarray] = {}
    count = 0
    for group in groups:  # one float session at a time, returning its layers' tensors
        wanted = tensors(group)
        reference = FloatReference.build(model, model_bytes, tensors=wanted, fetch=False)
        if reference is None or not set(wanted) <= reference.tensors:
            log.warning("no fast bias correction: onnxruntime cannot return the crossbar layers' tensors")
            return {}
        for count, feed in enumerate(feeds, 1):
            values = {**feed, **dict(zip(wanted, reference.run(wanted, feed)))}
            for op in group:
                cfg = op.config.input_quantization_config[0].dominated_by
                scale = float(cfg.scale.reshape(-1)[0])
                x = np.clip(np.rint(values[op.inputs[0].name] / scale), int(cfg.quant_min), int(cfg.quant_max)) * scale
                weight, bias = (v.value.detach().cpu().numpy() for v in op.inputs[1:3])
                quantized = op._maptools_runner.run([x.astype(np.float32), weight, bias])[0]
                axes = tuple(i for i in range(quantized.ndim) if i != 1)  # Conv/ConvTranspose [N, C, ...], Gemm [N, C]
                delta = (values[op.outputs[0].name].astype(np.float64) - quantized).mean(axis=axes)
                shift[op.name] = shift.get(op.name, 0.0) + delta
            del values
        del reference
    moved = {}  # every new bias first, then all at once: a failure leaves the graph as it was
    for op in layers:
        bias = op.inputs[2].value.detach().cpu().numpy()
        delta = shift[op.name] / count
        if np.any(bias == 0) or np.max(np.abs(delta.reshape(bias.shape) / bias)) >= FBC_THRESHOLD:
            log.debug("fast bias correction leaves %s: its bias would move by over %gx itself", op.name, FBC_THRESHOLD)
            continue
        moved[op] = op.inputs[2].value + torch.from_numpy(delta).to(op.inputs[2].value.dtype).to(
            op.inputs[2].value.device).reshape(op.inputs[2].value.shape)
    previous = {op.name: op.inputs[2].value for op in moved}
    for op, value in moved.items():
        op.inputs[2].value = value
    return previous


def quantize_graph(
    model_path: Path,
    calibration: Iterable[Mapping[str, torch.Tensor]],
    calib_steps: int,
    trace_inputs: Mapping[str, torch.Tensor],
    settings: QuantSettings,
    device: str,
    reference: FloatReference | None = None,
) -> QuantizedGraph:
    """Quantize a prepared ONNX model with PPQ; ``calibration`` must be re-iterable and have ``len()``.

    ``reference``: the model's float session for the error report
    (:class:`maptools.quantization.reference.FloatReference`), where the caller built one already.

    Raises MaptoolsError subclasses for bad input; CUDA faults (out of memory, launch failures)
    propagate unchanged so callers can retry them.
    """
    if len(settings.algorithm.candidates) > 1:
        raise ValueError(f"quantize_graph calibrates with one algorithm, not {settings.algorithm.value!r}: "
                         "maptools.quantization.quantize chooses among the candidates.")
    model_bytes = model_path.read_bytes()
    model = onnx.ModelProto.FromString(model_bytes)
    placement = place(model)
    graph = load_ppq_graph(model_path, model)
    for op in graph.operations.values():
        op.platform = TargetPlatform.TRT_INT8 if placement.part(op.name) == DEVICE else TargetPlatform.FP32
    unknown = [name for name, _, _ in settings.layer_bits if placement.roles.get(name) is not Role.CROSSBAR]
    if unknown:
        raise SettingsError(f"layer_bits names operators that are not crossbar layers on the device: "
                            f"{', '.join(unknown[:8])}.", "name Conv/ConvTranspose/Gemm nodes of the prepared model "
                            "(see quantinfo.json or 'maptools inspect').")
    unsigned = nonnegative_tensors(model, placement) if settings.unsigned_activations else frozenset()
    quantizer = _MaptoolsQuantizer(graph, settings, placement, unsigned,
                                   None if str(device).startswith("cuda") else model_bytes)
    quantizer._verbose = False
    with ppq_step("placing the graph's tensors"):
        executor = TorchExecutor(graph=quantizer._graph, device=device)
    dummy = {k: v.to(device) for k, v in trace_inputs.items()}
    # PPQ's parameter pass runs one forward on zeros, where a detector's data-dependent sizes (a TopK over the
    # scores above a threshold) fail: it runs on the tracing input instead
    executor.dummy_forward = lambda hooks=None: executor.forward(inputs=dummy, hooks=hooks)
    with _no_gc_between_passes():
        with ppq_step("tracing the model"), _quiet():
            _probe.active = True
            try:
                executor.tracing_operation_meta(inputs=dummy)
            finally:
                _probe.active = False
        with ppq_step("checking PPQ's float execution against onnxruntime"):
            switched = _float_check(executor, quantizer._graph, model, model_bytes, dummy, device)
        if switched:
            log.info("PPQ's kernels differ from ONNX for %s; those run in onnxruntime", ", ".join(switched))
        if quantizer._model is not None and not settings.optimization.in_ppq and \
                settings.algorithm.value in ("minmax", "percentile"):
            batch = 1  # onnxruntime computes the statistics, one sample per run (see Statistics)
        else:
            single = _float_shapes(quantizer._graph)
            with ppq_step("tracing a batch of two"), _quiet():
                doubled = _doubled_batch_shapes(executor, quantizer._graph, dummy) if calib_steps > 1 else None
            batch = _batch_size(single, doubled, calib_steps, device)
        # kl's and mse's histograms need every tensor out of onnxruntime, which costs about what PPQ's forward
        # does: worth it only where that forward takes one sample at a time (their min/max pass is reduced there)
        quantizer.tensors_out = batch == 1
        log.debug("calibrating %d samples in batches of %d", calib_steps, batch)
        torch.manual_seed(settings.seed)
        with ppq_step("calibrating"), _quiet():
            # quantize() traces `dummy` again (batch 1), so exported shapes are the model's own.
            quantizer.quantize(
                inputs=dummy, calib_dataloader=_Batches(calibration, calib_steps, batch), executor=executor,
                setting=_setting(settings, device), calib_steps=max(calib_steps, 8),
                collate_fn=lambda b: {k: v.to(device) for k, v in b.items()},
            )
    _check_zero_offsets(quantizer._graph)
    result = QuantizedGraph(quantizer._graph, device, settings, placement, model, model_bytes, batch=batch,
                            reference=reference)
    result._executor = executor
    result.equalization_pairs = quantizer.equalization_pairs
    if settings.optimization is Optimization.FAST_BIAS_CORRECTION:
        with ppq_step("correcting biases"):
            correct_biases(result, calibration, calib_steps)
    return result
