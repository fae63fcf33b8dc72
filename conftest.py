"""Every Python block of README.md and docs/ runs as a test, in page order (Sybil).

Each page runs in a fresh folder of its own, which holds what the pages assume is there: the simplified
ResNet18 that `maptools example` writes (``onnx_models/simp-resnet18.onnx``), a folder of images in a
class subfolder (``calib_images/``) and a folder of ``.npy`` arrays (``calib_arrays/``). Blocks that need
something a test run does not have (a Prefect server, a model from the package registry) carry
``<!-- skip: next "why" -->``; hidden ``<!-- invisible-code-block: python -->`` blocks check results.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

# pytest-xdist's workers start with COLUMNS=80, which rich's consoles (created at import) would keep for good;
# the command-line tests give each run the width they read it at.
os.environ.pop("COLUMNS", None)


@cache
def _resnet18() -> Path:
    """The example ResNet18, exported once per test session into a folder removed when the session ends."""
    from maptools.examples import resnet18_onnx

    folder = tempfile.mkdtemp(prefix="maptools-docs-model-")
    atexit.register(shutil.rmtree, folder, True)
    return resnet18_onnx(Path(folder) / "simp-resnet18.onnx")


def _setup(namespace: dict[str, Any]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="maptools-docs-"))
    namespace["_restore"] = (os.getcwd(), os.environ.pop("MAPTOOLS_HOME", None), folder)
    (folder / "onnx_models").mkdir()
    shutil.copy(_resnet18(), folder / "onnx_models" / "simp-resnet18.onnx")
    rng = np.random.default_rng(0)
    (folder / "calib_images" / "any").mkdir(parents=True)
    for i in range(10):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "calib_images" / "any" / f"{i}.png")
    (folder / "calib_arrays").mkdir()
    for i in range(9):
        np.save(folder / "calib_arrays" / f"{i:02d}.npy", rng.standard_normal((1, 3, 224, 224), dtype=np.float32))
    os.chdir(folder)


def _teardown(namespace: dict[str, Any]) -> None:
    cwd, home, folder = namespace["_restore"]
    os.chdir(cwd)
    if home is not None:
        os.environ["MAPTOOLS_HOME"] = home
    shutil.rmtree(folder, ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    setup=_setup,
    teardown=_teardown,
).pytest()
