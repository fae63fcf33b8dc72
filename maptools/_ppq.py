"""The only module that imports ppq.

PPQ 0.6.6 (2023, the last release) imports ``onnx.mapping`` (removed in onnx 1.19) and a
caffe protobuf module generated for protobuf <= 3.20. Neither is used for ONNX quantization,
so before the first ``import ppq`` we register two stand-ins in ``sys.modules``:

* ``onnx.mapping`` with the two tables ppq reads (for Cast), built from ``onnx.helper``;
* ``ppq.parser.caffe.ppl_caffe_pb2`` whose attributes are dummy classes (Caffe I/O is never used).

This keeps the rest of the stack current (onnx 1.2x, protobuf 5+) instead of pinning 2023
versions. Everything PPQ-specific (graphs, configs, passes, exceptions) stays in here; the rest
of maptools sees :func:`quantize_graph` and the small :class:`QuantizedGraph` interface.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import sys
import tempfile
import threading
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch

from maptools.errors import DependencyError, MaptoolsError, ModelError, QuantizationFailed, SettingsError
from maptools.node_runner import NodeRunner
from maptools.onnx_model import OUTER_INPUTS, explicit_outer_inputs, implicit_outer_inputs, node_attr, opsets
from maptools.placement import (CROSSBAR_OP_TYPES, DEVICE, FUSABLE_ACTIVATIONS, Placement, Role, nonnegative_tensors,
                                 place)
from maptools.quantinfo import QuantConfig, param_key
from maptools.settings import Optimization, QuantSettings, ScalePolicy

log = logging.getLogger(__name__)

__all__ = ["QuantizedGraph", "quantize_graph", "ppq_version"]


def _install_shims() -> None:
    if "onnx.mapping" not in sys.modules:
        mapping = types.ModuleType("onnx.mapping")
        table: dict[int, np.dtype] = {}
        for code in onnx.TensorProto.DataType.values():
            try:
                table[code] = onnx.helper.tensor_dtype_to_np_dtype(code)
            except (KeyError, ValueError, TypeError):
                continue
        mapping.TENSOR_TYPE_TO_NP_TYPE = table  # type: ignore[attr-defined]
        mapping.NP_TYPE_TO_TENSOR_TYPE = {v: k for k, v in table.items()}  # type: ignore[attr-defined]
        sys.modules["onnx.mapping"] = mapping
        onnx.mapping = mapping  # type: ignore[attr-defined]

    class _CaffeStandIn(types.ModuleType):
        def __getattr__(self, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    sys.modules.setdefault("ppq.parser.caffe.ppl_caffe_pb2", _CaffeStandIn("ppq.parser.caffe.ppl_caffe_pb2"))


_install_shims()
with contextlib.redirect_stdout(io.StringIO()):  # ppq prints a banner on import
    import ppq
    from ppq import QuantableOperation, QuantizationSettingFactory, TargetPlatform, TorchExecutor
    from ppq.api import load_graph
    import ppq.core.defs as _ppq_defs
    from ppq.core import DataType, NetworkFramework, QuantizationPolicy, QuantizationProperty, QuantizationStates
    from ppq.executor.base import OPERATION_FORWARD_TABLE
    from ppq.IR import GraphCommand, GraphCommandType, GraphFormatter
    from ppq.parser.onnxruntime_exporter import ONNXRUNTIMExporter
    from ppq.quantization.analyse import graphwise_error_analyse
    from ppq.quantization.observer import OBSERVER_TABLE
    from ppq.quantization.observer.range import TorchMinMaxObserver, TorchPercentileObserver
    from ppq.quantization.optim import (ParameterBakingPass, ParameterQuantizePass, PassiveParameterQuantizePass,
                                        QuantAlignmentPass, QuantizationOptimizationPipeline, QuantizeFusionPass,
                                        RuntimeCalibrationPass)
    from ppq.quantization.optim.base import QuantizationOptimizationPass
    from ppq.quantization.quantizer import TensorRTQuantizer

#: The PPQ releases this adapter was written for (its shims, kernels and passes follow 0.6.6's internals).
PPQ_VERSIONS = ("0.6.",)
if not str(getattr(ppq, "__version__", "0.6.6")).startswith(PPQ_VERSIONS):
    raise DependencyError(f"ppq {ppq.__version__} is installed; maptools adapts ppq 0.6.6's internals.",
                          "pip install ppq==0.6.6 (the version pyproject.toml pins).")

_APPLIED = {QuantizationStates.ACTIVATED, QuantizationStates.PASSIVE, QuantizationStates.BAKED,
            QuantizationStates.PASSIVE_BAKED}


def ppq_version() -> str:
    return str(getattr(ppq, "__version__", "0.6.6"))


# --- operators: onnxruntime where PPQ has no kernel, or a kernel that differs from ONNX ------------

_probe = threading.local()  # .active: the first trace may switch a failing PPQ kernel to onnxruntime


def _to_numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _run_ort(op: Any, values: list[Any], ctx: Any) -> list[torch.Tensor | None]:
    """The operator's ONNX node in onnxruntime: activations (and a crossbar operator's quantized weights) as
    PPQ holds them; other constants are the model's, in the runner (PPQ's format passes rewrite some)."""
    runner: NodeRunner = op._maptools_runner
    device = next((v.device for v in values if isinstance(v, torch.Tensor)),
                  getattr(ctx, "executing_device", "cpu") if ctx is not None else "cpu")
    held = {var.name: value for var, value in zip(op.inputs, values)}
    results = iter(runner.run([_to_numpy(held.get(name)) for name in runner.inputs]))
    return [torch.from_numpy(np.array(next(results))).to(device) if name else None for name in runner.node.output]


def _prelu(op: Any, values: list[torch.Tensor], ctx: Any = None, **kwargs: Any) -> torch.Tensor:
    """ONNX PRelu with its broadcasting (PPQ calls F.prelu, which rejects ONNX's [C, 1, 1] slope)."""
    x, slope = values
    return torch.where(x >= 0, x, x * slope.to(x.dtype))


def _dispatcher(kernels: dict[str, Any]) -> Any:
    """A forward for one PPQ platform table: PPQ's kernel, or onnxruntime for the operator's ONNX node."""

    def forward(op: Any, values: list[Any], ctx: Any = None, **kwargs: Any) -> Any:
        kernel = kernels.get(op.type)
        has_node = getattr(op, "_maptools_runner", None) is not None
        if has_node and (kernel is None or getattr(op, "_maptools_ort", False)):
            return _run_ort(op, values, ctx)
        if kernel is None:
            raise NotImplementedError(f"PPQ has no kernel for {op.name} ({op.type}).")
        if not (has_node and getattr(_probe, "active", False)):
            return kernel(op, values, ctx, **kwargs)
        try:
            return kernel(op, values, ctx, **kwargs)
        except Exception as e:  # noqa: BLE001  (PPQ's kernel cannot take this node: use onnxruntime's)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            log.debug("PPQ's %s kernel failed on %s (%s); running it in onnxruntime", op.type, op.name, e)
            op._maptools_ort = True
            return _run_ort(op, values, ctx)

    return forward


_FORWARDS: dict[Any, Any] = {}  # platform -> the forward of every operator type on it
#: Operators always run in onnxruntime: PPQ's Gather and Slice kernels index tensors with a list of slices,
#: which torch deprecated (it will read them as one index array).
_ONNXRUNTIME_ONLY = frozenset({"Gather", "Slice"})


def _install_forwards() -> None:
    """Route every standard ONNX operator on the two platforms maptools uses through :func:`_dispatcher`."""
    import onnx.defs

    every = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")}
    for platform in (TargetPlatform.TRT_INT8, TargetPlatform.FP32):
        table = OPERATION_FORWARD_TABLE[platform]
        kernels = {k: v for k, v in table.items() if k not in _ONNXRUNTIME_ONLY}
        kernels["PRelu"] = _prelu
        forward = _FORWARDS[platform] = _dispatcher(kernels)
        for op_type in every | set(table):
            table[op_type] = forward


def _register(op_types: Iterable[str]) -> None:
    """Operators of other domains (``com.microsoft``, ...) run in onnxruntime through the same forward."""
    for platform, forward in _FORWARDS.items():
        for op_type in op_types:
            OPERATION_FORWARD_TABLE[platform].setdefault(op_type, forward)


_install_forwards()


class _MaptoolsQuantizer(TensorRTQuantizer):
    """TensorRT's symmetric scheme on maptools' placement, with our bit widths and per-channel choice.

    Device operators are quantized (every op type, not only PPQ's list); parameters of operators
    other than the crossbar ones (PRelu slopes, the constant of an Add) stay float, as do the
    tensors the placement keeps float (inside a gated activation, crossbar outputs read only by
    the host).
    """

    def __init__(self, graph: Any, settings: QuantSettings, placement: Placement, unsigned: frozenset[str],
                 model: bytes | None = None) -> None:
        super().__init__(graph=graph)
        self._model = model  # the graph's ONNX model, serialized: CPU calibration statistics are computed there
        self._settings = settings
        self._placement = placement
        self._unsigned = unsigned  # tensors quantized on [0, 2^b - 1]
        bits = settings.activation_bits
        self._num_of_bits, self._quant_min, self._quant_max = bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    @property
    def activation_fusion_types(self) -> set:
        return set(FUSABLE_ACTIVATIONS)

    def quantize_operation(self, op_name: str, platform: Any = None) -> Any:
        """PPQ's conversion to a QuantableOperation (a new object), keeping maptools' onnxruntime runner
        and the kernel choice of the float check on it."""
        before = self._graph.operations[op_name]
        after = super().quantize_operation(op_name, platform)
        for key in ("_maptools_runner", "_maptools_ort"):
            if hasattr(before, key):
                setattr(after, key, getattr(before, key))
        return after

    def init_quantize_config(self, operation: Any) -> Any:
        oqc = super().init_quantize_config(operation)
        crossbar = self._placement.roles.get(operation.name) is Role.CROSSBAR
        for cfg, var in zip(oqc.input_quantization_config, operation.inputs):
            if var.name in self._placement.float_outputs or not var.name or (var.is_parameter and not crossbar):
                cfg.state = QuantizationStates.FP32
        for cfg, var in zip(oqc.output_quantization_config, operation.outputs):
            if var.name in self._placement.float_outputs:
                cfg.state = QuantizationStates.FP32
        if crossbar:  # the width the layer reads its input at (its own grid when it differs from the producer's)
            bits = self._settings.bits_of(operation.name)[1]
            cfg = oqc.input_quantization_config[0]
            cfg.num_of_bits, cfg.quant_min, cfg.quant_max = bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        role = self._placement.roles.get(operation.name)
        acts = [v.name for v in operation.inputs if v.name and not v.is_parameter]
        # an adder or concatenation aligns its inputs on one grid: unsigned only when all of them are
        mixed = role in (Role.ADD, Role.CONCAT) and not all(a in self._unsigned for a in acts)
        for cfg, var in [*([] if mixed else zip(oqc.input_quantization_config, operation.inputs)),
                         *zip(oqc.output_quantization_config, operation.outputs)]:
            if var.name in self._unsigned and cfg.state != QuantizationStates.FP32:
                # zero offset: the observed minimum of a tensor that cannot be negative is clipped to 0
                cfg.policy = QuantizationPolicy(
                    QuantizationProperty.ASYMMETRICAL + QuantizationProperty.LINEAR + QuantizationProperty.PER_TENSOR)
                cfg.quant_min, cfg.quant_max = 0, 2 ** cfg.num_of_bits - 1
        if crossbar:
            cfg = oqc.input_quantization_config[1]
            bits = self._settings.bits_of(operation.name)[0]
            cfg.num_of_bits, cfg.quant_min, cfg.quant_max = bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            if operation.type == "Gemm" and not operation.attributes.get("transB", 0):
                cfg.channel_axis = 1  # weight is [in, out]: output channels on axis 1
            grouped_transpose = operation.type == "ConvTranspose" and operation.attributes.get("group", 1) != 1
            if not self._settings.per_channel or grouped_transpose:  # PPQ's axis 1 is out/group there
                cfg.channel_axis = None  # PPQ allows changing the axis only while the policy is per-channel
                cfg.policy = QuantizationPolicy(
                    QuantizationProperty.SYMMETRICAL + QuantizationProperty.LINEAR + QuantizationProperty.PER_TENSOR
                )
        if self._settings.scale_policy is ScalePolicy.POW2:  # PPQ's observers round such scales up to 2^k
            for cfg in [*oqc.input_quantization_config, *oqc.output_quantization_config]:
                if cfg.state != QuantizationStates.FP32:
                    cfg.policy = QuantizationPolicy(cfg.policy._policy | QuantizationProperty.POWER_OF_2)
        return oqc

    def build_quant_pipeline(self, setting: Any) -> Any:
        """PPQ's pipeline with maptools' fusion and alignment, and two changes that only make it faster.

        * Fusion: a crossbar operator's output goes straight to the grid of a Relu/Clip after it,
          and operators that move codes keep their input's grid (PPQ's own list misses Slice,
          Resize, GlobalMaxPool, DepthToSpace, and fuses non-linear activations like Sigmoid).
        * Alignment skips operators with a float constant operand (a lookup table, not an adder).
        * Clip bounds and Pad values stay float (see :class:`_PassiveParameters`).
        * Weights are baked right after they are quantized: PPQ would otherwise re-fake-quantize
          every weight on every calibration forward (baking stores exactly those values; the
          final baking pass then skips them).
        * Calibration reads the (batched) data once, however many batches there are.
        """
        passes: list[Any] = []
        for step in super().build_quant_pipeline(setting):
            if type(step) is RuntimeCalibrationPass:
                step = _OnePassCalibration(method=step._method, model=self._model)
            elif type(step) is QuantizeFusionPass:
                step = _Fusion(self._placement)
            elif type(step) is PassiveParameterQuantizePass:
                step = _PassiveParameters()
            elif type(step) is QuantAlignmentPass:
                step = _Alignment(self._placement, self._settings.shared_scales,
                                  elementwise_alignment=step.elementwise_alignment,
                                  concat_alignment=step.concat_alignment, pooling_alignment=step.pooling_alignment,
                                  resize_alignment=step.resize_alignment, force_overlap=step.force_overlap)
            passes.append(step)
            if isinstance(step, ParameterQuantizePass) and not self._settings.optimization.in_ppq:
                passes.append(ParameterBakingPass())  # the correction passes work on unbaked weights
        return QuantizationOptimizationPipeline(passes=passes)


#: Largest magnitude of an int32 bias code: the accumulator keeps 2^30 of headroom for the products.
BIAS_LIMIT = 2**30


class _PassiveParameters(PassiveParameterQuantizePass):
    """PPQ's pass, after fitting every crossbar bias into int32 (:func:`_fit_bias`), with Clip bounds and Pad
    values left float, as maptools keeps every constant of an operator other than the crossbar ones. PPQ
    would put a Clip's bounds on its input's grid in the bounds' own (signed) range: a ReLU6 with unsigned
    output then clips at 127 steps (2.0 instead of 6.0 at a step of 1/64), and a Clip whose input stays
    float (inside paddle2onnx's hard-swish ``x * Clip(x + 3, 0, 6)``) is refused."""

    def __init__(self) -> None:
        super().__init__(process_clip=False, process_pad=False)

    def optimize(self, graph: Any, **kwargs: Any) -> None:
        for op in graph.operations.values():
            if isinstance(op, QuantableOperation) and op.type in CROSSBAR_OP_TYPES:
                _fit_bias(op)
        super().optimize(graph, **kwargs)


def _fit_bias(op: Any) -> None:
    """Raise the weight scale of output channels whose bias would not fit an int32 code at
    ``input scale x weight scale`` (:data:`BIAS_LIMIT`): channels of (near-)zero weights beside a
    bias, common in trained models, get scales of 1e-8 and biases of 10^10 codes. Their weights,
    tiny against the new step, are quantized on it again."""
    if len(op.inputs) < 3 or op.inputs[2].value is None:
        return
    i_cfg, w_cfg = op.config.input_quantization_config[:2]
    s_in = _scale_of(i_cfg)
    if s_in is None or w_cfg.state not in _APPLIED or w_cfg.dominated_by is not w_cfg or \
            not isinstance(w_cfg.scale, torch.Tensor):
        return
    scale = w_cfg.scale
    bias = op.inputs[2].value.detach().reshape(-1).to(scale.device, torch.float64)
    need = bias.abs() / (s_in * BIAS_LIMIT)
    need = need if scale.numel() == need.numel() else need.max().reshape(scale.shape)
    fitted = torch.maximum(scale.double(), need.reshape(scale.shape)).to(scale.dtype)
    if torch.equal(fitted, scale):
        return
    if w_cfg.state in (QuantizationStates.BAKED, QuantizationStates.PASSIVE_BAKED):
        weight = op.inputs[1].value
        shape = [1] * weight.dim()
        if fitted.numel() > 1:
            shape[w_cfg.channel_axis] = -1
        step = fitted.reshape(shape).to(weight.dtype)
        op.inputs[1].value = torch.clamp(torch.round(weight / step), w_cfg.quant_min, w_cfg.quant_max) * step
    w_cfg._scale = fitted  # (PPQ's setter refuses baked configs; the baked values were requantized above)


class _Fusion(QuantizationOptimizationPass):
    """Crossbar -> Relu/Clip fusion and grid-keeping operators, by maptools' placement."""

    def __init__(self, placement: Placement) -> None:
        super().__init__(name="maptools fusion")
        self._placement = placement

    def optimize(self, graph: Any, **kwargs: Any) -> None:
        for op in graph.topological_sort():
            if not isinstance(op, QuantableOperation):
                continue
            role = self._placement.roles.get(op.name)
            if role is Role.CROSSBAR:
                after = graph.get_downstream_operations(op)
                out = op.config.output_quantization_config[0]
                if (len(after) == 1 and after[0].type in FUSABLE_ACTIVATIONS and isinstance(after[0], QuantableOperation)
                        and len(graph.get_upstream_operations(after[0])) == 1
                        and out.state != QuantizationStates.FP32):
                    act = after[0].config.output_quantization_config[0]
                    out.dominated_by = act
                    after[0].config.input_quantization_config[0].dominated_by = act
            elif role is Role.MOVE:
                source = op.config.input_quantization_config[0]
                for cfg in op.config.output_quantization_config:
                    cfg.dominated_by = source


class _Alignment(QuantAlignmentPass):
    """PPQ's alignment (Add inputs to the larger range, Concat inputs to its output) on the adders
    and concatenations of maptools' placement only: not on lookup tables with a float constant
    operand (PPQ would put the constant on the activation's grid) nor on code-moving operators
    (their output keeps the input's grid).

    With ``shared`` every producer of an input is put on the aligned grid, also one read by other
    operators or grouped with other tensors (the whole group moves): the adder's inputs then arrive
    on one scale and neither is requantized before it.
    """

    def __init__(self, placement: Placement, shared: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._placement = placement
        self._shared = shared

    def optimize(self, graph: Any, **kwargs: Any) -> None:
        for op in graph.operations.values():
            role = self._placement.roles.get(op.name)
            if not isinstance(op, QuantableOperation) or role not in (Role.ADD, Role.CONCAT):
                continue
            if role is Role.ADD and self.elementwise_alignment != "None":
                master = (self.align_to_large(op) if self.elementwise_alignment == "Align to Large"
                          else self.align_to_output(op))
            elif role is Role.CONCAT and self.concat_alignment != "None":
                master = (self.align_to_large(op) if self.concat_alignment == "Align to Large"
                          else self.align_to_output(op))
            else:
                continue
            for up in graph.get_upstream_operations(op):  # as PPQ: a single-consumer producer writes that grid
                if not isinstance(up, QuantableOperation):
                    continue
                single = len(graph.get_downstream_operations(up)) == 1 or self.force_overlap
                for cfg, var in up.config_with_variable:
                    if op not in var.dest_ops or var.is_parameter:
                        continue
                    if single and cfg.dominated_by is cfg:
                        # only a config that is its own group: merging a group (a code mover's output is
                        # grouped with its input) would move the grid of every tensor in it
                        cfg.dominated_by = master
                    elif self._shared and cfg.dominated_by is not master.dominated_by:
                        _share_grid(cfg.dominated_by, master)
        if self._shared:
            _unify(graph, self._placement)


def _unify(graph: Any, placement: Placement) -> None:
    """``shared_scales``: the tensors an adder or a concatenation reads, a concatenation's output, and the
    tensors sharing a grid with any of them, on one grid per connected set: pairwise alignment leaves a
    tensor that feeds two adders on the second one's grid only (a YOLO neck's upsampled map feeds two
    Concats). The grid keeps every member's range: the largest bound over the set, signed where any
    member is."""
    parent: dict[int, Any] = {}  # union-find over configs, by id
    seen: dict[int, Any] = {}

    def find(cfg: Any) -> Any:
        seen[id(cfg)] = cfg
        root = parent.setdefault(id(cfg), cfg)
        while root is not cfg:
            cfg, root = root, parent.setdefault(id(root), root)
        return root

    for op in graph.operations.values():
        role = placement.roles.get(op.name)
        if not isinstance(op, QuantableOperation) or role not in (Role.ADD, Role.CONCAT):
            continue
        members = []
        for cfg, var in zip(op.config.input_quantization_config, op.inputs):
            if var.is_parameter or not var.name:
                continue
            members.append(cfg.dominated_by)
            source = var.source_op
            if isinstance(source, QuantableOperation):
                members.append(source.config.output_quantization_config[source.outputs.index(var)].dominated_by)
        if role is Role.CONCAT:
            members += [cfg.dominated_by for cfg in op.config.output_quantization_config]
        members = [m for m in members if m.state in _APPLIED and isinstance(m.scale, torch.Tensor)]
        for member in members[1:]:
            a, b = find(members[0]), find(member)
            if a is not b:
                parent[id(b)] = a
    groups: dict[int, list[Any]] = {}
    for cfg in list(seen.values()):
        groups.setdefault(id(find(cfg)), []).append(cfg)
    for members in groups.values():
        template = min(members, key=lambda m: int(m.quant_min))  # a signed member, where there is one
        members = [m for m in members if m.num_of_bits == template.num_of_bits]
        if len(members) < 2:
            continue
        high = max(float(m.scale.reshape(-1)[0]) * int(m.quant_max) for m in members)
        low = max(float(m.scale.reshape(-1)[0]) * -int(m.quant_min) for m in members)
        scale = max(high / int(template.quant_max), low / -int(template.quant_min) if template.quant_min < 0 else 0.0)
        value = _round_scale(torch.tensor([scale], dtype=template.scale.dtype, device=template.scale.device))
        if template.policy.has_property(QuantizationProperty.POWER_OF_2):
            value = torch.pow(2.0, torch.ceil(torch.log2(value)))
        for member in members:
            member.scale, member.offset = value.clone().reshape(member.scale.shape), torch.zeros_like(member.offset)
            member.quant_min, member.quant_max, member.policy = template.quant_min, template.quant_max, template.policy


def _share_grid(root: Any, master: Any) -> None:
    """Put the group of ``root`` (a producer's output and what moves its codes) on ``master``'s grid:
    same scale, integer range and policy (an unsigned group joining a signed adder turns signed: PPQ's
    exporter skips an asymmetric config with a signed range, which left that tensor without Q/DQ),
    still quantized where it is produced."""
    if root.state not in _APPLIED or master.scale is None:
        return
    root.scale, root.offset = master.scale.clone(), torch.zeros_like(master.offset)
    root.quant_min, root.quant_max, root.policy = master.quant_min, master.quant_max, master.policy


# --- speed: batched calibration, a faster exact percentile observer, no gc between passes ---------

_batch = threading.local()  # .samples: how many calibration samples the current forward carries
_FAST_PERCENTILE = "maptools_percentile"
#: Largest tail (elements) taken with topk; beyond it kthvalue is faster.
_TOPK_LIMIT = 4096


class _PercentilePerSample(TorchPercentileObserver):
    """PPQ's percentile observer with the same result, computed faster.

    PPQ takes, for every calibration forward, the k-th smallest and k-th largest value of the
    tensor (``kthvalue``) and averages them over forwards. This observer computes the same two
    order statistics for each sample of a batch (so a batch of n counts as n forwards, exactly as
    if the samples came one by one) with ``topk`` of the short tails.
    """

    @torch.no_grad()
    def observe(self, value: torch.Tensor) -> None:
        cfg = self._quant_cfg
        if cfg.state != QuantizationStates.INITIAL or not cfg.policy.has_property(QuantizationProperty.PER_TENSOR):
            return super().observe(value)
        samples = getattr(_batch, "samples", 1)
        rows = value.reshape(samples, -1) if value.numel() % samples == 0 else value.reshape(1, -1)
        numel = rows.shape[1]
        min_k = max(0, int(numel * (1 - self._percentile))) + 1  # kthvalue's k, as PPQ computes it
        max_k = min(int(numel * self._percentile), numel - 1) + 1
        self._percentile_collector.append(torch.stack([_kth(rows, max_k), _kth(rows, min_k)], dim=1).float())


def _kth(rows: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest value (1-based) of every row, like ``torch.kthvalue(rows, k, dim=1)``."""
    numel = rows.shape[1]
    if k <= _TOPK_LIMIT:
        return rows.topk(k, dim=1, largest=False, sorted=True).values[:, -1]
    if numel - k + 1 <= _TOPK_LIMIT:
        return rows.topk(numel - k + 1, dim=1, largest=True, sorted=True).values[:, -1]
    return rows.kthvalue(k, dim=1).values


OBSERVER_TABLE[_FAST_PERCENTILE] = _PercentilePerSample


#: significant bits an activation scale keeps (see _OnePassCalibration)
SCALE_BITS = 8


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to :data:`SCALE_BITS` significant bits (half to even)."""
    mantissa, exponent = torch.frexp(scale.detach().to(torch.float64))
    return torch.ldexp(torch.round(mantissa * 2.0**SCALE_BITS) / 2.0**SCALE_BITS, exponent).to(scale.dtype)


class _OnePassCalibration(RuntimeCalibrationPass):
    """PPQ's runtime calibration, reading the calibration batches exactly once per phase, with
    activation scales rounded to :data:`SCALE_BITS` significant bits.

    PPQ loops over its data until ``calib_steps`` batches were read (at least 8); maptools
    hands it exactly the samples to use, batched, so one pass is the same data as PPQ's loop.
    The rounding makes artifacts independent of torch's thread count: a convolution's float
    result changes in its last bits with the number of threads, and so would a percentile or a
    minimum taken from it; a 0.2-0.4% step absorbs such differences (and is far below the
    calibration's own sampling noise).
    """

    def __init__(self, method: str | None, model: bytes | None = None) -> None:
        super().__init__(method=method)
        self._model = model
        self._graph: Any = None

    def optimize(self, graph: Any, *args: Any, **kwargs: Any) -> None:
        self._graph = graph
        super().optimize(graph, *args, **kwargs)
        for op in graph.operations.values():
            if not isinstance(op, QuantableOperation):
                continue
            for cfg, var in op.config_with_variable:
                if (not var.is_parameter and cfg.dominated_by is cfg and cfg.state == QuantizationStates.ACTIVATED
                        and isinstance(cfg.scale, torch.Tensor)):
                    cfg.scale = _round_scale(cfg.scale)

    def calibrate(self, desc: str, dataloader: Iterable[Any], executor: Any, hooks: Any,
                  output_names: list[str] | None = None) -> None:
        statistics = _Statistics.build(self._model, self._graph, hooks) if self._model is not None else None
        for data in dataloader:
            if statistics is not None:
                # one sample per run, as the statistics model keeps the model's input shapes: onnxruntime gains
                # nothing from batches on the CPU, and large ones cost it memory traffic (FPN 640, 32 samples:
                # 0.77 s one at a time, 1.24 s in batches of 16). quantize_graph forms batches only where it
                # expects PPQ's forward to calibrate; should the statistics apply there after all, they split here.
                count = getattr(_batch, "samples", 1)
                for i in range(count):
                    statistics.observe({k: v.chunk(count)[i] for k, v in data.items()})
                continue
            if self._collate_fn is not None:
                data = self._collate_fn(data)
            executor.forward(inputs=data, hooks=hooks, output_names=output_names)


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


_LCG_STATES = _lcg_states()


def _with_outputs(model: bytes, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
                  outputs: list[onnx.ValueInfoProto], what: str) -> Any:
    """An onnxruntime CPU session of the serialized ``model`` with ``nodes``, ``initializers`` and graph
    ``outputs`` added; None where onnxruntime cannot load it.

    The additions are serialized on their own and appended: protobuf merges concatenated messages
    (repeated fields are appended), so the model (its weights) is not parsed or serialized again.
    """
    import onnxruntime as ort

    extra = onnx.ModelProto(graph=onnx.GraphProto(node=nodes, initializer=initializers, output=outputs))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    # no QDQ-specific rewrites, so constant folding computes each weight's QuantizeLinear/DequantizeLinear
    # once (ResNet18's QDQ forward: 0.42 -> 0.22 s for 8 samples); activations keep their nodes
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(model + extra.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (the caller falls back on PPQ's forward)
        log.debug("onnxruntime cannot load %s (%s); PPQ's forward runs instead", what, e)
        return None


def _fetching_session(model: bytes, produced: set[str], tensors: Mapping[str, int], what: str) -> Any:
    """A session of the serialized ``model`` (whose nodes produce ``produced``) returning, for each
    ``tensor: elements per sample``, the values at PPQ's seeded positions (``batch_random_fetch``),
    one row per sample; None where a tensor is missing or onnxruntime cannot load the model."""
    if not set(tensors) <= produced:
        return None
    nodes, initializers, outputs = [], [], []
    for i, (name, numel) in enumerate(tensors.items()):
        t = f"maptools_fetch{i}"
        initializers.append(onnx.numpy_helper.from_array(_LCG_STATES % numel, f"{t}_index"))
        nodes += [onnx.helper.make_node("Flatten", [name], [f"{t}_rows"], axis=1),
                  onnx.helper.make_node("Gather", [f"{t}_rows", f"{t}_index"], [t], axis=1)]
        outputs.append(onnx.helper.make_empty_tensor_value_info(t))
    return _with_outputs(model, nodes, initializers, outputs, what)


def _chunks(numel: int, m: int) -> int | None:
    """Chunks a row of ``numel`` values splits into for :func:`_tail`: the smallest divisor of ``numel``
    from 8m on whose chunks hold at least 16 values; None where there is none (short rows)."""
    divisors = {d for i in range(1, math.isqrt(numel) + 1) if numel % i == 0 for d in (i, numel // i)}
    fitting = [d for d in divisors if d >= 8 * m and numel // d >= 16]
    return min(fitting) if fitting else None


def _tail(graph: onnx.GraphProto, rows: str, numel: int, m: int, largest: bool, out: str) -> list[onnx.NodeProto]:
    """Nodes writing to ``out`` the m largest (or smallest) values of every row of ``rows`` [batch, numel],
    sorted, so ``out[:, -1]`` is the m-th: ``TopK``, exact, over far fewer values where the row splits
    into R >= 8m chunks. The m extreme values all lie in the m chunks with the most extreme maxima (or
    minima), since any other chunk has m chunks above it, each holding a value above all of its own; so
    TopK of the chunk extremes, GatherND of those chunks and TopK of their values give the same m values
    (FPN 640: a third of the time of one TopK over the row)."""
    k = onnx.numpy_helper.from_array(np.array([m], dtype=np.int64), f"{out}_k")
    graph.initializer.append(k)
    top = onnx.helper.make_node
    count = _chunks(numel, m)
    if count is None:
        return [top("TopK", [rows, k.name], [out, f"{out}_i"], axis=1, largest=int(largest), sorted=1)]
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0, count, numel // count], dtype=np.int64), f"{out}_grid"),
        onnx.numpy_helper.from_array(np.array([0, -1, 1], dtype=np.int64), f"{out}_picks")])
    return [
        top("Reshape", [rows, f"{out}_grid"], [f"{out}_chunks"]),
        top("ReduceMax" if largest else "ReduceMin", [f"{out}_chunks"], [f"{out}_ends"], axes=[2], keepdims=0),
        top("TopK", [f"{out}_ends", k.name], [f"{out}_e", f"{out}_which"], axis=1, largest=int(largest), sorted=0),
        top("Reshape", [f"{out}_which", f"{out}_picks"], [f"{out}_index"]),
        top("GatherND", [f"{out}_chunks", f"{out}_index"], [f"{out}_picked"], batch_dims=1),
        top("Flatten", [f"{out}_picked"], [f"{out}_cand"], axis=1),
        top("TopK", [f"{out}_cand", k.name], [out, f"{out}_i"], axis=1, largest=int(largest), sorted=1),
    ]


class _Statistics:
    """Calibration statistics computed inside onnxruntime (CPU), as onnxruntime's own calibrator does.

    While PPQ calibrates it quantizes no activation, so its forward is the float network with the
    baked (fake-quantized) weights: this model, in which every observed tensor feeds, per sample,
    ``ReduceMin``/``ReduceMax`` (minmax) or its two short tails (:func:`_tail`; maptools' percentile
    observer: the same order statistics). Only those small results leave onnxruntime, and they go
    into the observers' collectors exactly as the observers would have put them. Every operator
    whose PPQ kernel computes something else than ONNX already runs in onnxruntime (see
    :func:`_float_check`). Samples run one at a time, in the model's own input shapes.
    """

    def __init__(self, session: Any, outputs: list[tuple[Any, str, list[str]]]) -> None:
        self.session = session
        self.outputs = outputs  # (observer, kind, output names)
        self.names = [n for _, _, names in outputs for n in names]

    @classmethod
    def build(cls, model: bytes, graph: Any, hooks: Mapping[str, Any]) -> _Statistics | None:
        """None where only PPQ's forward can calibrate: another observer (kl, mse), a weight that is not
        baked yet (before an optimization pass), a tensor PPQ made up, a tail too long for TopK."""
        probe = onnx.ModelProto.FromString(model)
        inits = {i.name: i for i in probe.graph.initializer}
        produced = {t for n in probe.graph.node for t in n.output} | {i.name for i in probe.graph.input}
        for op in graph.operations.values():
            if not isinstance(op, QuantableOperation):
                continue
            for cfg, var in op.config_with_variable:
                if cfg.state in (QuantizationStates.ACTIVATED, QuantizationStates.PASSIVE):
                    return None
                if var.is_parameter and cfg.state in (QuantizationStates.BAKED, QuantizationStates.PASSIVE_BAKED):
                    init = inits.get(var.name)
                    value = var.value.detach().cpu().numpy()
                    if init is None or list(value.shape) != list(init.dims) or \
                            value.dtype != onnx.helper.tensor_dtype_to_np_dtype(init.data_type):
                        return None
                    init.CopyFrom(onnx.numpy_helper.from_array(value, var.name))
        nodes: list[onnx.NodeProto] = []
        outputs: list[tuple[Any, str, list[str]]] = []
        for hook in hooks.values():
            for cfg, observer in hook._observer_table.items():
                var = next(v for c, v in hook._operation.config_with_variable if c is cfg)
                shape = var.shape
                if var.name not in produced or not shape or not all(isinstance(d, int) for d in shape):
                    return None
                numel = math.prod(shape[1:]) if len(shape) > 1 else 1
                t = f"maptools_stat{len(outputs)}"
                nodes.append(onnx.helper.make_node("Flatten", [var.name], [f"{t}_rows"], axis=1))
                if type(observer) is TorchMinMaxObserver:
                    nodes += [onnx.helper.make_node("ReduceMin", [f"{t}_rows"], [f"{t}_lo"], axes=[1], keepdims=0),
                              onnx.helper.make_node("ReduceMax", [f"{t}_rows"], [f"{t}_hi"], axes=[1], keepdims=0)]
                    outputs.append((observer, "minmax", [f"{t}_lo", f"{t}_hi"]))
                elif type(observer) is _PercentilePerSample:
                    low = max(0, int(numel * (1 - observer._percentile))) + 1  # as _PercentilePerSample.observe
                    high = numel - min(int(numel * observer._percentile), numel - 1)  # m-th largest
                    if max(low, high) > _TOPK_LIMIT:
                        return None
                    for side, m, largest in (("hi", high, 1), ("lo", low, 0)):
                        nodes += _tail(probe.graph, f"{t}_rows", numel, m, bool(largest), f"{t}_{side}")
                    outputs.append((observer, "percentile", [f"{t}_hi", f"{t}_lo"]))
                else:
                    return None
        probe.graph.node.extend(nodes)
        session = _with_outputs(probe.SerializeToString(), [], [],
                                [onnx.helper.make_empty_tensor_value_info(n) for _, _, names in outputs for n in names],
                                "the statistics model")
        return None if session is None else cls(session, outputs)

    def observe(self, data: Mapping[str, torch.Tensor]) -> None:
        """One calibration batch: its statistics, into the observers' collectors."""
        values = iter(self.session.run(self.names, {k: v.detach().cpu().numpy() for k, v in data.items()}))
        for observer, kind, _ in self.outputs:
            if kind == "minmax":
                lo, hi = (torch.from_numpy(np.asarray(next(values))) for _ in range(2))
                observer._min_val_collector.append(lo.min().reshape([1]))
                observer._max_val_collector.append(hi.max().reshape([1]))
            else:
                hi, lo = (torch.from_numpy(np.asarray(next(values))[:, -1]) for _ in range(2))
                observer._percentile_collector.append(torch.stack([hi, lo], dim=1).float())


_gc_lock = threading.Lock()
_gc_users = 0


@contextlib.contextmanager
def _no_gc_between_passes() -> Any:
    """PPQ runs ``gc.collect()`` (and ``torch.cuda.empty_cache()``) before many of its passes;
    a full collection of a process holding torch costs 0.1-1 s each time and frees nothing that
    reference counting would not. Skip them while maptools drives PPQ."""
    global _gc_users
    with _gc_lock:
        if _gc_users == 0:
            _no_gc_between_passes.saved = (_ppq_defs.gc, _ppq_defs.empty_cache)  # type: ignore[attr-defined]
            _ppq_defs.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
            _ppq_defs.empty_cache = lambda: None
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                _ppq_defs.gc, _ppq_defs.empty_cache = _no_gc_between_passes.saved  # type: ignore[attr-defined]


class _Batches:
    """Re-iterable: consecutive samples concatenated along axis 0, ``size`` at a time.

    Sets the thread-local sample count the percentile observer reads while each batch is used.
    """

    def __init__(self, samples: Iterable[Mapping[str, torch.Tensor]], count: int, size: int) -> None:
        self.samples, self.count, self.size = samples, count, max(1, size)

    def __len__(self) -> int:
        return math.ceil(self.count / self.size)

    def __iter__(self) -> Any:
        group: list[Mapping[str, torch.Tensor]] = []
        try:
            for i, sample in enumerate(self.samples):
                if i >= self.count:
                    break
                group.append(sample)
                if len(group) == self.size:
                    yield self._emit(group)
                    group = []
            if group:
                yield self._emit(group)
        finally:
            _batch.samples = 1

    @staticmethod
    def _emit(group: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        _batch.samples = len(group)
        if len(group) == 1:
            return dict(group[0])
        return {name: torch.cat([s[name] for s in group], dim=0) for name in group[0]}


#: Calibration batch (samples per forward) by device kind; bounded by _BATCH_BYTES of the largest activation.
_BATCH = {"cpu": 16, "cuda": 32}
_BATCH_BYTES = 256 << 20


def _float_shapes(graph: Any) -> dict[str, list[Any]]:
    """Shapes of the float activations (an empty optional input has no name and no shape)."""
    return {name: list(var.shape) for name, var in graph.variables.items()
            if name and not var.is_parameter and var.shape is not None
            and var.dtype in (DataType.FP32, DataType.FP16, DataType.FP64)}


def _doubled_batch_shapes(executor: Any, graph: Any, trace_inputs: Mapping[str, torch.Tensor]) -> dict | None:
    """Float tensor shapes of a trace with two copies of the sample, or None when that fails."""
    try:
        with _quiet():
            executor.tracing_operation_meta(inputs={k: torch.cat([v, v]) for k, v in trace_inputs.items()})
    except Exception:  # noqa: BLE001  (not batchable; the batch-1 trace decides whether the model runs)
        return None
    return _float_shapes(graph)


def _batch_size(one: Mapping[str, list[Any]], two: Mapping[str, list[Any]] | None, count: int, device: str) -> int:
    """How many samples to calibrate per forward: 1 unless the graph is batch-major throughout.

    ``one`` and ``two`` are the float tensor shapes traced with one sample and with two copies of
    it: every float tensor must have its leading axis doubled and its other axes unchanged (a
    Reshape to a constant batch of 1, a batch moved to another axis, or a failed trace all mean:
    calibrate one sample at a time).
    """
    if count < 2 or two is None:
        return 1
    for name, shape in one.items():
        other = two.get(name)
        if not shape or other is None or len(other) != len(shape) or other[1:] != shape[1:] or \
                not isinstance(shape[0], int) or other[0] != 2 * shape[0]:
            return 1
    largest = max((math.prod(int(d) for d in s) for s in one.values() if all(isinstance(d, int) for d in s)),
                  default=1) * 4
    size = min(_BATCH["cuda" if str(device).startswith("cuda") else "cpu"], max(1, _BATCH_BYTES // largest), count)
    return max(1, size)


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


@contextlib.contextmanager
def _quiet() -> Any:
    """Send PPQ's prints to the debug log instead of the user's terminal."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        text = (out.getvalue() + err.getvalue()).strip()
        if text:
            log.debug("ppq: %s", text)


@contextlib.contextmanager
def _ppq_step(what: str) -> Any:
    """PPQ's and onnx's raw exceptions as QuantizationFailed naming the step and the device operator they
    arose at (CUDA faults pass unchanged, so callers can retry them)."""
    try:
        yield
    except (MaptoolsError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        if "cuda" in str(e).lower():
            raise
        op, cause = _blame(e), _root_cause(e)  # (PPQ wraps kernel faults in "Op Execution Error")
        at = f" at {op.name} ({op.type})" if op is not None else ""
        raise QuantizationFailed(f"PPQ failed while {what}{at}: {type(cause).__name__}: {str(cause).strip()[:400]}",
                                 "report this model to the maptools maintainers (the operator is named above).",
                                 operator=op.name if op is not None and op.platform != TargetPlatform.FP32 else None
                                 ) from e


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _root_cause(error: BaseException) -> BaseException:
    return _chain(error)[-1]


def _blame(error: BaseException) -> Any:
    """The PPQ operation an exception arose at: the innermost one a frame of its traceback (or of its
    causes') holds, as ``op``/``operation`` or as a hook's operation; None where no frame holds one."""
    from ppq.IR import Operation

    for exc in reversed(_chain(error)):  # the innermost cause first
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):  # the innermost frame first
            local = frame.f_locals
            hooked = getattr(local.get("self"), "_hook_to", None)
            for value in (local.get("op"), local.get("operation"), hooked, *local.values()):
                if isinstance(value, Operation):
                    return value
    return None


def _range_of(cfg: Any) -> tuple[int, int]:
    """Integer range of the codes a tensor config puts on its tensor (its group's, where it has one)."""
    root = cfg.dominated_by if cfg.dominated_by.state in _APPLIED else cfg
    return int(root.quant_min), int(root.quant_max)


def _scale_of(cfg: Any) -> float | None:
    """Scale a tensor config puts on its tensor, or None when the tensor stays float."""
    root = cfg.dominated_by
    if root.state not in _APPLIED or root.scale is None:
        return None
    return float(root.scale.reshape(-1)[0].item())


class QuantizedGraph:
    """A PPQ graph after quantization, seen through what maptools needs of it."""

    def __init__(self, graph: Any, device: str, settings: QuantSettings, placement: Placement, model: onnx.ModelProto,
                 model_bytes: bytes, batch: int = 1) -> None:
        self._graph = graph
        self._model = model  # the prepared ONNX model the graph was loaded from
        self._model_bytes = model_bytes  # the same, serialized
        self._placement = placement
        self._device = device
        self._settings = settings
        self._executor: Any = None
        self._batch = batch  # samples per forward the graph is known to accept (see _batch_size)

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
        requantization multipliers and shifts of each (:func:`maptools.simulate.record_requant`)."""
        from maptools.conversion import build_graph
        from maptools.simulate import record_requant

        info: dict[str, QuantConfig] = {}
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
            weight = op.inputs[1].value.detach().cpu().double().numpy()
            axis = wcfg.channel_axis if cfg.weight_scale.size > 1 else None
            scale = cfg.weight_scale.astype(np.float64)
            shape = [1] * weight.ndim
            if axis is not None:
                shape[axis] = -1
            w_int = np.clip(np.rint(weight / scale.reshape(shape)), cfg.weight_min, cfg.weight_max)
            params[param_key(op.name, op.type, "weight")] = w_int.astype(np.int8)
            bias = None
            if len(op.inputs) > 2 and op.inputs[2].value is not None:
                if cfg.input_scale is None:
                    raise QuantizationFailed(f"operator {op.name} has a float input, so its bias has no int32 scale.",
                                             "report this model to the maptools maintainers.")
                b = op.inputs[2].value.detach().cpu().double().numpy().reshape(-1)
                b_scale = cfg.input_scale * scale if scale.size > 1 else cfg.input_scale * np.full(b.shape, scale[0])
                bias = np.clip(np.rint(b / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
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

    def qdq_model(self) -> bytes:
        """The QDQ model onnxruntime runs, exact at every width (see :class:`_ExactExporter`), serialized.

        PPQ's exporter lists graph inputs and outputs in its own variable order and names the
        tensors it adds from a process-wide counter; inputs and outputs are put back in the model's
        order and added tensors renamed in order of use, so the same quantization gives the same bytes.
        """
        with tempfile.TemporaryDirectory(prefix="maptools-export-") as scratch:
            path = Path(scratch) / "quant_model.onnx"
            with _quiet(), _ppq_step("exporting the QDQ model"):
                graph = self._graph.copy()
                _ExactExporter().export(file_path=str(path), config_path=None, graph=graph, quantized_param=False)
            exported = onnx.load(str(path))
        for field_name, names in (("input", self.input_names), ("output", self.output_names)):
            rank = {name: i for i, name in enumerate(names)}
            values = getattr(exported.graph, field_name)
            ordered = [onnx.ValueInfoProto.FromString(v.SerializeToString())
                       for v in sorted(values, key=lambda v: rank.get(v.name, len(rank)))]
            del values[:]
            values.extend(ordered)
        _canonical_names(exported)
        _restore_domains(exported, self._model)
        implicit_outer_inputs(exported)
        return exported.SerializeToString()

    def error_report(self, samples: Iterable[Mapping[str, torch.Tensor]], steps: int = 8,
                     qdq: bytes | None = None) -> dict[str, float]:
        """PPQ's graphwise SNR (noise power / signal power, lower is better) per computing operator, to 4
        significant digits: at each operator's output, over 4096 seeded positions per sample, averaged over samples.

        On the CPU, with ``qdq`` (the exported QDQ model), onnxruntime runs that model against the float
        model (:meth:`_ort_error_report`); otherwise PPQ runs its graph twice, dequantized and quantized.
        """
        report = self._ort_error_report(samples, steps, qdq) if qdq is not None and self._device == "cpu" else None
        if report is None:
            # PPQ's SNR is per sample, averaged over samples: batching the samples does not change it.
            data = list(_Batches(samples, steps, self._batch))
            with _quiet(), _no_gc_between_passes(), _ppq_step("measuring the per-layer error"):
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
        with _ppq_step("measuring the per-layer error"):
            sessions = [_fetching_session(self._model_bytes, {t for n in self._model.graph.node for t in n.output},
                                          real, "the float model"),
                        _fetching_session(qdq, {t for n in quantized.graph.node for t in n.output}, pred,
                                          "the QDQ model")]
            if None in sessions:
                return None
            names = [f"maptools_fetch{i}" for i in range(len(ops))]
            feeds = [{k: v.detach().cpu().numpy() for k, v in sample.items()}
                     for _, sample in zip(range(steps), samples)]
            # one sample per run, in the models' own input shapes (PPQ's SNR is per sample, averaged);
            # one model after the other: alternating them per sample evicts each one's weights from the
            # caches (ResNet18, 8 samples: 0.84 s in onnxruntime runs against 0.56 s)
            real, pred = ([session.run(names, feed) for feed in feeds] for session in sessions)
            total, rows = np.zeros(len(ops)), np.zeros(len(ops))
            for real_rows, pred_rows in zip(real, pred):
                for i, (y, x) in enumerate(zip(real_rows, pred_rows)):
                    # a row is the first axis: a sample, or a token where PPQ flattened a MatMul into a Gemm
                    y, x = y.astype(np.float64), x.astype(np.float64)
                    total[i] += (((x - y) ** 2).sum(axis=1) / ((y ** 2).sum(axis=1) + 1e-7)).sum()
                    rows[i] += y.shape[0]
        return {op.name: float(v / max(n, 1)) for op, v, n in zip(ops, total, rows)}

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


class _ExactExporter(ONNXRUNTIMExporter):
    """PPQ's QDQ exporter, exact at every width: each activation's DequantizeLinear is followed by a
    Clip to ``scale * [quant_min, quant_max]``.

    Under 8 bits the Clip saturates where PPQ's simulation (and the hardware) does instead of at the
    int8/uint8 type's range. At 8 bits it changes no value, and it keeps onnxruntime from fusing the
    QDQ pairs into its own int8 kernels, which compute something else: their uint8 x int8 path
    saturates 16-bit intermediates on AVX2 CPUs (on the digits CNN with unsigned activations, 85.5%
    top-1 instead of 92.4%, and 91% agreement with PPQ's simulation).
    """

    def insert_dequantize_node(self, graph: Any, var: Any, config: Any, op: Any) -> Any:
        created = super().insert_dequantize_node(graph, var, config, op)
        # ``op`` is the QuantizeLinear just inserted; a weight's is fed by the parameter, and weights are
        # baked inside their range already
        weight = op.type == "QuantizeLinear" and op.inputs[0].is_parameter
        if not config.policy.has_property(QuantizationProperty.LINEAR) or weight:
            return created
        scale = config.scale.detach().float().cpu().reshape(-1)[0]
        clip = graph.create_operation(op_type="Clip", attributes={})
        graph.insert_op_after(A=clip, B=created, output_idx=0)
        for bound in (config.quant_min, config.quant_max):
            graph.create_variable(name=None, value=(scale * float(bound)).reshape([]), is_parameter=True,
                                  dest_ops=[clip])
        clip.outputs[0].shape, clip.outputs[0].dtype = created.outputs[0].shape, torch.float32
        return created


def _restore_domains(exported: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Put operators of other domains (``com.microsoft``, ...) back into theirs, with their opset imports:
    PPQ's exporter writes every operator into the default domain."""
    domains = {n.name: n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    if not domains:
        return
    for node in exported.graph.node:
        node.domain = domains.get(node.name, node.domain)
    have = {o.domain for o in exported.opset_import}
    exported.opset_import.extend(o for o in model.opset_import if o.domain in set(domains.values()) - have)


def _canonical_names(model: onnx.ModelProto) -> None:
    """Rename the tensors and nodes PPQ's exporter generated (a process-wide counter) in order of use,
    and list initializers in that order: the same graph gives the same bytes in any process."""
    generated = re.compile(r"^PPQ_(Variable|Operation)_\d+$")
    renames: dict[str, str] = {}
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if generated.match(name) and name not in renames:
                renames[name] = f"maptools_q{len(renames)}"
    order = {}
    for i, node in enumerate(model.graph.node):
        if generated.match(node.name):
            node.name = f"maptools_node{i}"
        for field in (node.input, node.output):
            for j, name in enumerate(field):
                field[j] = renames.get(name, name)
                order.setdefault(field[j], len(order))
    for collection in (model.graph.initializer, model.graph.value_info, model.graph.input, model.graph.output):
        for item in collection:
            item.name = renames.get(item.name, item.name)
    for field in (model.graph.initializer, model.graph.value_info):
        field.sort(key=lambda item: order.get(item.name, len(order)))  # stable, in place


def _check_zero_offsets(graph: Any) -> None:
    """The crossbar contract: every quantized tensor has a zero offset (an unsigned one too)."""
    bad = [f"{op.name}/{var.name}" for op in graph.operations.values() if isinstance(op, QuantableOperation)
           for cfg, var in op.config_with_variable
           if cfg.state in _APPLIED and cfg.offset is not None and bool(torch.any(cfg.offset != 0))]
    if bad:
        raise QuantizationFailed(f"these tensors got a non-zero offset: {', '.join(bad[:8])}.",
                                 "use activation_sign='signed', and report the model to the maptools maintainers.")


def _load(model_path: Path, model: onnx.ModelProto) -> Any:
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
                                                               for t in held if t in constants})
    return graph


def _float_check(executor: Any, graph: Any, model: onnx.ModelProto, model_bytes: bytes,
                 feed: Mapping[str, torch.Tensor], device: str) -> list[str]:
    """Switch to onnxruntime every operator whose PPQ kernel computes something else than ONNX.

    onnxruntime runs the model on one sample with every tensor as an output; PPQ's float graph then
    runs with each operator fed those reference values (not its own upstream results, so an
    operator that amplifies tiny differences, a rounding or a dynamic quantization, is judged on
    its own) and its outputs are compared with the reference. Returns the names of the switched
    operators; one that still differs in onnxruntime is left there (it computes ONNX's semantics).
    """
    from ppq.executor.base import RuntimeHook

    types = {vi.name: vi for vi in model.graph.value_info}
    known = {vi.name for vi in model.graph.output}
    names = [n for n, v in graph.variables.items() if n and not v.is_parameter and v.source_op is not None
             and (n in types or n in known)]
    session = _with_outputs(model_bytes, [], [], [types[n] for n in names if n not in known], "the float model")
    if session is None:
        log.warning("onnxruntime cannot load the prepared model with its intermediate tensors as outputs; PPQ's "
                    "kernels are not checked against it")
        return []
    reference = dict(zip(names, session.run(names, {k: v.detach().cpu().numpy() for k, v in feed.items()})))
    # CUDA convolutions and matrix products run in TF32 by default (10-bit mantissas): a kernel that
    # computes something else than ONNX differs by far more than that
    tolerance = 1e-2 if str(device).startswith("cuda") else 1e-4
    got: dict[str, Any] = {}

    class _Substitute(RuntimeHook):
        def pre_forward_hook(self, inputs: list, **kwargs: Any) -> list:
            return [torch.from_numpy(np.array(reference[var.name])).to(device) if var.name in reference else value
                    for var, value in zip(self._hook_to.inputs, inputs)]

        def post_forward_hook(self, outputs: list, **kwargs: Any) -> list:
            for var, value in zip(self._hook_to.outputs, outputs):
                got[var.name] = value
            return outputs

    def differing() -> list[Any]:
        got.clear()
        hooks = {op.name: _Substitute(op) for op in graph.operations.values()}
        with torch.no_grad(), _quiet():
            executor.forward(inputs=dict(feed), hooks=hooks)
        bad = []
        for op in graph.topological_sort():
            for var in op.outputs:
                ref, value = reference.get(var.name), got.get(var.name)
                if ref is None or not isinstance(value, torch.Tensor) or not np.issubdtype(ref.dtype, np.floating):
                    continue
                out = value.detach().cpu().numpy()
                peak = float(np.abs(ref).max(initial=0.0))
                if ref.shape != out.shape or not np.all(np.abs(out - ref) <= tolerance * peak + 1e-3 * np.abs(ref)
                                                        + 1e-6):
                    bad.append(op)
                    break
        return bad

    switched = [op for op in differing() if not getattr(op, "_maptools_ort", False)]
    for op in switched:
        op._maptools_ort = True
    if switched:
        still = [f"{op.name} ({op.type})" for op in differing() if op in switched]
        if still:
            log.info("onnxruntime's own result differs between runs at %s (given the same inputs)", ", ".join(still))
    return [op.name for op in switched]


#: Calibration samples the fast bias correction averages over.
FBC_SAMPLES = 32


def _fast_bias_correction(graph: Any, model: onnx.ModelProto, model_bytes: bytes,
                          calibration: Iterable[Mapping[str, torch.Tensor]], steps: int) -> None:
    """NNCF's fast bias correction on the crossbar layers: each layer, run quantized (its input on its input
    grid, its baked weights) on the float model's input to it, shifts its output's mean per channel from
    the float output's; that shift is added to its bias. One float forward per sample, each layer judged
    on its own (no layer-by-layer passes)."""
    layers = [op for op in graph.topological_sort() if isinstance(op, QuantableOperation)
              and op.type in CROSSBAR_OP_TYPES and op.platform != TargetPlatform.FP32 and len(op.inputs) > 2
              and op.inputs[2].value is not None and op.config.input_quantization_config[0].state in _APPLIED]
    if not layers:
        return
    types = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
    inputs = {i.name for i in model.graph.input}
    wanted = list(dict.fromkeys(t for op in layers for t in (op.inputs[0].name, op.outputs[0].name)
                                if t not in inputs))
    outputs = {o.name for o in model.graph.output}
    session = _with_outputs(model_bytes, [], [], [types[t] for t in wanted if t not in outputs and t in types],
                            "the float model")
    if session is None or not all(t in types for t in wanted):
        log.warning("no fast bias correction: onnxruntime cannot return the crossbar layers' tensors")
        return
    shift: dict[str, np.ndarray] = {}
    count = 0
    for _, sample in zip(range(min(steps, FBC_SAMPLES)), calibration):
        feed = {k: v.detach().cpu().numpy() for k, v in sample.items()}
        values = {**feed, **dict(zip(wanted, session.run(wanted, feed)))}
        for op in layers:
            cfg = op.config.input_quantization_config[0].dominated_by
            scale = float(cfg.scale.reshape(-1)[0])
            x = np.clip(np.rint(values[op.inputs[0].name] / scale), int(cfg.quant_min), int(cfg.quant_max)) * scale
            weight, bias = (v.value.detach().cpu().numpy() for v in op.inputs[1:3])
            quantized = op._maptools_runner.run([x.astype(np.float32), weight, bias])[0]
            axes = tuple(i for i in range(quantized.ndim) if i != 1)  # Conv/ConvTranspose [N, C, ...], Gemm [N, C]
            delta = (values[op.outputs[0].name].astype(np.float64) - quantized).mean(axis=axes)
            shift[op.name] = shift.get(op.name, 0.0) + delta
        count += 1
    for op in layers:
        bias = op.inputs[2]
        bias.value = bias.value + torch.from_numpy(shift[op.name] / count).to(bias.value.dtype).to(
            bias.value.device).reshape(bias.value.shape)


def quantize_graph(
    model_path: Path,
    calibration: Iterable[Mapping[str, torch.Tensor]],
    calib_steps: int,
    trace_inputs: Mapping[str, torch.Tensor],
    settings: QuantSettings,
    device: str,
) -> QuantizedGraph:
    """Quantize a prepared ONNX model with PPQ; ``calibration`` must be re-iterable and have ``len()``.

    Raises MaptoolsError subclasses for bad input; CUDA faults (out of memory, launch failures)
    propagate unchanged so callers can retry them.
    """
    model_bytes = model_path.read_bytes()
    model = onnx.ModelProto.FromString(model_bytes)
    placement = place(model)
    graph = _load(model_path, model)
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
    executor = TorchExecutor(graph=quantizer._graph, device=device)
    dummy = {k: v.to(device) for k, v in trace_inputs.items()}
    with _no_gc_between_passes():
        with _ppq_step("tracing the model"), _quiet():
            _probe.active = True
            try:
                executor.tracing_operation_meta(inputs=dummy)
            finally:
                _probe.active = False
        with _ppq_step("checking PPQ's float execution against onnxruntime"):
            switched = _float_check(executor, quantizer._graph, model, model_bytes, dummy, device)
        if switched:
            log.info("PPQ's kernels differ from ONNX for %s; those run in onnxruntime", ", ".join(switched))
        if quantizer._model is not None and not settings.optimization.in_ppq and \
                settings.algorithm.value in ("minmax", "percentile"):
            batch = 1  # onnxruntime computes the statistics, one sample per run (see _Statistics)
        else:
            single = _float_shapes(quantizer._graph)
            with _ppq_step("tracing a batch of two"), _quiet():
                doubled = _doubled_batch_shapes(executor, quantizer._graph, dummy) if calib_steps > 1 else None
            batch = _batch_size(single, doubled, calib_steps, device)
        log.debug("calibrating %d samples in batches of %d", calib_steps, batch)
        torch.manual_seed(settings.seed)
        with _ppq_step("calibrating"), _quiet():
            # quantize() traces `dummy` again (batch 1), so exported shapes are the model's own.
            quantizer.quantize(
                inputs=dummy, calib_dataloader=_Batches(calibration, calib_steps, batch), executor=executor,
                setting=_setting(settings, device), calib_steps=max(calib_steps, 8),
                collate_fn=lambda b: {k: v.to(device) for k, v in b.items()},
            )
    if settings.optimization is Optimization.FAST_BIAS_CORRECTION:
        with _ppq_step("correcting biases"):
            _fast_bias_correction(quantizer._graph, model, model_bytes, calibration, calib_steps)
    _check_zero_offsets(quantizer._graph)
    result = QuantizedGraph(quantizer._graph, device, settings, placement, model, model_bytes, batch=batch)
    result._executor = executor
    return result
