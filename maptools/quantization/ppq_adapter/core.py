"""The one place ``import ppq`` happens (the package :mod:`maptools.quantization.ppq_adapter` is the only user of ppq).

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
import sys
import types

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

from maptools.errors import DependencyError

log = logging.getLogger(__name__)

# ppq_version, and the ppq names the rest of the package imports from here
__all__ = ["ppq_version", "PPQ_VERSIONS", "_APPLIED", "ppq",
           "QuantableOperation", "QuantizationSettingFactory", "TargetPlatform", "TorchExecutor", "load_graph",
           "_ppq_defs", "DataType", "NetworkFramework", "QuantizationPolicy", "QuantizationProperty",
           "QuantizationStates", "OPERATION_FORWARD_TABLE", "GraphCommand", "GraphCommandType", "GraphFormatter",
           "ONNXRUNTIMExporter", "graphwise_error_analyse", "OBSERVER_TABLE", "TorchHistObserver",
           "TorchMinMaxObserver", "TorchPercentileObserver", "LayerwiseEqualizationPass", "ParameterBakingPass",
           "ParameterQuantizePass",
           "PassiveParameterQuantizePass",
           "QuantAlignmentPass", "QuantizationOptimizationPipeline", "QuantizeFusionPass", "RuntimeCalibrationPass",
           "QuantizationOptimizationPass", "TensorRTQuantizer"]


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
    from ppq.quantization.observer.range import TorchHistObserver, TorchMinMaxObserver, TorchPercentileObserver
    from ppq.quantization.optim import (LayerwiseEqualizationPass, ParameterBakingPass, ParameterQuantizePass,
                                        PassiveParameterQuantizePass, QuantAlignmentPass,
                                        QuantizationOptimizationPipeline, QuantizeFusionPass, RuntimeCalibrationPass)
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
