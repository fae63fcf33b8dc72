"""The quantized graph maptools reads: maptools' settings as PPQ's, and :class:`QuantizedGraph`."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch

from maptools.errors import QuantizationFailed
from maptools.onnx_model import implicit_outer_inputs, one_copy_each
from maptools.opgraph import build_graph
from maptools.placement import CROSSBAR_OP_TYPES, Placement, Role
from maptools.quantinfo import QuantConfig, param_key
from maptools.requant import record_requant
from maptools.settings import Optimization, QuantSettings
from maptools.quantization.ppq_adapter.core import (QuantableOperation, QuantizationSettingFactory, QuantizationStates,
                                                    TargetPlatform, TorchExecutor, _APPLIED, graphwise_error_analyse)

from maptools.quantization.ppq_adapter.calibration import (_FAST_PERCENTILE, _Batches,
                                                           _no_gc_between_passes)
from maptools.quantization.ppq_adapter.export import (_canonical_names, _ExactExporter, _model_types,
                                                      _restore_domains)
from maptools.quantization.ppq_adapter.quantizer import _range_of, _scale_of
from maptools.quantization.ppq_adapter.steps import ppq_step, _quiet
from maptools.quantization.reference import FloatReference, fetch_name, fetch_weights, fetching_session
log = logging.getLogger(__name__)

def _setting(settings: QuantSettings, device: str) -> Any:
    setting = QuantizationSettingFactory.trt_setting()
    algorithm = settings.algorithm.value
    setting.quantize_activation_setting.calib_algorithm = _FAST_PERCENTILE if algorithm == "percentile" else algorithm
    # Without this, ResNet's stem output reaches layer1.0.conv1 unquantized (see docs/ppq notes).
    setting.fusion_setting.force_alignment_overlap = False
    optimization = settings.optimization
    if optimization is Optimization.BIAS_CORRECTION:
        setting.bias_correct = True
        setting.bias_correct_setting.block_size = 1  # PPQ's advice for the best result; one layer at a time
        setting.bias_correct_setting.steps = settings.calib_steps
    elif optimization is Optimization.EQUALIZATION:
        setting.equalization = True
    elif optimization is Optimization.LSQ:
        setting.lsq_optimization = True
        setting.lsq_optimization_setting.collecting_device = device
        setting.lsq_optimization_setting.steps = LSQ_STEPS
    return setting


#: Training steps of PPQ's learned-step-size pass per block (PPQ's default is 500).
LSQ_STEPS = 200

#: An operator output of fewer values a sample has its SNR pooled over the samples (noise power summed over signal
#: power summed): one sample's ratio of a single logit explodes wherever the float value nears zero.
POOLED_ROW = 8


def _bias_scale(cfg: QuantConfig, count: int) -> np.ndarray:
    """The scale of an operator's int32 bias codes, per output channel: its input scale x its weight scale."""
    scale = cfg.weight_scale.astype(np.float64)
    return cfg.input_scale * (scale if scale.size > 1 else np.full(count, scale[0]))


class QuantizedGraph:
    """A PPQ graph after quantization, seen through what maptools needs of it."""

    def __init__(self, graph: Any, device: str, settings: QuantSettings, placement: Placement, model: onnx.ModelProto,
                 model_bytes: bytes, batch: int = 1, reference: FloatReference | None = None) -> None:
        self._graph = graph
        self._model = model  # the prepared ONNX model the graph was loaded from
        self._model_bytes = model_bytes  # the same, serialized
        self._placement = placement
        self._device = device
        self._settings = settings
        self._executor: Any = None
        self._batch = batch  # samples per forward the graph is known to accept (see _batch_size)
        self._reference = reference  # the prepared model's float session, where quantize_graph had one
        self.equalization_pairs: int | None = None  # layer pairs optimization='equalization' rescaled

    @property
    def input_names(self) -> list[str]:
        return list(self._graph.inputs.keys())

    @property
    def output_names(self) -> list[str]:
        return list(self._graph.outputs.keys())

    def _quantized_ops(self) -> list[Any]:
        return [op for op in self._graph.topological_sort()
                if isinstance(op, QuantableOperation) and op.platform != TargetPlatform.FP32]

    def quantinfo(self) -> dict[str, QuantConfig]:
        """One :class:`QuantConfig` per device (quantized) operator, in topological order, with the
        requantization multipliers and shifts of each (:func:`maptools.requant.record_requant`)."""
        info: dict[str, QuantConfig] = {}
        broken = [op.name for op in self._quantized_ops()
                  if not all(math.isfinite(s) and s > 0 for cfg in [*op.input_quant_config, *op.output_quant_config]
                             for s in [_scale_of(cfg)] if s is not None)]
        if broken:
            raise QuantizationFailed(
                f"calibration gave {len(broken)} operator(s) no finite range ({', '.join(broken[:5])}"
                f"{' ...' if len(broken) > 5 else ''}): the samples drive them to NaN or infinity (random samples "
                "reach values a model never sees, a Log of a negative); pass real samples as calibset",
                "pass real samples as calibset (calib= in the flow, --calib on the command line).",
                operator=broken[0], also=tuple(broken[1:]))
        for op in self._quantized_ops():
            acts = [(cfg, var) for cfg, var in zip(op.input_quant_config, op.inputs) if var.name and not var.is_parameter]
            outs = op.output_quant_config
            first = acts[0][0] if acts else outs[0]
            weight: dict[str, Any] = {}
            if op.type in CROSSBAR_OP_TYPES and op.inputs[1].is_parameter:
                wcfg = op.input_quant_config[1]
                weight = dict(
                    weight_bits=int(wcfg.num_of_bits), weight_min=int(wcfg.quant_min), weight_max=int(wcfg.quant_max),
                    weight_scale=wcfg.scale.detach().cpu().reshape(-1).numpy().astype(np.float32),
                )
            input_scales = tuple(_scale_of(cfg) for cfg, _ in acts)
            lo, hi = _range_of(first)
            info[op.name] = QuantConfig(
                op_type=op.type, io_bits=int(first.num_of_bits), io_min=lo, io_max=hi,
                input_scale=input_scales[0] if input_scales else None,
                output_scale=_scale_of(outs[0]) if outs else None, input_scales=input_scales,
                output_range=_range_of(outs[0]) if outs else None,
                input_ranges=tuple(_range_of(cfg) for cfg, _ in acts), **weight,
            )
        return record_requant(build_graph(self._model), info, self._settings.multiplier_bits)

    def unquantized_conv_inputs(self) -> list[str]:
        """Names of crossbar operators whose input does not arrive on a quantization grid."""

        def on_grid(var: Any, consumer_cfg: Any) -> bool:
            if consumer_cfg is not None and consumer_cfg.state in _APPLIED:
                return True
            src = var.source_op
            if src is None or not isinstance(src, QuantableOperation):
                return False
            if src.output_quant_config[src.outputs.index(var)].state in _APPLIED:
                return True
            role = self._placement.roles.get(src.name)
            if role is Role.MOVE or src.type == "Relu":
                return on_grid(src.inputs[0], src.input_quant_config[0])
            if role is Role.CONCAT:  # its inputs are quantized onto one grid
                return all(on_grid(v, c) for v, c in zip(src.inputs, src.input_quant_config))
            return False

        return [op.name for op in self._quantized_ops()
                if op.type in CROSSBAR_OP_TYPES and not on_grid(op.inputs[0], op.input_quant_config[0])]

    def quantparams(self, quantinfo: Mapping[str, QuantConfig]) -> dict[str, np.ndarray | None]:
        """Integer weights (int8 storage) and int32 biases at scale input_scale x weight_scale."""
        params: dict[str, np.ndarray | None] = {}
        for op in self._quantized_ops():
            cfg = quantinfo.get(op.name)
            if cfg is None or not cfg.has_weights:
                continue
            wcfg = op.input_quant_config[1]  # per output channel: axis 0 (Conv), 1 (ConvTranspose, Gemm [in, out])
            weight = op.inputs[1].value.detach().to("cpu", torch.float64, copy=True).numpy()
            axis = wcfg.channel_axis if cfg.weight_scale.size > 1 else None
            scale = cfg.weight_scale.astype(np.float64)
            shape = [1] * weight.ndim
            if axis is not None:
                shape[axis] = -1
            # in place on the float64 copy: ResNet18's 11M weights in three passes, no temporaries to page in
            np.divide(weight, scale.reshape(shape), out=weight)
            np.clip(np.rint(weight, out=weight), cfg.weight_min, cfg.weight_max, out=weight)
            params[param_key(op.name, op.type, "weight")] = weight.astype(np.int8)
            bias = None
            if len(op.inputs) > 2 and op.inputs[2].value is not None:
                if cfg.input_scale is None:
                    raise QuantizationFailed(f"operator {op.name} has a float input, so its bias has no int32 scale.",
                                             "report this model to the maptools maintainers.")
                b = op.inputs[2].value.detach().cpu().double().numpy().reshape(-1)
                bias = np.clip(np.rint(b / _bias_scale(cfg, b.size)), -(2**31), 2**31 - 1).astype(np.int32)
            params[param_key(op.name, op.type, "bias")] = bias
        return params

    def _get_executor(self) -> Any:
        if self._executor is None:
            self._executor = TorchExecutor(graph=self._graph, device=self._device)
        return self._executor

    def run(self, inputs: Mapping[str, torch.Tensor], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run PPQ's simulation of the quantized graph; returns the named (default: graph) outputs."""
        names = output_names or self.output_names
        feed = {k: v.to(self._device) for k, v in inputs.items()}
        with torch.no_grad(), _quiet():
            outs = self._get_executor().forward(inputs=feed, output_names=names)
        return {n: o.detach().cpu().numpy() for n, o in zip(names, outs)}

    def qdq_model(self, quantinfo: Mapping[str, QuantConfig] | None = None,
                  quantparams: Mapping[str, np.ndarray | None] | None = None) -> bytes:
        """The QDQ model onnxruntime runs, exact at every width (see :class:`_ExactExporter`), serialized.

        With the map's ``quantinfo`` and ``quantparams`` (:meth:`quantparams`), each crossbar bias is written as
        the device adds it, its int32 code times input scale x weight scale (a float bias had put
        ``quant_model.onnx`` 0.03% from the integer simulation at 8 bits, 1.9% at 4); without, as PPQ's
        simulation adds it, in float.

        PPQ's exporter lists graph inputs and outputs in its own variable order (leaving out inputs no node
        reads) and names the tensors it adds from a process-wide counter; inputs and outputs are put back in
        the model's order and added tensors renamed in order of use, so the same quantization gives the same
        bytes. A weight PPQ copied for each operator reading it is written once (:func:`one_copy_each`).
        """
        written = io.BytesIO()  # PPQ's exporter onnx.save()s to it: no file written and read back
        graph = self._graph.copy()  # (new variables, the same tensors: a bias replaced here stays in the copy)
        for op in self._quantized_ops() if quantinfo is not None and quantparams is not None else ():
            cfg = quantinfo.get(op.name)
            has_bias = cfg is not None and cfg.has_weights
            codes = quantparams.get(param_key(op.name, op.type, "bias")) if has_bias else None
            if codes is not None:
                bias = graph.operations[op.name].inputs[2]
                bias.value = torch.as_tensor(codes * _bias_scale(cfg, codes.size),
                                             dtype=bias.value.dtype, device=bias.value.device).reshape(bias.value.shape)
        with _quiet(), ppq_step("exporting the QDQ model"):
            _ExactExporter().export(file_path=written, config_path=None, graph=graph, quantized_param=False)
        exported = onnx.ModelProto.FromString(written.getbuffer())
        # an input no node reads (paddle2onnx's sequence lengths) is not a PPQ variable: it is put back, so
        # quant_model.onnx takes the same feeds as the model
        present = {v.name for v in exported.graph.input}
        initializers = {i.name for i in self._model.graph.initializer}
        inputs = [v for v in self._model.graph.input if v.name not in initializers]
        exported.graph.input.extend(v for v in inputs if v.name not in present)
        for field_name, names in (("input", [v.name for v in inputs]), ("output", self.output_names)):
            rank = {name: i for i, name in enumerate(names)}
            values = getattr(exported.graph, field_name)
            ordered = [onnx.ValueInfoProto.FromString(v.SerializeToString())
                       for v in sorted(values, key=lambda v: rank.get(v.name, len(rank)))]
            del values[:]
            values.extend(ordered)
        _canonical_names(exported)
        _model_types(exported, self._model)
        _restore_domains(exported, self._model)
        implicit_outer_inputs(exported)
        one_copy_each(exported)
        return exported.SerializeToString()

    def error_report(self, samples: Iterable[Mapping[str, torch.Tensor]], steps: int = 8,
                     qdq: bytes | None = None) -> dict[str, float]:
        """PPQ's graphwise SNR (noise power / signal power, lower is better) per computing operator, to 4
        significant digits: at each operator's output, over 4096 seeded positions per sample, averaged over samples.

        On the CPU, with ``qdq`` (the exported QDQ model), onnxruntime runs that model against the float
        model (:meth:`_ort_error_report`), where an output of fewer than :data:`POOLED_ROW` values a sample (a
        classifier's single logit) has its noise and signal powers summed over the samples before the ratio;
        otherwise PPQ runs its graph twice, dequantized and quantized.
        Empty where no computing operator is on the device (a model kept on the host whole).
        """
        if not any(isinstance(op, QuantableOperation) and op.is_computing_op for op in self._graph.operations.values()):
            return {}
        report = self._ort_error_report(samples, steps, qdq) if qdq is not None and self._device == "cpu" else None
        if report is None:
            # PPQ's SNR is per sample, averaged over samples: batching the samples does not change it.
            data = list(_Batches(samples, steps, self._batch))
            with _quiet(), _no_gc_between_passes(), ppq_step("measuring the per-layer error"):
                report = graphwise_error_analyse(
                    self._graph, running_device=self._device, dataloader=data,
                    collate_fn=lambda b: {k: v.to(self._device) for k, v in b.items()},
                    method="snr", steps=len(data), verbose=False,
                )
        # 4 significant digits: the last bits of a float SNR depend on the thread count (PPQ returns None
        # for a graph without a computing operator on the device)
        return {name: float(f"{float(v):.4g}") for name, v in (report or {}).items()}

    def _ort_error_report(self, samples: Iterable[Mapping[str, torch.Tensor]], steps: int,
                          qdq: bytes) -> dict[str, float] | None:
        """The graphwise SNR with both forwards in onnxruntime: the QDQ model (what ``quant_model.onnx``
        computes) against the prepared float model, only the fetched positions leaving onnxruntime.

        The float reference is the prepared model's own weights (PPQ's is its graph dequantized, which
        after ``bias-correction`` or ``lsq`` holds the optimized float weights). None where an operator's
        output is not a tensor of both models with a static shape: PPQ's analysis runs instead.
        """
        ops = [op for op in self._graph.operations.values() if isinstance(op, QuantableOperation) and op.is_computing_op]
        quantized = onnx.ModelProto.FromString(qdq)
        del quantized.graph.initializer[:]  # only its nodes are read here (the session loads ``qdq``)
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in quantized.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        nodes = {node.name: node for node in quantized.graph.node}
        real: dict[str, int] = {}
        pred: dict[str, int] = {}
        for op in ops:
            var, shape = op.outputs[0], op.outputs[0].shape
            if not shape or not all(isinstance(d, int) for d in shape):
                return None
            numel = math.prod(shape[1:]) if len(shape) > 1 else 1
            real[var.name] = numel
            if op.name not in nodes:
                return None
            seen = nodes[op.name].output[0]  # the exporter renames an output it quantizes
            # PPQ measures the output after the operator's own quantization, if it has one
            if QuantizationStates.is_activated(op.output_quant_config[0].state):
                for op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
                    after = consumers.get(seen, [])
                    if len(after) != 1 or after[0].op_type != op_type:
                        if op_type == "Clip":
                            break
                        return None
                    seen = after[0].output[0]
            pred[seen] = numel
        with ppq_step("measuring the per-layer error"):
            feeds = [{k: v.detach().cpu().numpy() for k, v in sample.items()}
                     for _, sample in zip(range(steps), samples)]
            # one sample per run, in the models' own input shapes (PPQ's SNR is per sample, averaged);
            # one model after the other: alternating them per sample evicts each one's weights from the
            # caches (ResNet18, 8 samples: 0.84 s in onnxruntime runs against 0.56 s)
            def fetch(model: onnx.ModelProto, data: bytes, tensors: dict[str, int], what: str) -> list | None:
                session = fetching_session(data, {t for n in model.graph.node for t in n.output}, tensors, what)
                names = [fetch_name(t) for t in tensors]
                return None if session is None else [session.run(names, feed) for feed in feeds]

            sizes = list(real.values())
            weights = [fetch_weights(numel) for numel in sizes]
            real = (None if self._reference is None else self._reference.fetch(real, feeds)) or \
                fetch(self._model, self._model_bytes, real, "the float model")
            pred = None if real is None else fetch(quantized, qdq, pred, "the QDQ model")
            if pred is None:
                return None
            total, rows = np.zeros(len(ops)), np.zeros(len(ops))
            noise, signal = np.zeros(len(ops)), np.zeros(len(ops))  # (pooled, for rows under POOLED_ROW values)
            for real_rows, pred_rows in zip(real, pred):
                for i, (y, x) in enumerate(zip(real_rows, pred_rows)):
                    # a row is the first axis: a sample, or a token where PPQ flattened a MatMul into a Gemm;
                    # a row of fewer than 4096 elements comes whole, each position weighted by its fetches
                    y, x, w = y.astype(np.float64), x.astype(np.float64), 1.0 if weights[i] is None else weights[i]
                    row_noise, row_signal = (((x - y) ** 2) * w).sum(axis=1), ((y ** 2) * w).sum(axis=1)
                    total[i] += (row_noise / (row_signal + 1e-7)).sum()
                    noise[i] += row_noise.sum()
                    signal[i] += row_signal.sum()
                    rows[i] += y.shape[0]
        return {op.name: float(noise[i] / (signal[i] + 1e-7) if numel < POOLED_ROW else total[i] / max(rows[i], 1))
                for i, (op, numel) in enumerate(zip(ops, sizes))}

    def tensor_values(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Every operator output as it leaves its operator, keyed by tensor name.

        That is after the operator's own output quantization and before any consumer's input
        quantization (``run(output_names=...)`` returns the last consumer's quantized input instead).
        """
        from ppq.executor.base import RuntimeHook

        captured: dict[str, np.ndarray] = {}

        class _Capture(RuntimeHook):
            def post_forward_hook(self, outputs: list, **kwargs: Any) -> list:
                for var, value in zip(self._hook_to.outputs, outputs):
                    if var.name and isinstance(value, torch.Tensor):
                        captured[var.name] = value.detach().cpu().numpy()
                return outputs

        hooks = {op.name: _Capture(op) for op in self._graph.operations.values()}
        feed = {k: v.to(self._device) for k, v in inputs.items()}
        with torch.no_grad(), _quiet():
            self._get_executor().forward(inputs=feed, hooks=hooks)
        return captured
