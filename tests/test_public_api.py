"""The public API: every stage's entry point, result, setting and error from the top-level package."""

from __future__ import annotations

import inspect

import maptools


def test_top_level_exports_every_stage_and_error() -> None:
    for name in maptools.__all__:
        assert hasattr(maptools, name), name
    for entry in ("prepare_model", "quantize", "evaluate_map", "convert", "simulate", "map_crossbars",
                  "evaluate_crossbar"):
        assert callable(getattr(maptools, entry)) and inspect.getdoc(getattr(maptools, entry)), entry
    errors = [getattr(maptools, n) for n in maptools.__all__ if isinstance(getattr(maptools, n), type)
              and issubclass(getattr(maptools, n), Exception)]
    assert set(errors) >= {cls for cls in vars(maptools.errors).values() if isinstance(cls, type)
                           and issubclass(cls, maptools.MaptoolsError)}  # every error class is public
    for cls in errors:  # each means what its builtin means, and says whether a retry can help
        assert issubclass(cls, maptools.MaptoolsError) and isinstance(cls.transient, bool)
        assert cls is maptools.MaptoolsError or any(issubclass(cls, b) for b in (ValueError, RuntimeError, OSError,
                                                                                  TypeError, ImportError))
    assert maptools.ConcurrentUpdateError.transient and not maptools.IntegrityError.transient
    assert issubclass(maptools.DependencyError, ImportError) and issubclass(maptools.SimulationError, RuntimeError)
    assert not issubclass(maptools.SimulationError, maptools.ConversionError)
