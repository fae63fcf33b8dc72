"""One error hierarchy for maptools.

Every error says what is wrong and how to fix it. Each class also inherits the
builtin it refines, so ``except ValueError`` in user code keeps working, and says whether running
the same step again may succeed (:attr:`MaptoolsError.transient`; the flows retry only those).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

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
    "IntegrityError",
    "ConcurrentUpdateError",
    "UnsafePickleError",
    "QuantizationFailed",
    "ConversionError",
    "SimulationError",
    "SweepConfigError",
    "StorageError",
    "BudgetError",
    "StoreUnavailable",
    "DependencyError",
]


class MaptoolsError(Exception):
    """Base class: ``problem`` says what went wrong, ``fix`` how to put it right."""

    #: whether the same step, run again on the same input, may succeed (a store that did not answer, a
    #: map another writer replaced meanwhile); bad input never is
    transient: ClassVar[bool] = False

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


class IntegrityError(ArtifactError):
    """An artifact's bytes do not match the sha256 its manifest (or the store's pointer) records."""


class ConcurrentUpdateError(MaptoolsError, RuntimeError):
    """Another writer replaced the map while this step read it: run the step again on the new map."""

    transient = True


class UnsafePickleError(MaptoolsError, TypeError):
    """A pickle names a class outside the allow-list of the safe readers."""


class QuantizationFailed(MaptoolsError, RuntimeError):
    """PPQ failed on a valid input (a transient or internal fault, not bad input).

    ``operator`` names the device operator the fault arose at, where one is known: ``quantize`` then
    keeps that operator on the host in float and quantizes again (unless ``strict``); ``also``, the others
    the same fault arose at (kept there with it: a NaN reaches every operator after its source); ``reasons``,
    each one's own account where the problem, which names the first, does not fit it.
    """

    def __init__(self, problem: str, fix: str | None = None, *, operator: str | None = None,
                 also: tuple[str, ...] = (), reasons: Mapping[str, str] | None = None) -> None:
        super().__init__(problem, fix)
        self.operator = operator
        self.also = also
        self.reasons = dict(reasons or {})

    def reason(self, operator: str) -> str:
        """Why ``operator`` (the one named, or one of ``also``) failed."""
        return self.reasons.get(operator, self.problem)


class ConversionError(MaptoolsError, ValueError):
    """The model uses operators the conversion does not support, or lacks required quant configs."""


class SimulationError(MaptoolsError, RuntimeError):
    """The integer simulation cannot compute a value as the hardware would (an accumulator overflows, a device
    operator is handed a float tensor)."""


class StorageError(MaptoolsError, OSError):
    """The output folder cannot take the map (disk full, read-only, no permission, a file in the way)."""


class StoreUnavailable(StorageError):
    """The map store did not answer (network, endpoint down): transient, worth retrying."""

    transient = True


class SweepConfigError(SettingsError):
    """A sweep configuration file that is missing, unreadable or has bad fields."""


class DependencyError(MaptoolsError, ImportError):
    """A package is missing, or installed outside the versions the module that adapts it was written for."""
