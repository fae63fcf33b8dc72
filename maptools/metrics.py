"""How far one set of per-sample outputs is from another: relative L2, cosine, top-1 agreement; outputs whose
size depends on the data are left out (every stage that measures an error reads these)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["comparable", "compare_outputs", "is_score_vector", "rel_l2", "mean_output_error", "split_parts", "Parts",
           "per_output_line"]

log = logging.getLogger(__name__)


def comparable(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
               names: Sequence[str] = ()) -> list[int]:
    """The outputs (by position; ``names`` name them in the warning) that have one shape in every sample of both:
    an output whose size depends on the data (the boxes a NonMaxSuppression keeps) has no element-wise error.
    Integer outputs (an ArgMax's class, a TopK's indices) are left out where a float output is left: an index is
    a label, and one rank swapped among a top five outweighed every float output's error. An output with no
    elements (the boxes of a detector that kept none) is left out too."""
    shapes = {(np.shape(o), i) for run in (quantized, reference) for sample in run for i, o in enumerate(sample)}
    count = len(reference[0]) if len(reference) else 0
    varying = {i for i in range(count) if sum(1 for _, j in shapes if j == i) > 1}
    empty = {i for i in range(count) if i not in varying and np.size(reference[0][i]) == 0}  # (no box kept)
    kept = [i for i in range(count) if i not in varying | empty]
    then = "the error is taken over the others" if kept else "no output error is measured"
    for left, why in ((varying, "vary in size with the data"), (empty, "are empty")):
        if left:
            log.warning("outputs %s %s: %s", ", ".join(repr(names[i]) if i < len(names) else f"#{i}"
                                                        for i in sorted(left)), why, then)
    floats = [i for i in kept if np.issubdtype(np.asarray(reference[0][i]).dtype, np.floating)]
    return floats or kept


def is_score_vector(output: np.ndarray) -> bool:
    """Whether one sample's output is a vector of class scores (one axis longer than 1: ``[1, 1000]``,
    ``[1, 10, 1, 1]``), whose largest entry is a class; an image, a map of boxes or a sequence is not."""
    return sum(int(d) > 1 for d in np.shape(output)) == 1


def _flat(runs: Sequence[Sequence[np.ndarray]], outputs: Sequence[int]) -> np.ndarray:
    parts = [np.ravel(sample[i]) for sample in runs for i in outputs]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def rel_l2(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]]) -> float:
    """``||q - f|| / ||f||`` over the :func:`comparable` outputs of every sample, where ``f`` is finite (NaN where
    no output is comparable)."""
    outputs = comparable(quantized, reference)
    return _rel(_flat(quantized, outputs), _flat(reference, outputs)) if outputs else float("nan")


#: Where a Concat assembled an output: ``(axis, bounds)``, its parts ``[bounds[k], bounds[k + 1])`` on ``axis``.
Parts = tuple[int, tuple[int, ...]]


def split_parts(x: np.ndarray, parts: Parts) -> list[np.ndarray]:
    """``x`` cut into its ``parts``."""
    axis, bounds = parts
    return [np.take(x, range(lo, hi), axis) for lo, hi in zip(bounds, bounds[1:])]


def mean_output_error(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
                      parts: Mapping[int, Parts] | None = None) -> float:
    """The mean over the :func:`comparable` outputs of each one's own relative L2 over every sample: each output
    weighted alike (a detector's box offsets as much as its scores, which the pooled :func:`rel_l2` lets the larger
    one outweigh), and an output in ``parts`` (by position) the mean of its parts' own; NaN where no output is
    comparable."""
    errors = []
    for i in comparable(quantized, reference):
        q, f = [s[i] for s in quantized], [s[i] for s in reference]
        if parts and i in parts:  # each part's error, over the samples' pieces of it
            pieces = zip(zip(*(split_parts(x, parts[i]) for x in q)), zip(*(split_parts(x, parts[i]) for x in f)))
            errors.append(float(np.nanmean([rel_l2([[p] for p in qs], [[p] for p in fs]) for qs, fs in pieces])))
        else:
            errors.append(rel_l2([[x] for x in q], [[x] for x in f]))
    return float(np.nanmean(errors)) if errors and not np.isnan(errors).all() else float("nan")


def _finite(q: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The elements where the reference is finite (an overflow of the float model itself, such as Zero-DCE's
    curve on inputs outside its range, has no error to measure); all of them where every one is."""
    keep = np.isfinite(f)
    return (q, f) if keep.all() else (q[keep], f[keep])


def _rel(q: np.ndarray, f: np.ndarray) -> float:
    q, f = _finite(q, f)
    norm = float(np.linalg.norm(f))
    return float(np.linalg.norm(q - f) / norm) if norm > 0 else float(np.linalg.norm(q - f))


def compare_outputs(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
                    labels: np.ndarray | None = None, names: Sequence[str] = ()) -> dict[str, Any]:
    """rel. L2, cosine and top-1 agreement (where the first output of a fixed size is a score vector,
    :func:`is_score_vector`; else None) of per-sample outputs; accuracies with labels (on a score vector too);
    ``per_output``: each output's own rel. L2, by name (the pooled one is dominated by the largest output: a
    detector's pixel boxes beside its scores). Outputs whose size depends on the data are left out
    (:func:`comparable`), and so are the elements where the reference is not finite (a warning names the output);
    NaN where none is left."""
    outputs = comparable(quantized, reference, names)
    result: dict[str, Any] = {"rel_l2": float("nan"), "cosine": float("nan"), "top1_agreement": None,
                              "accuracy": None, "float_accuracy": None, "per_output": {}}
    if not outputs:
        return result
    flat = {names[i] if i < len(names) else f"#{i}": (_flat(quantized, [i]), _flat(reference, [i])) for i in outputs}
    for name, (_, f) in flat.items():
        bad = int(f.size - np.count_nonzero(np.isfinite(f)))
        if bad:
            log.warning("output %r of the float model is not finite in %d of its %d elements (it overflows on these "
                        "inputs): the error is taken over the finite ones", name, bad, f.size)
    q, f = _finite(*(np.concatenate(parts) for parts in zip(*flat.values())))
    norm_f, norm_q = float(np.linalg.norm(f)), float(np.linalg.norm(q))
    result["rel_l2"] = _rel(q, f)
    result["cosine"] = float(q @ f / (norm_q * norm_f)) if norm_q > 0 and norm_f > 0 else 0.0
    result["per_output"] = {name: _rel(q_i, f_i) for name, (q_i, f_i) in flat.items()}
    if not is_score_vector(reference[0][outputs[0]]):
        if labels is not None:
            log.warning("labels were given, and the first output (shape %s) is not a vector of class scores: no "
                        "accuracy", list(np.shape(reference[0][outputs[0]])))
        return result
    top_q = np.array([int(np.argmax(sample[outputs[0]])) for sample in quantized])
    top_f = np.array([int(np.argmax(sample[outputs[0]])) for sample in reference])
    result["top1_agreement"] = float(np.mean(top_q == top_f))
    if labels is not None:
        result["accuracy"] = float(np.mean(top_q == labels))
        result["float_accuracy"] = float(np.mean(top_f == labels))
    return result


def per_output_line(per_output: Mapping[str, float]) -> str:
    """``'per output: boxes 3.10%, scores 0.52%'`` where there are several outputs, else ``''``."""
    if len(per_output) < 2:
        return ""
    return "per output: " + ", ".join(f"{name} {100 * error:.2f}%" for name, error in per_output.items())
