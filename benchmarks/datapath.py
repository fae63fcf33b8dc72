"""Hardware-constrained quantization: what each datapath option costs in accuracy and what it saves.

    python benchmarks/datapath.py            # digits CNN, ResNet18 and the zoo (~5 min on 2 cores)
    python benchmarks/datapath.py --quick    # digits CNN only

Options, each against the default (float scales, separate scales, W8A8):
``scale_policy='pow2'``, ``shared_scales=True``, both, and ``bit_width='auto'`` under a budget
(an output-error ratio, an absolute output error, a weight-memory size). Per row: top-1 of the
integer simulation (fixed-point requantization, the multipliers quantinfo records) on the digits
test set, or the output error against float (relative L2 over held-back random inputs) for
random-weight models; weight memory (packed weights + int32 biases); average weight bits per
parameter and input bits per multiply-accumulate; how many requantizations are not a pure shift;
quantize seconds. Writes ``benchmarks/results/datapath.json``.
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

from maptools import quantize, read_quantinfo, read_quantparams  # noqa: E402
from maptools.conversion import convert, read_graph  # noqa: E402
from maptools.evaluation import weight_memory_bytes  # noqa: E402
from maptools.examples import RESNET18_SHAPES, SMALL_CNN_SHAPES, resnet18_onnx, small_cnn_onnx  # noqa: E402
from maptools.simulate import IntegerSimulator  # noqa: E402
from maptools.zoo import ZOO, export_zoo_model  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402

#: the extended profile's datapath options (the seed profile is signed with shared scales throughout)
OPTIONS: list[tuple[str, dict]] = [
    ("default", {"profile": "extended"}),
    ("pow2", {"profile": "extended", "scale_policy": "pow2"}),
    ("shared", {"profile": "extended", "shared_scales": True}),
    ("pow2 + shared", {"profile": "extended", "scale_policy": "pow2", "shared_scales": True}),
    ("auto, error <= 1.5x W8A8", {"profile": "extended", "bit_width": "auto", "budget": {"error_ratio": 1.5}}),
]


def _run(name: str, model: Path, shapes: dict, calib: list, root: Path, options: dict, x: np.ndarray
         ) -> tuple[dict, np.ndarray]:
    started = time.perf_counter()
    result = quantize(shapes, "cpu", model, mapname=name, calibset=calib, calib_steps=len(calib), output_root=root,
                      error_steps=0, **options)
    seconds = time.perf_counter() - started
    convert(name, output_root=root)
    sim = IntegerSimulator(read_graph(name, root), read_quantparams(name, root), requant="fixed")
    out = np.concatenate([sim.run({"input": x[i:i + 1]}).outputs["output"] for i in range(len(x))])
    info = read_quantinfo(name, root)
    stages = [r for cfg in info.values() for r in cfg.requant.values()]
    mixed = result.mixed_precision
    return {"bytes": weight_memory_bytes(name, root), "seconds": round(seconds, 2),
            "not_shift": sum(not r.shift_only for r in stages), "requants": len(stages),
            "weight_bits": round(mixed["average_weight_bits"], 2) if mixed else 8,
            "input_bits": round(mixed["average_input_bits"], 2) if mixed else 8,
            "layer_bits": None if mixed is None else {l["name"]: [l["weight_bits"], l["input_bits"]]
                                                      for l in mixed["layers"]}}, out


def digits_rows(root: Path, rows: list[dict]) -> None:
    model, images, labels = train_small_cnn(seed=0)
    path = small_cnn_onnx(root / "digits.onnx", model=model)
    calib = [{"input": x[None]} for x in digits(seed=0)[0][:32]]
    x = images.numpy().astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    float_top1 = float(np.mean(np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
                               .argmax(1) == labels.numpy()))
    options = OPTIONS + [("auto, error <= 0.15", {"profile": "extended", "bit_width": "auto",
                                                  "budget": {"output_error": 0.15}}),
                         ("auto, weights <= 6000 B", {"profile": "extended", "bit_width": "auto",
                                                      "budget": {"weight_bytes": 6000}})]
    for label, opts in options:
        row, out = _run(f"digits-{len(rows)}", path, SMALL_CNN_SHAPES, calib, root, opts, x)
        top1 = float(np.mean(out.argmax(1) == labels.numpy()))
        rows.append({"model": "digits CNN", "option": label, "float_top1": round(100 * float_top1, 2),
                     "top1": round(100 * top1, 2), **row})
        print(rows[-1], flush=True)


def random_rows(name: str, path: Path, shapes: dict, root: Path, rows: list[dict], calib_count: int) -> None:
    shape = list(shapes["input"])
    rng = np.random.default_rng(0)
    calib = [{"input": torch.from_numpy(rng.standard_normal(shape).astype(np.float32))} for _ in range(calib_count)]
    x = rng.standard_normal([8, *shape[1:]]).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    for label, opts in OPTIONS:
        row, out = _run(f"{name}-{len(rows)}", path, shapes, calib, root, opts, x)
        error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        rows.append({"model": name, "option": label, "error_pct": round(100 * error, 2), **row})
        print(rows[-1], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the digits CNN only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digits_rows(root, rows)
        if not args.quick:
            random_rows("ResNet18", resnet18_onnx(root / "resnet18.onnx"), RESNET18_SHAPES, root, rows, 16)
            for name in ("mobilenet_v3_small", "regnet_x_400mf", "yolo_head"):
                if ZOO[name].outputs != ("output",):
                    continue
                path = export_zoo_model(name, root / f"{name}.onnx", 13, dynamic_batch=False)
                random_rows(name, path, {"input": list(ZOO[name].input_shape)}, root, rows, 16)
    out = ROOT / "benchmarks" / "results" / "datapath.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| model | option | top-1 (float) or output error | weight bytes | weight bits / param | input bits / MAC "
          "| requantizations not a shift | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        quality = f"{r['top1']:.2f}% ({r['float_top1']:.2f}%)" if "top1" in r else f"{r['error_pct']:.2f}%"
        print(f"| {r['model']} | {r['option']} | {quality} | {r['bytes']} | {r['weight_bits']} | {r['input_bits']} | "
              f"{r['not_shift']} of {r['requants']} | {r['seconds']} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
