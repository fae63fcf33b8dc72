"""Benchmark: maptools' quantization against raw PPQ, the float floor and two peers.

One run on ResNet18 224x224 (random weights built in code) prints a table of times, ratios and
output errors and writes ``benchmarks/results/bench-<device>.json``:

* raw PPQ ``quantize_onnx_model`` (TRT_INT8, PPQ's default setting) on the same model and samples;
* ``maptools.quantization.quantize``; the Prefect flow cold and cached (when ``flows`` exists);
* the floor: float forward passes over the same samples (onnxruntime and torch eager);
* the peers: onnxruntime ``quantize_static`` (QDQ, per-channel, MinMax) and NNCF ``nncf.quantize``
  (ONNX backend, default preset);
* output error against float on held-back random inputs (relative L2 and cosine), every
  quantized model run by onnxruntime from its QDQ export;
* peak RSS of a quantization calibrated from a folder of 32 and of 1024 PNG images.

Timings are medians of ``--repeats`` runs; ratios are taken within this run (the machine may be
shared and noisy, so compare ratios, not absolute seconds across runs).

    python benchmarks/bench_quantize.py            # full run (32 and 128 samples)
    python benchmarks/bench_quantize.py --quick    # 32 samples, one repeat, small RSS check
    python benchmarks/bench_quantize.py --device cuda
    python benchmarks/bench_quantize.py --contended    # alone vs beside a CPU-bound competitor
    python benchmarks/bench_quantize.py --fpn          # FPN detector at 640x640 vs onnxruntime
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from maptools.examples import RESNET18_SHAPES, resnet18_onnx  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPE = tuple(RESNET18_SHAPES["input"])
HELD_OUT = 16
THREADS = 0  # --threads: torch and the benchmark's own onnxruntime sessions (0: library defaults)


# --- data -----------------------------------------------------------------------------------------

def random_samples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out.append({"input": torch.randn(SHAPE, generator=gen)})
    return out


class PngFolder(Sequence):
    """Lazily loaded PNG images of a folder as ``{'input': tensor}`` samples (ImageNet-normalised)."""

    _MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    _STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def __init__(self, folder: Path, count: int) -> None:
        self.files = sorted(folder.glob("*.png"))[:count]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        from PIL import Image

        if isinstance(index, slice):
            raise TypeError("PngFolder does not slice")
        with Image.open(self.files[index]) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        return {"input": ((t - self._MEAN) / self._STD).contiguous()}


def write_png_folder(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = rng.integers(0, 256, size=(SHAPE[2], SHAPE[3], 3), dtype=np.uint8)
        if i >= have:
            Image.fromarray(arr).save(folder / f"img_{i:05d}.png", compress_level=1)
    return folder


# --- measuring ------------------------------------------------------------------------------------

def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, result


def ort_session(model: Any, device: str) -> Any:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if THREADS:
        options.intra_op_num_threads = options.inter_op_num_threads = THREADS
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=providers)


def ort_outputs(model: Any, inputs: list[dict[str, torch.Tensor]], device: str = "cpu") -> np.ndarray:
    sess = ort_session(model, device)
    name = sess.get_inputs()[0].name
    return np.stack([sess.run(None, {name: s["input"].numpy()})[0] for s in inputs]).astype(np.float64)


def output_error(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Relative L2 (percent) over all held-out outputs and mean per-sample cosine similarity."""
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) * 100.0
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    cos = float(np.mean(np.sum(r * o, 1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1))))
    return {"rel_l2_pct": round(rel, 3), "cosine": round(cos, 5)}


@contextlib.contextmanager
def quiet() -> Any:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# --- the contenders -------------------------------------------------------------------------------

def run_raw_ppq(model: Path, samples: list, device: str) -> Any:
    from maptools.quantization import ppq_adapter  # noqa: F401  (installs the onnx/protobuf shims before ppq imports)
    from ppq import TargetPlatform
    from ppq.api import quantize_onnx_model

    with quiet():
        graph = quantize_onnx_model(
            onnx_import_file=str(model), calib_dataloader=samples, calib_steps=len(samples),
            input_shape=list(SHAPE), platform=TargetPlatform.TRT_INT8, device=device,
            collate_fn=lambda b: {k: v.to(device) for k, v in b.items()},
        )
    return graph


def export_ppq(graph: Any, path: Path) -> None:
    from ppq import TargetPlatform
    from ppq.api import export_ppq_graph

    with quiet():
        export_ppq_graph(graph, TargetPlatform.ONNXRUNTIME, str(path), quantized_param=False)


def run_ours(model: Path, samples: Any, device: str, root: Path, mapname: str, steps: int | None = None,
             threads: int | None = None, shapes: dict[str, list[int]] = RESNET18_SHAPES, error_steps: int = 8) -> Any:
    """maptools with one calibration (percentile), as each peer calibrates once: the default ``auto`` calibrates
    twice (percentile and mse) and keeps the better, at about 2-3x this time."""
    from maptools.quantization import quantize

    return quantize(shapes, device, model, mapname=mapname, calibset=samples,
                    calib_steps=steps or min(len(samples), 512), output_root=root, threads=threads,
                    error_steps=error_steps, algorithm="percentile")


def run_ort_static(model: Path, samples: list, out: Path) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self) -> dict | None:
            s = next(self._it, None)
            return None if s is None else {"input": s["input"].numpy()}

    with quiet():
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out


def run_nncf(model: Path, samples: list) -> Any:
    import logging

    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.ERROR)
    dataset = nncf.Dataset(samples, lambda s: {"input": s["input"].numpy()})
    with quiet():
        return nncf.quantize(onnx.load(str(model)), dataset, subset_size=len(samples))


def flow_runner() -> Callable[..., Any] | None:
    try:
        from maptools_flows.quantize_model import quantize_model  # type: ignore[import-not-found]
    except Exception:
        return None
    return quantize_model


# --- peak RSS (child process) ---------------------------------------------------------------------

def rss_child(folder: Path, count: int, device: str, root: Path) -> None:
    """Quantize ResNet18 calibrated from ``count`` images of ``folder``; print peak RSS as JSON."""
    from maptools.errors import CalibrationError

    model = root / "simp-resnet18.onnx"
    t = time.perf_counter()
    try:  # maptools' own image-folder source, when calibration supports a folder path
        result = run_ours(model, str(folder), device, root, f"rss{count}", steps=min(count, 512))
        kind = "folder path passed to quantize (maptools image-folder source)"
    except CalibrationError as e:
        kind = f"benchmark's lazy PNG dataset (maptools: {str(e)[:80]})"
        result = run_ours(model, PngFolder(folder / "all", count), device, root, f"rss{count}", steps=min(count, 512))
    used = result.calibration.get("used")
    # VmHWM: ru_maxrss carries the parent's peak over fork and exec (every child read the benchmark's own)
    peak_kib = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("VmHWM:")), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"images": count, "used": used, "peak_rss_mib": round(peak_kib / 1024, 1),
                      "seconds": round(time.perf_counter() - t, 2), "source": kind}))


def measure_rss(folder: Path, counts: list[int], device: str, root: Path) -> dict[str, Any]:
    out = {}
    for count in counts:
        view = root / f"images{count}"
        if not view.exists():  # root/<class>/<image> holding exactly `count` images (links, no copies)
            (view / "all").mkdir(parents=True)
            for f in sorted(folder.glob("*.png"))[:count]:
                os.symlink(f, view / "all" / f.name)
        cmd = [sys.executable, __file__, "--rss-child", str(view), str(count), "--device", device,
               "--workdir", str(root), "--threads", str(THREADS)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
        out[str(count)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# --- main -----------------------------------------------------------------------------------------

def bench_samples(args: argparse.Namespace, n: int, report: dict[str, Any], root: Path, model: Path,
                  torch_model: Any, held: list, float_ref: np.ndarray, flow: Callable[..., Any] | None) -> None:
    device, repeats = args.device, args.repeats
    samples = random_samples(n, seed=1)
    row: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any], reps: int = repeats) -> Any:
        med, times, result = median_time(fn, reps)
        row[name] = {"seconds": round(med, 3), "runs": [round(t, 3) for t in times]}
        print(f"  [{n}] {name}: {med:.2f} s  {['%.2f' % t for t in times]}", flush=True)
        return result

    sess = ort_session(model.read_bytes(), device)
    timed("floor_onnxruntime", lambda: [sess.run(None, {"input": s["input"].numpy()}) for s in samples])

    def torch_floor() -> None:
        with torch.no_grad():
            for s in samples:
                torch_model(s["input"].to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    timed("floor_torch", torch_floor)

    ppq_export = root / f"raw_ppq_{n}.onnx"
    graph = timed("raw_ppq", lambda: run_raw_ppq(model, samples, device))
    export_ppq(graph, ppq_export)
    del graph
    row["raw_ppq"]["error"] = output_error(float_ref, ort_outputs(str(ppq_export), held))

    result = timed("maptools", lambda: run_ours(model, samples, device, root, f"ours{n}"))
    row["maptools"]["calibrate_seconds"] = round(result.seconds["calibrate"], 3)
    row["maptools"]["stage_seconds"] = {k: round(v, 3) for k, v in result.seconds.items()}
    row["maptools"]["error"] = output_error(float_ref, ort_outputs(str(result.quant_model_path), held))
    result = timed("maptools_no_report", lambda: run_ours(model, samples, device, root, f"ours{n}-0", error_steps=0))
    row["maptools_no_report"]["stage_seconds"] = {k: round(v, 3) for k, v in result.seconds.items()}

    # The flow takes a folder, so the flow and the core are compared on the same .npy folder.
    if flow is None:
        row["flow_cold"] = row["flow_cached"] = "n/a (flow not available)"
    else:
        npy = write_npy_folder(root / f"npy{n}", samples)
        timed("maptools_npy", lambda: run_ours(model, str(npy), device, root, f"oursnpy{n}", steps=n))
        try:
            timed("flow_cold", lambda: call_flow(flow, model, npy, n, device, root, f"flow{n}", refresh=True))
            cached = timed("flow_cached", lambda: call_flow(flow, model, npy, n, device, root, f"flow{n}",
                                                            refresh=False))
            row["flow_cached"]["cache_hit"] = bool(getattr(cached, "quantization_cached", False))
        except Exception as e:  # report, don't lose the rest of the benchmark
            row["flow_cold"] = row["flow_cached"] = f"n/a ({type(e).__name__}: {str(e)[:200]})"

    ort_out = root / f"ort_static_{n}.onnx"
    timed("onnxruntime_quantize_static", lambda: run_ort_static(model, samples, ort_out))
    row["onnxruntime_quantize_static"]["error"] = output_error(float_ref, ort_outputs(str(ort_out), held))

    if args.skip_nncf:
        row["nncf"] = "skipped"
    else:
        q = timed("nncf", lambda: run_nncf(model, samples))
        row["nncf"]["error"] = output_error(float_ref, ort_outputs(q, held))
    report["runs"][str(n)] = row


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device, repeats = args.device, args.repeats
    root = Path(tempfile.mkdtemp(prefix="maptools-bench-"))
    model = resnet18_onnx(root / "simp-resnet18.onnx", seed=0)
    from torchvision.models import resnet18

    torch.manual_seed(0)
    torch_model = resnet18(weights=None).eval().to(device)
    held = random_samples(HELD_OUT, seed=7)
    float_ref = ort_outputs(model.read_bytes(), held)
    report: dict[str, Any] = {
        "model": "ResNet18 224x224, random weights (seed 0), onnxsim'd", "device": device, "repeats": repeats,
        "torch_threads": torch.get_num_threads(), "threads_option": THREADS, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "held_out_inputs": HELD_OUT, "runs": {},
    }
    report["prepare"] = bench_prepare(args, root, model)
    flow = None if args.skip_flow else flow_runner()
    with prefect_harness(flow is not None and bool(args.samples)):
        for n in args.samples:
            bench_samples(args, n, report, root, model, torch_model, held, float_ref, flow)

    if not args.skip_rss:
        counts = [32, args.rss_images]
        folder = write_png_folder(RESULTS / "png-calibration", max(counts))
        print(f"  peak RSS, calibrating from {folder} ...", flush=True)
        report["peak_rss"] = measure_rss(folder, counts, device, root)
    shutil.rmtree(root, ignore_errors=True)
    return report


def bench_prepare(args: argparse.Namespace, root: Path, model: Path) -> dict[str, Any]:
    """Preparing a model that needs nothing: maptools' own prepared file (recognised by the record it carries)
    and the same graph without that record (prepared and checked against itself in onnxruntime), against the
    budget of 0.2 s plus one onnxruntime forward per check input."""
    import onnx

    from maptools.prepare import PREPARED_KEY, prepare_model

    plain = onnx.load(str(model))
    kept = [p for p in plain.metadata_props if p.key != PREPARED_KEY]
    del plain.metadata_props[:]
    plain.metadata_props.extend(kept)
    simple = root / "simple-resnet18.onnx"
    onnx.save(plain, str(simple))
    sess = ort_session(model.read_bytes(), "cpu")
    x = {"input": random_samples(1, seed=3)[0]["input"].numpy()}
    forward, _, _ = median_time(lambda: sess.run(None, x), 5)
    checks = 3  # prepare_model's default
    budget = 0.2 + checks * forward
    rows: dict[str, Any] = {"onnxruntime forward": round(forward, 4), "budget (0.2 s + one forward per check input)":
                            round(budget, 3)}
    for name, source in (("already prepared", model), ("already simple, not prepared", simple)):
        med, runs, done = median_time(lambda: prepare_model(source, root / "prepared.onnx", RESNET18_SHAPES),
                                      args.repeats)
        rows[name] = {"seconds": round(med, 3), "runs": [round(t, 3) for t in runs], "steps": list(done.steps),
                      "/ budget (target <= 1)": round(med / budget, 2)}
        print(f"  prepare, {name}: {med:.3f} s ({med / budget:.2f}x the budget of {budget:.3f} s)", flush=True)
    return rows


@contextlib.contextmanager
def competitor() -> Any:
    """One CPU-bound process beside the measurement (what a busy lab machine has)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def bench_contended(args: argparse.Namespace) -> dict[str, Any]:
    """Each quantizer alone, then beside one CPU-bound competitor: the slowdown of each, in one run."""
    from maptools.threads import available_cores

    root = Path(tempfile.mkdtemp(prefix="maptools-bench-"))
    model = resnet18_onnx(root / "simp-resnet18.onnx", seed=0)
    samples = random_samples(32, seed=1)
    cores = available_cores()
    cases: dict[str, Callable[[], Any]] = {
        "maptools (threads: the free cores)": lambda: run_ours(model, samples, "cpu", root, "auto"),
        f"maptools (threads={cores}: torch's default, before the thread policy)":
            lambda: run_ours(model, samples, "cpu", root, "fixed", threads=cores),
        "onnxruntime quantize_static": lambda: run_ort_static(model, samples, root / "ort.onnx"),
    }
    rows: dict[str, Any] = {}
    for name, fn in cases.items():
        quiet_s, quiet_runs, _ = median_time(fn, args.repeats)
        with competitor():
            busy_s, busy_runs, _ = median_time(fn, args.repeats)
        rows[name] = {"alone": round(quiet_s, 2), "contended": round(busy_s, 2),
                      "slowdown": round(busy_s / quiet_s, 2), "runs": [quiet_runs, busy_runs]}
        print(f"  {name}: {quiet_s:.2f} s alone, {busy_s:.2f} s beside a competitor ({busy_s / quiet_s:.2f}x)",
              flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return {"model": "ResNet18 224x224, 32 random samples", "cores": cores, "repeats": args.repeats, "rows": rows}


def fpn_onnx(path: Path, size: int) -> Path:
    from maptools.zoo import build_zoo_model

    with torch.no_grad():
        torch.onnx.export(build_zoo_model("fpn_detector"), (torch.zeros(1, 3, size, size),), str(path),
                          input_names=["input"], output_names=["output"], opset_version=13, dynamo=False)
    return path


def bench_fpn(args: argparse.Namespace, size: int = 640) -> dict[str, Any]:
    """The large-input case: an FPN detector built in code at size x size, 32 samples."""
    root = Path(tempfile.mkdtemp(prefix="maptools-bench-"))
    model = fpn_onnx(root / "fpn.onnx", size)
    shapes = {"input": [1, 3, size, size]}
    gen = torch.Generator().manual_seed(1)
    samples = [{"input": torch.randn(1, 3, size, size, generator=gen)} for _ in range(32)]
    rows: dict[str, Any] = {}
    for name, fn in {"maptools": lambda: run_ours(model, samples, args.device, root, "fpn", shapes=shapes),
                     "onnxruntime quantize_static": lambda: run_ort_static(model, samples, root / "ort.onnx")}.items():
        med, runs, result = median_time(fn, args.repeats)
        rows[name] = {"seconds": round(med, 2), "runs": [round(t, 2) for t in runs]}
        if name == "maptools":
            rows[name]["stage_seconds"] = {k: round(v, 2) for k, v in result.seconds.items()}
        print(f"  {name}: {med:.2f} s", flush=True)
    rows["ratio"] = round(rows["maptools"]["seconds"] / rows["onnxruntime quantize_static"]["seconds"], 2)
    shutil.rmtree(root, ignore_errors=True)
    return {"model": f"FPN detector (maptools.zoo) {size}x{size}, 32 random samples", "repeats": args.repeats,
            "rows": rows}


def write_npy_folder(folder: Path, samples: list[dict[str, torch.Tensor]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        np.save(folder / f"sample_{i:05d}.npy", sample["input"].numpy())
    return folder


def call_flow(flow: Callable[..., Any], model: Path, folder: Path, steps: int, device: str, root: Path,
              mapname: str, refresh: bool) -> Any:
    """The Prefect flow on the already simplified model, quantization only (no conversion)."""
    return flow(str(model), RESNET18_SHAPES, mapname, calib=str(folder), calib_steps=steps, device=device,
                output_root=str(root), simplify=False, refresh=refresh, run_conversion=False)


@contextlib.contextmanager
def prefect_harness(enabled: bool) -> Any:
    """A temporary local Prefect server for the flow rows (started once, outside every timing)."""
    if not enabled:
        yield
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with quiet():
        harness = prefect_test_harness(server_startup_timeout=120)
        harness.__enter__()
    try:
        yield
    finally:
        with quiet():
            harness.__exit__(None, None, None)


def ratio(a: Any, b: Any) -> float | None:
    try:
        return round(float(a) / float(b), 3)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def secs(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return v["seconds"] if isinstance(v, dict) else None


def summarise(report: dict[str, Any]) -> None:
    for n, row in report["runs"].items():
        ours, ours_cal = secs(row, "maptools"), row["maptools"]["calibrate_seconds"]
        report.setdefault("ratios", {})[n] = {
            "raw_ppq / floor_onnxruntime": ratio(secs(row, "raw_ppq"), secs(row, "floor_onnxruntime")),
            "maptools calibrate / floor_onnxruntime": ratio(ours_cal, secs(row, "floor_onnxruntime")),
            "raw_ppq / maptools calibrate (target >= 2)": ratio(secs(row, "raw_ppq"), ours_cal),
            "maptools total / onnxruntime quantize_static (target <= 2.0)":
                ratio(ours, secs(row, "onnxruntime_quantize_static")),
            "maptools error_steps=0 / onnxruntime quantize_static (target <= 1.5)":
                ratio(secs(row, "maptools_no_report"), secs(row, "onnxruntime_quantize_static")),
            "maptools total / raw PPQ (target <= 0.5)": ratio(ours, secs(row, "raw_ppq")),
            "maptools total / nncf": ratio(ours, secs(row, "nncf")),
            "flow cold / maptools, same .npy folder (target <= 1.05)": ratio(secs(row, "flow_cold"),
                                                                             secs(row, "maptools_npy")),
            "flow cached / flow cold (target <= 0.03)": ratio(secs(row, "flow_cached"), secs(row, "flow_cold")),
        }
    if "peak_rss" in report:
        counts = sorted(report["peak_rss"], key=int)
        report.setdefault("ratios", {})["peak_rss"] = {
            f"peak RSS {counts[-1]} / {counts[0]} images (target <= 1.2)": ratio(
                report["peak_rss"][counts[-1]]["peak_rss_mib"], report["peak_rss"][counts[0]]["peak_rss_mib"])}


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    names = [("floor_onnxruntime", "float forward, onnxruntime"), ("floor_torch", "float forward, torch eager"),
             ("raw_ppq", "raw PPQ quantize_onnx_model (TRT_INT8)"), ("maptools", "maptools quantize (total)"),
             ("maptools_cal", "  of which calibration"), ("maptools_no_report", "maptools quantize, error_steps=0"),
             ("maptools_npy", "maptools quantize, .npy folder"),
             ("flow_cold", "flow, cold (same folder)"), ("flow_cached", "flow, cached"),
             ("onnxruntime_quantize_static", "onnxruntime quantize_static"), ("nncf", "NNCF nncf.quantize")]
    for n, row in report["runs"].items():
        floor = secs(row, "floor_onnxruntime")
        t = Table(title=f"ResNet18, {n} calibration samples, device={report['device']}, "
                        f"median of {report['repeats']}")
        for col in ("step", "seconds", "x float floor (ort)", "rel. L2 error %", "cosine"):
            t.add_column(col, justify="left" if col == "step" else "right")
        for key, label in names:
            if key == "maptools_cal":
                s, err = row["maptools"]["calibrate_seconds"], {}
            else:
                v = row.get(key)
                if not isinstance(v, dict):
                    t.add_row(label, str(v), "", "", "")
                    continue
                s, err = v["seconds"], v.get("error", {})
            t.add_row(label, f"{s:.2f}", f"{s / floor:.2f}" if floor else "",
                      f"{err['rel_l2_pct']:.2f}" if err else "", f"{err['cosine']:.4f}" if err else "")
        console.print(t)
    r = Table(title="Ratios (same run)")
    r.add_column("samples")
    r.add_column("ratio")
    r.add_column("value", justify="right")
    for n, ratios in report.get("ratios", {}).items():
        for k, v in ratios.items():
            r.add_row(n, k, "n/a" if v is None else f"{v:.3f}")
    console.print(r)
    if "prepare" in report:
        prep = report["prepare"]
        budget = prep["budget (0.2 s + one forward per check input)"]
        m = Table(title=f"Preparing ResNet18 that needs nothing (budget {budget} s: 0.2 s + 3 forwards of "
                        f"{prep['onnxruntime forward']} s)")
        for col in ("model", "seconds", "/ budget"):
            m.add_column(col)
        for name, v in prep.items():
            if isinstance(v, dict):
                m.add_row(name, f"{v['seconds']:.3f}", f"{v['/ budget (target <= 1)']:.2f}")
        console.print(m)
    if "peak_rss" in report:
        m = Table(title="Peak RSS of a quantization calibrated from a PNG folder (separate processes)")
        for col in ("images", "used (calib_steps)", "peak RSS MiB", "seconds", "source"):
            m.add_column(col)
        for v in report["peak_rss"].values():
            m.add_row(str(v["images"]), str(v["used"]), f"{v['peak_rss_mib']:.0f}", f"{v['seconds']:.1f}", v["source"])
        console.print(m)


ROWS = [("floor_onnxruntime", "float forward, onnxruntime"), ("floor_torch", "float forward, torch eager"),
        ("raw_ppq", "raw PPQ `quantize_onnx_model` (TRT_INT8)"), ("maptools", "maptools `quantize` (total)"),
        ("maptools_cal", "  of which calibration"), ("maptools_no_report", "maptools `quantize`, `error_steps=0`"),
        ("maptools_npy", "maptools `quantize`, .npy folder"),
        ("flow_cold", "flow, cold (same folder)"), ("flow_cached", "flow, cached"),
        ("onnxruntime_quantize_static", "onnxruntime `quantize_static`"), ("nncf", "NNCF `nncf.quantize`")]


def markdown(reports: list[dict[str, Any]]) -> str:
    """One markdown table (time, x float floor, error per sample count) for the README."""
    runs = [(n, row) for r in reports for n, row in r.get("runs", {}).items()]
    head = "| step | " + " | ".join(f"{n} samples: s | x floor | rel. L2 % | cosine" for n, _ in runs) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(runs)]
    for key, label in ROWS:
        cells = []
        for _, row in runs:
            floor = secs(row, "floor_onnxruntime")
            if key == "maptools_cal":
                s, err = row["maptools"]["calibrate_seconds"], {}
            elif isinstance(row.get(key), dict):
                s, err = row[key]["seconds"], row[key].get("error", {})
            else:
                cells.append(f"{row.get(key, 'n/a')} | | |")
                continue
            cells.append(f"{s:.2f} | {s / floor:.2f} | " + (f"{err['rel_l2_pct']:.2f} | {err['cosine']:.4f}" if err
                                                              else " | "))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for r in reports:
        for n, ratios in r.get("ratios", {}).items():
            for k, v in ratios.items():
                lines.append(f"| ratio ({n}): {k} | {'n/a' if v is None else v} |" + " |" * (4 * len(runs) - 1))
        for v in r.get("peak_rss", {}).values():
            lines.append(f"| peak RSS, {v['images']} images ({v['used']} used) | {v['peak_rss_mib']:.0f} MiB |"
                         + " |" * (4 * len(runs) - 1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 samples, 1 repeat, RSS with 32 vs 256 images")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, nargs="+", default=[32, 128])
    p.add_argument("--rss-images", type=int, default=1024)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-nncf", action="store_true")
    p.add_argument("--skip-flow", action="store_true")
    p.add_argument("--rss-only", action="store_true", help="only the peak RSS measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (and the benchmark's own onnxruntime sessions); 0 = library defaults. "
                        "On a crowded machine, 1 avoids thread-pool oversubscription.")
    p.add_argument("--contended", action="store_true",
                   help="only: each quantizer alone and beside a CPU-bound competitor (bench-contended.json)")
    p.add_argument("--fpn", action="store_true",
                   help="only: the large-input case, an FPN detector at 640x640 (bench-fpn-<device>.json)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench-<device>.json)")
    p.add_argument("--markdown", type=Path, nargs="+", help="print a markdown table of these result JSONs and exit")
    p.add_argument("--rss-child", nargs=2, metavar=("FOLDER", "COUNT"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown([json.loads(f.read_text()) for f in args.markdown]))
        return 0
    global THREADS
    THREADS = args.threads
    if THREADS:
        torch.set_num_threads(THREADS)
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), int(args.rss_child[1]), args.device, args.workdir)
        return 0
    if args.contended or args.fpn:
        report = bench_contended(args) if args.contended else bench_fpn(args)
        out = args.out or RESULTS / ("bench-contended.json" if args.contended else
                                     f"bench-fpn-{args.device.split(':')[0]}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["rows"], indent=2))
        return 0
    if args.quick:
        args.samples, args.repeats, args.rss_images = [32], 1, 256
    if args.rss_only:
        args.samples = []
    started = time.perf_counter()
    report = bench(args)
    summarise(report)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    suffix = "-quick" if args.quick else "-rss" if args.rss_only else ""
    out = args.out or RESULTS / f"bench-{args.device.split(':')[0]}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"wrote {out} ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
