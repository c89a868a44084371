"""The manually tuned weighted combination of the heads (docs/configuration.md, [score])."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

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
