"""What the seed contract costs: ``profile='seed'`` (signed ranges, shared scales) against ``'extended'``.

    python benchmarks/profiles.py

* the digits CNN (``tests/trained_cnn.py``, 449 test images, 64 calibration images) at W8A8 and W4A4: top-1 of
  the integer simulation and its drop from float;
* ResNet18 (random weights, 32 seeded random calibration samples) at W8A8 and W4A4: relative L2 of the
  integer simulation's logits against float on 16 held-back random inputs;
* three real models of the test corpus (``tests/corpus.py``) at W8A8, 16 random calibration samples: the same
  relative L2 on 8 random inputs.

Prints a markdown table and writes ``benchmarks/results/profiles.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import quantize, read_quantparams  # noqa: E402
from maptools.calibration import RandomCalibration  # noqa: E402
from maptools.conversion import convert, read_graph  # noqa: E402
from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, export_onnx, resnet18_onnx  # noqa: E402
from maptools.simulate import IntegerSimulator  # noqa: E402
from tests.corpus import CORPUS, fetch  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402

PROFILES = ("seed", "extended")


def _simulate(name: str, root: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    convert(name, output_root=root)
    sim = IntegerSimulator(read_graph(name, root), read_quantparams(name, root))
    return sim.run(feed).outputs


def _rel(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    return max(float(np.linalg.norm(ours[k].astype(np.float64) - ref[k]) / max(np.linalg.norm(ref[k]), 1e-12))
               for k in ref)


def digits_rows(root: Path) -> list[dict]:
    model, test_x, test_y = train_small_cnn(seed=0)
    with torch.no_grad():
        float_top1 = float((model(test_x).argmax(1) == test_y).float().mean() * 100)
    path = export_onnx(model, root / "digits.onnx", SMALL_CNN_SHAPES)
    train_x = digits(seed=0)[0]
    calib = [{"input": train_x[i:i + 1].contiguous()} for i in range(64)]
    rows = []
    for bits in (8, 4):
        row = {"model": "digits CNN (top-1, drop in points)", "bits": f"W{bits}A{bits}"}
        for profile in PROFILES:
            name = f"digits-{bits}-{profile}"
            quantize(SMALL_CNN_SHAPES, "cpu", path, mapname=name, calibset=calib, calib_steps=64, bit_width=bits,
                     output_root=root, error_steps=0, profile=profile)
            logits = np.concatenate([_simulate(name, root, {"input": b})["output"]
                                     for b in np.array_split(test_x.numpy(), 8)])
            top1 = float((logits.argmax(1) == test_y.numpy()).mean() * 100)
            row[profile] = f"{top1:.2f}% ({float_top1 - top1:+.2f})"
        rows.append(row)
    return rows


def random_rows(label: str, path: Path, shapes: dict[str, list[int]], root: Path, bits: tuple[int, ...],
                calib: int, samples: int) -> list[dict]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(99)
    inputs = [{k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()} for _ in range(samples)]
    reference = [dict(zip(names, session.run(None, x))) for x in inputs]
    rows = []
    for width in bits:
        row = {"model": f"{label} (rel. L2)", "bits": f"W{width}A{width}"}
        for profile in PROFILES:
            name = f"{label}-{width}-{profile}"
            quantize(shapes, "cpu", path, mapname=name, calibset=RandomCalibration(
                {k: tuple(v) for k, v in shapes.items()}, calib, seed=1), calib_steps=calib, bit_width=width,
                output_root=root, error_steps=0, profile=profile)
            errors = [_rel(_simulate(name, root, x), ref) for x, ref in zip(inputs, reference)]
            row[profile] = f"{np.mean(errors):.2%}"
        rows.append(row)
    return rows


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="maptools-profiles-") as tmp:
        root = Path(tmp)
        rows += digits_rows(root)
        rows += random_rows("ResNet18", resnet18_onnx(root / "r18.onnx"), RESNET18_SHAPES, root, (8, 4), 32, 16)
        for name in ("ppocr_cls", "mtcnn_onet", "orientation"):
            model = CORPUS[name]
            rows += random_rows(name, fetch(model, ROOT / ".pytest_cache" / "d" / "maptools-corpus"), model.input_shapes,
                                root, (8,), 16, 8)
    print("| model | bits | seed (the default) | extended |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['bits']} | {row['seed']} | {row['extended']} |")
    out = ROOT / "benchmarks" / "results" / "profiles.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
