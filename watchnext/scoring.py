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
    """heads (B, T) in label units (float32, as ONNX Runtime gives them), w (T,) -> scores (B,), float64.

    linear:         sum_t w_t * y_t
    multiplicative: prod_t y_t ** w_t   (the paper's form; tasks with w_t = 0 drop out; each y_t floored at
                                         FLOOR so that a zero cannot erase the others)

    A row with a non-finite head gets a non-finite score, or NaN. The one implementation is the compiled pass
    `top_k` also uses (`kernels.top_rows`), so offline evaluation scores as the service ranks.
    """
    return _scored(heads, w, mode, 0)[0]


def top_k(heads: np.ndarray, w: np.ndarray, mode: str, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, scores, dropped): the rows of the k best scores of `combine`, best first, ties in row order, and
    their scores; rows whose heads or score are not finite are never among them, and `dropped` counts them.
    One compiled pass (`kernels.top_rows`), where combine, the finiteness checks and a sort were each a numpy
    call whose code a request must first bring into the CPU's caches."""
    scores, top, dropped = _scored(heads, w, mode, k)
    rows = top[: len(heads) - dropped] if dropped else top
    return rows, scores[rows], dropped


def _scored(heads: np.ndarray, w: np.ndarray, mode: str, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(every row's score, the top min(k, B) rows (-1 past the finite ones), how many rows are not finite)."""
    if mode not in ("linear", "multiplicative"):
        raise ValueError(f"score.combine: expected linear or multiplicative, got {mode!r}")
    heads = np.ascontiguousarray(heads, np.float32)
    w = np.ascontiguousarray(w, np.float64)
    if heads.ndim != 2 or w.shape != (heads.shape[1],):
        raise ValueError(f"score: heads {heads.shape} and weights {w.shape} do not match")
    scores = np.empty(len(heads), np.float64)
    top = np.empty(min(k, len(heads)), np.int64)
    dropped = kernels().top_rows(heads, w, mode == "multiplicative", scores, top)
    return scores, top, int(dropped)
