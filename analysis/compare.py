"""`watchnext compare A B`: two versions on the same examples, with paired-bootstrap intervals.

Both versions score the same impressions, so their metrics are paired: the
interval on a difference comes from resampling *requests* (the impressions of
one request share a user and a moment, so they are not independent) and
recomputing both versions' metrics on each resample. The bootstrap is
vectorised: each replicate gives every request a Poisson(1) weight (the
"Poisson bootstrap", the large-sample equivalent of a multinomial resample),
and a weighted AUC over all replicates at once needs one sort per version and
task, done before any replicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.evaluate import Scored, ranking_quality, score_files, task_metrics
from watchnext.config import Config, ConfigError
from watchnext.metrics import auc, ndcg_per_group, rmse
from watchnext.repository import ModelRepository
from watchnext.scoring import combine, weight_vector

CELLS_PER_CHUNK = 4_000_000  # replicates x rows held at once (32 MB of float64)
NDCG_K = 10


def weighted_auc(labels: np.ndarray, scores: np.ndarray | None, w: np.ndarray, order: np.ndarray | None = None,
                 starts: np.ndarray | None = None) -> np.ndarray:
    """AUC under row weights, ties counted half: labels, scores (n,), w (R, n) -> (R,).

    For each positive, the weight of negatives scored below it plus half of those
    tied with it, summed and normalised by (positive weight) x (negative weight).
    `order` / `starts` (the score sort and its tie-run starts) may be passed in to sort once.
    """
    if order is None or starts is None:
        if scores is None:
            raise ValueError("weighted_auc: pass scores, or their order and tie-run starts")
        order, starts = sort_once(scores)
    lab = np.asarray(labels, bool)[order]
    ws = w[:, order]
    pos = np.add.reduceat(ws * lab, starts, axis=1)  # (R, runs of tied scores)
    neg = np.add.reduceat(ws * ~lab, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def sort_once(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]])) if len(s) else np.zeros(0, np.int64)
    return order, starts


def _interval(point_a: float, point_b: float, reps: np.ndarray, confidence: float) -> dict[str, Any]:
    """reps (R, 2): each replicate's (a, b)."""
    d = reps[:, 1] - reps[:, 0]
    d = d[np.isfinite(d)]
    lo, hi = (np.percentile(d, [50 * (1 - confidence), 50 * (1 + confidence)]) if len(d) else (np.nan, np.nan))
    return {"a": _r(point_a), "b": _r(point_b), "diff": _r(point_b - point_a), "ci": [_r(lo), _r(hi)],
            "se": _r(float(np.std(d, ddof=1))) if len(d) > 1 else None, "replicates": int(len(d))}


def bootstrap_differences(config: Config, sa: Scored, sb: Scored, replicates: int = 1000, seed: int = 0,
                          confidence: float = 0.95) -> dict[str, Any]:
    """Per-task metric of each version and the B - A difference with a paired request bootstrap."""
    if sa.heads.shape != sb.heads.shape or not np.array_equal(sa.group, sb.group):
        raise ValueError("the two versions did not score the same examples")
    _, g = np.unique(sa.group, return_inverse=True)
    G = int(g.max()) + 1 if len(g) else 0
    rng = np.random.default_rng(seed)
    W = rng.poisson(1.0, size=(replicates, G)).astype(np.float64)  # (R, G) request weights
    out: dict[str, Any] = {}
    for j, t in enumerate(config.tasks):
        m = sa.mask[:, j]
        y, gj = sa.labels[m, j], g[m]
        ha, hb = sa.heads[m, j], sb.heads[m, j]
        reps = np.full((replicates, 2), np.nan)
        if t.kind == "binary":
            pa_, pb_ = auc(y, ha), auc(y, hb)
            if np.isfinite(pa_) and np.isfinite(pb_):
                sorts = [sort_once(ha), sort_once(hb)]
                step = max(1, CELLS_PER_CHUNK // max(1, len(y)))
                for lo in range(0, replicates, step):
                    rw = W[lo : lo + step][:, gj]  # (r, n) row weights
                    for v, (order, starts) in enumerate(sorts):
                        reps[lo : lo + step, v] = weighted_auc(y, None, rw, order, starts)
            out[t.name] = {"metric": "auc", "n": int(m.sum()), **_interval(pa_, pb_, reps, confidence)}
        else:
            pa_, pb_ = rmse(y, ha), rmse(y, hb)
            cnt = W @ np.bincount(gj, minlength=G)
            for v, h in enumerate((ha, hb)):
                with np.errstate(invalid="ignore", divide="ignore"):
                    reps[:, v] = np.sqrt(W @ np.bincount(gj, weights=(y - h) ** 2, minlength=G) / cnt)
            out[t.name] = {"metric": "rmse", "n": int(m.sum()), **_interval(pa_, pb_, reps, confidence)}
    # the combined score's ranking quality, on the same realised gains as evaluate's
    names = [t.name for t in config.tasks]
    w = weight_vector(names, config.score.weights)
    binary = np.isin(names, [t.name for t in config.binary_tasks])
    gains = np.where(sa.mask, sa.labels, 0.0) @ np.where(binary, w, 0.0)
    per = [ndcg_per_group(g, combine(s.heads, w, config.score.combine), gains) for s in (sa, sb)]
    has = np.isfinite(per[0])
    reps = np.stack([(W[:, has] @ p[has]) / W[:, has].sum(1) for p in per], axis=1) if has.any() else np.full((replicates, 2), np.nan)
    point = [float(np.mean(p[has])) if has.any() else float("nan") for p in per]
    out["ranking"] = {"metric": f"ndcg@{NDCG_K}", "n": int(has.sum()), **_interval(point[0], point[1], reps, confidence)}
    return out


def compare(config: Config, repo: ModelRepository, a: int, b: int, paths: Sequence[str], replicates: int = 1000,
            seed: int = 0, confidence: float = 0.95, device: str = "auto") -> dict[str, Any]:
    """Score `paths` with versions a and b; each one's metrics and B - A with bootstrap intervals (JSON-ready)."""
    if replicates < 10:
        raise ValueError(f"--bootstrap: expected at least 10 replicates, got {replicates}")
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence: expected a number in (0, 1), got {confidence}")
    scored = []
    for v in (a, b):
        meta = repo.metadata(v)
        if meta.get("config_hash") != config.hash:
            raise ConfigError(config.path, f"version {v} was trained with config hash {meta.get('config_hash')}, "
                                           f"this config is {config.hash}: pass the --config it was trained with")
        scored.append(score_files(config, repo.path(v) / "model.onnx", paths, device))
    sa, sb = scored
    return {
        "model": repo.name,
        "a": {"version": a, "tasks": task_metrics(config, sa), "ranking": ranking_quality(config, sa)},
        "b": {"version": b, "tasks": task_metrics(config, sb), "ranking": ranking_quality(config, sb)},
        "examples": int(len(sa.heads)),
        "requests": int(len(np.unique(sa.group))),
        "bad_lines": sa.bad_lines,
        "bootstrap": {"replicates": replicates, "seed": seed, "unit": "request", "confidence": confidence,
                      "weights": "poisson(1) per request"},
        "differences": bootstrap_differences(config, sa, sb, replicates, seed, confidence),
        "direction": "b - a",
    }


def _r(x: float) -> float | None:
    return None if x is None or x != x else round(float(x), 6)
