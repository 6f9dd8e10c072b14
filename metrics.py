"""Evaluation metrics for the ranking and the retrieval model.

Ranking metrics score one engagement action at a time: `labels` say whether the action happened
(0/1) and `scores` or `probabilities` are the model's prediction for it, one element per
example. Both arrays may have any shape, as long as it is the same; every element is one
example. Retrieval metrics take, per query, the item ids the model ranked best first and the one
held-out item the user engaged with.

Every metric is a pure function of numpy arrays, computed in float64, and returns a Python
float (or, for `calibration`, float64 arrays). Input is checked before anything is computed; a
problem raises `ValueError` naming the argument.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Probabilities are clipped to [EPS, 1 - EPS] inside the logarithm, so that a confident mistake
# costs -log(EPS) ~ 16.1 nats instead of infinity.
EPS = 1e-7


class Calibration(NamedTuple):
    """Predicted against observed rate, one entry per non-empty bin, bins in increasing order.

    mean_predicted: [M] mean predicted probability in the bin; observed_rate: [M] mean label in
    the bin; count: [M] int64 number of examples in the bin. M <= num_bins.
    """

    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    count: np.ndarray


def _array(value, name: str) -> np.ndarray:
    """`value` as a numpy array, or ValueError naming the argument: a masked array (whose mask
    numpy would drop) and nested lists of unequal lengths are not arrays of examples."""
    if isinstance(value, np.ma.MaskedArray):
        raise ValueError(f"{name} is a masked array; pass the kept elements (x.compressed())")
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nesting
        raise ValueError(f"{name} is not an array of numbers ({error})") from None
    if array.dtype.hasobject:  # None, or lists holding something other than numbers
        raise ValueError(f"{name} is not an array of numbers (got {type(value).__name__})")
    return array


def _real_dtype(dtype: np.dtype) -> bool:
    """bool, integers and floats, bfloat16 (the models' default type) and the other narrow
    floats that numpy knows only as opaque types among them: each converts to float64 exactly."""
    narrow = ("bfloat16", "float8", "float6", "float4")
    return dtype.kind in "biuf" or (dtype.kind == "V" and dtype.name.startswith(narrow))


def _examples(labels, values, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Checks labels and per-example values; returns both flattened to float64 [N]."""
    labels, values = _array(labels, "labels"), _array(values, name)
    if labels.shape != values.shape:
        raise ValueError(
            f"labels has shape {labels.shape} and {name} has shape {values.shape}; they must match"
        )
    if labels.size == 0:
        raise ValueError("labels is empty; need at least one example")
    for arg, array in (("labels", labels), (name, values)):
        if not _real_dtype(array.dtype):
            raise ValueError(f"{arg} must be bool or real numbers, got dtype {array.dtype}")
    if values.dtype.kind == "f" and values.dtype.itemsize > 8:
        raise ValueError(
            f"{name} is {values.dtype}, wider than the float64 these metrics compute in (which "
            "could tie distinct values); pass float64, or their ranks"
        )
    if values.dtype.kind in "iu" and values.size:
        low, high = values.min(), values.max()
        # Beyond ±2**53, float64 may merge neighbouring integers (and so tie them).
        if (high > 2**53 or low < -(2**53)) and len(np.unique(values)) > len(
            np.unique(values.astype(np.float64))
        ):
            raise ValueError(
                f"{name} holds distinct integers beyond ±2**53 that float64 cannot tell apart "
                f"(range [{low}, {high}]); pass their ranks instead"
            )
    y, v = labels.astype(np.float64).ravel(), values.astype(np.float64).ravel()
    bad = y[(y != 0) & (y != 1)]
    if bad.size:
        raise ValueError(f"labels must be 0 or 1, got {bad.size} other values, e.g. {bad[0]}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {np.sum(~np.isfinite(v))} non-finite values")
    return y, v


def _probabilities(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    y, p = _examples(labels, probabilities, "probabilities")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probabilities must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    return y, p


def auroc(labels, scores) -> float:
    """Area under the ROC curve of `scores` (any real, higher = more likely positive).

    The probability that a random positive scores above a random negative, a tie counting one
    half; computed from average ranks (Mann-Whitney U) in O(N log N). Only the order of the
    scores matters. nan when `labels` has no positive or no negative, since there is no pair.
    """
    y, s = _examples(labels, scores, "scores")
    positives = y.sum()
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, group, group_size = np.unique(s, return_inverse=True, return_counts=True)
    # A run of tied scores occupying 1-based ranks a..b gives each member the mean (a + b) / 2.
    average_rank = (np.cumsum(group_size) - (group_size - 1) / 2)[group]
    u = average_rank[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve of `scores`, without interpolation.

    sum over distinct score thresholds t, from high to low, of (R_t - R_prev) * P_t, where P_t
    and R_t are precision and recall when every example scoring >= t is predicted positive.
    Without ties this is the mean, over positives, of the precision at that positive's rank;
    tied examples enter together. nan when `labels` has no positive.
    """
    y, s = _examples(labels, scores, "scores")
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last_of_tie = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    true_positives = np.cumsum(y)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def cross_entropy(labels, probabilities) -> float:
    """Mean binary cross-entropy in nats: -mean(y log p + (1 - y) log(1 - p)).

    `probabilities` in [0, 1], same shape as `labels`; clipped to [EPS, 1 - EPS] first.
    """
    return _cross_entropy(*_probabilities(labels, probabilities))


def _cross_entropy(y: np.ndarray, p: np.ndarray) -> float:
    """`cross_entropy` of checked arrays."""
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def rce(labels, probabilities) -> float:
    """Relative cross-entropy in percent: 100 * (CE_base - CE) / CE_base.

    CE_base is the cross-entropy of the constant predictor that always predicts the base rate,
    the mean of these same `labels`. 0 = no better than the base rate, 100 = perfect, negative =
    worse than the base rate. nan when every label is equal, since CE_base is then 0.
    """
    y, p = _probabilities(labels, probabilities)
    base_rate = y.mean()
    if base_rate in (0.0, 1.0):
        return float("nan")
    base = _cross_entropy(y, np.full_like(y, base_rate))
    return float(100 * (base - _cross_entropy(y, p)) / base)


def calibration(labels, probabilities, num_bins: int = 10) -> Calibration:
    """Mean predicted probability against observed rate, in quantile bins of the prediction.

    Sorted by prediction, the N examples fill `num_bins` bins of about N / num_bins each: the
    example of rank r (from 0) goes to bin floor(r · num_bins / N). Equal-width bins would put
    almost every prediction of a rare action (most predictions near 0) into the first bin and
    leave the others with a handful of examples each. Equal predictions always share a bin, the
    one of their middle rank, so that when many are tied fewer than `num_bins` bins are
    returned. Empty bins are dropped.
    """
    y, p = _probabilities(labels, probabilities)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    # More bins than examples leave the extra ones empty: the same non-empty bins come from
    # one bin per rank.
    num_bins = min(int(num_bins), len(p))
    ordered = np.sort(p)
    first, last = np.searchsorted(ordered, p, "left"), np.searchsorted(ordered, p, "right") - 1
    index = ((first + last) * num_bins // (2 * len(p))).astype(np.int64)  # middle rank's bin
    count = np.bincount(index, minlength=num_bins)
    kept = count > 0
    predicted_sum = np.bincount(index, weights=p, minlength=num_bins)
    label_sum = np.bincount(index, weights=y, minlength=num_bins)
    return Calibration(
        mean_predicted=predicted_sum[kept] / count[kept],
        observed_rate=label_sum[kept] / count[kept],
        count=count[kept].astype(np.int64),
    )


def _target_ranks(ranked, targets, k) -> np.ndarray:
    """0-based rank [Q] of each target among the first k of its row of `ranked`; k if absent."""
    ranked, targets = _array(ranked, "ranked"), _array(targets, "targets")
    if ranked.ndim != 2 or ranked.shape[0] == 0 or ranked.shape[1] == 0:
        raise ValueError(f"ranked must be a non-empty [Q, R] array of item ids, got {ranked.shape}")
    if targets.shape != ranked.shape[:1]:
        raise ValueError(f"targets must have shape {ranked.shape[:1]} (Q,), got {targets.shape}")
    for arg, array in (("ranked", ranked), ("targets", targets)):
        if array.dtype.kind not in "iu":
            raise ValueError(f"{arg} must hold integer item ids, got dtype {array.dtype}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= ranked.shape[1]:
        raise ValueError(f"k must lie in [1, R] = [1, {ranked.shape[1]}], got {k}")
    hit = ranked[:, :k] == targets[:, None]
    # argmax finds the first match; a row without one gets rank k, past every counted position.
    return np.where(hit.any(axis=1), hit.argmax(axis=1), k)


def recall_at_k(ranked, targets, k: int) -> float:
    """Fraction of queries whose target is among the first `k` items of its ranking.

    ranked: [Q, R] integer item ids, best first, R >= k; targets: [Q] the one held-out item id
    of each query.
    """
    rank = _target_ranks(ranked, targets, k)
    return float(np.mean(rank < k))


def ndcg_at_k(ranked, targets, k: int) -> float:
    """Mean over queries of the NDCG@k with one relevant item: 1 / log2(rank + 2) if the target's
    0-based rank is below `k`, else 0 (the ideal DCG is 1).

    ranked: [Q, R] integer item ids, best first, R >= k; targets: [Q] the one held-out item id
    of each query.
    """
    rank = _target_ranks(ranked, targets, k)
    return float(np.mean(np.where(rank < k, 1 / np.log2(rank + 2.0), 0.0)))
