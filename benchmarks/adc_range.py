"""What the ADC range setting keeps: the digits CNN's accuracy on crossbars against ADC bits, full range
against calibrated (and max), per array size.

    python benchmarks/adc_range.py                  # writes benchmarks/results/adc_range.json
    python benchmarks/adc_range.py --rows 64 --adc 3 4 5
    python benchmarks/adc_range.py --model mobilenet_v3_small   # a zoo model, random weights

The SmallCNN trained on scikit-learn's digits (``tests/trained_cnn.py``), W8A8, calibrated on 64 training
images; ADC ranges calibrated on 64 other training images; top-1 accuracy on the 449 test images of the
crossbar simulation (2-bit cells, 1-bit inputs, differential), beside the lossless integer simulation's, and
each point's energy, latency and area per inference (``CrossbarMap.cost``, the ISAAC component table).
``--model NAME`` takes a zoo model instead (``maptools.zoo``: torchvision's architecture with seeded random
weights, nothing trained): calibrated on 32 and scored on 64 other seeded random inputs, by top-1 agreement
with the float model (no labels exist for it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import CrossbarSpec, convert, evaluate_crossbar, quantize  # noqa: E402
from maptools.evaluation import EvaluationSet  # noqa: E402
from maptools.examples import SMALL_CNN_SHAPES, small_cnn_onnx  # noqa: E402
from maptools.zoo import ZOO, export_zoo_model  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--adc", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    parser.add_argument("--ranges", nargs="+", default=["full", "calibrated", "max"])
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/adc_range.json (the "
                                                                   "digits CNN) or adc_range_<model>.json")
    parser.add_argument("--model", default=None, help="a zoo model (maptools.zoo) instead of the digits CNN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or ROOT / "benchmarks" / "results" / (f"adc_range_{args.model}.json" if args.model else
                                                         "adc_range.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        label, evaluation, calibration = _prepared(args.model, Path(tmp))
        for size in args.rows:
            for adc in args.adc:
                for adc_range in args.ranges:
                    started = time.perf_counter()
                    spec = CrossbarSpec(rows=size, cols=size, cell_bits=2, adc_bits=adc, adc_range=adc_range)
                    error = evaluate_crossbar("m", spec, output_root=tmp, evaluation=evaluation,
                                              calibration=calibration)
                    rows.append({"xbar": spec.xbar, "adc_bits": adc, "adc_range": adc_range,
                                 "accuracy": error.accuracy, "top1_agreement": error.top1_agreement,
                                 "rel_l2": error.rel_l2, "integer_accuracy": error.integer_accuracy,
                                 "float_accuracy": error.float_accuracy, "integer_rel_l2": error.integer_rel_l2,
                                 "adc_steps": {k: list(v) for k, v in error.adc_steps.items()},
                                 "energy_uj": error.energy_pj / 1e6, "latency_us": error.latency_ns / 1e3,
                                 "area_mm2": error.area_mm2,
                                 "seconds": time.perf_counter() - started})
                    scored = (f"top-1 {100 * error.accuracy:.1f}% (integer {100 * error.integer_accuracy:.1f}%, "
                              f"float {100 * error.float_accuracy:.1f}%)" if error.accuracy is not None else
                              f"top-1 agreement with float {100 * error.top1_agreement:.1f}%, error "
                              f"{100 * error.rel_l2:.2f}%")
                    print(f"{spec.xbar} ADC {adc} bits, {adc_range}: {scored}, "
                          f"{100 * error.integer_rel_l2:.2f}% from the integer outputs; "
                          f"{error.energy_pj / 1e6:.4g} uJ, {error.latency_ns / 1e3:.4g} us, {error.area_mm2:.4g} mm2 "
                          "per inference (ISAAC component table)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": label, "cell_bits": 2, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


def _prepared(model: str | None, tmp: Path) -> tuple[str, EvaluationSet, dict[str, np.ndarray]]:
    """Map ``m`` in ``tmp`` (quantized, converted): its label, evaluation set and ADC calibration inputs."""
    if model is None:
        train_x, _, test_x, test_y = digits()
        trained, _, _ = train_small_cnn()
        path = small_cnn_onnx(tmp / "digits.onnx", model=trained.float())
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="m", calibset=[{"input": x[None]} for x in train_x[:64]],
                 calib_steps=64, output_root=tmp)
        convert("m", output_root=tmp)
        return ("digits CNN (W8A8)", EvaluationSet([{"input": x[None].numpy()} for x in test_x], test_y.numpy(),
                                                   "digits test"), {"input": train_x[64:128].numpy()})
    shape = list(ZOO[model].input_shape)
    path = export_zoo_model(model, tmp / f"{model}.onnx")
    quantize({"input": shape}, "cpu", path, mapname="m", calib_steps=32, output_root=tmp)
    convert("m", output_root=tmp)
    rng = np.random.default_rng(1)
    evaluation = EvaluationSet([{"input": rng.standard_normal(shape, dtype=np.float32)} for _ in range(64)], None,
                               "64 seeded random inputs")
    return (f"{model} (random weights, W8A8)", evaluation,
            {"input": rng.standard_normal([8, *shape[1:]], dtype=np.float32)})


if __name__ == "__main__":
    main()
