"""One error hierarchy for maptools.

Every error says what is wrong and how to fix it. Each class also inherits the
builtin it refines, so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations

__all__ = [
    "MaptoolsError",
    "ModelError",
    "InputShapeError",
    "CalibrationError",
    "SettingsError",
    "DeviceError",
    "MapnameError",
    "ArtifactError",
    "MissingArtifactError",
    "UnsafePickleError",
    "QuantizationFailed",
    "ConversionError",
    "StorageError",
    "BudgetError",
    "StoreUnavailable",
    "DependencyError",
]


class MaptoolsError(Exception):
    """Base class: ``problem`` says what went wrong, ``fix`` how to put it right."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class ModelError(MaptoolsError, ValueError):
    """The ONNX model is missing, unreadable, or uses something PPQ cannot quantize."""


class InputShapeError(MaptoolsError, ValueError):
    """``input_shapes`` does not match the model's graph inputs."""


class CalibrationError(MaptoolsError, ValueError):
    """Calibration data is missing, malformed, or does not match the model."""


class SettingsError(MaptoolsError, ValueError):
    """A quantization setting is out of range or unknown."""


class BudgetError(SettingsError):
    """``bit_width='auto'``: no assignment of per-layer widths meets the budget."""


class DeviceError(MaptoolsError, RuntimeError):
    """The requested device is unknown or not available on this machine."""


class MapnameError(MaptoolsError, ValueError):
    """``mapname`` is empty or would write outside the output folder."""


class ArtifactError(MaptoolsError, ValueError):
    """Artifacts are incomplete, unreadable, from another model, or do not match their manifest."""


class MissingArtifactError(ArtifactError, FileNotFoundError):
    """An artifact (or the whole map) does not exist."""


class UnsafePickleError(MaptoolsError, TypeError):
    """A pickle names a class outside the allow-list of the safe readers."""


class QuantizationFailed(MaptoolsError, RuntimeError):
    """PPQ failed on a valid input (a transient or internal fault, not bad input).

    ``operator`` names the device operator the fault arose at, where one is known: ``quantize`` then
    keeps that operator on the host in float and quantizes again (unless ``strict``).
    """

    def __init__(self, problem: str, fix: str | None = None, *, operator: str | None = None) -> None:
        super().__init__(problem, fix)
        self.operator = operator


class ConversionError(MaptoolsError, ValueError):
    """The model uses operators the conversion does not support, or lacks required quant configs."""


class StorageError(MaptoolsError, OSError):
    """The output folder cannot take the map (disk full, read-only, no permission, a file in the way)."""


class StoreUnavailable(StorageError):
    """The map store did not answer (network, endpoint down): transient, worth retrying."""


class DependencyError(MaptoolsError, ImportError):
    """An installed package is outside the versions the module that adapts it was written for."""
