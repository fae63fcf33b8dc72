"""The integer simulation against PPQ's simulation, operator by operator on PPQ's own input codes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from maptools.conversion import OperatorGraph
from maptools.simulate import IntegerSimulator, QTensor


def _codes(value: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(value.astype(np.float32) / np.float32(scale)), lo, hi)


def layer_agreement(sim: IntegerSimulator, graph: OperatorGraph, ppq_graph: object,
                    x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, float]:
    """{device tensor: fraction of codes within one step of PPQ's}, each operator fed PPQ's own inputs (``x``:
    the model's one input, or every input by name).

    Float tensors must match PPQ's: the host's to float precision, a crossbar output only the host
    reads within what one step on each input can move it (:func:`_one_step`); an AssertionError names
    the operator otherwise.
    """
    cfg_of = {t: graph.node(n)["quant"] for n in graph.operators() for t in graph.node(n)["outputs"]}
    feed = dict(x) if isinstance(x, Mapping) else {next(iter(graph.inputs)): x}
    ppq = {**feed, **ppq_graph.tensor_values({k: torch.from_numpy(v) for k, v in feed.items()})}
    ours = sim.run(feed, keep=True)

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
                if not np.issubdtype(ref.dtype, np.floating):  # a Dropout's mask, shape arithmetic
                    assert np.array_equal(out.numpy(), ref), op
                    continue
                # (onnxruntime's logistic is an approximation good to ~1e-7 absolute: tiny sigmoid outputs need the floor)
                finite = np.isfinite(ref)  # an attention mask's -inf must come out -inf
                slack = max(1e-3 * np.abs(ref[finite]).max(initial=0.0), 1e-6) + _one_step(sim, op, node)
                with np.errstate(invalid="ignore"):
                    close = np.abs(out.numpy() - ref) <= slack + 1e-3 * np.abs(ref)
                assert np.all((out.numpy() == ref) | (close & finite)), op
    return agreement


def _one_step(sim: IntegerSimulator, op: str, node: dict) -> np.ndarray | float:
    """What one step on every input code, and the int32 bias's rounding, can move a crossbar output kept
    float (the host reads it): ``s_in * s_w * (sum |w| + 1)`` per output channel. A layer reading its
    input at its own width requantizes it from the producer's grid, where the integer multiplier and
    PPQ's float division may round a near-tie apart."""
    if node["part"] != "device" or node["role"] != "crossbar" or op not in sim.weights:
        return 0.0
    cfg = node["quant"]
    weight = sim.weights[op][0].abs()
    per_channel = weight.reshape(weight.shape[0], -1).sum(1).numpy() if node["op_type"] != "ConvTranspose" else \
        np.full(len(cfg.weight_scale), float(weight.sum()))
    bound = cfg.input_scale * cfg.weight_scale.astype(np.float64) * (per_channel + 1)
    rank = len(node["output_shapes"][0])
    return bound.reshape([1, -1] + [1] * (rank - 2))
