"""The documentation site builds with no warning (``mkdocs build --strict``: broken links, missing anchors and
references fail it), and its generated reference pages name every setting, command, manifest key and error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import maptools
from maptools.crossbar.device import DeviceModel
from maptools.crossbar.mapping import CrossbarSpec
from maptools.maps.manifest import Manifest
from maptools.settings import QuantSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def text(site: Path, page: str) -> str:
    html = (site / page / "index.html").read_text()
    return re.sub(r"<[^>]+>", " ", html[html.index("<article"):html.index("</article>")])


def test_the_site_builds_strict_and_its_home_reaches_every_reference(site: Path) -> None:
    home = (site / "index.html").read_text()
    for page in ("reference/settings/", "reference/cli/", "reference/manifest/", "reference/errors/",
                 "reference/api/", "getting-started/", "map-folder/", "benchmarks/"):
        assert f'href="{page}"' in home, page  # one click from the home page
    for image in ("sweep_bits.png", "sweep_adc.png", "layer_snr.png", "real_models.png", "adc_range.png"):
        assert (site / "images" / image).stat().st_size > 10_000, image


def test_reference_pages_are_generated_from_the_code(site: Path) -> None:
    settings = text(site, "reference/settings")
    for name, field in (*QuantSettings.model_fields.items(), *CrossbarSpec.model_fields.items(),
                        *DeviceModel.model_fields.items()):
        assert name in settings and " ".join(field.description.split())[:40] in " ".join(settings.split()), name
    errors = text(site, "reference/errors")
    for name in maptools.errors.__all__:
        assert name in errors, name
    manifest = text(site, "reference/manifest")
    for name in Manifest.model_fields:
        assert name in manifest, name
    cli = text(site, "reference/cli")
    for command in ("quantize", "inspect", "convert", "simulate", "map", "check-seed", "sweep", "flow example"):
        assert f"maptools {command}" in cli, command
    for option in ("--input-shape", "--weight-bits", "--layer-bits", "--scale-policy", "--keep-on-host", "--xbar"):
        assert option in cli, option
    api = text(site, "reference/api")
    assert "calib_steps" in api and "QuantizationResult" in api and "evaluate_crossbar" in api


#: shell blocks the suite runs as written (tests/test_cli.py): the first one of each of these guides
RUN_BY_TESTS = {"docs/cli.md", "docs/conversion.md", "docs/crossbar.md", "docs/map-folder.md"}


def test_every_code_block_runs_or_says_why_not() -> None:
    """Python blocks run under Sybil (conftest.py); the guides' command lines run in tests/test_cli.py; every
    other block says why it is not run (``<!-- not run: why -->`` right above it). Diagrams (``text``) are not
    code."""
    unmarked = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        name, lines = path.relative_to(ROOT).as_posix(), path.read_text().splitlines()
        inside, shell = False, 0
        for i, line in enumerate(lines):
            if not line.startswith("```"):
                continue
            inside = not inside
            language = line[3:].strip()
            shell += inside and language == "bash"
            if not inside or language in ("python", "text") or (name in RUN_BY_TESTS and shell == 1 and
                                                                 language == "bash"):
                continue
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if not (above.startswith("<!-- not run: ") and len(above) > 30):
                unmarked.append(f"{name}:{i + 1}")
    assert not unmarked, f"code blocks neither run nor marked '<!-- not run: why -->': {unmarked}"
