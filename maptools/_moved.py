"""Old import paths of modules that moved into the stage packages: each still imports, with a warning."""

from __future__ import annotations

import importlib
import sys
import warnings

#: the release that drops the old paths
REMOVED_IN = "0.4"


def moved(old: str, new: str) -> None:
    """Make module ``old`` the module ``new`` (same object: same classes, same state) and warn once."""
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes in maptools {REMOVED_IN}).",
                  DeprecationWarning, stacklevel=3)  # the importer (warnings skips importlib's frames)
    sys.modules[old] = importlib.import_module(new)
