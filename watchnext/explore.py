"""Randomised logging on a slice of traffic: adjacent-pair swaps (RandPair).

Why this design
---------------
The shallow tower (and any click model) can only tell "examined less because it
was shown lower" from "clicked less because it is worse" if the *same* items are
seen at different positions. Under the production policy the best item is always
shown first, so position and relevance are confounded and the tower learns the
logging policy instead of the user.

The exploration policy keeps the ranking almost intact and changes only what is
needed to identify the examination curve (Joachims et al., WSDM 2017, "RandPair";
Agarwal et al., WSDM 2019, swap interventions): the ranked list is cut into
adjacent pairs of positions starting at ``offset`` ((0,1), (2,3), ... for offset 0;
(1,2), (3,4), ... for offset 1) and every pair is swapped independently with
probability 1/2. An item of original rank r inside a pair is therefore shown at
either position of its pair with probability 1/2 each, independently of how good it
is, so for the pair (k, k+1)

    E[CTR(rank r shown at k+1)] / E[CTR(rank r shown at k)] = p_{k+1} / p_k

for both ranks r in {k, k+1}: the ratio of click rates of the same original ranks
at k+1 vs k estimates the examination ratio, and chaining the ratios of
(0,1), (1,2), (2,3), ... gives the whole curve p_k / p_0
(`training/propensity.py`). Drawing the offset at random per list covers every
adjacent pair. A swap moves an item by one position at most, so the cost to the
user is small.

The propensity returned with each shown item is the probability, under this
policy, that the item is at the position it was shown at: 0.5 for an item in a
pair, 1.0 for an unpaired one (the first item when offset is 1, the last when the
paired part has odd length).

Torch-free; the service and the simulator call it.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["explore_draw", "explore_order", "explore_orders", "original_ranks"]


def explore_order(scores: np.ndarray, rng: np.random.Generator, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """One list: (shown order, propensity per shown position).

    ``scores`` (k,): the list's combined scores; the original ranking is the
    stable descending sort. ``offset`` in {0, 1}: the first position of the first
    pair. Returns ``order`` (k,) int64, indices into ``scores`` in shown order,
    and ``propensity`` (k,) float64, the probability of each shown item being at
    its shown position (0.5 paired, 1.0 unpaired).
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one list (1-d), got shape {scores.shape}")
    order, prop = explore_orders(scores[None, :], rng, np.array([offset]))
    return order[0], prop[0]


def explore_orders(scores: np.ndarray, rng: np.random.Generator, offsets: np.ndarray | int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n lists of k at once: scores (n, k); offsets (n,) or one int, each in {0, 1}.

    Returns order (n, k) (indices into each row of ``scores``, shown order) and
    propensity (n, k). Same policy as `explore_order`, with one uniform draw per
    pair (a row's draws do not depend on other rows' lengths or scores).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n, k), got shape {scores.shape}")
    n, k = scores.shape
    offsets = np.broadcast_to(np.asarray(offsets, dtype=np.int64), (n,))
    if not np.isin(offsets, (0, 1)).all():
        raise ValueError(f"offset must be 0 or 1, got {sorted(set(offsets.tolist()) - {0, 1})}")
    ranked = np.argsort(-scores, axis=1, kind="stable")  # (n, k) original ranking, best first
    pos = np.arange(k)
    rel = pos[None, :] - offsets[:, None]  # position relative to the first pair
    pair = rel // 2  # (n, k) pair index; -1 before the first pair
    # a position is paired when it and its partner both exist
    partner = np.where(rel % 2 == 0, pos + 1, pos - 1)  # (n, k) the other position of the pair
    paired = (rel >= 0) & (partner >= 0) & (partner < k)
    flips = rng.random((n, (k + 1) // 2)) < 0.5  # (n, pairs) one draw per pair
    swap = paired & flips[np.arange(n)[:, None], np.clip(pair, 0, max(flips.shape[1] - 1, 0))] if k else paired
    src = np.where(swap, partner, pos[None, :])  # shown position j takes the item of original rank src[j]
    order = np.take_along_axis(ranked, src, axis=1)
    propensity = np.where(paired, 0.5, 1.0)
    return order.astype(np.int64), propensity


def original_ranks(order: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The original rank (0 = best) of each shown item: a helper for logging and tests."""
    scores = np.asarray(scores, dtype=np.float64)
    ranked = np.argsort(-scores, kind="stable")
    rank_of = np.empty(len(scores), np.int64)
    rank_of[ranked] = np.arange(len(scores))
    return rank_of[np.asarray(order)]


def explore_draw(key: str, share: float) -> tuple[np.random.Generator, int] | None:
    """Whether the list named ``key`` (a request id) is explored, decided by a hash of the key so that a retry
    of the same request gets the same answer and the same swaps: None when not explored, else (a generator
    seeded from the hash, the pair offset 0 or 1). ``share`` in [0, 1]: the expected explored fraction."""
    if share <= 0.0:
        return None
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16, person=b"watchnext-explor").digest()
    u = int.from_bytes(h[:7], "big") / float(1 << 56)  # uniform in [0, 1)
    if u >= share:
        return None
    return np.random.default_rng(int.from_bytes(h[8:], "big")), h[7] & 1
