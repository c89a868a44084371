"""The one check of label values on their way to training (torch-free).

Used by POST /v1/feedback (`service/feedback.py`) and by the trainer's example
reader (`encoding.Encoder.encode_labels`): a value is trained on only if it is
finite and inside its task's `range` (config, inclusive; a binary label is 0 or
1). Ranges lie inside float32 (checked when the config is read), so a value
that passes also survives the cast to float32.
"""

from __future__ import annotations

import numpy as np

from .config import Task


def label_problems(task: Task, values: np.ndarray, present: np.ndarray | None = None) -> list[tuple[np.ndarray, str]]:
    """(rows, reason) for each way the `present` entries of `values` (float64, one task) can be refused.

    Each row is named by at most one reason. Absent entries (`present` False) are never refused.
    """
    v = np.asarray(values, dtype=np.float64)
    present = np.ones(v.shape, bool) if present is None else np.asarray(present, bool)
    finite = np.isfinite(v)
    out = [(present & ~finite, "must be a finite number")]
    ok = present & finite
    lo, hi = task.range
    if task.kind == "binary":
        out.append((ok & (v != 0) & (v != 1), "a binary label must be 0 or 1"))
    else:
        with np.errstate(invalid="ignore"):
            out.append((ok & ((v < lo) | (v > hi)), f"must be in the task's range [{lo:g}, {hi:g}]"))
    return [(rows, reason) for rows, reason in out if rows.any()]

