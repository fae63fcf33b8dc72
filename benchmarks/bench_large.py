"""Benchmark: large models and large inputs, maptools beside onnxruntime ``quantize_static`` and NNCF.

Each (model, tool) pair runs in a fresh process that builds nothing but its own quantization: seconds
(the quantization call, imports and model export excluded) and the process's peak RSS. Every tool reads
the same seeded random samples, generated one at a time (no tool holds the calibration set unless it
keeps it itself). Models are built in code with random weights and exported with the TorchScript exporter
at opset 13 (ViT-B/16 at 17, where attention exports); each tool gets the same exported file.

    python benchmarks/bench_large.py                          # FPN 640, U-Net 1024, ResNet50, ViT-B/16
    python benchmarks/bench_large.py --models fpn640 resnet50 --samples 32

Writes ``benchmarks/results/bench-large.json`` and prints a table with the ratios to onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
TOOLS = ("maptools", "onnxruntime", "nncf")


class UNet(nn.Module):
    """A four-level U-Net (16-128 channels): max-pool down, transposed-convolution up, skip Concats."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.down = nn.ModuleList(block(cin, cout) for cin, cout in zip((3, *widths[:-1]), widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in widths[:0:-1])
        self.merge = nn.ModuleList(block(w, w // 2) for w in widths[:0:-1])
        self.head = nn.Conv2d(widths[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as models

        return getattr(models, name)(weights=None)
    return build


def _fpn() -> nn.Module:
    from maptools.zoo import build_zoo_model

    return build_zoo_model("fpn_detector")


#: name -> (builder, input shape, opset of the export)
MODELS: dict[str, tuple[Callable[[], nn.Module], list[int], int]] = {
    "fpn640": (_fpn, [1, 3, 640, 640], 13),
    "unet1024": (UNet, [1, 3, 1024, 1024], 13),
    "resnet50": (_torchvision("resnet50"), [1, 3, 224, 224], 13),
    "vit_b_16": (_torchvision("vit_b_16"), [1, 3, 224, 224], 17),  # (attention is exported from opset 14 on)
}


def export(name: str, path: Path) -> Path:
    build, shape, opset = MODELS[name]
    torch.manual_seed(0)
    # (gradients on: without them nn.MultiheadAttention takes a fused kernel the exporter cannot write)
    torch.onnx.export(build().eval(), (torch.zeros(shape),), str(path), input_names=["input"],
                      output_names=["output"], opset_version=opset, dynamo=False)
    return path


class Samples:
    """``count`` seeded standard-normal samples of ``shape``, made one at a time on each pass."""

    def __init__(self, shape: list[int], count: int) -> None:
        self.shape, self.count = shape, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1)
        for _ in range(self.count):
            yield {"input": torch.randn(self.shape, generator=gen)}


def child(tool: str, model: Path, shape: list[int], count: int, workdir: Path) -> None:
    """One quantization in this process, with the same calls as ``bench_quantize.py``; prints {seconds,
    peak_rss_mib} as JSON."""
    from benchmarks.bench_quantize import run_nncf, run_ort_static, run_ours

    samples = Samples(shape, count)
    runs: dict[str, Callable[[], Any]] = {
        "maptools": lambda: run_ours(model, samples, "cpu", workdir, "large", shapes={"input": shape}),
        "onnxruntime": lambda: run_ort_static(model, samples, workdir / "ort.onnx"),
        "nncf": lambda: run_nncf(model, samples),
    }
    t = time.perf_counter()
    runs[tool]()
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mib(), 1)}))


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (``ru_maxrss`` carries the parent's over fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, tool: str, model: Path, count: int, workdir: Path, timeout: int) -> dict[str, Any]:
    shape = MODELS[name][1]
    cmd = [sys.executable, __file__, "--child", tool, str(model), json.dumps(shape), str(count), str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per quantization")
    p.add_argument("--out", type=Path, default=RESULTS / "bench-large.json")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        tool, model, shape, count, workdir = args.child
        child(tool, Path(model), json.loads(shape), int(count), Path(workdir))
        return 0
    report: dict[str, Any] = {"samples": args.samples, "cpu": "this machine", "rows": {}}
    with tempfile.TemporaryDirectory(prefix="maptools-large-") as tmp:
        for name in args.models:
            try:
                model = export(name, Path(tmp) / f"{name}.onnx")
            except Exception as e:  # noqa: BLE001  (a row that says why, not a lost run)
                report["rows"][name] = {"error": f"export: {type(e).__name__}: {str(e)[:200]}"}
                continue
            row: dict[str, Any] = {"onnx_mib": round(model.stat().st_size / 2**20, 1)}
            for tool in args.tools:
                workdir = Path(tmp) / f"{name}-{tool}"
                workdir.mkdir()
                row[tool] = measure(name, tool, model, args.samples, workdir, args.timeout)
                print(f"  {name} {tool}: {row[tool]}", flush=True)
            ours, ort, nncf = (row.get(t, {}) for t in TOOLS)
            if "seconds" in ours and "seconds" in ort:
                row["maptools / onnxruntime seconds"] = round(ours["seconds"] / ort["seconds"], 2)
            if "peak_rss_mib" in ours and "peak_rss_mib" in nncf:
                row["maptools / NNCF peak RSS"] = round(ours["peak_rss_mib"] / nncf["peak_rss_mib"], 2)
            report["rows"][name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | ONNX MiB | maptools s / MiB | onnxruntime s / MiB | NNCF s / MiB | maptools / onnxruntime s | "
             "maptools / NNCF RSS |", "|---|---|---|---|---|---|---|"]

    def cell(v: dict[str, Any]) -> str:
        return v.get("error", "n/a") if "seconds" not in v else f"{v['seconds']} / {v['peak_rss_mib']:.0f}"
    for name, row in report["rows"].items():
        if "onnx_mib" not in row:
            lines.append(f"| {name} | {row.get('error', 'n/a')} |" + " |" * 5)
            continue
        lines.append(f"| {name} | {row['onnx_mib']} | {cell(row.get('maptools', {}))} | "
                     f"{cell(row.get('onnxruntime', {}))} | {cell(row.get('nncf', {}))} | "
                     f"{row.get('maptools / onnxruntime seconds', 'n/a')} | {row.get('maptools / NNCF peak RSS', 'n/a')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
