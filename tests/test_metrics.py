"""The output errors every stage reports: which outputs they are taken over."""

from __future__ import annotations

import numpy as np

from maptools.metrics import compare_outputs, rel_l2


def test_index_outputs_are_labels_not_values() -> None:
    """A classifier exported with its top-5 indices beside its scores: one rank swapped among the indices had
    outweighed the scores' error (0.49 where the scores were 0.07 away), and equal indices hid it. The error is the
    scores'; an output of indices alone is still compared."""
    rng = np.random.default_rng(0)
    scores = [rng.standard_normal(10).astype(np.float32) for _ in range(4)]
    noisy = [s + np.float32(0.05) * rng.standard_normal(10).astype(np.float32) for s in scores]
    top = [np.argsort(-s)[:5].astype(np.int64) * 100 for s in scores]
    swapped = [t[[1, 0, 2, 3, 4]] for t in top]
    alone = rel_l2([[n] for n in noisy], [[s] for s in scores])
    assert rel_l2([[n, t] for n, t in zip(noisy, swapped)], [[s, t] for s, t in zip(scores, top)]) == alone
    assert compare_outputs([[n, t] for n, t in zip(noisy, top)], [[s, t] for s, t in zip(scores, top)])["rel_l2"] \
        == alone > 0
    assert rel_l2([[t] for t in swapped], [[t] for t in top]) > 0
