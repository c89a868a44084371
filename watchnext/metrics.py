"""Metrics shared by the trainer, `evaluate`, `compare` and the benches (numpy only)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, ties counted half (Mann-Whitney). NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average ranks over ties, 1-based
    first = np.concatenate([[True], s[1:] != s[:-1]])
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.concatenate([starts[1:], [len(s)]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = avg_rank[group]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def rmse(y: np.ndarray, yhat: np.ndarray) -> float:
    y, yhat = np.asarray(y, np.float64), np.asarray(yhat, np.float64)
    return float(np.sqrt(np.mean((y - yhat) ** 2))) if len(y) else float("nan")


def ndcg_by_group(groups: np.ndarray, scores: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over groups (requests): how well `scores` orders the realised `gains`.

    Groups with no positive gain are left out. Vectorised with one sort per key.
    """
    groups = np.asarray(groups)
    if len(groups) == 0:
        return float("nan")
    _, g = np.unique(groups, return_inverse=True)
    gains = np.maximum(np.asarray(gains, np.float64), 0.0)

    def dcg(key: np.ndarray) -> np.ndarray:
        order = np.lexsort((-key, g))
        gs, gg = g[order], gains[order]
        start = np.concatenate([[0], np.flatnonzero(gs[1:] != gs[:-1]) + 1])
        rank = np.arange(len(gs)) - np.repeat(start, np.diff(np.concatenate([start, [len(gs)]])))
        contrib = np.where(rank < k, (2.0**gg - 1) / np.log2(rank + 2), 0.0)
        return np.bincount(gs, weights=contrib, minlength=g.max() + 1)

    ideal = dcg(gains)
    actual = dcg(np.asarray(scores, np.float64))
    keep = ideal > 0
    return float(np.mean(actual[keep] / ideal[keep])) if keep.any() else float("nan")
