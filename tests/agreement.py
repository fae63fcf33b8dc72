"""The integer simulation against PPQ's simulation, operator by operator on PPQ's own input codes."""

from __future__ import annotations

import numpy as np
import torch

from maptools.conversion import OperatorGraph
from maptools.simulate import IntegerSimulator, QTensor


def _codes(value: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(value.astype(np.float32) / np.float32(scale)), lo, hi)


def layer_agreement(sim: IntegerSimulator, graph: OperatorGraph, ppq_graph: object, x: np.ndarray
                    ) -> dict[str, float]:
    """{device tensor: fraction of codes within one step of PPQ's}, each operator fed PPQ's own inputs.

    Float tensors (the host's, a crossbar output only the host reads) must match PPQ's to float
    precision; an AssertionError names the operator otherwise.
    """
    cfg_of = {t: graph.node(n)["quant"] for n in graph.operators() for t in graph.node(n)["outputs"]}
    name = next(iter(graph.inputs))
    ppq = {name: x, **ppq_graph.tensor_values({name: torch.from_numpy(x)})}
    ours = sim.run({name: x}, keep=True)

    def ppq_input(tensor: str) -> torch.Tensor | QTensor:
        cfg = cfg_of.get(tensor)
        if tensor not in ours.codes:
            return torch.from_numpy(ppq[tensor])
        return QTensor(torch.from_numpy(_codes(ppq[tensor], cfg.output_scale, *cfg.out_range)).double(),
                       cfg.output_scale)

    agreement: dict[str, float] = {}
    for op in sim.order:
        node = graph.node(op)
        for tensor, out in zip(node["outputs"], sim.step(op, [ppq_input(t) for t in node["inputs"]])):
            if isinstance(out, QTensor):
                theirs = _codes(ppq[tensor], out.scale, *node["quant"].out_range)
                agreement[tensor] = float((np.abs(out.codes.numpy() - theirs) <= 1).mean())
            else:
                ref = ppq[tensor]
                # (onnxruntime's logistic is an approximation good to ~1e-7 absolute: tiny sigmoid outputs need the floor)
                assert np.allclose(out.numpy(), ref, rtol=1e-3, atol=max(1e-3 * np.abs(ref).max(), 1e-6)), op
    return agreement
