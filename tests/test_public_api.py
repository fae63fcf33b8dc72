"""The public API: every stage's entry point, result, setting and error from the top-level package."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_every_function_reading_or_writing_maps_names_their_root_alike() -> None:
    """One name for one setting: every public function that takes the folder holding ``mapsave/`` calls it
    ``output_root`` (the readers of quantinfo, quantparams and the manifest had called it ``root``)."""
    takes_a_map = [f for f in (getattr(maptools, n) for n in maptools.__all__) if inspect.isfunction(f)
                   and "mapname" in inspect.signature(f).parameters]
    assert {f.__name__ for f in takes_a_map} >= {"quantize", "read_quantinfo", "read_quantparams", "read_manifest",
                                                 "convert", "read_graph", "simulate", "evaluate_map"}
    for function in takes_a_map:
        roots = [p for p in inspect.signature(function).parameters if "root" in p]
        assert roots == ["output_root"], (function.__name__, roots)


#: modules that moved into the stage packages, by their old path (kept for one release, with a warning)
MOVED = {
    "maptools.roots": "maptools.maps.roots", "maptools.mapfolder": "maptools.maps.folder",
    "maptools.store": "maptools.maps.store", "maptools.manifest": "maptools.maps.manifest",
    "maptools.artifacts": "maptools.maps.artifacts", "maptools.seed": "maptools.maps.seed",
    "maptools.mapping": "maptools.crossbar.mapping", "maptools.crossbar_error": "maptools.crossbar.evaluation",
    "maptools.equalize": "maptools.quantization.equalize",
    "maptools.mixed_precision": "maptools.quantization.mixed_precision",
}


def test_old_import_paths_warn_and_give_the_moved_module() -> None:
    code = ["import importlib, json, sys, warnings", "out = {}"]
    for old, new in MOVED.items():  # each in a fresh interpreter, so the first import (the one that warns) is seen
        code += ["with warnings.catch_warnings(record=True) as caught:",
                 "    warnings.simplefilter('always')",
                 f"    module = importlib.import_module({old!r})",
                 f"out[{old!r}] = [module is sys.modules[{new!r}], [str(w.message) for w in caught "
                 "if w.category is DeprecationWarning]]"]
    code.append("print(json.dumps(out))")
    result = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    for old, new in MOVED.items():
        same, messages = seen[old]
        assert same, old
        assert any(f"{old} moved to {new}" in m for m in messages), (old, messages)
    from maptools.crossbar.mapping import map_graph
    sys.modules.pop("maptools.mapping", None)
    with pytest.warns(DeprecationWarning, match="maptools.crossbar.mapping"):
        from maptools.mapping import map_graph as old_map_graph  # the documented old path still works
    assert old_map_graph is map_graph


#: the pipeline's stages in order, each by its modules' prefix
STAGES = ["maptools.prepare", "maptools.quantization", "maptools.conversion", "maptools.simulate", "maptools.crossbar"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_an_earlier_stage_never_imports_a_later_one() -> None:
    root = Path(maptools.__file__).parent
    checked = 0
    for i, stage in enumerate(STAGES):
        base = root.joinpath(*stage.split(".")[1:])
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        for path in files:
            later = {m for m in _imports(path) for s in STAGES[i + 1:] if m == s or m.startswith(s + ".")}
            assert not later, f"{path.relative_to(root)} ({stage}) imports later stages: {sorted(later)}"
            checked += 1
    assert checked > 10
