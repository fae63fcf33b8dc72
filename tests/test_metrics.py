"""The output errors every stage reports: which outputs they are taken over."""

from __future__ import annotations

import numpy as np

from maptools.metrics import OutputComparison, compare_outputs, rel_l2


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


def test_each_output_has_its_own_error() -> None:
    """A detector's pixel boxes beside its sub-1 scores: the pooled error is the boxes'; each output's own error is
    reported by name, the scores' 20x the pooled one here. An output of indices is left out, as in the pooled one."""
    from maptools.metrics import per_output_line

    rng = np.random.default_rng(1)
    boxes = [100 * rng.random((8, 4)).astype(np.float32) for _ in range(3)]
    scores = [rng.random(8).astype(np.float32) for _ in range(3)]
    labels = [np.arange(8, dtype=np.int64) for _ in range(3)]
    moved = [[b * np.float32(1.001), s * np.float32(1.2), k[::-1]] for b, s, k in zip(boxes, scores, labels)]
    result = compare_outputs(moved, [list(t) for t in zip(boxes, scores, labels)], names=["boxes", "scores", "ids"])
    assert list(result["per_output"]) == ["boxes", "scores"]
    assert abs(result["per_output"]["boxes"] - 0.001) < 1e-4 and abs(result["per_output"]["scores"] - 0.2) < 1e-4
    assert result["per_output"]["scores"] > 20 * result["rel_l2"]
    assert per_output_line(result["per_output"]) == "per output: boxes 0.10%, scores 20.00%"
    assert per_output_line({"logits": 0.1}) == ""


def test_an_empty_output_is_left_out(caplog) -> None:
    """A detector that kept no box returns a (0, 4) output in every sample: it has no error (argmax of it had
    failed every evaluation); beside it the other outputs are compared, and with none left every figure is NaN
    and the warning says no error is measured (it said the error was taken over the others: there were none)."""
    rng = np.random.default_rng(2)
    scores = [rng.standard_normal(6).astype(np.float32) for _ in range(2)]
    none = np.zeros((0, 4), np.float32)
    result = compare_outputs([[none, s + 0.01] for s in scores], [[none, s] for s in scores], names=["boxes", "s"])
    assert list(result["per_output"]) == ["s"] and 0 < result["rel_l2"] < 0.1 and result["top1_agreement"] == 1.0
    assert "outputs 'boxes' are empty: the error is taken over the others" in caplog.text
    caplog.clear()
    alone = compare_outputs([[none], [none]], [[none], [none]], names=["boxes"])
    assert np.isnan(alone["rel_l2"]) and alone["top1_agreement"] is None and alone["per_output"] == {}
    assert "outputs 'boxes' are empty: no output error is measured" in caplog.text


def test_top1_agreement_is_measured_on_class_scores_only() -> None:
    """A super-resolution model's image, a detector's box map or a recogniser's frame sequence has no top-1 class:
    argmax over all its elements had printed an agreement (0% or 100%) that meant nothing in every report. It is
    None there; on a score vector of any layout ([1, 10], [1, 10, 1, 1]) it is measured as before."""
    rng = np.random.default_rng(4)
    for shape in ([1, 10], [1, 10, 1, 1], [10]):
        scores = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
        flipped = [-s for s in scores]
        assert compare_outputs([[s] for s in scores], [[s] for s in scores])["top1_agreement"] == 1.0
        assert compare_outputs([[f] for f in flipped], [[s] for s in scores])["top1_agreement"] == 0.0
    for shape in ([1, 3, 8, 8], [1, 84, 20], [20, 1, 37], [1, 1]):
        images = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
        result = compare_outputs([[i * np.float32(1.01)] for i in images], [[i] for i in images])
        assert result["top1_agreement"] is None and abs(result["rel_l2"] - 0.01) < 1e-6
    labels = np.array([3, 4])  # an argmax over every element is no class, with labels too
    assert compare_outputs([[i] for i in images], [[i] for i in images], labels)["accuracy"] is None


def test_where_the_float_model_overflows_the_error_is_taken_over_the_finite_elements(caplog) -> None:
    """Zero-DCE's curve overflows to inf on inputs outside its range: every figure was NaN (the flow's headline
    read 'nan%'). The elements where the reference is not finite are left out, with a warning naming the output and
    the count; a quantized inf where the reference is finite still counts (as inf)."""
    rng = np.random.default_rng(3)
    ref = [rng.standard_normal(8).astype(np.float32) for _ in range(2)]
    q = [r * np.float32(1.01) for r in ref]
    ref[0][3], q[0][3] = np.inf, np.float32(3e38)
    with caplog.at_level("WARNING"):
        result = compare_outputs([[a] for a in q], [[r] for r in ref], names=["enhanced"])
    assert abs(result["rel_l2"] - 0.01) < 1e-6 and abs(result["per_output"]["enhanced"] - 0.01) < 1e-6
    assert result["cosine"] > 0.99
    assert "output 'enhanced' of the float model is not finite in 1 of its 16 elements" in caplog.text
    q[1][0] = np.inf
    assert np.isinf(rel_l2([[a] for a in q], [[r] for r in ref]))


def test_the_mean_output_error_weighs_each_output_alike() -> None:
    """MTCNN's P-Net: box offsets 32% off beside probabilities near 1 that moved little; the pooled error read 10%
    (bit_width='auto' took it as within a 0.1 budget) where algorithm='auto', weighing each output alike, read 16%.
    The budget now reads the mean of each output's own error, as auto does."""
    from maptools.metrics import mean_output_error

    rng = np.random.default_rng(6)
    boxes = [rng.standard_normal((1, 4, 5, 5)).astype(np.float32) * 0.1 for _ in range(3)]
    scores = [np.full((1, 2, 5, 5), 0.5, np.float32) + rng.random((1, 2, 5, 5)).astype(np.float32) for _ in range(3)]
    moved = [[b * np.float32(1.3), s * np.float32(1.01)] for b, s in zip(boxes, scores)]
    reference = [list(pair) for pair in zip(boxes, scores)]
    pooled, mean = rel_l2(moved, reference), mean_output_error(moved, reference)
    assert abs(mean - (0.3 + 0.01) / 2) < 1e-6 and pooled < 0.05
    assert mean_output_error([[b] for b in boxes], [[b] for b in boxes]) == 0.0


def test_outputs_taken_one_sample_at_a_time_give_the_figures_of_them_all_at_once() -> None:
    """The comparison keeps sums, not the samples' outputs (a 1024x1024 segmentation model's twelve outputs had
    taken 1.4 GB a sample in float64 copies): its relative L2, cosine, per-output and per-part errors are those of
    every sample's outputs concatenated, a non-finite reference element left out."""
    rng = np.random.default_rng(4)
    reference = [[rng.standard_normal((1, 6, 8)).astype(np.float32), rng.standard_normal((1, 10)).astype(np.float32)]
                 for _ in range(5)]
    reference[2][0][0, 1, 1] = np.inf
    quantized = [[o + rng.normal(0, s, o.shape).astype(np.float32) for o, s in zip(sample, (0.05, 0.2))]
                 for sample in reference]
    comparison = OutputComparison(["maps", "scores"], parts={0: (1, (0, 2, 6))})
    for q, f in zip(quantized, reference):
        comparison.add(q, f)

    def flat(samples, i, part=slice(None)):
        return np.concatenate([np.ravel(s[i][:, part]) for s in samples]).astype(np.float64)

    def rel(q, f):
        keep = np.isfinite(f)
        return np.linalg.norm(q[keep] - f[keep]) / np.linalg.norm(f[keep])

    result = comparison.result()
    q_all, f_all = np.concatenate([flat(quantized, 0), flat(quantized, 1)]), np.concatenate(
        [flat(reference, 0), flat(reference, 1)])
    keep = np.isfinite(f_all)
    assert np.isclose(result["rel_l2"], rel(q_all, f_all))
    assert np.isclose(result["cosine"], q_all[keep] @ f_all[keep] / np.linalg.norm(q_all[keep]) /
                      np.linalg.norm(f_all[keep]))
    assert np.isclose(result["per_output"]["maps"], rel(flat(quantized, 0), flat(reference, 0)))
    assert np.isclose(result["per_output"]["scores"], rel(flat(quantized, 1), flat(reference, 1)))
    parts = [rel(flat(quantized, 0, slice(0, 2)), flat(reference, 0, slice(0, 2))),
             rel(flat(quantized, 0, slice(2, 6)), flat(reference, 0, slice(2, 6)))]
    assert np.isclose(comparison.mean_error(), np.mean([np.mean(parts), result["per_output"]["scores"]]))
    assert result["top1_agreement"] is None  # (the first output is no score vector)
    assert compare_outputs(quantized, reference, names=["maps", "scores"]) == result
