"""The CUDA path, measured on a GPU: maptools ``quantize`` against raw PPQ on the same card, and the zoo.

    python benchmarks/gpu_check.py [--out results.json]

ResNet18 224x224 (random weights) with 128 seeded random samples: raw PPQ ``quantize_onnx_model``
(TRT_INT8, its default percentile setting) and maptools ``quantize`` (default settings; twice, the
second warm), both on ``cuda``, with the output error of each against the float model (onnxruntime
on the CPU, 16 held-back inputs). Then each zoo model (``maptools.zoo``, opset 17 export with a
symbolic batch) through ``quantize`` on ``cuda``, and ResNet18 with ``optimization='bias-correction'``
and ``'lsq'`` (32 samples). Every step appends to the JSON file as it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import quantize  # noqa: E402
from maptools.examples import RESNET18_SHAPES, resnet18_onnx  # noqa: E402
from maptools.zoo import ZOO, export_zoo_model  # noqa: E402


def _error(model_path: Path, held: np.ndarray, ref: np.ndarray) -> float:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = np.concatenate([session.run(None, {"input": held[i:i + 1]})[0] for i in range(len(held))])
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try the script")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--skip-optimizations", action="store_true")
    args = parser.parse_args()
    device, count = args.device, args.samples
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                    "torch": torch.__version__, "steps": []}

    def record(name: str, **values: object) -> None:
        report["steps"].append({"step": name, **values})
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["steps"][-1]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = resnet18_onnx(root / "resnet18.onnx")
        rng = np.random.default_rng(0)
        samples = [{"input": torch.from_numpy(rng.standard_normal(RESNET18_SHAPES["input"]).astype(np.float32))}
                   for _ in range(count)]
        held = rng.standard_normal([16, 3, 224, 224]).astype(np.float32)
        float_model = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        ref = np.concatenate([float_model.run(None, {"input": held[i:i + 1]})[0] for i in range(len(held))])

        from maptools.quantization import ppq_adapter  # noqa: F401  (the onnx/protobuf shims before ppq imports)
        from ppq import TargetPlatform
        from ppq.api import export_ppq_graph, quantize_onnx_model

        try:
            started = time.perf_counter()
            graph = quantize_onnx_model(onnx_import_file=str(model), calib_dataloader=samples, calib_steps=count,
                                        input_shape=[1, 3, 224, 224], platform=TargetPlatform.TRT_INT8,
                                        device=device, collate_fn=lambda b: {k: v.to(device) for k, v in b.items()})
            seconds = time.perf_counter() - started
            export_ppq_graph(graph, TargetPlatform.ONNXRUNTIME, str(root / "raw.onnx"), quantized_param=False)
            record(f"raw PPQ quantize_onnx_model, ResNet18, {count} samples, {device}", seconds=round(seconds, 2),
                   error=round(_error(root / "raw.onnx", held, ref), 5))
        except Exception:  # noqa: BLE001
            record("raw PPQ", failed=traceback.format_exc()[-1500:])

        for attempt in ("cold", "warm"):
            try:
                started = time.perf_counter()
                result = quantize(RESNET18_SHAPES, device, model, mapname=f"r-{attempt}", calibset=samples,
                                  calib_steps=count, output_root=root)
                seconds = time.perf_counter() - started
                record(f"maptools quantize, ResNet18, {count} samples, {device} ({attempt})", seconds=round(seconds, 2),
                       phases={k: round(v, 2) for k, v in result.seconds.items()},
                       error=round(_error(result.quant_model_path, held, ref), 5))
            except Exception:  # noqa: BLE001
                record(f"maptools quantize ({attempt})", failed=traceback.format_exc()[-1500:])

        for name, entry in ZOO.items():
            try:
                source = export_zoo_model(name, root / f"{name}.onnx", 17)
                started = time.perf_counter()
                result = quantize({"input": list(entry.input_shape)}, device, source, mapname=name, calib_steps=8,
                                  output_root=root)
                record(f"zoo {name} (opset 17), {device}", seconds=round(time.perf_counter() - started, 2),
                       prepared=result.prepared["steps"])
            except Exception:  # noqa: BLE001
                record(f"zoo {name}", failed=traceback.format_exc()[-1500:])

        for optimization in () if args.skip_optimizations else ("bias-correction", "lsq"):
            try:
                started = time.perf_counter()
                result = quantize(RESNET18_SHAPES, device, model, mapname=optimization, calibset=samples[:32],
                                  calib_steps=32, optimization=optimization, output_root=root)
                record(f"maptools quantize, ResNet18, 32 samples, optimization={optimization}, {device}",
                       seconds=round(time.perf_counter() - started, 2),
                       error=round(_error(result.quant_model_path, held, ref), 5))
            except Exception:  # noqa: BLE001
                record(f"optimization {optimization}", failed=traceback.format_exc()[-1500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
