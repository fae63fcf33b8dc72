"""Operators PPQ runs in onnxruntime: where it has no kernel, or a kernel that differs from ONNX."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from maptools.node_runner import NodeRunner
from maptools.quantization.ppq_adapter.core import TargetPlatform, OPERATION_FORWARD_TABLE

log = logging.getLogger(__name__)

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
    known = set(runner.inputs)  # PPQ renames a parameter several operators share (one copy each): by position
    held = {var.name if var.name in known or i >= len(runner.inputs) else runner.inputs[i]: value
            for i, (var, value) in enumerate(zip(op.inputs, values))}
    results = iter(runner.run([_to_numpy(held.get(name)) for name in runner.inputs]))
    return [torch.from_numpy(np.array(next(results))).to(device) if name else None for name in runner.node.output]


def _prelu(op: Any, values: list[torch.Tensor], ctx: Any = None, **kwargs: Any) -> torch.Tensor:
    """ONNX PRelu with its broadcasting (PPQ calls F.prelu, which rejects ONNX's [C, 1, 1] slope)."""
    x, slope = values
    return torch.where(x >= 0, x, x * slope.to(x.dtype))


def _beyond_kernel(op: Any, values: list[Any]) -> bool:
    """Forms of an operator PPQ's kernel computes wrongly: integer Sub/Div (:data:`_FLOAT_ONLY`), a
    BatchNormalization in training mode (its three outputs: batch statistics, and the running ones), and
    pads that differ between axes where PPQ passes them to torch in reversed axis order (:func:`_reversed_pads`)."""
    if op.type in _FLOAT_ONLY:
        return any(isinstance(v, torch.Tensor) and not v.is_floating_point() for v in values)
    if op.type in _PADDED:
        return _reversed_pads(op)
    return op.type == "BatchNormalization" and len(op.outputs) > 1


#: Operators whose PPQ kernel turns ONNX pads into torch's (:func:`_reversed_pads`).
_PADDED = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool"})


def _reversed_pads(op: Any) -> bool:
    """True where PPQ's kernel pads the wrong axes: its pad conversion lists equal begin/end pads last axis
    first (W, H, D), which torch reads as (D, H, W); its 3-D convolution and pools, and its 2-D transposed
    convolution, pass that list on (pads [0, 5, 5, 0, 5, 5] pad D and H instead of H and W)."""
    pads = list(op.attributes.get("pads") or [])
    spatial = len(pads) // 2
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end or len(set(begin)) < 2:
        return False
    return spatial == 3 or (spatial == 2 and op.type == "ConvTranspose")


def _dispatcher(kernels: dict[str, Any]) -> Any:
    """A forward for one PPQ platform table: PPQ's kernel, or onnxruntime for the operator's ONNX node."""

    def forward(op: Any, values: list[Any], ctx: Any = None, **kwargs: Any) -> Any:
        kernel = kernels.get(op.type)
        has_node = getattr(op, "_maptools_runner", None) is not None
        if has_node and (kernel is None or getattr(op, "_maptools_ort", False) or _beyond_kernel(op, values)):
            return _run_ort(op, values, ctx)
        if kernel is None:
            raise NotImplementedError(f"PPQ has no kernel for {op.name} ({op.type}).")
        if not (has_node and getattr(_probe, "active", False)):
            return kernel(op, values, ctx, **kwargs)
        try:
            outputs = kernel(op, values, ctx, **kwargs)
        except Exception as e:  # noqa: BLE001  (PPQ's kernel cannot take this node: use onnxruntime's)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            log.debug("PPQ's %s kernel failed on %s (%s); running it in onnxruntime", op.type, op.name, e)
            op._maptools_ort = True
            return _run_ort(op, values, ctx)
        if (1 if isinstance(outputs, torch.Tensor) else len(outputs)) < len(op.outputs):
            # a form whose extra outputs the kernel does not compute (a MaxPool's indices, for a MaxUnpool)
            log.debug("PPQ's %s kernel leaves outputs of %s out; running it in onnxruntime", op.type, op.name)
            op._maptools_ort = True
            return _run_ort(op, values, ctx)
        return outputs

    return forward


_FORWARDS: dict[Any, Any] = {}  # platform -> the forward of every operator type on it
#: Operators always run in onnxruntime: PPQ's Gather and Slice kernels index tensors with a list of slices,
#: which torch deprecated (it will read them as one index array); its ReduceMax reduces the first axis only; its
#: Range gives int64 (``torch.arange`` of Python numbers) for int32 bounds (tf2onnx's frame indices), so the
#: operators after it would compute in another type than the model's.
_ONNXRUNTIME_ONLY = frozenset({"Gather", "Slice", "ReduceMax", "Range"})
#: Operators whose PPQ kernel computes only floats: its Sub casts the result to float, its Div floors integer
#: quotients (ONNX truncates); on integer inputs (index arithmetic) they run in onnxruntime.
_FLOAT_ONLY = frozenset({"Sub", "Div"})


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
