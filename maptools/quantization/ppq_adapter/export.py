"""``quant_model.onnx``: PPQ's onnxruntime export made exact (ranges clipped, domains and names restored)."""

from __future__ import annotations

import logging
import re
from typing import Any

import onnx
import onnx.helper
import onnx.numpy_helper
import torch

from maptools.errors import QuantizationFailed
from maptools.onnx_model import DEFAULT_DOMAINS
from maptools.placement import recorded_sizes
from maptools.quantization.ppq_adapter.core import (QuantableOperation, QuantizationProperty, ONNXRUNTIMExporter,
                                                    _APPLIED)

log = logging.getLogger(__name__)

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
    """Put every operator back into the model's domain for it, with its opset imports: PPQ's exporter writes
    operators of other domains (``com.microsoft``, ...) into the default one, at opset 13, and moves the default
    domain's ``Attention`` (opset 23) into ``com.microsoft``, whose Attention takes other attributes; a prepared
    model left at a later opset (preparation could not convert it) keeps that opset, which its operators'
    attributes need; and a call of a local function that preparation could not inline keeps its function."""
    # one import of the default domain ("ai.onnx", PPQ's name for it, and ""): of two, onnxruntime reads either
    default = max((o.version for o in [*model.opset_import, *exported.opset_import] if o.domain in DEFAULT_DOMAINS),
                  default=0)
    kept = [o for o in exported.opset_import if o.domain not in DEFAULT_DOMAINS]
    del exported.opset_import[:]
    exported.opset_import.extend([onnx.helper.make_opsetid("", default), *kept])
    domains = {n.name: n.domain for n in model.graph.node}
    for node in exported.graph.node:
        node.domain = domains.get(node.name, node.domain)
    have = {o.domain for o in exported.opset_import} | set(DEFAULT_DOMAINS)
    used = {n.domain for n in exported.graph.node}
    exported.opset_import.extend(o for o in model.opset_import if o.domain in used - have)
    calls = {(n.domain, n.op_type) for n in exported.graph.node}
    if any((f.domain, f.name) in calls for f in model.functions):  # a call preparation could not inline
        exported.functions.extend(model.functions)


def _model_types(exported: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Declare each of the model's tensors in the type the model gives it: PPQ's exporter writes the type its
    kernel returned, which for an integer tensor can differ (a Range of int32 bounds, in torch int64), and
    onnxruntime then refuses the model. A tensor whose size follows the data keeps the model's open dims (PPQ
    writes the size of its last run)."""
    declared = {vi.name: vi.type.tensor_type for vi in [*model.graph.value_info, *model.graph.output]}
    sized = recorded_sizes(model)
    for vi in [*exported.graph.value_info, *exported.graph.output]:
        wanted = declared.get(vi.name)
        if wanted is None or not vi.type.HasField("tensor_type"):
            continue
        if wanted.elem_type and vi.type.tensor_type.elem_type != wanted.elem_type:
            vi.type.tensor_type.elem_type = wanted.elem_type
        if vi.name in sized and wanted.HasField("shape"):
            vi.type.tensor_type.shape.CopyFrom(wanted.shape)
        elif vi.name in sized:  # (no shape declared: not even the rank PPQ's last run gave it)
            vi.type.tensor_type.ClearField("shape")


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
