"""The map stage: mapping time, crossbar simulation speed against the integer simulation, and the
accuracy a trained network keeps on crossbars against ADC bits, cell bits and array size.

    python benchmarks/crossbar.py            # everything below (~10 min on 2 cores)
    python benchmarks/crossbar.py --quick    # digits CNN only, a smaller grid

* speed: ResNet18 (random weights, 32 random calibration samples) and the digits CNN
  (``tests/trained_cnn.py``), one thread: ``map_graph`` (median of 5), then the integer
  simulation and the crossbar simulation (2-bit cells, 1-bit inputs, differential) per image,
  medians of 3 runs, as a ratio. Three crossbar cases: an ADC that can saturate (the common
  case: only positions whose partial sums may exceed the ADC go bit by bit), a lossless ADC
  (nothing can saturate: the plain product), and every position bit by bit (``collect_histograms``,
  what calibrating the ADC steps costs);
* accuracy: the ``design-sweep`` flow (Prefect, local Dask cluster) on the digits CNN saved as
  ONNX with its calibration images as ``.npy`` files and its 449 test images as a labelled
  ``.npz``: W8A8 on every crossbar x cell bits x ADC bits point.

Prints the tables and writes ``benchmarks/results/crossbar.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import quantize, read_quantparams  # noqa: E402
from maptools.conversion import convert, read_graph  # noqa: E402
from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, resnet18_onnx, small_cnn_onnx  # noqa: E402
from maptools.crossbar.mapping import CrossbarSimulator, CrossbarSpec, map_graph  # noqa: E402
from maptools.simulate import IntegerSimulator  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402


def _median(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(name: str, root: Path, x: np.ndarray, adc_lossy: int) -> dict[str, Any]:
    """Per-image times of the integer and crossbar simulations on ``x`` (one batch), and mapping time."""
    graph, params = read_graph(name, root), read_quantparams(name, root)
    spec = CrossbarSpec(rows=256, cols=256, cell_bits=2, adc_bits=adc_lossy)
    mapped = map_graph(graph, params, spec)
    lossless = CrossbarSpec(rows=256, cols=256, cell_bits=2, adc_bits=max(lay.adc_bits_needed for lay in mapped.layers))
    n = len(x)
    integer = IntegerSimulator(graph, params)
    cases = {"integer": integer,
             f"crossbar, {adc_lossy}-bit ADC": CrossbarSimulator(graph, params, spec),
             f"crossbar, lossless {lossless.adc_bits}-bit ADC": CrossbarSimulator(graph, params, lossless),
             "crossbar, every position bit by bit": CrossbarSimulator(graph, params, spec, collect_histograms=True)}
    seconds = {label: _median(lambda s=sim: s.run({"input": x}), 3) / n for label, sim in cases.items()}
    return {"model": name, "images": n, "map_graph_s": _median(lambda: map_graph(graph, params, spec), 5),
            "arrays": mapped.arrays, "utilization": mapped.utilization,
            "per_image_s": seconds, "ratio": {k: v / seconds["integer"] for k, v in seconds.items()}}


def accuracy_sweep(work: Path, model: torch.nn.Module, quick: bool) -> list[dict[str, Any]]:
    """The design-sweep flow over crossbar axes on the digits CNN, on its labelled test set."""
    from maptools_flows.sweep import Grid, ModelSpec, SweepConfig, run_sweep

    train_x, _, test_x, test_y = digits()
    onnx_path = small_cnn_onnx(work / "digits.onnx", model=model)
    calib = work / "calib"
    calib.mkdir()
    for i in range(64):
        np.save(calib / f"{i:03d}.npy", train_x[i:i + 1].numpy())
    np.savez(work / "test.npz", labels=test_y.numpy(), input=test_x.numpy())
    grid = Grid(bits=[8], algorithms=["percentile"], calib_samples=[64],
                xbar=["128x128"] if quick else ["64x64", "256x256"], cell_bits=[2] if quick else [1, 2, 4],
                adc_bits=[4, 6, 8] if quick else [3, 4, 5, 6, 7, 8])
    config = SweepConfig(name="crossbar-bench", models=[ModelSpec(name="digits", path=str(onnx_path),
                                                                  input_shapes=SMALL_CNN_SHAPES, calib=str(calib),
                                                                  eval_set=str(work / "test.npz"))],
                         grid=grid, device="cpu", eval_samples=len(test_y), output_root=str(work / "out"), workers=2)
    return run_sweep(config).rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits CNN only, a smaller grid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"threads": 1, "speed": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, test_x, _ = train_small_cnn()
        path = small_cnn_onnx(work / "digits_speed.onnx", model=model)
        train_x = digits()[0]
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="digits", output_root=work, calib_steps=64,
                 calibset=[{"input": train_x[i:i + 1]} for i in range(64)])
        convert("digits", output_root=work)
        results["speed"].append(speed("digits", work, test_x[:64].numpy(), adc_lossy=6))
        if not args.quick:
            resnet = resnet18_onnx(work / "resnet18.onnx")
            quantize(RESNET18_SHAPES, "cpu", resnet, mapname="resnet18", output_root=work, calib_steps=32)
            convert("resnet18", output_root=work)
            x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
            results["speed"].append(speed("resnet18", work, x, adc_lossy=8))
        for s in results["speed"]:
            print(f"\n{s['model']}: {s['arrays']} arrays of 256x256 ({100 * s['utilization']:.1f}% used); "
                  f"map_graph {1000 * s['map_graph_s']:.1f} ms (median of 5)")
            print(f"{'simulation (1 thread, median of 3)':<44} {'s / image':>10} {'x integer':>10}")
            for label, value in s["per_image_s"].items():
                print(f"{label:<44} {value:>10.4f} {s['ratio'][label]:>10.2f}")
        rows = accuracy_sweep(work / "sweep", model, args.quick)
    results["accuracy"] = [{k: r[k] for k in ("bits", "xbar", "cell_bits", "adc_bits", "status", "accuracy",
                                              "float_accuracy", "rel_l2", "integer_agreement", "arrays",
                                              "utilization", "error")} for r in rows]
    quantized = rows[0]
    print(f"\ndigits CNN W8A8 (design-sweep flow, {len(rows) - 1} crossbar points): float accuracy "
          f"{quantized['float_accuracy']:.4f}, quantized (quant_model.onnx) {quantized['accuracy']:.4f}")
    print(f"{'xbar':<9} {'cell':>4} {'adc':>4} {'accuracy':>9} {'agree int':>10} {'rel_l2':>8} {'arrays':>7}")
    for r in rows[1:]:
        if r["status"] != "completed":
            print(f"{r['xbar']:<9} {r['cell_bits']:>4} {r['adc_bits']:>4} failed: {r['error']}")
            continue
        print(f"{r['xbar']:<9} {r['cell_bits']:>4} {r['adc_bits']:>4} {r['accuracy']:>9.4f} "
              f"{r['integer_agreement']:>10.4f} {r['rel_l2']:>8.4f} {r['arrays']:>7}")
    out = ROOT / "benchmarks" / "results" / "crossbar.json"
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
