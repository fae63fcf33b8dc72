"""What the ADC range setting keeps: the digits CNN's accuracy on crossbars against ADC bits, full range
against calibrated (and max), per array size.

    python benchmarks/adc_range.py                  # writes benchmarks/results/adc_range.json
    python benchmarks/adc_range.py --rows 64 --adc 3 4 5

The SmallCNN trained on scikit-learn's digits (``tests/trained_cnn.py``), W8A8, calibrated on 64 training
images; ADC ranges calibrated on 64 other training images; top-1 accuracy on the 449 test images of the
crossbar simulation (2-bit cells, 1-bit inputs, differential), beside the lossless integer simulation's, and
each point's energy, latency and area per inference (``CrossbarMap.cost``, the ISAAC component table).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import CrossbarSpec, convert, evaluate_crossbar, quantize  # noqa: E402
from maptools.evaluation import EvaluationSet  # noqa: E402
from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--adc", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    parser.add_argument("--ranges", nargs="+", default=["full", "calibrated", "max"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adc_range.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_x, _, test_x, test_y = digits()
    model, _, _ = train_small_cnn()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = small_cnn_onnx(Path(tmp) / "digits.onnx", model=model.float())
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="digits", calibset=[{"input": x[None]} for x in train_x[:64]],
                 calib_steps=64, output_root=tmp)
        convert("digits", output_root=tmp)
        evaluation = EvaluationSet([{"input": x[None].numpy()} for x in test_x], test_y.numpy(), "digits test")
        calibration = {"input": train_x[64:128].numpy()}
        for size in args.rows:
            for adc in args.adc:
                for adc_range in args.ranges:
                    started = time.perf_counter()
                    spec = CrossbarSpec(rows=size, cols=size, cell_bits=2, adc_bits=adc, adc_range=adc_range)
                    error = evaluate_crossbar("digits", spec, output_root=tmp, evaluation=evaluation,
                                              calibration=calibration)
                    rows.append({"xbar": spec.xbar, "adc_bits": adc, "adc_range": adc_range,
                                 "accuracy": error.accuracy, "integer_accuracy": error.integer_accuracy,
                                 "float_accuracy": error.float_accuracy, "integer_rel_l2": error.integer_rel_l2,
                                 "adc_steps": {k: list(v) for k, v in error.adc_steps.items()},
                                 "energy_uj": error.energy_pj / 1e6, "latency_us": error.latency_ns / 1e3,
                                 "area_mm2": error.area_mm2,
                                 "seconds": time.perf_counter() - started})
                    print(f"{spec.xbar} ADC {adc} bits, {adc_range}: top-1 {100 * error.accuracy:.1f}% (integer "
                          f"{100 * error.integer_accuracy:.1f}%, float {100 * error.float_accuracy:.1f}%), "
                          f"{100 * error.integer_rel_l2:.2f}% from the integer outputs; "
                          f"{error.energy_pj / 1e6:.4g} uJ, {error.latency_ns / 1e3:.4g} us, {error.area_mm2:.4g} mm2 "
                          "per inference (ISAAC component table)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "digits CNN (W8A8)", "cell_bits": 2, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
