"""Per-layer SNR of the example ResNet18 at several weight widths (the docs' per-layer chart).

    python benchmarks/layer_snr.py                     # writes benchmarks/results/layer_snr.json
    python benchmarks/layer_snr.py --bits 8 6 4 --calib-steps 32

ResNet18 with seeded random weights (built in code), random calibration data; for each weight width
(activations at 8 bits) the per-layer SNR in dB of ``error_report.json`` (PPQ's graphwise measure,
higher is better) and the output error against the float model on 16 held-out random inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools import evaluate_map, quantize  # noqa: E402
from maptools.examples import RESNET18_SHAPES, resnet18_onnx  # noqa: E402
from maptools.quantization import snr_db  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    parser.add_argument("--calib-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layer_snr.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = resnet18_onnx(Path(tmp) / "resnet18.onnx")
        for bits in args.bits:
            started = time.perf_counter()
            result = quantize(RESNET18_SHAPES, "cpu", model, mapname=f"w{bits}", calib_steps=args.calib_steps,
                              weight_bits=bits, activation_bits=8, output_root=tmp)
            error = evaluate_map(f"w{bits}", output_root=tmp, samples=16)
            runs.append({"weight_bits": bits, "activation_bits": 8, "rel_l2": error.rel_l2,
                         "seconds": time.perf_counter() - started,
                         "layers": result.errors.per_layer_db})
            print(f"W{bits}A8: output error {100 * error.rel_l2:.2f}%, worst layer "
                  f"{snr_db(result.errors.worst):.1f} dB ({result.errors.worst_layer})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "resnet18 (random weights)", "calib_steps": args.calib_steps,
                                    "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
