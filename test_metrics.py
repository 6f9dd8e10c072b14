"""Properties of the evaluation metrics (`metrics.py`).

Each metric is checked against a value worked out by hand on a tiny case, and against its
defining property on random data (AUROC against the O(N^2) count over pairs, average precision
against the mean precision at each positive).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metrics
from metrics import (
    auroc,
    average_precision,
    calibration,
    cross_entropy,
    ndcg_at_k,
    rce,
    recall_at_k,
)

SOME_EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True)
# Rounding scores to one decimal in [-1, 1] leaves 21 values, so most draws contain ties.
EXAMPLES = st.lists(
    st.tuples(st.booleans(), st.floats(-1, 1).map(lambda x: round(x, 1))), min_size=1, max_size=40
)


def pairwise_auroc(labels, scores) -> float:
    """The definition: over every (positive, negative) pair, 1 if ordered right, 1/2 if tied."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# AUROC


def test_auroc_hand_computed_with_a_tie():
    # Positives score 0.9, 0.5, 0.1; negatives 0.9, 0.3. The six pairs (pos, neg):
    # (.9,.9) tie 1/2, (.9,.3) 1, (.5,.9) 0, (.5,.3) 1, (.1,.9) 0, (.1,.3) 0 -> 2.5 / 6.
    assert auroc([1, 0, 1, 0, 1], [0.9, 0.9, 0.5, 0.3, 0.1]) == pytest.approx(5 / 12, abs=1e-15)


def test_bfloat16_scores_from_a_model_are_taken_as_the_numbers_they_hold():
    """The models compute in bfloat16 by default; their scores are real numbers like any."""
    scores = np.array([0.9, 0.9, 0.5, 0.3, 0.1], jnp.bfloat16)
    labels = np.array([1, 0, 1, 0, 1], jnp.bfloat16)
    assert auroc(labels, scores) == pytest.approx(5 / 12, abs=1e-15)
    wide = scores.astype(np.float64)
    assert cross_entropy(labels, scores) == cross_entropy([1, 0, 1, 0, 1], wide)


def test_auroc_extremes():
    labels = np.array([0, 1, 0, 1, 1, 0], bool)
    scores = np.arange(6.0)
    assert auroc(labels, np.zeros(6)) == 0.5
    assert auroc(labels, np.where(labels, 1.0, -1.0)) == 1.0
    assert auroc(labels, np.where(labels, -1.0, 1.0)) == 0.0
    assert auroc(labels, scores) + auroc(labels, -scores) == pytest.approx(1.0)
    assert math.isnan(auroc(np.zeros(6), scores))
    assert math.isnan(auroc(np.ones(6), scores))
    # Large integers that float64 still tells apart are taken as they are.
    assert auroc([0, 1], np.array([0, 2**60])) == 1.0


@SOME_EXAMPLES
@given(EXAMPLES)
def test_auroc_equals_the_pairwise_definition(examples):
    labels, scores = zip(*examples, strict=True)
    expected = pairwise_auroc(labels, scores)
    got = auroc(np.array(labels), np.array(scores))
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_auroc_depends_only_on_the_order_of_scores_and_not_of_examples():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = rng.integers(0, 20, 500).astype(float)  # many ties
    value = auroc(labels, scores)
    # Strictly increasing, and exact in float64 on these small integers, so ties stay ties.
    assert auroc(labels, scores**3 + 5 * scores - 7) == value
    assert auroc(labels, np.exp(scores / 4)) == pytest.approx(value, abs=1e-12)
    perm = rng.permutation(500)
    assert auroc(labels[perm], scores[perm]) == pytest.approx(value, abs=1e-12)
    # Any shape is a set of examples.
    assert auroc(labels.reshape(25, 20), scores.reshape(25, 20)) == value


# Average precision


def test_average_precision_hand_computed():
    # No ties: positives at ranks 1, 3, 5 have precision 1/1, 2/3, 3/5.
    ap = average_precision([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5])
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-15)
    # A tie at 0.8 enters together: recall 1/2 at precision 1/2, then recall 1 at precision 2/3.
    ap = average_precision([1, 0, 1], [0.8, 0.8, 0.3])
    assert ap == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-15)


def test_average_precision_extremes():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    assert average_precision(labels, labels) == 1.0
    # One threshold covering everything: precision is the base rate, recall 1.
    assert average_precision(labels, np.ones(8)) == pytest.approx(labels.mean())
    assert math.isnan(average_precision(np.zeros(8), np.arange(8.0)))


@SOME_EXAMPLES
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_average_precision_is_mean_precision_at_each_positive_without_ties(labels, random):
    labels = np.array(labels)
    scores = np.array(random.sample(range(1000), labels.size), float)
    hits = labels[np.argsort(-scores)]
    precision_at_rank = np.cumsum(hits) / np.arange(1, hits.size + 1)
    got = average_precision(labels, scores)
    if not labels.any():
        assert math.isnan(got)
    else:
        assert got == pytest.approx(precision_at_rank[hits].mean(), abs=1e-12)


# Cross-entropy and RCE

LABELS = [1, 0, 1, 0]
PROBABILITIES = [0.8, 0.2, 0.6, 0.5]
# -(ln .8 + ln .8 + ln .6 + ln .5) / 4 = (0.223144 + 0.223144 + 0.510826 + 0.693147) / 4
CE = 0.412565
# The base rate is 1/2, so CE_base = ln 2 = 0.693147 and RCE = 100 (0.693147 - 0.412565) / 0.693147.
RCE = 40.4795


def test_cross_entropy_and_rce_hand_computed():
    assert cross_entropy(LABELS, PROBABILITIES) == pytest.approx(CE, abs=1e-6)
    assert rce(LABELS, PROBABILITIES) == pytest.approx(RCE, abs=1e-4)


def test_cross_entropy_of_a_confident_mistake_is_finite():
    assert cross_entropy([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(metrics.EPS))
    assert cross_entropy([1, 0], [1.0, 0.0]) == pytest.approx(0.0, abs=1e-6)


def test_rce_of_base_rate_perfect_and_inverted_predictors():
    rng = np.random.default_rng(1)
    labels = rng.random(1000) < 0.07
    assert rce(labels, np.full(1000, labels.mean())) == 0.0
    assert rce(labels, labels.astype(float)) == pytest.approx(100.0, abs=1e-3)
    assert rce(labels, 1 - labels.astype(float)) < -100
    # Better than the base rate: half-way towards the true labels.
    assert 0 < rce(labels, (labels + labels.mean()) / 2) < 100


def test_rce_is_nan_when_every_label_is_equal():
    assert math.isnan(rce([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(rce([1, 1], [0.9, 0.5]))


# Calibration


def test_calibration_hand_computed():
    # Six predictions in three bins of two by rank; each tied pair's middle rank is in its bin.
    result = calibration([0, 0, 0, 1, 1, 1], [0.1, 0.1, 0.2, 0.2, 0.9, 0.9], num_bins=3)
    np.testing.assert_allclose(result.mean_predicted, [0.1, 0.2, 0.9])
    np.testing.assert_array_equal(result.observed_rate, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(result.count, [2, 2, 2])
    # More bins than examples: one per distinct prediction (its tied group), nothing allocated
    # for the empty ones.
    for many in (6, 7, 10**11, 2**62):
        result = calibration([0, 0, 0, 1, 1, 1], [0.1, 0.1, 0.2, 0.2, 0.9, 0.9], num_bins=many)
        np.testing.assert_allclose(result.mean_predicted, [0.1, 0.2, 0.9])
        np.testing.assert_array_equal(result.count, [2, 2, 2])


def test_calibration_of_a_calibrated_rare_action():
    rng = np.random.default_rng(2)
    n, num_bins = 200_000, 10
    probabilities = rng.beta(0.5, 20, n)  # mostly near 0, as for a rare action
    labels = rng.random(n) < probabilities
    result = calibration(labels, probabilities, num_bins)
    assert result.count.sum() == n
    # Quantile bins: every bin holds a tenth of the examples, though most predictions are small.
    assert np.all(np.abs(result.count - n // num_bins) <= 1)
    assert np.all(np.diff(result.mean_predicted) > 0)
    stderr = np.sqrt(result.mean_predicted * (1 - result.mean_predicted) / result.count)
    assert np.all(np.abs(result.observed_rate - result.mean_predicted) < 5 * stderr)
    # A predictor that doubles every probability is visibly over-confident in the top bins.
    doubled = calibration(labels, np.minimum(2 * probabilities, 1), num_bins)
    assert np.all(doubled.mean_predicted[-3:] > 1.5 * doubled.observed_rate[-3:])


def test_calibration_keeps_tied_predictions_together():
    rng = np.random.default_rng(3)
    probabilities = rng.integers(0, 4, 300) / 4  # four distinct values
    labels = rng.random(300) < probabilities
    result = calibration(labels, probabilities, num_bins=10)
    assert len(result.count) <= 4
    assert result.count.sum() == 300
    perm = rng.permutation(300)
    shuffled = calibration(labels[perm], probabilities[perm], num_bins=10)
    for got, expected in zip(shuffled, result, strict=True):
        np.testing.assert_allclose(got, expected)
    single = calibration(labels, np.full(300, 0.3), num_bins=10)
    np.testing.assert_allclose(single.observed_rate, [labels.mean()])
    # A tied group that fills most ranks keeps a bin of its own, on either side of the rest.
    low = calibration([0, 1, 1, 0, 1], [0.1, 0.1, 0.1, 0.1, 0.9], num_bins=2)
    np.testing.assert_array_equal(low.count, [4, 1])
    high = calibration([0, 1, 1, 0, 1], [0.1, 0.9, 0.9, 0.9, 0.9], num_bins=2)
    np.testing.assert_array_equal(high.count, [1, 4])
    mostly_zero = np.where(np.arange(300) < 240, 0.0, np.linspace(0.1, 0.9, 300))
    zeros = calibration(labels, mostly_zero, num_bins=10)  # the rest: the last two bins
    np.testing.assert_array_equal(zeros.count, [240, 30, 30])


# Retrieval

RANKED = np.array([[5, 3, 9, 1], [2, 7, 4, 8], [6, 0, 1, 3]])
# Target ranks (0-based): 0, 2, absent.
TARGETS = np.array([5, 4, 11])


def test_recall_and_ndcg_hand_computed():
    assert recall_at_k(RANKED, TARGETS, 1) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, TARGETS, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, TARGETS, 3) == pytest.approx(2 / 3)
    assert ndcg_at_k(RANKED, TARGETS, 2) == pytest.approx(1 / 3)
    # (1 / log2(2) + 1 / log2(4) + 0) / 3 = (1 + 0.5) / 3
    assert ndcg_at_k(RANKED, TARGETS, 3) == pytest.approx(0.5)
    assert ndcg_at_k(RANKED, TARGETS, 4) == pytest.approx(0.5)


def test_recall_and_ndcg_grow_with_k_and_ndcg_never_exceeds_recall():
    rng = np.random.default_rng(4)
    ranked = np.stack([rng.permutation(50) for _ in range(40)])
    targets = rng.integers(0, 60, 40)  # some targets are missing from every ranking
    recall = [recall_at_k(ranked, targets, k) for k in range(1, 51)]
    ndcg = [ndcg_at_k(ranked, targets, k) for k in range(1, 51)]
    assert np.all(np.diff(recall) >= 0) and np.all(np.diff(ndcg) >= 0)
    assert np.all(np.array(ndcg) <= np.array(recall))
    assert recall[-1] == pytest.approx(np.mean(targets < 50))
    assert recall[0] == ndcg[0]


# Bad input

RANKING_CASES = [
    (auroc, ([1, 0], [0.5]), "labels has shape .* scores has shape"),
    (auroc, ([], []), "labels is empty"),
    (auroc, ([1, 2], [0.5, 0.5]), "labels must be 0 or 1"),
    (auroc, ([1, np.nan], [0.5, 0.5]), "labels must be 0 or 1"),
    (auroc, (["a", "b"], [0.5, 0.5]), "labels must be bool or real"),
    (auroc, ([1, 0], [0.5, np.nan]), "scores must be finite"),
    (average_precision, ([1, 0], [np.inf, 0.0]), "scores must be finite"),
    (auroc, ([0, 1], np.array([2**60, 2**60 + 1])), r"scores holds distinct integers beyond ±2"),
    (cross_entropy, ([1, 0], [0.5, 1.5]), r"probabilities must lie in \[0, 1\]"),
    (cross_entropy, ([1, 0], [-0.1, 0.5]), r"probabilities must lie in \[0, 1\]"),
    (rce, ([1, 0], [0.5, np.nan]), "probabilities must be finite"),
    (rce, ([1, 0, 1], [0.5, 0.5]), "probabilities has shape"),
    (calibration, ([1, 0], [0.5, 0.5], 0), "num_bins must be a positive integer"),
    (calibration, ([1, 0], [0.5, 0.5], 2.5), "num_bins must be a positive integer"),
    (recall_at_k, (RANKED, TARGETS, 0), r"k must lie in \[1, R\]"),
    (recall_at_k, (RANKED, TARGETS, 5), r"k must lie in \[1, R\] = \[1, 4\], got 5"),
    (ndcg_at_k, (RANKED, TARGETS, 2.0), "k must be an integer"),
    (ndcg_at_k, (RANKED[0], TARGETS[:1], 1), r"ranked must be a non-empty \[Q, R\]"),
    (ndcg_at_k, (RANKED, TARGETS[:2], 1), r"targets must have shape \(3,\)"),
    (recall_at_k, (RANKED.astype(float), TARGETS, 1), "ranked must hold integer item ids"),
    (recall_at_k, (RANKED, TARGETS.astype(float), 1), "targets must hold integer item ids"),
    # numpy would drop the mask, or raise its own words about an inhomogeneous shape.
    (auroc, ([1, 0], np.ma.masked_array([0.9, 0.1], mask=[0, 1])), "scores is a masked array"),
    (auroc, ([[1, 0], [1]], [0.5, 0.5]), "labels is not an array of numbers"),
    (recall_at_k, ([[1, 2], [3]], TARGETS[:2], 1), "ranked is not an array of numbers"),
    (auroc, (None, [0.5]), r"labels is not an array of numbers \(got NoneType\)"),
    (recall_at_k, (RANKED, [None, 1, 2], 1), r"targets is not an array of numbers \(got list\)"),
    pytest.param(
        auroc, ([1, 0], np.longdouble(1) + [np.longdouble(2) ** -60, 0]),  # distinct in float128
        "scores is float128, wider",
        marks=pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="no wider float"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("metric", "args", "message"), RANKING_CASES)
def test_bad_input_raises_value_error_naming_the_argument(metric, args, message):
    with pytest.raises(ValueError, match=message):
        metric(*args)
