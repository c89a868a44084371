"""Examination propensities from randomised logging, and the IPW weights they give (numpy only).

Intervention harvesting (Agarwal et al., WSDM 2019) on RandPair swaps (Joachims et al., WSDM 2017;
`watchnext/explore.py`). On an explored list every adjacent pair of positions is swapped on a random half of
the lists, so the item of original rank r is shown at r, or at its neighbour, independently of how good it is.
Under the examination hypothesis P(click) = p(position) * attraction(item), hence for the pair (k, k+1)

    CTR(rank k at k+1) + CTR(rank k+1 at k+1)     p_{k+1} * (a_k + a_{k+1})     p_{k+1}
    -----------------------------------------  =  -------------------------  =  -------
    CTR(rank k at k)   + CTR(rank k+1 at k)       p_k     * (a_k + a_{k+1})     p_k

where CTR(r at p) is the click rate of the explored impressions of original rank r shown at position p (the
two ranks are summed so that the attraction cancels exactly). Chaining the ratios gives p_k / p_0.

Statistics are kept as counts per cell (rank r, shown position r - 1, r or r + 1), so they add up over batches,
files and stream entries (`SwapCounts`), and are saved in the trainer's checkpoint. A ratio is used only when
its four cells each hold at least `min_count` impressions; past the first pair that lacks them the curve stays
at its last estimate (flat). The curve is clipped to [floor, 1]: no position is taken as examined more than the
top one, and no weight exceeds 1 / floor.

IPW, the unbiased pointwise estimator (`unbiased_target`; Saito et al., WSDM 2020; Bekker et al., 2019): the
click task's binary cross-entropy of an example shown at position k is taken against c / p(k) instead of the
click c, with p(k) clipped to at least 1 / clip:

    loss = -[(c / p) log s + (1 - c / p) log(1 - s)],     s = sigmoid(f)

Its expectation over examination, E[c | item, k] = p(k) * attraction, is the cross-entropy against the
attraction itself, wherever the item was shown. Weighting the whole loss of the row by 1 / p(k) (`ipw_weights`,
`[trainer] ipw_method = "weight"`) does not debias: an item's optimum stays its click rate averaged over the
positions it was shown at (docs/exploration.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OFFSETS = 3  # shown position - original rank + 1: 0 (moved up), 1 (stayed), 2 (moved down)


@dataclass
class Examination:
    """p(k) / p(0) for k < len(curve) (positions past the end use the last value), and which were estimated."""

    curve: np.ndarray  # (K,) float64, curve[0] = 1
    known: np.ndarray  # (K,) bool: the chain of ratios up to k was estimated from enough data
    ratios: np.ndarray  # (K - 1,) float64 p_{k+1} / p_k, NaN where too few impressions
    by_group: np.ndarray | None = None  # (G, K) per group (device, ...); the pooled curve where a group is thin

    def at(self, position: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
        """p(position) per row; unknown positions (-1) read 1.0."""
        position = np.asarray(position, np.int64)
        k = np.clip(position, 0, len(self.curve) - 1)
        p = self.curve[k] if group is None or self.by_group is None else self.by_group[np.asarray(group), k]
        return np.where(position < 0, 1.0, p)


def curve_examination(curve, floor: float = 0.1) -> Examination:
    """A known curve (`[trainer] ipw_curve`, p_0 = 1), clipped to [floor, 1], as an `Examination`."""
    c = np.asarray(curve, np.float64)
    if c.ndim != 1 or not len(c) or not np.isfinite(c).all() or (c <= 0).any() or (c > 1).any():
        raise ValueError(f"examination curve: expected finite numbers in (0, 1], got {curve!r}")
    return Examination(np.clip(c / c[0], floor, 1.0), np.ones(len(c), bool), c[1:] / c[:-1])


def unbiased_target(click: np.ndarray, p: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """c / p with p >= 1 / clip: the click target whose cross-entropy is unbiased for the attraction's.

    NaN clicks (unknown labels) stay NaN."""
    return np.asarray(click, np.float64) / np.maximum(np.asarray(p, np.float64), 1.0 / clip)


class SwapCounts:
    """Explored impressions and their clicks by (group, original rank, shown position - rank + 1)."""

    def __init__(self, positions: int, groups: int = 1):
        self.positions, self.groups = positions, groups
        self.shown = np.zeros((groups, positions, OFFSETS))
        self.clicks = np.zeros((groups, positions, OFFSETS))

    def add(self, rank: np.ndarray, position: np.ndarray, click: np.ndarray, group: np.ndarray | None = None) -> int:
        """Count rows that were explored (rank >= 0), with a known position within one of their rank and a known
        click (NaN: unknown, not counted). Returns the rows counted."""
        rank, position = np.asarray(rank, np.int64), np.asarray(position, np.int64)
        click = np.asarray(click, np.float64)
        d = position - rank + 1
        ok = (rank >= 0) & (rank < self.positions) & (position >= 0) & (d >= 0) & (d < OFFSETS) & np.isfinite(click)
        g = np.zeros(len(rank), np.int64) if group is None else np.asarray(group, np.int64)
        ok &= (g >= 0) & (g < self.groups)
        if not ok.any():
            return 0
        cell = np.ravel_multi_index((g[ok], rank[ok], d[ok]), self.shown.shape)
        size = self.shown.size
        self.shown += np.bincount(cell, minlength=size).reshape(self.shown.shape)
        self.clicks += np.bincount(cell, weights=click[ok], minlength=size).reshape(self.shown.shape)
        return int(ok.sum())

    def state(self) -> dict:
        return {"positions": self.positions, "groups": self.groups, "shown": self.shown.tolist(),
                "clicks": self.clicks.tolist()}

    @classmethod
    def from_state(cls, d: dict) -> SwapCounts:
        c = cls(int(d["positions"]), int(d["groups"]))
        c.shown[...] = np.asarray(d["shown"], np.float64)
        c.clicks[...] = np.asarray(d["clicks"], np.float64)
        return c

    def estimate(self, min_count: int = 200, floor: float = 0.1) -> Examination:
        pooled = _chain(self.shown.sum(0), self.clicks.sum(0), min_count, floor)
        if self.groups == 1:
            return pooled
        by = np.empty((self.groups, self.positions))
        for g in range(self.groups):  # over groups (a few devices), not over examples
            mine = _chain(self.shown[g], self.clicks[g], min_count, floor)
            by[g] = np.where(mine.known, mine.curve, pooled.curve)
        pooled.by_group = by
        return pooled


def _chain(shown: np.ndarray, clicks: np.ndarray, min_count: int, floor: float) -> Examination:
    """shown, clicks: (K, 3) by (rank, offset) -> the chained curve."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = clicks / shown  # (K, 3)
        # pair (j, j+1): rank j stays at j (offset 1) or moves down (2); rank j+1 moves up (0) or stays (1)
        num = ctr[:-1, 2] + ctr[1:, 1]  # shown at j+1
        den = ctr[:-1, 1] + ctr[1:, 0]  # shown at j
        enough = ((shown[:-1, 1:3] >= min_count).all(1) & (shown[1:, 0:2] >= min_count).all(1) & (den > 0))
        ratios = np.where(enough, num / den, np.nan)
    known = np.concatenate([[True], np.logical_and.accumulate(enough)])
    step = np.where(known[1:], ratios, 1.0)  # past the first gap the curve stays flat
    curve = np.concatenate([[1.0], np.cumprod(step)])
    return Examination(np.clip(curve, floor, 1.0), known, ratios)


def estimate_examination(rank: np.ndarray, position: np.ndarray, click: np.ndarray, *, positions: int = 33,
                         group: np.ndarray | None = None, groups: int = 1, min_count: int = 200,
                         floor: float = 0.1) -> Examination:
    """The examination curve p(k) / p(0), k < `positions`, from explored examples: their original rank
    (`explore.rank`; -1 for rows not explored, which are ignored), shown position and click label; optionally
    one curve per group (e.g. the device's id, 0 <= group < groups)."""
    counts = SwapCounts(positions, groups)
    counts.add(rank, position, click, group)
    return counts.estimate(min_count, floor)


def ipw_weights(position: np.ndarray, exam: Examination, clip: float = 10.0, group: np.ndarray | None = None,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Per-row weights 1 / p(position), at most `clip`, with mean 1 over `rows` (a bool mask: the rows whose
    click label counts; all rows when None). Rows outside `rows` get 1."""
    w = np.minimum(1.0 / exam.at(position, group), clip)
    sel = np.ones(len(w), bool) if rows is None else np.asarray(rows, bool)
    if sel.any():
        w = np.where(sel, w / w[sel].mean(), 1.0)
    return w
