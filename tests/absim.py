"""Many simulated A/B experiments at once, from the synthetic world (tests of the A/B report).

A population of users from `simulation.world.World`, each with a fixed list of
impressions (video, slot, time, device) in the experiment period and another in
the pre-period. Heavy users have many impressions (the world's Pareto activity)
and each user's tastes make their outcomes alike, so user-level clustering
matters. An experiment samples users from the population, assigns them to arms
with the real hash assignment, and samples fresh outcomes from the world's true
probabilities; arm 1 may change them by a known amount. Because the population
is fixed, the true difference of every metric is known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from analysis.abstats import Events
from simulation.world import DAY, SLATE, World, WorldSpec
from watchnext.experiments import Experiment, assign

RATING_SD, SURVEY_RATE, WATCH_SD = 0.6, 0.2, 0.15  # as in World.outcomes

@dataclass
class Period:
    offsets: np.ndarray  # (P+1,) user u's impressions are [offsets[u], offsets[u+1])
    ts: np.ndarray  # (M,)
    p: dict  # world probabilities per impression, (M,) each, plus "duration"


@dataclass
class Effect:
    """Arm 1's change: click probability times `click_mult`, like probability plus `like_add`."""

    click_mult: float = 1.0
    like_add: float = 0.0

    def apply(self, p: dict) -> dict:
        q = dict(p)
        q["click"] = np.minimum(p["click"] * self.click_mult, 1.0 - p["dismiss"])
        q["like"] = np.clip(p["like"] + self.like_add, 0.0, 1.0)
        return q


class Population:
    def __init__(self, users: int = 20_000, seed: int = 0, impressions: float = 5.0, propensity_sd: float = 0.7):
        self.world = World(WorldSpec(users=users, videos=2_000, channels=200, tags=100), seed)
        self.rng = np.random.default_rng(seed + 100)
        act = self.world.activity * users  # mean 1, heavy-tailed
        self.users = users
        # a lasting per-user taste for clicking and for liking, beyond the world's topic tastes:
        # the heterogeneity that makes user-level analysis (and CUPED) matter
        self.click_propensity = self.rng.normal(0, propensity_sd, users)
        self.like_propensity = self.rng.normal(0, propensity_sd, users)
        self.main = self._period(act, impressions, 0.0)
        self.pre = self._period(act, impressions, -7 * DAY)

    def _period(self, act: np.ndarray, rate: float, shift: float) -> Period:
        w, r = self.world, self.rng
        counts = 1 + np.minimum(r.poisson(rate * act), 60)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        user = np.repeat(np.arange(self.users), counts)
        m = len(user)
        video = r.integers(0, w.spec.videos, m)
        ts = w.spec.start_ts + r.uniform(0, 7 * DAY, m) + shift
        p = w.probabilities(user, video, np.maximum(ts, w.spec.start_ts), r.integers(0, SLATE, m), w.device[user])
        p["duration"] = w.duration[video]
        p["click"] = np.minimum(p["click"] * np.exp(self.click_propensity[user]), 1.0 - p["dismiss"])
        p["like"] = 1.0 / (1.0 + np.exp(-(np.log(p["like"] / (1.0 - p["like"])) + self.like_propensity[user])))
        return Period(offsets, ts, p)

    # ------------------------------------------------------------ truth
    def truth(self, effect: Effect) -> dict[str, float]:
        """Population value of each metric in arm 1 minus arm 0 (the report's estimand)."""
        a, b = self.main.p, effect.apply(self.main.p)
        return {k: v - self._values(a)[k] for k, v in self._values(b).items()}

    def _values(self, p: dict) -> dict[str, float]:
        n = len(p["click"])
        mu, lo, hi = p["watch_frac"], 0.02, 1.0  # E[clip(mu + sd Z, lo, hi)]
        al, be = (lo - mu) / WATCH_SD, (hi - mu) / WATCH_SD
        ef = lo * (1 - norm.sf(al)) + hi * norm.sf(be) + mu * (norm.sf(al) - norm.sf(be)) \
            + WATCH_SD * (norm.pdf(al) - norm.pdf(be))
        # E[clip(round(mu + sd Z), 1, 5)] = 1 + sum_j P(X >= j + 0.5)
        er = 1 + sum(norm.sf((j + 0.5 - p["rating_mean"]) / RATING_SD) for j in range(1, 5))
        c = p["click"]
        return {"ctr": c.sum() / n, "watch_time": (c * ef * p["duration"]).sum() / n,
                "like_rate": (c * p["like"]).sum() / c.sum(), "dismiss_rate": p["dismiss"].mean(),
                "rating": (c * er).sum() / c.sum()}

    # ------------------------------------------------------------ experiments
    def experiments(self, n_exp: int, n_users: int, seed: int, effect: Effect | None = None,
                    shares=(0.5, 0.5), salt: str = "exp") -> Batch:
        """n_exp experiments of n_users sampled users each, with outcomes; all as flat arrays."""
        r = np.random.default_rng(seed)
        users = np.stack([r.choice(self.users, n_users, replace=False) for _ in range(n_exp)])  # (E, n)
        arms = np.stack([assign(f"{salt}-{seed}-{e}", users[e], shares) for e in range(n_exp)])
        main = self._events(self.main, users, arms, r, effect)
        pre = self._events(self.pre, users, np.zeros_like(arms), r, None)
        return Batch([Experiment.from_dict({"name": f"e{e}", "salt": f"{salt}-{seed}-{e}", "arms": [
            {"name": f"arm{i}", "share": s} for i, s in enumerate(shares)]}) for e in range(n_exp)], main, pre)

    def _events(self, period: Period, users: np.ndarray, arms: np.ndarray, r, effect: Effect | None):
        E, n = users.shape
        flat = users.reshape(-1)
        counts = np.diff(period.offsets)[flat]
        ends = np.cumsum(counts)
        idx = np.arange(ends[-1]) - np.repeat(ends - counts, counts) + np.repeat(period.offsets[flat], counts)
        arm = np.repeat(arms.reshape(-1), counts)
        p = {k: v[idx] for k, v in period.p.items()}
        if effect is not None:
            treated = effect.apply(p)
            p = {k: np.where(arm == 1, treated[k], v) for k, v in p.items()}
        labels = sample_outcomes(p, r)
        exp_of = np.repeat(np.repeat(np.arange(E), n), counts)
        return Events(np.repeat(flat, counts), arm, period.ts[idx], labels), np.searchsorted(exp_of, np.arange(E + 1))


def sample_outcomes(p: dict, r: np.random.Generator) -> dict[str, np.ndarray]:
    """Labels from true probabilities, as World.outcomes draws them (vectorised over all impressions)."""
    m = len(p["click"])
    dismiss = r.random(m) < p["dismiss"]
    click = ~dismiss & (r.random(m) < p["click"] / np.maximum(1 - p["dismiss"], 1e-9))
    like = click & (r.random(m) < p["like"])
    frac = np.clip(p["watch_frac"] + r.normal(0, WATCH_SD, m), 0.02, 1.0)
    surveyed = click & (r.random(m) < SURVEY_RATE)
    rating = np.clip(np.round(p["rating_mean"] + r.normal(0, RATING_SD, m)), 1, 5)
    return {"click": click.astype(float), "watch_time": np.where(click, np.round(frac * p["duration"], 1), np.nan),
            "dismiss": dismiss.astype(float), "like": np.where(click, like.astype(float), np.nan),
            "rating": np.where(surveyed, rating, np.nan)}


@dataclass
class Batch:
    experiments: list[Experiment]
    main: tuple[Events, np.ndarray]  # all events, and each experiment's [start, end) offsets (E+1,)
    pre: tuple[Events, np.ndarray]

    def __len__(self) -> int:
        return len(self.experiments)

    def events(self, e: int) -> tuple[Events, Events]:
        (ev, off), (pe, poff) = self.main, self.pre
        return ev.select(slice(off[e], off[e + 1])), pe.select(slice(poff[e], poff[e + 1]))
