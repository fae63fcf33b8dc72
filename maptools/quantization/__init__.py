"""Quantization: PPQ post-training quantization of a prepared model into a map.

- :mod:`~maptools.quantization.api`: the documented ``quantize(input_shapes, device, onnx_path, mapname=...,
  calibset=..., calib_steps=...)`` and its typed result;
- :mod:`~maptools.quantization.ppq_adapter`: the one home of ``import ppq`` (shims for a current stack,
  quantizer configs, calibration statistics, the graph adapter, the exact onnxruntime export);
- :mod:`~maptools.quantization.equalize`: cross-layer equalization before calibration;
- :mod:`~maptools.quantization.mixed_precision`: per-layer widths searched under a budget.
"""

from maptools.quantization.api import ErrorSummary, QuantizationResult, quantize, snr_db

__all__ = ["quantize", "QuantizationResult", "ErrorSummary", "snr_db"]
