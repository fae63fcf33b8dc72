"""Top-1 accuracy of the digits CNN (tests/trained_cnn.py) at 8, 6 and 4 bits.

Trains SmallCNN for a few seconds on scikit-learn's digits (shipped with scikit-learn), quantizes
it with 64 training images, and measures test accuracy of the float model, of PPQ's simulation
at each width, and of onnxruntime on ``quant_model.onnx`` (exact for 8 bits only).

    python benchmarks/fidelity_bits.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools.examples import SMALL_CNN_SHAPES, export_onnx  # noqa: E402
from maptools.quantization import quantize  # noqa: E402
from tests.test_fidelity import CALIB_SAMPLES, accuracy, onnxruntime_predictions, ppq_simulation  # noqa: E402
from tests.trained_cnn import digits, train_small_cnn  # noqa: E402


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    model, test_x, test_y = train_small_cnn(seed=0)
    with torch.no_grad():
        float_acc = accuracy(model(test_x).argmax(1).numpy(), test_y)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "digits_cnn.onnx", SMALL_CNN_SHAPES)
        train_x = digits(seed=0)[0]
        calibset = [{"input": train_x[i:i + 1].contiguous()} for i in range(CALIB_SAMPLES)]
        for bits in (8, 6, 4):
            sim = ppq_simulation(path, calibset, bits)
            sim_pred = sim.run({"input": test_x})[sim.output_names[0]].argmax(1)
            result = quantize(SMALL_CNN_SHAPES, "cpu", path, mapname=f"digits-w{bits}", calibset=calibset,
                              calib_steps=CALIB_SAMPLES, bit_width=bits, output_root=tmp)
            ort_pred = onnxruntime_predictions(result.quant_model_path, test_x)
            rows.append({"bits": bits, "float_top1": round(float_acc, 2),
                         "ppq_simulation_top1": round(accuracy(sim_pred, test_y), 2),
                         "onnxruntime_top1": round(accuracy(ort_pred, test_y), 2),
                         "onnxruntime_exact": bits == 8,
                         "agreement_pct": round(float((sim_pred == ort_pred).mean() * 100), 2)})
    table = Table(title=f"Digits SmallCNN, {len(test_y)} test images, {CALIB_SAMPLES} calibration images")
    for col in ("W/A bits", "float top-1 %", "PPQ simulation top-1 %", "onnxruntime quant_model.onnx top-1 %",
                "sim/ORT agreement %"):
        table.add_column(col, justify="right")
    for r in rows:
        ort_cell = f"{r['onnxruntime_top1']:.2f}" + ("" if r["onnxruntime_exact"] else " (int8 ranges, not exact)")
        table.add_row(f"{r['bits']}/{r['bits']}", f"{r['float_top1']:.2f}", f"{r['ppq_simulation_top1']:.2f}",
                      ort_cell, f"{r['agreement_pct']:.1f}")
    Console().print(table)
    out = ROOT / "benchmarks" / "results" / "fidelity_bits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
