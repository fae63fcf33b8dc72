"""maptools: quantize ONNX CNNs with PPQ for compute-in-memory accelerators."""

from __future__ import annotations

import logging

# torch logs "No CUDA runtime is found" on every CPU-only import of its cpp_extension (ppq does that).
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from maptools.versions import __version__  # noqa: E402
import maptools.store  # noqa: E402,F401 - registers the map folder of store URLs
from maptools.artifacts import read_manifest, read_quantinfo, read_quantparams  # noqa: E402
from maptools.conversion import convert, read_graph  # noqa: E402
from maptools.errors import MaptoolsError  # noqa: E402
from maptools.quantinfo import QuantConfig  # noqa: E402
from maptools.quantization import QuantizationResult, quantize  # noqa: E402
from maptools.settings import CalibrationAlgorithm, QuantSettings  # noqa: E402

__all__ = [
    "__version__", "quantize", "QuantizationResult", "QuantConfig", "QuantSettings", "CalibrationAlgorithm",
    "read_quantinfo", "read_quantparams", "read_manifest", "MaptoolsError", "convert", "read_graph",
]
