"""How far one set of per-sample outputs is from another: relative L2, cosine, top-1 agreement; outputs whose
size depends on the data are left out (every stage that measures an error reads these)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["OutputComparison", "comparable", "compare_outputs", "is_score_vector", "rel_l2", "mean_output_error",
           "split_parts", "Parts", "per_output_line"]

log = logging.getLogger(__name__)


class _Sums:
    """One output's (or one part's) sums over the samples, in float64, where the reference is finite:
    ``|f|^2``, ``|q - f|^2``, ``|q|^2``, ``q . f``; and the count of elements, and of those left out."""

    __slots__ = ("ff", "dd", "qq", "qf", "bad", "size")

    def __init__(self) -> None:
        self.ff = self.dd = self.qq = self.qf = 0.0
        self.bad = self.size = 0

    def add(self, q: np.ndarray, f: np.ndarray) -> None:
        q, f = np.ravel(q).astype(np.float64), np.ravel(f).astype(np.float64)
        keep = np.isfinite(f)
        self.size += f.size
        if not keep.all():
            self.bad += int(f.size - np.count_nonzero(keep))
            q, f = q[keep], f[keep]
        d = q - f
        self.ff += float(f @ f)
        self.dd += float(d @ d)
        self.qq += float(q @ q)
        self.qf += float(q @ f)

    def __iadd__(self, other: _Sums) -> _Sums:
        for name in ("ff", "dd", "qq", "qf"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad += other.bad
        self.size += other.size
        return self

    def rel(self) -> float:
        """``||q - f|| / ||f||`` (``||q - f||`` where ``f`` is zero)."""
        return math.sqrt(self.dd / self.ff) if self.ff > 0 else math.sqrt(self.dd)


class OutputComparison:
    """Per-sample outputs of a quantized model against the reference's, taken one sample at a time
    (:meth:`add`) and kept as sums: the memory does not grow with the samples or with the outputs' size (a
    1024x1024 segmentation model's twelve outputs, 119 MB a sample, had taken 1.4 GB a sample as float64 copies).

    ``parts``: outputs (by position) whose error :meth:`mean_error` takes part by part (:func:`split_parts`).
    """

    def __init__(self, names: Sequence[str] = (), parts: Mapping[int, Parts] | None = None) -> None:
        self.names = list(names)
        self.parts = dict(parts or {})
        self.samples = 0
        self._shapes: list[set[tuple[int, ...]]] = []
        self._dtypes: list[np.dtype] = []
        self._sums: list[_Sums] = []
        self._part_sums: dict[int, list[_Sums]] = {}
        self._tops: list[tuple[list[int], list[int]]] = []

    def add(self, quantized: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
        """One sample's outputs, in the same order in both."""
        if not self._sums:
            self._shapes = [set() for _ in reference]
            self._dtypes = [np.asarray(f).dtype for f in reference]
            self._sums = [_Sums() for _ in reference]
            self._tops = [([], []) for _ in reference]
        for i, (q, f) in enumerate(zip(quantized, reference)):
            self._shapes[i].update({np.shape(q), np.shape(f)})
            if len(self._shapes[i]) > 1:
                continue  # (sized by the data: left out in the end)
            self._sums[i].add(q, f)
            if i in self.parts:
                pieces = zip(split_parts(np.asarray(q), self.parts[i]), split_parts(np.asarray(f), self.parts[i]))
                sums = self._part_sums.setdefault(i, [_Sums() for _ in self.parts[i][1][1:]])
                for part, (qp, fp) in zip(sums, pieces):
                    part.add(qp, fp)
            if np.size(f) and is_score_vector(f):
                self._tops[i][0].append(int(np.argmax(q)))
                self._tops[i][1].append(int(np.argmax(f)))
        self.samples += 1

    def _name(self, i: int) -> str:
        return repr(self.names[i]) if i < len(self.names) else f"#{i}"

    def comparable(self) -> list[int]:
        """The outputs (by position) with one shape in every sample of both: an output whose size depends on the
        data (the boxes a NonMaxSuppression keeps) has no element-wise error. Integer outputs (an ArgMax's class,
        a TopK's indices) are left out where a float output is left: an index is a label, and one rank swapped
        among a top five outweighed every float output's error. An output with no elements (the boxes of a
        detector that kept none) is left out too."""
        varying = {i for i, shapes in enumerate(self._shapes) if len(shapes) > 1}
        empty = {i for i, shapes in enumerate(self._shapes) if i not in varying and self._sums[i].size == 0}
        kept = [i for i in range(len(self._shapes)) if i not in varying | empty]
        then = "the error is taken over the others" if kept else "no output error is measured"
        for left, why in ((varying, "vary in size with the data"), (empty, "are empty")):
            if left:
                log.warning("outputs %s %s: %s", ", ".join(self._name(i) for i in sorted(left)), why, then)
        floats = [i for i in kept if np.issubdtype(self._dtypes[i], np.floating)]
        return floats or kept

    def rel_l2(self) -> float:
        """``||q - f|| / ||f||`` pooled over the comparable outputs (NaN where there is none)."""
        total = _Sums()
        outputs = self.comparable()
        for i in outputs:
            total += self._sums[i]
        return total.rel() if outputs else float("nan")

    def mean_error(self) -> float:
        """The mean over the comparable outputs of each one's own relative L2: each output weighted alike (a
        detector's box offsets as much as its scores, which the pooled one lets the larger outweigh), and an output
        in ``parts`` the mean of its parts' own; NaN where no output is comparable."""
        errors = []
        for i in self.comparable():
            if i in self._part_sums:
                errors.append(float(np.nanmean([part.rel() for part in self._part_sums[i]])))
            else:
                errors.append(self._sums[i].rel())
        return float(np.nanmean(errors)) if errors and not np.isnan(errors).all() else float("nan")

    def result(self, labels: np.ndarray | None = None) -> dict[str, Any]:
        """rel. L2, cosine and top-1 agreement (where the first comparable output is a score vector,
        :func:`is_score_vector`; else None); accuracies with labels (on a score vector too); ``per_output``: each
        output's own rel. L2, by name (the pooled one is dominated by the largest output: a detector's pixel boxes
        beside its scores). The elements where the reference is not finite are left out (a warning names the
        output); NaN where no output is left."""
        outputs = self.comparable()
        result: dict[str, Any] = {"rel_l2": float("nan"), "cosine": float("nan"), "top1_agreement": None,
                                  "accuracy": None, "float_accuracy": None, "per_output": {}}
        if not outputs:
            return result
        total = _Sums()
        for i in outputs:
            sums = self._sums[i]
            if sums.bad:
                log.warning("output %s of the float model is not finite in %d of its %d elements (it overflows on "
                            "these inputs): the error is taken over the finite ones", self._name(i), sums.bad,
                            sums.size)
            total += sums
        result["rel_l2"] = total.rel()
        norms = math.sqrt(total.qq) * math.sqrt(total.ff)
        result["cosine"] = total.qf / norms if norms > 0 else 0.0
        result["per_output"] = {self.names[i] if i < len(self.names) else f"#{i}": self._sums[i].rel()
                                for i in outputs}
        top_q, top_f = (np.array(t) for t in self._tops[outputs[0]])
        if top_f.size != self.samples:
            if labels is not None:
                log.warning("labels were given, and the first output (shape %s) is not a vector of class scores: no "
                            "accuracy", list(next(iter(self._shapes[outputs[0]]))))
            return result
        result["top1_agreement"] = float(np.mean(top_q == top_f))
        if labels is not None:
            result["accuracy"] = float(np.mean(top_q == labels))
            result["float_accuracy"] = float(np.mean(top_f == labels))
        return result


def _compared(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
              names: Sequence[str] = (), parts: Mapping[int, Parts] | None = None) -> OutputComparison:
    comparison = OutputComparison(names, parts)
    for q, f in zip(quantized, reference):
        comparison.add(q, f)
    return comparison


def comparable(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
               names: Sequence[str] = ()) -> list[int]:
    """:meth:`OutputComparison.comparable` of these samples."""
    return _compared(quantized, reference, names).comparable()


def is_score_vector(output: np.ndarray) -> bool:
    """Whether one sample's output is a vector of class scores (one axis longer than 1: ``[1, 1000]``,
    ``[1, 10, 1, 1]``), whose largest entry is a class; an image, a map of boxes or a sequence is not."""
    return sum(int(d) > 1 for d in np.shape(output)) == 1


def rel_l2(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]]) -> float:
    """``||q - f|| / ||f||`` over the comparable outputs of every sample, where ``f`` is finite (NaN where
    no output is comparable)."""
    return _compared(quantized, reference).rel_l2()


#: Where a Concat assembled an output: ``(axis, bounds)``, its parts ``[bounds[k], bounds[k + 1])`` on ``axis``.
Parts = tuple[int, tuple[int, ...]]


def split_parts(x: np.ndarray, parts: Parts) -> list[np.ndarray]:
    """``x`` cut into its ``parts``."""
    axis, bounds = parts
    return [np.take(x, range(lo, hi), axis) for lo, hi in zip(bounds, bounds[1:])]


def mean_output_error(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
                      parts: Mapping[int, Parts] | None = None) -> float:
    """:meth:`OutputComparison.mean_error` of these samples."""
    return _compared(quantized, reference, parts=parts).mean_error()


def compare_outputs(quantized: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
                    labels: np.ndarray | None = None, names: Sequence[str] = ()) -> dict[str, Any]:
    """:meth:`OutputComparison.result` of these samples."""
    return _compared(quantized, reference, names).result(labels)


def per_output_line(per_output: Mapping[str, float]) -> str:
    """``'per output: boxes 3.10%, scores 0.52%'`` where there are several outputs, else ``''``."""
    if len(per_output) < 2:
        return ""
    return "per output: " + ", ".join(f"{name} {100 * error:.2f}%" for name, error in per_output.items())
