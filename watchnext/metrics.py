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


def ndcg_per_group(g: np.ndarray, scores: np.ndarray, gains: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k of each group (g: (n,) group index 0..G-1) -> (G,), NaN where the group has no gain.

    Vectorised: one sort per key, no loop over groups.
    """
    g = np.asarray(g)
    G = int(g.max()) + 1 if len(g) else 0
    gains = np.maximum(np.asarray(gains, np.float64), 0.0)

    def dcg(key: np.ndarray) -> np.ndarray:
        order = np.lexsort((-key, g))
        gs, gg = g[order], gains[order]
        start = np.concatenate([[0], np.flatnonzero(gs[1:] != gs[:-1]) + 1])
        rank = np.arange(len(gs)) - np.repeat(start, np.diff(np.concatenate([start, [len(gs)]])))
        return np.bincount(gs, weights=np.where(rank < k, (2.0**gg - 1) / np.log2(rank + 2), 0.0), minlength=G)

    ideal = dcg(gains)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg(np.asarray(scores, np.float64)) / ideal, np.nan)


def ndcg_by_group(groups: np.ndarray, scores: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over groups (requests) of how `scores` orders the realised `gains`.

    Groups with no positive gain are left out.
    """
    if len(groups) == 0:
        return float("nan")
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    per = ndcg_per_group(g, scores, gains, k)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
