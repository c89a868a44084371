"""The manually tuned weighted combination of the heads (docs/configuration.md, [score])."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .encoding import kernels

FLOOR = 1e-6  # multiplicative form: heads are floored so a zero cannot erase the others


def weight_vector(task_names: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    """Weights in task order; tasks without a weight get 0. Shape (T,)."""
    return np.array([float(weights.get(t, 0.0)) for t in task_names], dtype=np.float64)


def combine(heads: np.ndarray, w: np.ndarray, mode: str = "linear") -> np.ndarray:
    """heads (B, T) in label units, w (T,) -> scores (B,).

    linear:         sum_t w_t * y_t
    multiplicative: prod_t y_t ** w_t   (the paper's form; tasks with w_t = 0 drop out)
    """
    heads = np.asarray(heads, dtype=np.float64)
    if mode == "linear":
        return heads @ w
    if mode == "multiplicative":
        return np.exp(np.log(np.maximum(heads, FLOOR)) @ w)
    raise ValueError(f"score.combine: expected linear or multiplicative, got {mode!r}")


def top_k(heads: np.ndarray, w: np.ndarray, mode: str, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, scores, dropped): the rows of the k best scores of `combine`, best first, ties in row order, and
    their scores; rows whose heads or score are not finite are never among them, and `dropped` counts them.
    One compiled pass (`kernels.top_rows`), where combine, the finiteness checks and a sort were each a numpy
    call whose code a request must first bring into the CPU's caches."""
    if mode not in ("linear", "multiplicative"):
        raise ValueError(f"score.combine: expected linear or multiplicative, got {mode!r}")
    heads = np.ascontiguousarray(heads, np.float32)
    scores = np.empty(len(heads), np.float64)
    top = np.empty(min(k, len(heads)), np.int64)
    dropped = kernels().top_rows(heads, np.ascontiguousarray(w, np.float64), mode == "multiplicative", scores, top)
    rows = top[: len(heads) - dropped] if dropped else top
    return rows, scores[rows], int(dropped)
