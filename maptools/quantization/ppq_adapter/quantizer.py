"""maptools' PPQ quantizer: where quantization applies (the placement), its configs, and the passes that keep
scales, biases and shared grids in the crossbar contract."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from maptools.errors import QuantizationFailed
from maptools.placement import CROSSBAR_OP_TYPES, FUSABLE_ACTIVATIONS, Placement, Role
from maptools.settings import QuantSettings, ScalePolicy
from maptools.quantization.ppq_adapter.core import (LayerwiseEqualizationPass, ParameterBakingPass,
                                                    ParameterQuantizePass,
                                                    PassiveParameterQuantizePass, QuantAlignmentPass,
                                                    QuantableOperation, QuantizationOptimizationPass,
                                                    QuantizationOptimizationPipeline, QuantizationPolicy,
                                                    QuantizationProperty, QuantizationStates, QuantizeFusionPass,
                                                    RuntimeCalibrationPass, TensorRTQuantizer, _APPLIED)

from maptools.quantization.ppq_adapter.calibration import _OnePassCalibration, _round_scale
log = logging.getLogger(__name__)

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
        self.tensors_out = True  # whether whole tensors (kl's and mse's histograms) leave onnxruntime to be observed
        self._settings = settings
        self._placement = placement
        self._unsigned = unsigned  # tensors quantized on [0, 2^b - 1]
        self.equalization_pairs: int | None = None  # layer pairs PPQ's equalization found (None: it did not run)
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

        * Fusion: a crossbar operator's or an adder's output goes straight to the grid of a Relu/Clip after it,
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
                step = _OnePassCalibration(method=step._method, model=self._model, tensors_out=self.tensors_out)
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

    def build_prequant_pipeline(self, setting: Any, executor: Any) -> Any:
        """PPQ's pipeline before quantization, with the layer pairs its equalization finds counted
        (:attr:`equalization_pairs`)."""
        pipeline = super().build_prequant_pipeline(setting, executor)
        for step in pipeline:
            if isinstance(step, LayerwiseEqualizationPass):
                step.find_equalization_pair = self._counted(step.find_equalization_pair)
        return pipeline

    def _counted(self, find: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
        """PPQ's search for layer pairs to equalize, its count kept in :attr:`equalization_pairs`."""
        def counted(*args: Any, **kwargs: Any) -> list[Any]:
            pairs = find(*args, **kwargs)
            self.equalization_pairs = len(pairs)
            return pairs
        return counted


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
    """Crossbar/adder -> Relu/Clip fusion and grid-keeping operators, by maptools' placement."""

    def __init__(self, placement: Placement) -> None:
        super().__init__(name="maptools fusion")
        self._placement = placement

    def optimize(self, graph: Any, **kwargs: Any) -> None:
        for op in graph.topological_sort():
            if not isinstance(op, QuantableOperation):
                continue
            role = self._placement.roles.get(op.name)
            if role in (Role.CROSSBAR, Role.ADD):
                after = graph.get_downstream_operations(op)
                out = op.config.output_quantization_config[0]
                if (len(after) == 1 and after[0].type in FUSABLE_ACTIVATIONS and isinstance(after[0], QuantableOperation)
                        and len(graph.get_upstream_operations(after[0])) == 1
                        and out.state != QuantizationStates.FP32
                        and after[0].config.output_quantization_config[0].state != QuantizationStates.FP32):
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
        _tie(graph, self._placement)
        if self._shared:
            _check_shared_inputs(graph, self._placement)
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


#: Under shared scales, how much larger than an adder's or a concatenation's input another input's range may be: one
#: further below loses its signal on the shared grid (under 4 of 8 bits' 127 codes), and the operator runs on the host.
SHARED_RANGE_RATIO = 32.0


def _check_shared_inputs(graph: Any, placement: Placement) -> None:
    """Raise :class:`QuantizationFailed` naming the adders and concatenations where one grid for every input (the
    seed profile's shared scales) would be over :data:`SHARED_RANGE_RATIO` times an input's range: a U-Net's skip
    tensor (range 1) beside an upsampled decoder map (range 280) rounds to zero, and so does the encoder behind it,
    which reads the same grid. ``quantize`` keeps them on the host in float, where each input keeps its own grid."""
    lost: list[tuple[str, str]] = []
    for op in graph.operations.values():
        if not isinstance(op, QuantableOperation) or placement.roles.get(op.name) not in (Role.ADD, Role.CONCAT):
            continue
        bounds, top = {}, 127
        for cfg, var in zip(op.config.input_quantization_config, op.inputs):
            root = cfg.dominated_by
            if var.is_parameter or root.state not in _APPLIED or not isinstance(root.scale, torch.Tensor):
                continue
            top = int(root.quant_max)
            bound = float(root.scale.reshape(-1)[0]) * top
            if bound > 0:
                bounds[var.name] = bound
        if len(bounds) < 2:
            continue
        small, large = min(bounds, key=bounds.get), max(bounds, key=bounds.get)
        codes = top * bounds[small] / bounds[large]
        if bounds[large] > SHARED_RANGE_RATIO * bounds[small]:
            lost.append((op.name, f"{op.name} ({op.type}) would put its input {small} (range {bounds[small]:.3g}) on "
                                  f"the grid of {large} (range {bounds[large]:.3g}): {codes:.1f} of {top} codes"))
    if lost:
        why = {name: f"under shared scales (the seed profile's), {text}" for name, text in lost}
        raise QuantizationFailed(why[lost[0][0]] + (f", and {len(lost) - 1} more such operator(s)" if len(lost) > 1
                                                    else ""),
                                 "profile='extended' gives each input its own grid.",
                                 operator=lost[0][0], also=tuple(name for name, _ in lost[1:]), reasons=why)


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
        _one_grid([m for m in members if m.num_of_bits == template.num_of_bits])


def _tie(graph: Any, placement: Placement) -> None:
    """Each group of :attr:`Placement.tied` tensors (the copies of one tensor a written-out loop computes per step)
    on one grid per bit width, the producers' and the readers' grids alike: calibrated one step at a time, a grid
    fits what that step saw, and a spike at a step where the calibration saw none is clipped."""
    for names in placement.tied:
        members: dict[int, Any] = {}
        for var in (graph.variables.get(name) for name in names):
            if var is None or var.is_parameter:  # (a weight each step computes from constants: its own grids)
                continue
            ops = [op for op in {id(op): op for op in var.dest_ops}.values() if isinstance(op, QuantableOperation)]
            configs = [cfg for op in ops for cfg, read in zip(op.config.input_quantization_config, op.inputs)
                       if read is var]  # (every input it is, where an operator reads it twice)
            if isinstance(var.source_op, QuantableOperation):
                configs.append(var.source_op.config.output_quantization_config[var.source_op.outputs.index(var)])
            members.update((id(c.dominated_by), c.dominated_by) for c in configs)
        widths: dict[int, list[Any]] = {}
        for member in members.values():
            if member.state in _APPLIED and isinstance(member.scale, torch.Tensor):
                widths.setdefault(member.num_of_bits, []).append(member)
        for group in widths.values():
            _one_grid(group)


def _one_grid(members: list[Any]) -> None:
    """Put ``members`` (tensor configs of one bit width) on one grid that keeps every member's range: the largest
    bound over them, signed where any member is."""
    if len(members) < 2:
        return
    template = min(members, key=lambda m: int(m.quant_min))  # a signed member, where there is one
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
