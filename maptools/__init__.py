"""maptools: quantize ONNX CNNs with PPQ for compute-in-memory accelerators."""

from __future__ import annotations

import logging

# torch logs "No CUDA runtime is found" on every CPU-only import of its cpp_extension (ppq does that).
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from maptools.versions import __version__  # noqa: E402
import maptools.maps.store  # noqa: E402,F401 - registers the map folder of store URLs
from maptools.maps.artifacts import read_manifest, read_quantinfo, read_quantparams  # noqa: E402
from maptools.maps.roots import MapRef  # noqa: E402
from maptools.conversion import ConversionResult, convert, read_graph  # noqa: E402
from maptools.crossbar.cost import COST_PRESETS, ComponentTable, NetworkCost  # noqa: E402
from maptools.crossbar.device import DEVICE_PRESETS, DeviceModel  # noqa: E402
from maptools.crossbar.evaluation import (CrossbarError, DeviceEvaluation, evaluate_crossbar,  # noqa: E402
                                          evaluate_device)
from maptools.errors import (ArtifactError, BudgetError, CalibrationError, ConcurrentUpdateError,  # noqa: E402
                             ConversionError, DependencyError, DeviceError, InputShapeError, IntegrityError,
                             MapnameError, MaptoolsError, MissingArtifactError, ModelError, QuantizationFailed,
                             SettingsError, SimulationError, StorageError, StoreUnavailable, SweepConfigError,
                             UnsafePickleError)
from maptools.evaluation import OutputError, evaluate_map  # noqa: E402
from maptools.crossbar.mapping import CrossbarMap, CrossbarSpec, map_crossbars  # noqa: E402
from maptools.prepare import PreparedModel, prepare_model  # noqa: E402
from maptools.quantinfo import QuantConfig  # noqa: E402
from maptools.quantization import ErrorSummary, QuantizationResult, quantize  # noqa: E402
from maptools.settings import (ActivationSign, CalibrationAlgorithm, Optimization, Profile,  # noqa: E402
                               QuantSettings, ScalePolicy)
from maptools.simulate import SimulationResult, simulate  # noqa: E402

#: every stage's entry point and typed result, the settings and the errors (the pipeline, in order)
__all__ = [
    "__version__",
    # prepare -> quantize
    "prepare_model", "PreparedModel", "quantize", "QuantizationResult", "ErrorSummary", "QuantSettings",
    "CalibrationAlgorithm", "ActivationSign", "Optimization", "ScalePolicy", "Profile", "QuantConfig",
    "MapRef", "read_quantinfo", "read_quantparams", "read_manifest", "evaluate_map", "OutputError",
    # convert -> simulate
    "convert", "ConversionResult", "read_graph", "simulate", "SimulationResult",
    # crossbars
    "map_crossbars", "CrossbarSpec", "CrossbarMap", "evaluate_crossbar", "CrossbarError",
    "DeviceModel", "DEVICE_PRESETS", "evaluate_device", "DeviceEvaluation", "NetworkCost", "ComponentTable",
    "COST_PRESETS",
    # errors
    "MaptoolsError", "ModelError", "InputShapeError", "CalibrationError", "SettingsError", "BudgetError",
    "DeviceError", "MapnameError", "ArtifactError", "MissingArtifactError", "IntegrityError",
    "ConcurrentUpdateError", "UnsafePickleError", "QuantizationFailed", "ConversionError", "SimulationError",
    "StorageError", "StoreUnavailable", "SweepConfigError", "DependencyError",
]
