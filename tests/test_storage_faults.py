"""A full disk and a read-only file system, for real: a small tmpfs mounted for the test (root only;
skipped, saying why, where mounting is not allowed); and ENOSPC, EROFS, EACCES and EIO at each write of
each map stage (and of the flows' prepared-model cache), injected where the call is made
(:mod:`tests.faults`). Each is a StorageError naming the fix (one line
and exit code 2 on the CLI), the previous map stays intact, and nothing is left behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maptools_flows.cli import app
from maptools import quantize
from maptools.maps.artifacts import verify_map
from maptools.conversion import convert
from maptools.errors import StorageError
from maptools.examples import SMALL_CNN_SHAPES
from maptools.crossbar.mapping import CrossbarSpec, map_crossbars
from maptools.stages import prepare_onnx
from tests.faults import inject_at, record_writes

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


_FAULTS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO)
def _tolerated(write: str) -> bool:
    """Writes a fault may hit without failing the run: creating a folder that exists (``mkdir(exist_ok=True)``
    checks it is a folder and goes on), the first open of the npz (zipfile opens it again in another mode),
    and the hard link of an unchanged file into a new version (copied instead where linking fails)."""
    return (write.startswith("os.mkdir ") or write.startswith("os.link ")
            or write.startswith("open ") and write.endswith("/quantparams.npz"))


def _prepare_again(root: Path) -> object:
    """The flows' prepare-model step with an empty prepared-model cache (so that it writes)."""
    shutil.rmtree(root / "mapsave" / ".models", ignore_errors=True)
    return prepare_onnx(root / "model.onnx", SMALL_CNN_SHAPES, root=root)


def _stage_runs(root: Path) -> dict[str, Callable[[int], object]]:
    """Each map stage as the API runs it, and as the CLI does (returning its result)."""
    return {
        "prepare": lambda seed: _prepare_again(root),
        "quantize": lambda seed: quantize(SMALL_CNN_SHAPES, "cpu", root / "model.onnx", mapname="m", calib_steps=8,
                                          seed=seed, output_root=root, error_steps=0),
        "convert": lambda seed: convert("m", output_root=root),
        "map": lambda seed: map_crossbars("m", CrossbarSpec(rows=32, cols=32, cell_bits=2), output_root=root,
                                          seed=seed),
    }


_CLI = {
    "quantize": lambda root, seed: ["quantize", str(root / "model.onnx"), "--mapname", "m", "--calib-steps", "8",
                                    "--seed", str(seed), "--device", "cpu",
                                    "--output-root", str(root)],
    "convert": lambda root, seed: ["convert", "--mapname", "m", "--output-root", str(root)],
    "map": lambda root, seed: ["map", "--mapname", "m", "--xbar", "32x32", "--output-root", str(root)],
}


def _tidy(root: Path) -> list[str]:
    """What a map folder holds besides the link, its lock, at most two versions (current, previous) and the
    prepared-model cache, and any partial file in that cache."""
    names = sorted(p.name for p in (root / "mapsave").iterdir()) if (root / "mapsave").is_dir() else []
    versions = [n for n in names if n.startswith(".m.v-")]
    extra = [n for n in names if n not in ("m", ".m.lock", ".models") and not n.startswith(".m.v-")]
    partial = [p.name for p in (root / "mapsave" / ".models").glob("*") if ".incomplete" in p.name] \
        if (root / "mapsave" / ".models").is_dir() else []
    return extra + partial + (versions if len(versions) > 2 else [])


@pytest.mark.parametrize("stage", ["prepare", "quantize", "convert", "map"])
def test_an_os_error_at_each_write_of_a_stage_is_a_storage_error(tmp_path, small_cnn, stage) -> None:
    """ENOSPC, EROFS, EACCES and EIO injected at every file-system write of the stage in turn (file creations,
    folder creations, renames, links under the output root): the API raises one StorageError naming the errno
    and the fix, or (where the library tolerates the fault) completes a verified map; the CLI prints one
    ``error:`` line and exits 2; the previous map stays intact and nothing is left behind."""
    (tmp_path / "model.onnx").write_bytes(small_cnn.read_bytes())
    runs = _stage_runs(tmp_path)
    for name in ("quantize", "convert", "map")[:("prepare", "quantize", "convert", "map").index(stage)]:
        runs[name](0)
    runs[stage](0)
    with record_writes(tmp_path) as writes:
        runs[stage](0)
    assert len(writes) >= 4, writes
    for index in range(len(writes)):
        for number in _FAULTS:
            before = verify_map(tmp_path / "mapsave" / "m") if stage != "prepare" else None
            with inject_at(tmp_path, index, number) as seen:
                try:
                    runs[stage](index + 1)
                except StorageError as e:
                    assert os.strerror(number) in str(e) and "Fix: " in str(e), (seen[index], e)
                    assert before is None or verify_map(tmp_path / "mapsave" / "m") == before, seen[index]
                else:
                    assert _tolerated(seen[index]), f"{seen[index]}: no error"
                    if before is not None:
                        verify_map(tmp_path / "mapsave" / "m")
            assert _tidy(tmp_path) == [], (seen[index], errno.errorcode[number])
        if stage not in _CLI:
            continue
        number = _FAULTS[index % len(_FAULTS)]
        with inject_at(tmp_path, index, number) as seen:
            done = runner.invoke(app, _CLI[stage](tmp_path, index + 100))
        lines = done.stderr.strip().splitlines()
        if done.exit_code == 0:
            assert _tolerated(seen[index]), f"{seen[index]}: no error"
        else:
            assert done.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (seen[index],
                                                                                                 done.output)
            assert os.strerror(number) in lines[0], lines[0]
        assert _tidy(tmp_path) == [], seen[index]


def test_an_os_error_while_a_task_result_is_written_is_a_storage_error(tmp_path) -> None:
    """The flows' result files (Prefect's cache records): written whole, and an OS error at any of their writes
    is a StorageError that leaves the previous record and no partial file."""
    from maptools_flows.results import SERIALIZER, ResultFiles

    storage = ResultFiles(basepath=str(tmp_path / "results"))
    old, new = SERIALIZER.dumps({"value": 1}), SERIALIZER.dumps({"value": 2})
    storage.write_path("key/record", old)
    with record_writes(tmp_path) as writes:
        storage.write_path("key/record", old)
    for index in range(len(writes)):
        for number in _FAULTS:
            with inject_at(tmp_path, index, number) as seen:
                try:
                    storage.write_path("key/record", new)
                except StorageError as e:
                    assert os.strerror(number) in str(e) and "Fix: " in str(e), (seen[index], e)
                    assert storage.read_path("key/record") == old
                else:
                    assert _tolerated(seen[index]), seen[index]
                    storage.write_path("key/record", old)
            assert sorted(p.name for p in (tmp_path / "results" / "key").iterdir()) == ["record"], seen[index]
