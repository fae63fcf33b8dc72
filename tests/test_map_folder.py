"""The map folder under faults and hostile input: kills mid-write, concurrent readers, bad names and files."""

from __future__ import annotations

import json
import pickle
import sys
import threading
from pathlib import Path

import pytest
import torch
from prefect.states import Failed

from maptools import quantize, read_manifest, read_quantinfo, read_quantparams
from maptools.maps.artifacts import safe_load_pickle, verify_map
from maptools.errors import (ArtifactError, ConcurrentUpdateError, IntegrityError, MapnameError, MaptoolsError,
                             SettingsError, StorageError, StoreUnavailable, UnsafePickleError)
from maptools.examples import SMALL_CNN_SHAPES
from maptools.maps.folder import MapFolder
from maptools_flows.tasks import is_transient
from tests.servers import kill_when_paused



def _quantize(model: Path, root: Path, seed: int = 0, **kwargs):
    return quantize(SMALL_CNN_SHAPES, "cpu", model, mapname="m", calib_steps=8, seed=seed, output_root=root,
                    **kwargs)


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "mapsave").iterdir())


@pytest.mark.parametrize("point", ["staged", "renamed"])
def test_a_killed_write_leaves_the_previous_map_and_the_next_write_cleans_up(point, small_cnn, tmp_path) -> None:
    before = _quantize(small_cnn, tmp_path, seed=0)
    code = (f"from maptools import quantize\nquantize({SMALL_CNN_SHAPES!r}, 'cpu', {str(small_cnn)!r}, mapname='m', "
            f"calib_steps=8, seed=1, output_root={str(tmp_path)!r})\n")
    kill_when_paused(code, point, tmp_path)
    # the map is the previous run's, whole
    assert verify_map(tmp_path / "mapsave" / "m")["artifacts"] == before.sha256
    assert read_manifest("m", tmp_path)["settings"]["seed"] == 0
    leftovers = [e for e in _entries(tmp_path) if "incomplete" in e or (point == "renamed" and ".v-" in e)]
    assert leftovers  # the killed write's staging folder (or unlinked version) is there ...
    if point == "staged":
        assert MapFolder("m", tmp_path).stale_staging()
    after = _quantize(small_cnn, tmp_path, seed=2)
    entries = _entries(tmp_path)
    assert not [e for e in entries if "incomplete" in e]  # ... and gone after the next write
    assert len([e for e in entries if e.startswith(".m.v-")]) == 2
    assert verify_map(tmp_path / "mapsave" / "m")["artifacts"] == after.sha256


def test_readers_see_a_whole_map_while_it_is_rewritten(small_cnn, tmp_path) -> None:
    _quantize(small_cnn, tmp_path, seed=0)
    stop, reads, failures = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                manifest = verify_map(tmp_path / "mapsave" / "m")
                assert manifest["settings"]["seed"] in (0, 1, 2, 3)
                read_quantinfo("m", tmp_path)
                read_quantparams("m", tmp_path)
                reads[0] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for seed in (1, 2, 3):
            _quantize(small_cnn, tmp_path, seed=seed)
    finally:
        stop.set()
        thread.join()
    assert reads[0] > 10 and failures == []


def test_names_and_hostile_files_are_refused(small_cnn, tmp_path) -> None:
    for bad in ("victim\n", "a/b", "..", "", ".hidden"):
        with pytest.raises(MapnameError):
            quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname=bad, output_root=tmp_path)
    _quantize(small_cnn, tmp_path)
    folder = MapFolder("m", tmp_path).open().path
    # artifact names confined to the map folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["../../escape.txt"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a file name inside the map"):
        verify_map(tmp_path / "mapsave" / "m")
    # the unpickler's allow-list is exact: a module merely named like numpy is never imported
    (tmp_path / "numpyevil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n"
                                           "class Boom:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import numpyevil  # noqa: F401  (pickled by reference below, then forgotten)

        payload = pickle.dumps(numpyevil.Boom())
        del sys.modules["numpyevil"]
        (tmp_path / "ran").unlink()
        (tmp_path / "evil.pkl").write_bytes(payload)
        with pytest.raises(UnsafePickleError, match="numpyevil.Boom"):
            safe_load_pickle(tmp_path / "evil.pkl")
        assert not (tmp_path / "ran").exists()
    finally:
        sys.path.remove(str(tmp_path))


def test_folders_and_files_in_the_way(small_cnn, tmp_path) -> None:
    precious = tmp_path / "mapsave" / "notamap"
    precious.mkdir(parents=True)
    (precious / "precious.txt").write_text("keep me")
    with pytest.raises(MapnameError, match="not a maptools map"):
        quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="notamap", output_root=tmp_path)
    assert (precious / "precious.txt").read_text() == "keep me"
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(MaptoolsError, match="afile") as e:
        quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", output_root=blocker)
    assert isinstance(e.value, OSError) and "output_root" in str(e.value)
    with pytest.raises(SettingsError, match="error_steps=-1"):
        quantize(SMALL_CNN_SHAPES, "cpu", small_cnn, mapname="m", error_steps=-1, output_root=tmp_path)


def test_error_steps_zero_skips_the_report(small_cnn, tmp_path) -> None:
    result = _quantize(small_cnn, tmp_path, error_steps=0)
    report = json.loads((result.map_dir / "error_report.json").read_text())
    assert report["skipped"] is True and report["per_layer"] == {} and result.errors.worst_layer is None


def test_maps_of_the_previous_release_are_read_and_replaced(small_cnn, tmp_path) -> None:
    """0.1 wrote a plain folder; it reads as it is, and the next write turns it into a version."""
    import shutil

    result = _quantize(small_cnn, tmp_path)
    legacy = tmp_path / "old" / "mapsave" / "m"
    shutil.copytree(result.version_dir, legacy)
    assert not legacy.is_symlink() and read_quantinfo("m", tmp_path / "old")
    assert verify_map(legacy)["artifacts"] == result.sha256
    again = _quantize(small_cnn, tmp_path / "old", seed=1)
    assert legacy.is_symlink() and verify_map(legacy)["artifacts"] == again.sha256
    assert len([e for e in _entries(tmp_path / "old") if e.startswith(".m.v-")]) == 2


def test_a_changed_artifact_is_not_a_missing_file(small_cnn, tmp_path) -> None:
    """A hash mismatch is an ArtifactError (a ValueError); only a file that does not exist is a FileNotFoundError."""
    result = _quantize(small_cnn, tmp_path)
    with pytest.raises(FileNotFoundError):
        read_quantinfo("never-written", tmp_path)
    params = result.version_dir / "quantparams.pkl"
    params.write_bytes(params.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="does not match the sha256") as info:
        verify_map(result.map_dir)
    assert isinstance(info.value, ArtifactError | ValueError) and not isinstance(info.value, OSError)
    assert not info.value.transient  # the same bytes fail again


def test_a_map_rewritten_meanwhile_is_a_transient_conflict(small_cnn, tmp_path) -> None:
    """A step that derived its files from one version of a map finds another there when it registers them:
    ConcurrentUpdateError (a RuntimeError, not bad input), which the flows retry."""
    first = _quantize(small_cnn, tmp_path)
    based_on = {"quantinfo.json": read_manifest("m", tmp_path)["artifacts"]["quantinfo.json"]}
    _quantize(small_cnn, tmp_path, seed=1)
    with pytest.raises(ConcurrentUpdateError, match="rewritten while this step read it") as info:
        MapFolder("m", tmp_path).update({"extra.json": b"{}"}, {}, based_on=based_on)
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, ValueError) and info.value.transient
    assert is_transient(None, None, Failed(data=info.value))
    assert not (first.map_dir / "extra.json").exists()


@pytest.mark.parametrize(("error", "retried"), [
    (StoreUnavailable("the store did not answer."), True),
    (StorageError("disk full.", "free space."), False),
    (SettingsError("bad.", "good."), False),
    (PermissionError(13, "denied"), False),
    (ConnectionResetError(104, "reset"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA-looking message, no CUDA error class"), False),
])
def test_the_retry_policy_reads_the_error_class(error, retried) -> None:
    assert is_transient(None, None, Failed(data=error)) is retried


def test_the_manifest_is_typed_and_checked(small_cnn, tmp_path) -> None:
    result = _quantize(small_cnn, tmp_path)
    record = MapFolder("m", tmp_path).open().verified()
    assert record.mapname == "m" and record.artifacts == result.sha256 and record.settings["seed"] == 0
    assert record.model.input_shapes == {k: list(v) for k, v in SMALL_CNN_SHAPES.items()}
    path = result.version_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["artifacts"]["quantinfo.pkl"] = "not a sha256"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"not a maptools manifest \(artifacts.quantinfo.pkl: String should match"):
        read_manifest("m", tmp_path)
