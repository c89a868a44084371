"""Progressive validation: every batch is scored before the model trains on it.

Scores and labels of the newest `window` examples are kept in ring buffers, so
the report describes the model as it is now, not averaged over its youth.
"""

from __future__ import annotations

import numpy as np

from watchnext.config import Config
from watchnext.metrics import auc, rmse


class ProgressiveMetrics:
    def __init__(self, config: Config, window: int, experts: int):
        T = len(config.tasks)
        self.config = config
        self.window = window
        self.heads = np.zeros((window, T), np.float32)  # serving heads (no bias tower)
        self.full = np.zeros((window, T), np.float32)  # with the bias tower, as trained
        self.labels = np.zeros((window, T), np.float32)
        self.mask = np.zeros((window, T), np.bool_)
        self.gates = np.zeros((window, T, experts), np.float32)
        self.filled = 0
        self.ptr = 0
        self.seen = 0

    def add(self, heads: np.ndarray, full: np.ndarray, labels: np.ndarray, mask: np.ndarray, gates: np.ndarray) -> None:
        """All (B, T) except gates (B, T, E)."""
        B = len(heads)
        if B >= self.window:
            sl = slice(B - self.window, B)
            heads, full, labels, mask, gates = heads[sl], full[sl], labels[sl], mask[sl], gates[sl]
            B = self.window
        idx = (self.ptr + np.arange(B)) % self.window
        self.heads[idx], self.full[idx], self.labels[idx] = heads, full, labels
        self.mask[idx], self.gates[idx] = mask > 0, gates
        self.ptr = (self.ptr + B) % self.window
        self.filled = min(self.window, self.filled + B)
        self.seen += B

    def report(self) -> dict:
        n = self.filled
        out: dict = {"window": n, "tasks": {}}
        if n == 0:
            return out
        heads, full, labels, mask = self.heads[:n], self.full[:n], self.labels[:n], self.mask[:n]
        for j, t in enumerate(self.config.tasks):
            m = mask[:, j]
            entry: dict = {"n": int(m.sum())}
            if t.kind == "binary":
                entry["auc"] = _round(auc(labels[m, j], heads[m, j]))
                entry["auc_with_bias"] = _round(auc(labels[m, j], full[m, j]))
                entry["rate"] = _round(float(labels[m, j].mean()) if m.any() else float("nan"))
            else:
                entry["rmse"] = _round(rmse(labels[m, j], heads[m, j]))
            entry["gate"] = [round(float(g), 4) for g in self.gates[:n, j].mean(0)]
            out["tasks"][t.name] = entry
        return out


def _round(x: float) -> float | None:
    return None if x != x else round(x, 5)
