"""What a PCM crossbar keeps over time: the digits CNN's accuracy under the PCM preset (aihwkit's fits of IBM's
PCM devices) at 1 s, 1 h, 1 day and 1 year after programming, with and without global drift compensation,
mean and spread over Monte Carlo trials; and trials per second.

    python benchmarks/device_drift.py                  # writes benchmarks/results/device_drift.json
    python benchmarks/device_drift.py --trials 5 --samples 64
    python benchmarks/device_drift.py --resnet18-only   # ResNet18's trials per second, added to the same JSON
    python benchmarks/device_drift.py --model mobilenet_v3_small   # a zoo model (random weights)

The SmallCNN trained on scikit-learn's digits (``tests/trained_cnn.py``), W8A8, calibrated on 64 training
images; 64x64 arrays of 2-bit cells, 1-bit inputs, differential pairs, a lossless (12-bit) ADC so that the
cells are what is measured; top-1 accuracy on the first ``--samples`` test images. ResNet18 (random weights,
224x224, W8A8 on 8 random calibration samples; ``--resnet18-trials`` trials of ``--resnet18-samples`` random
inputs on 256x256 arrays, one read time): Monte Carlo trials per second, the tiling mapped once. ``--model
NAME``: a zoo model (``maptools.zoo``, seeded random weights) calibrated on 32 seeded random inputs and scored
on ``--samples`` others by output error and top-1 agreement with the float model (no labels exist for it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import DEVICE_PRESETS, CrossbarSpec, convert, evaluate_crossbar, evaluate_device, quantize  # noqa: E402
from maptools.evaluation import EvaluationSet  # noqa: E402
from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, resnet18_onnx, small_cnn_onnx  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402

TIMES = {"1 s": 1.0, "1 h": 3600.0, "1 day": 86400.0, "1 year": 365 * 86400.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samples", type=int, default=449)
    parser.add_argument("--preset", default="pcm", choices=sorted(DEVICE_PRESETS), help="the cells (digits CNN)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/device_drift.json "
                                                               "(device_drift_<preset>.json for another preset)")
    parser.add_argument("--resnet18-trials", type=int, default=3)
    parser.add_argument("--resnet18-samples", type=int, default=1)
    parser.add_argument("--resnet18-only", action="store_true", help="only ResNet18's trials per second, added to "
                                                                      "--out")
    parser.add_argument("--model", default=None, help="a zoo model (maptools.zoo) instead of the digits CNN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or ROOT / "benchmarks" / "results" / ("device_drift.json" if args.preset == "pcm" else
                                                         f"device_drift_{args.preset}.json")
    if args.model:
        return zoo_drift(args.model, args.trials, min(args.samples, 64))
    resnet = resnet18_throughput(args.resnet18_trials, args.resnet18_samples) if args.preset == "pcm" else None
    if args.resnet18_only:
        report = json.loads(out.read_text()) if out.is_file() else {}
        out.write_text(json.dumps({**report, "resnet18": resnet}, indent=1) + "\n")
        return
    train_x, _, test_x, test_y = digits()
    model, _, _ = train_small_cnn()
    spec = CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=12)
    with tempfile.TemporaryDirectory() as tmp:
        path = small_cnn_onnx(Path(tmp) / "digits.onnx", model=model.float())
        quantize(SMALL_CNN_SHAPES, "cpu", path, mapname="digits", calibset=[{"input": x[None]} for x in train_x[:64]],
                 calib_steps=64, output_root=tmp)
        convert("digits", output_root=tmp)
        evaluation = EvaluationSet([{"input": x[None].numpy()} for x in test_x[:args.samples]],
                                   test_y[:args.samples].numpy(), "digits test")
        ideal = evaluate_crossbar("digits", spec, output_root=tmp, evaluation=evaluation)
        rows = []
        for compensation in (True, False):
            result = evaluate_device("digits", spec, DEVICE_PRESETS[args.preset].replace(compensation=compensation),
                                     output_root=tmp, trials=args.trials, times=list(TIMES.values()),
                                     evaluation=evaluation)
            for label, point in zip(TIMES, result.points):
                mean, std, ci = point.accuracy
                rows.append({"time": label, "seconds": point.time, "compensation": compensation, "accuracy": mean,
                             "accuracy_std": std, "accuracy_ci95": ci, "rel_l2": point.rel_l2[0]})
                print(f"{label:>7} compensation {'on ' if compensation else 'off'}: accuracy {100 * mean:5.1f}% "
                      f"+- {100 * std:.1f} ({args.trials} trials)")
    report = {"model": "digits SmallCNN (W8A8)", "spec": spec.model_dump(), "device": f"{args.preset} preset",
              "samples": len(evaluation.samples), "trials": args.trials, "float_accuracy": ideal.float_accuracy,
              "ideal_crossbar_accuracy": ideal.accuracy, "seconds_per_trial": result.seconds_per_trial, "rows": rows,
              "resnet18": resnet}
    print(f"ideal cells {100 * ideal.accuracy:.1f}% (float {100 * ideal.float_accuracy:.1f}%); "
          f"{1 / result.seconds_per_trial:.2f} trials per second ({len(evaluation.samples)} images each)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def zoo_drift(name: str, trials: int, samples: int) -> None:
    """A zoo model on PCM cells over time: output error and top-1 agreement with float, mean +- std."""
    import numpy as np

    from maptools.evaluation import EvaluationSet
    from maptools.zoo import ZOO, export_zoo_model

    spec = CrossbarSpec(rows=64, cols=64, cell_bits=2, adc_bits=12)
    shape = list(ZOO[name].input_shape)
    rng = np.random.default_rng(1)
    evaluation = EvaluationSet([{"input": rng.standard_normal(shape, dtype=np.float32)} for _ in range(samples)],
                               None, f"{samples} seeded random inputs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        quantize({"input": shape}, "cpu", export_zoo_model(name, Path(tmp) / f"{name}.onnx"), mapname="m",
                 calib_steps=32, output_root=tmp)
        convert("m", output_root=tmp)
        ideal = evaluate_crossbar("m", spec, output_root=tmp, evaluation=evaluation)
        for compensation in (True, False):
            result = evaluate_device("m", spec, DEVICE_PRESETS["pcm"].replace(compensation=compensation),
                                     output_root=tmp, trials=trials, times=list(TIMES.values()), evaluation=evaluation)
            for label, point in zip(TIMES, result.points):
                rows.append({"time": label, "seconds": point.time, "compensation": compensation,
                             "rel_l2": point.rel_l2[0], "rel_l2_std": point.rel_l2[1],
                             "top1_agreement": point.top1_agreement[0], "top1_agreement_std": point.top1_agreement[1]})
                print(f"{label:>7} compensation {'on ' if compensation else 'off'}: error {100 * point.rel_l2[0]:.1f}% "
                      f"+- {100 * point.rel_l2[1]:.1f}, top-1 agreement {100 * point.top1_agreement[0]:.1f}% "
                      f"+- {100 * point.top1_agreement[1]:.1f} ({trials} trials)")
    out = ROOT / "benchmarks" / "results" / f"device_drift_{name}.json"
    out.write_text(json.dumps({"model": f"{name} (random weights, W8A8)", "spec": spec.model_dump(),
                               "device": "pcm preset", "samples": samples, "trials": trials,
                               "ideal_crossbar_rel_l2": ideal.rel_l2, "seconds_per_trial": result.seconds_per_trial,
                               "rows": rows}, indent=1) + "\n")
    print(f"ideal cells: error {100 * ideal.rel_l2:.2f}%; {1 / result.seconds_per_trial:.2f} trials per second")


def resnet18_throughput(trials: int, samples: int) -> dict[str, float | int]:
    """Seconds per Monte Carlo trial of ResNet18 on PCM cells (each trial draws every cell again)."""
    spec = CrossbarSpec(rows=256, cols=256, cell_bits=2, adc_bits=12)
    with tempfile.TemporaryDirectory() as tmp:
        path = resnet18_onnx(Path(tmp) / "resnet18.onnx")
        quantize(RESNET18_SHAPES, "cpu", path, mapname="resnet18", calib_steps=8, output_root=tmp, error_steps=0)
        convert("resnet18", output_root=tmp)
        result = evaluate_device("resnet18", spec, DEVICE_PRESETS["pcm"], output_root=tmp, trials=trials,
                                 times=[3600.0], samples=samples)
    print(f"ResNet18: {result.seconds_per_trial:.1f} s per trial of {samples} input(s), "
          f"{1 / result.seconds_per_trial:.3f} trials per second")
    return {"trials": trials, "samples": samples, "seconds_per_trial": result.seconds_per_trial,
            "trials_per_second": 1 / result.seconds_per_trial}


if __name__ == "__main__":
    main()
