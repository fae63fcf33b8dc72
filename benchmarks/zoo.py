"""The zoo table: every architecture of maptools.zoo from its raw export, through quantize -> convert -> simulate.

    python benchmarks/zoo.py                 # opsets 11, 13, 17; markdown table on stdout
    python benchmarks/zoo.py --opsets 13     # one opset
    python benchmarks/zoo.py --calib 32 --inputs 8

Per model: the source opsets, operators after preparation, the device/host split, quantize
seconds (median over the opsets, this machine), and the output error against the float model
(relative L2 over ``--inputs`` random inputs) of the integer simulation, of PPQ's simulation
and, when NNCF is installed (``pip install -e '.[bench]'``), of NNCF's INT8 model on the same data.
Random weights and random calibration data: the errors compare tools, not real accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from maptools import quantize, read_quantparams
from maptools.conversion import convert, read_graph
from maptools.simulate import IntegerSimulator
from maptools.zoo import ZOO, export_zoo_model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _nncf_error(source: Path, shape: list[int], calib: list[np.ndarray], inputs: list[np.ndarray],
                reference: list[list[np.ndarray]]) -> float | None:
    try:
        import nncf
    except ImportError:
        return None
    model = onnx.load(str(source))
    quantized = nncf.quantize(model, nncf.Dataset([{"input": x} for x in calib]), subset_size=len(calib))
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    return max(_rel(o, r) for x, ref in zip(inputs, reference) for o, r in zip(session.run(None, {"input": x}), ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opsets", type=int, nargs="+", default=[11, 13, 17])
    parser.add_argument("--calib", type=int, default=8, help="random calibration samples")
    parser.add_argument("--inputs", type=int, default=4, help="random evaluation inputs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, entry in ZOO.items():
            shape = list(entry.input_shape)
            rng = np.random.default_rng(0)
            calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.calib)]
            inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.inputs)]
            seconds, errors, ppq_errors = [], [], []
            for opset in args.opsets:
                source = export_zoo_model(name, root / f"{name}-{opset}.onnx", opset)
                float_model = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
                reference = [float_model.run(None, {"input": x}) for x in inputs]
                names = [o.name for o in float_model.get_outputs()]
                started = time.perf_counter()
                result = quantize({"input": shape}, "cpu", source, mapname=f"{name}-{opset}", calib_steps=args.calib,
                                  calibset=[{"input": torch.from_numpy(x)} for x in calib], output_root=root)
                seconds.append(time.perf_counter() - started)
                convert(result.mapname, output_root=root)
                graph = read_graph(result.mapname, root)
                sim = IntegerSimulator(graph, read_quantparams(result.mapname, root))
                errors.append(max(_rel(sim.run({"input": x}).outputs[n], r[i]) for x, r in zip(inputs, reference)
                                  for i, n in enumerate(names)))
                qdq = ort.InferenceSession(str(result.quant_model_path), providers=["CPUExecutionProvider"])
                ppq_errors.append(max(_rel(o, r[i]) for x, r in zip(inputs, reference)
                                      for i, o in enumerate(qdq.run(names, {"input": x}))))
            parts = Counter(graph.node(n)["part"] for n in graph.operators())
            types = Counter(graph.node(n)["op_type"] for n in graph.operators() if graph.node(n)["part"] == "host")
            nncf_error = _nncf_error(source, shape, calib, inputs, reference)
            rows.append((name, entry.description, "/".join(map(str, args.opsets)), len(graph.operators()),
                         parts["device"], parts["host"], ", ".join(f"{k} {v}" for k, v in types.most_common(4)),
                         statistics.median(seconds), max(errors), max(ppq_errors), nncf_error))
            print(f"{name}: done", flush=True)
    print("\n| model | opsets | operators | device / host | host operators (top 4) | quantize s | error, integer "
          "simulation | error, quant_model.onnx | error, NNCF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, opsets, ops, dev, host, types, secs, err, ppq_err, nncf_err in rows:
        nncf_cell = "n/a" if nncf_err is None else f"{nncf_err:.2%}"
        print(f"| {name} | {opsets} | {ops} | {dev} / {host} | {types or '-'} | {secs:.1f} | {err:.2%} | "
              f"{ppq_err:.2%} | {nncf_cell} |")


if __name__ == "__main__":
    main()
