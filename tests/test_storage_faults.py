"""A full disk and a read-only file system, for real: a small tmpfs mounted for the test (root only;
skipped, saying why, where mounting is not allowed). Each is a StorageError naming the fix (one line
and exit code 2 on the CLI), the previous map stays intact, and nothing is left behind."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maptools_flows.cli import app
from maptools import quantize
from maptools.artifacts import verify_map
from maptools.conversion import convert
from maptools.errors import StorageError
from maptools.examples import SMALL_CNN_SHAPES

runner = CliRunner()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at a fresh folder, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Write a file until the file system is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "mapsave").iterdir() if ".incomplete" in p.name)


def test_disk_full_is_a_storage_error_and_keeps_the_previous_map(tmpfs, small_cnn) -> None:
    first = quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, output_root=tmpfs)
    before = verify_map(first.map_dir)
    _fill(tmpfs)
    with pytest.raises(StorageError, match="No space left on device") as info:
        quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, seed=1, output_root=tmpfs)
    assert "free disk space" in str(info.value)
    assert verify_map(first.map_dir) == before and _leftovers(tmpfs) == []
    with pytest.raises(StorageError, match="free disk space"):
        convert("m", output_root=tmpfs)
    assert verify_map(first.map_dir) == before and _leftovers(tmpfs) == []
    result = runner.invoke(app, ["quantize", str(small_cnn), "--mapname", "m", "--calib-steps", "8", "--seed", "2",
                                 "--device", "cpu", "--output-root", str(tmpfs)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "free disk space" in lines[0], result.stderr
    (tmpfs / "filler").unlink()  # space again: the next run completes
    quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, seed=1, output_root=tmpfs)
    assert verify_map(first.map_dir)["settings"]["seed"] == 1 and _leftovers(tmpfs) == []


def test_read_only_file_system_is_refused_before_any_work(tmpfs, small_cnn) -> None:
    first = quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, output_root=tmpfs)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(StorageError, match="writable file system"):
        quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, seed=1, output_root=tmpfs)
    with pytest.raises(StorageError):
        convert("m", output_root=tmpfs)
    assert verify_map(first.map_dir)["settings"]["seed"] == 0  # still readable, unchanged
    result = runner.invoke(app, ["quantize", str(small_cnn), "--mapname", "other", "--calib-steps", "8",
                                 "--device", "cpu", "--output-root", str(tmpfs)])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_full_disk_at_each_write_of_a_map_is_a_storage_error(tmpfs, small_cnn) -> None:
    """Room for the files written before one artifact and half of it: that artifact's write runs out of space
    (each in turn, the staging folder's files and the manifest included); every run is one StorageError, the
    previous map stays intact and nothing is left behind."""
    first = quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, output_root=tmpfs,
                     error_steps=0)
    before = verify_map(first.map_dir)
    order = ["quantinfo.pkl", "quantparams.pkl", "quantinfo.json", "quantparams.npz", "quant_model.onnx",
             "model.onnx", "error_report.json", "manifest.json"]
    pages = [-(-(first.map_dir / name).stat().st_size // 4096) for name in order]
    for index, name in enumerate(order):
        free = (sum(pages[:index]) + pages[index] // 2) * 4096
        _fill(tmpfs)
        filler = tmpfs / "filler"
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - free))
        with pytest.raises(StorageError, match="No space left on device.*free disk space"):
            quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", calib_steps=8, seed=index + 1,
                     output_root=tmpfs, error_steps=0)
        assert verify_map(first.map_dir) == before and _leftovers(tmpfs) == [], name
        filler.unlink()
