"""Accuracy of every quantization mode: bit widths x activation sign x optimization pass.

    python benchmarks/fidelity_bits.py            # everything below (~10 min on 2 cores)
    python benchmarks/fidelity_bits.py --quick    # digits CNN only

Three workloads, each quantized with every ``optimization`` (none, bias-correction, equalization,
lsq) and both ``activation_sign`` modes:

* the digits CNN (``tests/trained_cnn.py``: SmallCNN trained in seconds on scikit-learn's digits,
  449 test images, 64 calibration images from the training split) at W8A8, W4A8, W4A4: top-1 of
  the integer simulation, its drop from float, and the top-1 agreement of onnxruntime on
  ``quant_model.onnx`` with PPQ's simulation (no graph optimizations: onnxruntime's own int8
  kernels round differently, see README);
* MobileNetV3-small trained on the same digits upscaled to 32x32 (real data, shipped with
  scikit-learn) at W8A8 and W4A8: top-1 drop of the integer simulation;
* ResNet18 (random weights, 32 seeded random calibration samples) at W8A8: output error against
  float (relative L2 on 16 held-back random inputs) of the integer simulation, and NNCF's
  (``pip install -e '.[bench]'``) on the same data, plus the wall time of each pass.

Prints the tables and writes ``benchmarks/results/fidelity_bits.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import quantize, read_quantparams  # noqa: E402
from maptools.conversion import convert, read_graph  # noqa: E402
from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, export_onnx, resnet18_onnx  # noqa: E402
from maptools.settings import Optimization  # noqa: E402
from maptools.simulate import IntegerSimulator  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402

OPTIMIZATIONS = [o.value for o in Optimization]
SIGNS = ["signed", "auto"]
CALIB = 64


def _profile(sign: str) -> str:
    """signed: the seed profile (shared scales too); auto: unsigned ranges, the extended profile's."""
    return "seed" if sign == "signed" else "extended"


def _simulate(name: str, root: Path, x: np.ndarray) -> np.ndarray:
    convert(name, output_root=root)
    sim = IntegerSimulator(read_graph(name, root), read_quantparams(name, root))
    return np.concatenate([sim.run({"input": b}).outputs["output"] for b in np.array_split(x, max(1, len(x) // 64))])


def _ppq_agreement(result: object, name: str, root: Path, x: np.ndarray, calib: list, bits: tuple[int, int],
                   sign: str, optimization: str) -> float:
    """Top-1 agreement of onnxruntime on quant_model.onnx (no graph optimizations) with PPQ's simulation."""
    from maptools.quantization import ppq_adapter as _ppq
    from maptools.settings import QuantSettings

    settings = QuantSettings(weight_bits=bits[0], activation_bits=bits[1], calib_steps=len(calib),
                             activation_sign=sign, optimization=optimization, profile=_profile(sign),
                             algorithm=result.settings.algorithm)  # the one quantize chose
    graph = _ppq.quantize_graph(result.map_dir / "model.onnx", calib, len(calib), calib[0], settings, "cpu")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(result.quant_model_path), options, providers=["CPUExecutionProvider"])
    exported = np.array([session.run(None, {"input": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    theirs = np.array([graph.run({"input": torch.from_numpy(x[i:i + 1])})["output"].argmax() for i in range(len(x))])
    return float((exported == theirs).mean() * 100)


def digits_table(root: Path, rows: list[dict]) -> None:
    model, test_x, test_y = train_small_cnn(seed=0)
    with torch.no_grad():
        float_top1 = float((model(test_x).argmax(1) == test_y).float().mean() * 100)
    path = export_onnx(model, root / "digits_cnn.onnx", SMALL_CNN_SHAPES)
    train_x = digits(seed=0)[0]
    calib = [{"input": train_x[i:i + 1].contiguous()} for i in range(CALIB)]
    x, y = test_x.numpy(), test_y.numpy()
    for bits in ((8, 8), (4, 8), (4, 4)):
        for optimization in OPTIMIZATIONS:
            for sign in SIGNS:
                name = f"digits-w{bits[0]}a{bits[1]}-{optimization}-{sign}"
                started = time.perf_counter()
                result = quantize(SMALL_CNN_SHAPES, "cpu", path, mapname=name, calibset=calib, calib_steps=CALIB,
                                  weight_bits=bits[0], activation_bits=bits[1], activation_sign=sign,
                                  profile=_profile(sign), optimization=optimization, output_root=root)
                seconds = time.perf_counter() - started
                top1 = float((_simulate(name, root, x).argmax(1) == y).mean() * 100)
                agreement = _ppq_agreement(result, name, root, x, calib, bits, sign, optimization) \
                    if bits[1] < 8 or bits[0] < 8 else None
                rows.append({"model": "digits CNN", "bits": f"W{bits[0]}A{bits[1]}", "optimization": optimization,
                             "sign": sign, "float_top1": round(float_top1, 2), "top1": round(top1, 2),
                             "drop": round(float_top1 - top1, 2), "ort_ppq_agreement": agreement,
                             "seconds": round(seconds, 2)})
                print(rows[-1], flush=True)


def mobilenet_digits(seed: int = 0, epochs: int = 12) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """MobileNetV3-small (torchvision, random init) trained on the digits, 3x32x32."""
    import torchvision

    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train_y), generator=gen).split(32):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            optimiser.step()
    return model.eval(), test_x, test_y


def mobilenet_table(root: Path, rows: list[dict]) -> None:
    model, test_x, test_y = mobilenet_digits()
    with torch.no_grad():
        float_top1 = float((model(test_x).argmax(1) == test_y).float().mean() * 100)
    path = export_onnx(model, root / "mnv3_digits.onnx", SMALL_CNN_SHAPES)
    train_x = digits(seed=0)[0]
    calib = [{"input": train_x[i:i + 1].contiguous()} for i in range(CALIB)]
    x, y = test_x.numpy(), test_y.numpy()
    for bits in ((8, 8), (4, 8)):
        for optimization in OPTIMIZATIONS:
            for sign in SIGNS:
                name = f"mnv3-w{bits[0]}a{bits[1]}-{optimization}-{sign}"
                quantize(SMALL_CNN_SHAPES, "cpu", path, mapname=name, calibset=calib, calib_steps=CALIB,
                         weight_bits=bits[0], activation_bits=bits[1], activation_sign=sign, profile=_profile(sign),
                         optimization=optimization, output_root=root)
                top1 = float((_simulate(name, root, x).argmax(1) == y).mean() * 100)
                rows.append({"model": "MobileNetV3-small digits", "bits": f"W{bits[0]}A{bits[1]}",
                             "optimization": optimization, "sign": sign, "float_top1": round(float_top1, 2),
                             "top1": round(top1, 2), "drop": round(float_top1 - top1, 2)})
                print(rows[-1], flush=True)


def resnet_table(root: Path, rows: list[dict]) -> None:
    path = resnet18_onnx(root / "resnet18.onnx")
    rng = np.random.default_rng(0)
    calib = [{"input": torch.from_numpy(rng.standard_normal(RESNET18_SHAPES["input"]).astype(np.float32))}
             for _ in range(32)]
    held = rng.standard_normal([16, *RESNET18_SHAPES["input"][1:]]).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([reference.run(None, {"input": held[i:i + 1]})[0] for i in range(len(held))])

    def rel(out: np.ndarray) -> float:
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref) * 100)

    try:
        import nncf

        started = time.perf_counter()
        import onnx

        quantized = nncf.quantize(onnx.load(str(path)), nncf.Dataset([{"input": c["input"].numpy()} for c in calib]),
                                  subset_size=len(calib))
        nncf_seconds = time.perf_counter() - started
        session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
        nncf_error = rel(np.concatenate([session.run(None, {"input": held[i:i + 1]})[0] for i in range(len(held))]))
        rows.append({"model": "ResNet18 random", "bits": "W8A8", "optimization": "NNCF default", "sign": "-",
                     "error_pct": round(nncf_error, 3), "seconds": round(nncf_seconds, 2)})
        print(rows[-1], flush=True)
    except ImportError:
        pass
    for optimization in OPTIMIZATIONS:
        for sign in SIGNS:
            name = f"resnet-{optimization}-{sign}"
            started = time.perf_counter()
            quantize(RESNET18_SHAPES, "cpu", path, mapname=name, calibset=calib, calib_steps=32,
                     activation_sign=sign, optimization=optimization, output_root=root, profile=_profile(sign))
            seconds = time.perf_counter() - started
            rows.append({"model": "ResNet18 random", "bits": "W8A8", "optimization": optimization, "sign": sign,
                         "error_pct": round(rel(_simulate(name, root, held)), 3), "seconds": round(seconds, 2)})
            print(rows[-1], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the digits CNN only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digits_table(root, rows)
        if not args.quick:
            mobilenet_table(root, rows)
            resnet_table(root, rows)
    out = ROOT / "benchmarks" / "results" / "fidelity_bits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| model | bits | optimization | activations | float top-1 | top-1 (integer simulation) | drop | "
          "onnxruntime / PPQ agreement | output error vs float | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["model"], r["bits"], r["optimization"], r["sign"], r.get("float_top1", ""), r.get("top1", ""),
                 r.get("drop", ""), "" if r.get("ort_ppq_agreement") is None else f"{r['ort_ppq_agreement']:.1f}%",
                 "" if "error_pct" not in r else f"{r['error_pct']:.2f}%", r.get("seconds", "")]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
