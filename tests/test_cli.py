"""The ``maptools`` command line: quantize from an image folder, inspect, one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from maptools.cli import app
from maptools.evaluation import evaluate_map
from tests.test_calibration import docs_block, on_small_cnn, write_pngs

runner = CliRunner()


def test_quantize_from_an_image_folder(small_cnn, tmp_path) -> None:
    calib = write_pngs(tmp_path / "calib", 10)
    result = runner.invoke(app, ["quantize", str(small_cnn), "--input-shape", "input=1,3,32,32", "--mapname", "cnn",
                                 "--calib", str(calib), "--calib-steps", "8", "--device", "cpu", "--bits", "8",
                                 "--algorithm", "kl", "--output-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "W8A8, per-channel weights, kl activations (signed)" in " ".join(result.stdout.split())
    assert "8 of 10 samples" in result.stdout and "16/16" in result.stdout  # summary table; kl reads twice
    manifest = json.loads((tmp_path / "mapsave" / "cnn" / "manifest.json").read_text())
    assert manifest["calibration"]["kind"] == "image_folder" and manifest["calib_steps_used"] == 8
    assert manifest["settings"]["algorithm"] == "kl"


def test_evaluate_reads_the_calibration_folder_after_the_calibrated_samples(small_cnn, tmp_path) -> None:
    calib = write_pngs(tmp_path / "calib", 12)
    assert runner.invoke(app, ["quantize", str(small_cnn), "--mapname", "ev", "--calib", str(calib), "--calib-steps",
                               "8", "--algorithm", "percentile", "--output-root", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "--mapname", "ev", "--output-root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["samples"] == 4 and data["source"].startswith("calib/ samples 9-12 of 12")
    assert data["rel_l2"] == evaluate_map("ev", output_root=tmp_path).rel_l2 and data["verified"]
    table = runner.invoke(app, ["evaluate", "--mapname", "ev", "--output-root", str(tmp_path), "--samples", "2",
                                "--eval", str(write_pngs(tmp_path / "other", 3, seed=1))], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "2: other/ samples 1-2 of 3" in table.stdout and "top-1 agreement" in table.stdout
    missing = runner.invoke(app, ["evaluate", "--mapname", "nope", "--output-root", str(tmp_path)])
    assert missing.exit_code == 2 and "run quantize(..., mapname='nope') first" in missing.output


def test_quantize_json_output_for_scripts(small_cnn, tmp_path) -> None:
    result = runner.invoke(app, ["quantize", str(small_cnn), "--mapname", "js", "--calib-steps", "8", "--device", "cpu",
                                 "--output-root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is the JSON object alone: no table, no progress bar
    assert data["mapname"] == "js" and data["map_dir"] == str(tmp_path / "mapsave" / "js")
    assert data["settings"]["weight_bits"] == 8 and set(data["snr_db"]) == set(data["error_report"]) != set()
    for layer, ratio in data["error_report"].items():  # SNR in dB, higher is better; the ratio kept beside it
        assert data["snr_db"][layer] == pytest.approx(-10 * np.log10(ratio), abs=0.01)
    table = runner.invoke(app, ["quantize", str(small_cnn), "--mapname", "js", "--calib-steps", "8", "--device", "cpu",
                                "--output-root", str(tmp_path)], env={"COLUMNS": "200"})
    worst = max(data["error_report"], key=data["error_report"].__getitem__)
    error = data["output_error"]  # quant_model.onnx against float on the report's calibration samples
    assert error["samples"] == 8 and f"{error['rel_l2']:.2%} rel. L2 against float" in table.stdout
    assert f"worst {-10 * np.log10(data['error_report'][worst]):.1f} dB ({worst}); higher is better" in table.stdout


def test_documented_cli_examples_run(small_cnn, tmp_path, monkeypatch) -> None:
    """The command lines of the docs' guides, in order (quantize, convert and simulate, map onto crossbars,
    check the seed contract), run as written on the small CNN (model path and input size swapped)."""
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "calib_images", 9)
    pages = ("cli.md", "conversion.md", "crossbar.md", "map-folder.md")
    lines = on_small_cnn("".join(docs_block(page, "bash") for page in pages), small_cnn).strip().splitlines()
    for line in lines:
        args = shlex.split(line, comments=True)
        assert args[0] == "maptools"
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, (line, result.output)
    assert json.loads((tmp_path / "mapsave" / "resnet18" / "manifest.json").read_text())["calib_steps_used"] == 9
    assert json.loads((tmp_path / "mapsave" / "resnet18-w4" / "manifest.json").read_text())["onnx_export_exact"]
    assert (tmp_path / "mapsave" / "resnet18" / "crossbar_map.json").is_file()
    assert len(lines) >= 9  # four quantize, convert, simulate, map, simulate --crossbar, device, check-seed
    device = next(runner.invoke(app, shlex.split(line, comments=True)[1:], env={"COLUMNS": "200"}) for line in lines
                  if line.startswith("maptools device"))
    assert device.exit_code == 0 and "86400" in device.stdout and "+-" in device.stdout, device.output
    bad = runner.invoke(app, ["device", "--mapname", "resnet18", "--preset", "rram"])
    assert bad.exit_code == 2 and "device preset 'rram' is unknown" in bad.output


def test_help_explains_the_options() -> None:
    result = runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for words in ("--input-shape", "input=1,3,224,224", "--calib", "random", "subfolders", "--bits",
                  "--algorithm", "percentile", "--per-tensor", "--activation-sign", "--optimize", "bias-correction",
                  "Examples", "--scale-policy", "--shared-scales", "--max-error-ratio", "--multiplier-bits"):
        assert words in result.stdout, words


def dynamic_model(path: Path) -> Path:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize(("args", "words"), [
    (["--bits", "9"], "--bits"),
    (["--bits", "auto", "--profile", "extended"], "exactly one budget"),
    # the fixes name the options, not quantize()'s keywords
    (["--bits", "auto", "--profile", "extended"], "pass e.g. --max-error 0.05, --max-error-ratio 1.5"),
    (["--bits", "auto", "--max-error", "0.1"], "pass --profile extended with --bits auto."),
    (["--activation-sign", "auto"], "--activation-sign auto: the seed profile's downstream"),
    (["--bits", "auto", "--max-error-ratio", "0.5"], "--max-error-ratio"),
    (["--scale-policy", "log2"], "--scale-policy"),
    (["--calib-steps", "7"], "--calib-steps"),
    (["--input-shape", "input=1,3,x"], "NAME=D0,D1"),
    (["--input-shape", "image=1,3,32,32"], "missing: ['input']"),
    (["--input-shape", "input=1,3,32"], "rank 4"),
    (["--input-shape", "input=1,3,32,32", "--input-shape", "input=1,3,32,32"], "'input' is given twice"),
    (["--algorithm", "isotone"], "percentile"),
    (["--calib", "no/such/folder"], "does not exist"),
    (["--device", "tpu"], "'cpu', 'cuda' or 'auto'"),
    (["--mapname", "../up"], "plain folder name"),
    (["--frobnicate"], "No such option"),
])
def test_bad_input_is_one_line_and_exit_code_2(small_cnn, tmp_path, args, words) -> None:
    result = runner.invoke(app, ["quantize", str(small_cnn), "--output-root", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "mapsave").exists()


def test_a_file_name_a_mapname_cannot_hold_and_where_simulate_saves(small_cnn, tmp_path) -> None:
    """Without --mapname the map is named after the file, with what a mapname cannot hold as '_' ('my model
    (1).onnx' was refused, the fix never saying why); simulate --save into a folder that does not exist is one
    error line before the simulation runs (it was a raw FileNotFoundError after it), and the line after a save
    names the file written."""
    import shutil

    from maptools.errors import InputShapeError
    from maptools.simulate import simulate

    model = tmp_path / "my model (1).onnx"
    shutil.copy(small_cnn, model)
    result = runner.invoke(app, ["quantize", str(model), "--calib-steps", "8", "--output-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mapsave" / "my_model_1" / "manifest.json").is_file()
    assert runner.invoke(app, ["convert", "--mapname", "my_model_1", "--output-root", str(tmp_path)]).exit_code == 0
    missing = tmp_path / "no such" / "out"
    result = runner.invoke(app, ["simulate", "--mapname", "my_model_1", "--save", str(missing),
                                 "--output-root", str(tmp_path)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "does not exist" in result.stderr and "top-5" not in result.stdout and "Traceback" not in result.output
    result = runner.invoke(app, ["simulate", "--mapname", "my_model_1", "--save", str(tmp_path / "out"),
                                 "--output-root", str(tmp_path)])
    assert result.exit_code == 0 and f"outputs written to {tmp_path / 'out.npz'}" in " ".join(result.stdout.split())
    saved = np.load(tmp_path / "out.npz")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    one = simulate("my_model_1", x, output_root=tmp_path).outputs  # one input's array, not a dict
    assert set(one) == set(saved.files) and all(v.shape[0] == 2 for v in one.values())
    with pytest.raises(InputShapeError, match="holds no samples"):
        simulate("my_model_1", x[:0], output_root=tmp_path)
    mapped = runner.invoke(app, ["map", "--mapname", "my_model_1", "--xbar", "64x64", "--output-root", str(tmp_path)],
                           env={"COLUMNS": "400"})
    assert mapped.exit_code == 0, mapped.output
    assert f"written to {tmp_path / 'mapsave' / 'my_model_1' / 'crossbar_map.json'}" in " ".join(mapped.stdout.split())


def test_missing_model_and_dynamic_shapes(tmp_path) -> None:
    result = runner.invoke(app, ["quantize", str(tmp_path / "nope.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = runner.invoke(app, ["quantize", str(dynamic_model(tmp_path / "dyn.onnx"))])
    assert result.exit_code == 2 and "--input-shape x=" in result.stderr
    result = runner.invoke(app, ["quantise"])
    assert result.exit_code == 2 and "Did you mean 'quantize'" in result.stderr
    result = runner.invoke(app, ["quantize", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder, not an ONNX model file" in result.stderr, result.output


def test_inspect_lists_inputs_outputs_and_operators(small_cnn) -> None:
    result = runner.invoke(app, ["inspect", str(small_cnn)], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "float32 [1, 3, 32, 32]" in result.stdout and "[1, 10]" in result.stdout
    assert re.search(r"operator\s*│\s*Conv\s*│\s*4\s", result.stdout)
    assert "--input-shape input=1,3,32,32" in result.stdout
    wrong = runner.invoke(app, ["inspect", str(small_cnn), "-s", "input=1,3,32"], env={"COLUMNS": "200"})
    assert wrong.exit_code == 2 and "rank 4" in wrong.stdout and "operator" in wrong.stdout, wrong.output


def test_inspect_shows_opset_dynamic_axes_and_placement(tmp_path) -> None:
    from maptools.zoo import export_zoo_model

    model = export_zoo_model("mobilenet_v3_small", tmp_path / "mnv3.onnx", opset=17)
    result = runner.invoke(app, ["inspect", str(model)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "(opset 17," in out and "['batch', 3, 64, 64]" in out
    assert "maptools brings it to 13 (PPQ's), rewriting HardSwish x19" in out
    assert "warning: dynamic axes in input: pass --input-shape" in out
    shaped = runner.invoke(app, ["inspect", str(model), "-s", "input=1,3,64,64"], env={"COLUMNS": "200"})
    out = " ".join(shaped.stdout.split())
    assert shaped.exit_code == 0 and "dynamic axes" not in out
    assert re.search(r"note: device \(123\): Conv 52, .*note: host \(18\): HardSigmoid 9, Mul 9", out)
    assert f"maptools quantize {model} --input-shape input=1,3,64,64" in out
