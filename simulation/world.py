"""A synthetic world of users and videos, for history files and live traffic.

Users and videos have latent tastes and topics; the probability of each outcome
is known exactly, so a model's AUC can be compared with the best achievable AUC
on the same examples. Built in so that the model has something real to learn:

* position bias: a click needs the slot to be examined, with a known
  probability that falls with the position and depends on the device
  (`World.exam`), and the user to be attracted by the video
  (`truth.click_nopos`): P(click) = exam(position, device) * P(attracted), a
  multiplicative examination model, so weighting clicks by 1/exam is unbiased;
* a logging policy of known strength: each slate is ordered by a noisy
  relevance, `policy_strength` * relevance + Gumbel noise (0: uniformly random
  order), so position is confounded with relevance as in logged data;
  `unbiased_history` shows the same kind of slates in uniformly random order,
  and `explore_share` of requests are logged with adjacent pairs swapped at
  random (`watchnext.explore`), with the propensity of each shown slot;
* engagement and satisfaction disagree: "clickbait" raises clicks and lowers
  likes, watch time and survey ratings;
* drift: tastes move over the simulated period and new videos are published.

Every example line carries `truth` (true probabilities of the binary outcomes
given the features and position, `click_nopos` = the attraction probability,
the click probability had the slot surely been examined, and `exam` = the
examination probability of the slot shown); the trainer ignores unknown
top-level keys. See docs/position-bias.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

DEVICES = np.array(["mobile", "desktop", "tv"])
DEVICE_P = np.array([0.6, 0.3, 0.1])
DEVICE_CLICK = np.array([0.0, 0.2, -0.3])
DEVICE_EXAM = np.array([1.0, 0.6, 1.4])  # examination falls with position more slowly on desktop, faster on tv
SLATE = 10
POOL = 60  # candidates drawn per request before the "production" ranking picks a slate
DAY = 86_400.0
# the noise of the sampled outcomes around their means (`World.outcomes`; `World.expected` integrates it)
WATCH_NOISE = 0.15  # sd of the watched share of a video
WATCH_SHARE = (0.02, 1.0)  # the watched share is clipped to this range
SURVEY_SHARE = 0.2  # share of clicks that answer the survey
RATING_NOISE = 0.6  # sd of a survey answer around its mean (rounded, clipped to 1..5)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class WorldSpec:
    users: int = 5_000
    videos: int = 4_000
    latent: int = 8
    channels: int = 400
    tags: int = 300
    countries: int = 30
    embedding: int = 16  # must match the config's video_embedding size
    start_ts: float = 1_767_225_600.0  # 2026-01-01
    days: float = 14.0
    drift: float = 0.6  # how far tastes move over the period, in taste units
    new_video_share: float = 0.3  # share of videos published during the period
    # examination: exam(position, device) = (1 / (1 + position)) ** (position_bias * exam_device[device]),
    # devices in DEVICES order; 0 = every slot examined
    position_bias: float = 0.6
    exam_device: tuple[float, ...] = tuple(DEVICE_EXAM.tolist())
    satisfaction_corr: float = 0.3  # how alike what users click and what satisfies them are
    # the logging policy: candidates ranked by policy_strength * relevance + Gumbel(1) noise, the best
    # SLATE shown in that order; 1 is the historical policy, 0 a uniformly random slate in random order
    policy_strength: float = 1.0
    policy_popularity: float = 0.3  # the policy's relevance: topic match with the query + this * popularity
    explore_share: float = 0.0  # share of requests whose slate is logged with adjacent pairs swapped at random

    def check(self) -> None:
        """Raise ValueError naming the field when a knob is out of range."""
        for name in ("position_bias", "policy_strength", "policy_popularity"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {v}")
        if not 0.0 <= self.explore_share <= 1.0:
            raise ValueError(f"explore_share: must be in [0, 1], got {self.explore_share}")
        if len(self.exam_device) != len(DEVICES) or not all(math.isfinite(e) and e >= 0 for e in self.exam_device):
            raise ValueError(f"exam_device: expected {len(DEVICES)} finite numbers >= 0 ({', '.join(DEVICES)}), "
                             f"got {self.exam_device!r}")


class World:
    """The ground truth: who likes what, and how slots and devices bend it."""

    def __init__(self, spec: WorldSpec = WorldSpec(), seed: int = 0):
        spec.check()
        self.spec, s = spec, spec
        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng(seed + 1)  # for requests and outcomes
        k = s.latent
        # users
        self.taste0 = rng.normal(size=(s.users, k)) / math.sqrt(k) * 1.6
        self.taste_dir = rng.normal(size=(s.users, k)) / math.sqrt(k)
        rho = s.satisfaction_corr
        self.sat_taste = rho * self.taste0 + math.sqrt(1 - rho**2) * rng.normal(size=(s.users, k)) / math.sqrt(k) * 1.6
        country_centers = rng.normal(size=(s.countries, k))
        self.country = np.argmax(self.taste0 @ country_centers.T + rng.gumbel(size=(s.users, s.countries)), axis=1)
        self.device = rng.choice(len(DEVICES), size=s.users, p=DEVICE_P)
        self.activity = rng.pareto(1.5, size=s.users) + 1.0
        self.activity /= self.activity.sum()
        # videos
        ch_topic = rng.normal(size=(s.channels, k)) / math.sqrt(k) * 1.4
        self.channel = rng.integers(0, s.channels, size=s.videos)
        self.topic = ch_topic[self.channel] + rng.normal(size=(s.videos, k)) / math.sqrt(k) * 0.7
        ch_bait = rng.beta(1.2, 4.0, size=s.channels)
        self.clickbait = np.clip(ch_bait[self.channel] + rng.normal(0, 0.1, s.videos), 0, 1)
        self.quality = rng.normal(size=s.videos) - 1.6 * self.clickbait
        self.duration = np.exp(rng.normal(math.log(300), 0.8, size=s.videos))
        self.popularity = rng.normal(size=s.videos)
        tag_centers = rng.normal(size=(s.tags, k))
        self.tags = np.argsort(-(self.topic @ tag_centers.T + rng.gumbel(size=(s.videos, s.tags)) * 0.5), axis=1)[:, :4]
        end = s.start_ts + s.days * DAY
        new = rng.random(s.videos) < s.new_video_share
        self.published = np.where(new, rng.uniform(s.start_ts, end, s.videos), s.start_ts - rng.exponential(60 * DAY, s.videos))
        proj = rng.normal(size=(k + 2, s.embedding)) / math.sqrt(k)
        content = np.concatenate([self.topic, self.clickbait[:, None] * 2, self.quality[:, None] * 0.3], axis=1)
        self.embedding = (content @ proj + rng.normal(0, 0.05, size=(s.videos, s.embedding))).astype(np.float32)
        # each user's recent watches, newest first: start from what suits them
        self.recent = self._initial_recent(rng)

    def _initial_recent(self, rng) -> np.ndarray:
        s = self.spec
        old = np.flatnonzero(self.published <= s.start_ts)
        out = np.empty((s.users, SLATE), dtype=np.int64)
        for lo in range(0, s.users, 2048):  # blocks of users, to bound memory
            aff = self.taste0[lo : lo + 2048] @ self.topic[old].T
            g = aff * 2 + rng.gumbel(size=aff.shape)
            out[lo : lo + 2048] = old[np.argsort(-g, axis=1)[:, :SLATE]]
        return out

    # ------------------------------------------------------------ truth
    def taste(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        frac = (ts - self.spec.start_ts) / (self.spec.days * DAY)
        return self.taste0[users] + self.spec.drift * frac[:, None] * self.taste_dir[users]

    def exam(self, positions: np.ndarray, devices: np.ndarray) -> np.ndarray:
        """P(the slot is examined) = (1 / (1 + position)) ** (position_bias * exam_device[device]).

        positions < 0 means "unknown slot": examined for sure (1.0).
        """
        pos = np.asarray(positions)
        eta = self.spec.position_bias * np.asarray(self.spec.exam_device, np.float64)[np.asarray(devices)]
        return np.where(pos >= 0, np.exp(-eta * np.log1p(np.maximum(pos, 0))), 1.0)

    def relevance(self, queries: np.ndarray, videos: np.ndarray) -> np.ndarray:
        """What the logging policy ranks by (before its noise): topic match with the query, and popularity."""
        pop = self.spec.policy_popularity * self.popularity[videos]
        return np.einsum("...k,...k->...", self.topic[queries], self.topic[videos]) + pop

    def probabilities(self, users, videos, ts, positions, devices) -> dict[str, np.ndarray]:
        """True outcome probabilities for impressions (arrays of equal length).

        click = exam * click_nopos: the slot is examined (`exam`) and the user, not
        dismissing, is attracted (`click_nopos`), independently. positions < 0 means
        "unknown slot": examined for sure.
        """
        aff = np.einsum("nk,nk->n", self.taste(users, ts), self.topic[videos])
        sat = np.einsum("nk,nk->n", self.sat_taste[users], self.topic[videos])  # what satisfies them
        cb, q = self.clickbait[videos], self.quality[videos]
        exam = self.exam(positions, devices)
        base = -1.8 + 1.8 * aff + 2.2 * cb + 0.3 * self.popularity[videos] + DEVICE_CLICK[devices]
        p_dismiss = sigmoid(-2.6 - 1.2 * aff - 0.5 * self.popularity[videos] + 1.5 * (cb > 0.6))
        p_click_nopos = (1 - p_dismiss) * sigmoid(base)  # attraction
        p_like = sigmoid(-1.0 + 1.5 * sat + 1.0 * q - 2.5 * cb)
        watch_frac = sigmoid(0.3 + 0.5 * aff + 0.5 * sat + 0.6 * q - 1.5 * cb)
        return {
            "click": exam * p_click_nopos,
            "click_nopos": p_click_nopos,
            "exam": exam,
            "dismiss": p_dismiss,
            "like": p_like,  # given a click
            "watch_frac": watch_frac,
            "rating_mean": np.clip(3.0 + 0.8 * q + 0.8 * sat - 1.0 * cb, 1, 5),
        }

    def outcomes(self, users, videos, ts, positions, devices) -> tuple[dict, dict]:
        """Sample labels; returns (labels, probabilities)."""
        p = self.probabilities(users, videos, ts, positions, devices)
        r, n = self.rng, len(users)
        dismiss = r.random(n) < p["dismiss"]
        # one draw for "examined and attracted": u < exam * P(attracted | not dismissed), the product of
        # independent events (exam does not depend on the video, attraction not on the slot)
        click = ~dismiss & (r.random(n) < p["click"] / np.maximum(1 - p["dismiss"], 1e-9))
        like = click & (r.random(n) < p["like"])
        frac = np.clip(p["watch_frac"] + r.normal(0, WATCH_NOISE, n), *WATCH_SHARE)
        watch = np.where(click, np.round(frac * self.duration[videos], 1), np.nan)
        surveyed = click & (r.random(n) < SURVEY_SHARE)
        rating = np.where(surveyed, np.clip(np.round(p["rating_mean"] + r.normal(0, RATING_NOISE, n)), 1, 5), np.nan)
        labels = {
            "click": click.astype(float),
            "watch_time": watch,
            "dismiss": dismiss.astype(float),
            "like": np.where(click, like.astype(float), np.nan),
            "rating": rating,
        }
        return labels, p

    def expected(self, users, videos, ts, positions, devices) -> dict[str, np.ndarray]:
        """What `outcomes` samples, in expectation: the probabilities plus, per impression (all (n,)),
        `watch_time` = E[seconds watched | click] and `rating` = E[survey answer | answered].

        The noise is integrated exactly: E[clip(m + sZ, a, b)] for the watched share, and
        E[clip(round(m + sZ), 1, 5)] = 1 + sum_k P(m + sZ >= k + 0.5), k = 1..4, for the rating.
        """
        from scipy.stats import norm  # here: most users of the world never ask for expectations

        p = self.probabilities(users, videos, ts, positions, devices)
        m, s, (lo, hi) = p["watch_frac"], WATCH_NOISE, WATCH_SHARE
        za, zb = (lo - m) / s, (hi - m) / s
        ca, cb = norm.cdf(za), norm.cdf(zb)
        share = lo * ca + hi * (1 - cb) + m * (cb - ca) + s * (norm.pdf(za) - norm.pdf(zb))
        rating = 1.0 + sum(norm.cdf((p["rating_mean"] - k - 0.5) / RATING_NOISE) for k in range(1, 5))
        return {**p, "watch_time": share * self.duration[videos], "rating": rating}

    # ------------------------------------------------------------ traffic
    def requests(self, ts: np.ndarray) -> dict[str, np.ndarray]:
        """One request per timestamp: who asks, from which video, which slate is shown.

        The slate is a noisy "production" ranking (`WorldSpec.policy_strength`), so slot and
        relevance are correlated as they are in logged data.
        """
        users = self.rng.choice(self.spec.users, size=len(ts), p=self.activity)
        return self.requests_for(users, ts)

    def requests_for(self, users: np.ndarray, ts: np.ndarray, size: int = SLATE) -> dict[str, np.ndarray]:
        """`requests` for given users (one per element of `users` and `ts`): `size` candidates each, best first."""
        if not 1 <= size < POOL:
            raise ValueError(f"size: expected 1..{POOL - 1} candidates, got {size}")
        r, s, n = self.rng, self.spec, len(ts)
        query = self.recent[users, r.integers(0, 3, n)]
        cand = r.integers(0, s.videos, size=(n, POOL))
        live = self.published[cand] <= ts[:, None]
        rel = self.relevance(query[:, None], cand)
        g = np.where(live, s.policy_strength * rel + r.gumbel(size=rel.shape), -np.inf)
        g = np.where(cand == query[:, None], -np.inf, g)
        # the pool is drawn with replacement: a video drawn twice is offered once (a slate names each item once)
        by_id = np.argsort(cand, axis=1, kind="stable")
        ids = np.take_along_axis(cand, by_id, axis=1)
        again = np.zeros(cand.shape, bool)
        np.put_along_axis(again, by_id[:, 1:], ids[:, 1:] == ids[:, :-1], axis=1)
        g = np.where(again, -np.inf, g)
        order = np.argsort(-g, axis=1)[:, :size]
        slate = np.take_along_axis(cand, order, axis=1)
        return {"user": users, "query": query, "slate": slate, "device": self.device[users]}

    def watched(self, users: np.ndarray, videos: np.ndarray) -> None:
        """Push clicked videos onto users' recent lists (in the order given)."""
        for u, v in zip(users.tolist(), videos.tolist()):  # clicks only: a small share
            row = self.recent[u]
            row[1:] = row[:-1].copy()
            row[0] = v

    # ------------------------------------------------------------ features
    def candidate_features(self, videos: np.ndarray, ts: np.ndarray) -> list[dict]:
        age = np.maximum(ts - self.published[videos], 0) / DAY
        views = np.exp(self.popularity[videos] * 1.5 + 8)
        return [
            {
                "video_id": f"v{v}",
                "video_channel": f"c{self.channel[v]}",
                "video_tags": [f"t{t}" for t in self.tags[v]],
                "video_age_days": round(float(a), 3),
                "video_duration_s": round(float(self.duration[v]), 1),
                "video_views": round(float(w)),
                "video_embedding": [round(float(x), 3) for x in self.embedding[v]],
            }
            for v, a, w in zip(videos.tolist(), age.tolist(), views.tolist())
        ]

    def query_features(self, v: int) -> dict:
        return {"query_video_id": f"v{v}", "query_embedding": [round(float(x), 3) for x in self.embedding[v]]}

    def user_features(self, u: int) -> dict:
        recent = self.recent[u]
        return {
            "user_id": f"u{u}",
            "user_country": f"k{self.country[u]}",
            "user_recent_videos": [f"v{v}" for v in recent.tolist()],
            # mean content embedding of recent watches, as a profile service would keep it
            "user_embedding": [round(float(x), 3) for x in self.embedding[recent].mean(axis=0)],
        }


def history(world: World, n_examples: int, seed: int = 0, unbiased: bool = False) -> Iterator[dict]:
    """Time-ordered examples: SLATE impressions per request, labels sampled from the truth.

    Slates are shown in the logging policy's order, except `spec.explore_share` of requests
    (adjacent pairs swapped at random, `watchnext.explore`; their lines carry `propensity`, the
    probability of the slot shown, and `explore.rank`, the policy's position) or, with `unbiased`,
    every request (the slate in uniformly random order; see `unbiased_history`).
    """
    s = world.spec
    n_req = -(-n_examples // SLATE)
    rng = np.random.default_rng(seed + 7)
    order_rng = np.random.default_rng([seed, 11])  # the shown order; apart from `rng`, so timestamps stay put
    span = s.days * DAY
    all_ts = np.sort(rng.uniform(s.start_ts, s.start_ts + span, n_req))
    made = 0
    for lo in range(0, n_req, 2000):
        ts = all_ts[lo : lo + 2000]
        req = world.requests(ts)
        n = len(ts)
        rank, slate, prop, explored = shown_order(req["slate"], order_rng, 0.0 if unbiased else s.explore_share, unbiased)
        users = np.repeat(req["user"], SLATE)
        vids = slate.reshape(-1)
        tsx = np.repeat(ts, SLATE)
        pos = np.tile(np.arange(SLATE), n)
        dev = np.repeat(req["device"], SLATE)
        labels, p = world.outcomes(users, vids, tsx, pos, dev)
        cands = world.candidate_features(vids, tsx)
        for i in range(n):
            u = int(req["user"][i])
            shared = {
                "ts": round(float(ts[i]), 3),
                "request_id": f"r{lo + i}",
                "user": world.user_features(u),
                "query": world.query_features(int(req["query"][i])),
                "context": {"device": str(DEVICES[req["device"][i]]), "hour": float(int((ts[i] % DAY) // 3600))},
            }
            for j in range(SLATE):
                k = i * SLATE + j
                if made >= n_examples:
                    return
                made += 1
                line = {
                    **shared,
                    "candidate": cands[k],
                    "position": j,
                    "labels": {t: _label(labels[t][k]) for t in labels},
                    "truth": {
                        "click": round(float(p["click"][k]), 5),
                        "click_nopos": round(float(p["click_nopos"][k]), 5),
                        "exam": round(float(p["exam"][k]), 5),
                        "dismiss": round(float(p["dismiss"][k]), 5),
                        "like": round(float(p["like"][k]), 5),
                    },
                }
                if explored[i]:
                    line["propensity"] = float(prop[i, j])
                    line["explore"] = {"rank": int(rank[i, j])}
                yield line
        clicked = labels["click"] > 0
        world.watched(users[clicked], vids[clicked])


def unbiased_history(world: World, n_examples: int, seed: int = 0) -> Iterator[dict]:
    """`history` with every slate shown in uniformly random order: the same kind of requests and slates
    (chosen by the logging policy), positions independent of the videos. Labels are sampled as usual,
    with the examination of the random slot; `truth.click_nopos` is the attraction to judge a model by."""
    return history(world, n_examples, seed, unbiased=True)


def shown_order(slate: np.ndarray, rng: np.random.Generator, explore_share: float, shuffle: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How each request's slate (n, k), in the policy's order, is shown.

    Returns (rank, shown, propensity, explored): rank (n, k) the policy's position of the video
    in each shown slot, shown (n, k) the videos in shown order, propensity (n, k) the probability
    of each video being in the slot it is shown in, explored (n,) bool. `shuffle` shows every
    slate in uniformly random order (propensity 1/k); otherwise a share `explore_share` of
    requests, drawn at random, have adjacent pairs swapped (`watchnext.explore.explore_orders`).
    """
    n, k = slate.shape
    if shuffle:
        rank = rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1)
        return rank, np.take_along_axis(slate, rank, axis=1), np.full((n, k), 1.0 / k), np.zeros(n, bool)
    rank = np.tile(np.arange(k), (n, 1))
    prop = np.ones((n, k))
    explored = rng.random(n) < explore_share if explore_share > 0 else np.zeros(n, bool)
    m = int(explored.sum())
    if m:
        from watchnext.explore import explore_orders

        order, p = explore_orders(-rank[:m].astype(np.float64), rng, rng.integers(0, 2, m))
        rank[explored], prop[explored] = order, p
    return rank, np.take_along_axis(slate, rank, axis=1), prop, explored


def _label(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def write_history(out: IO[str], n_examples: int, seed: int = 0, spec: WorldSpec | None = None,
                  progress=None, unbiased: bool = False) -> int:
    """Write `history` (or, with `unbiased`, `unbiased_history`) of a new World(spec, seed) as JSON lines."""
    world = World(spec or WorldSpec(), seed)
    n = 0
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for ex in history(world, n_examples, seed, unbiased=unbiased):
        out.write(dumps(ex))
        out.write("\n")
        n += 1
        if progress is not None and n % 10_000 == 0:
            progress(10_000)
    if progress is not None:
        progress(n % 10_000)
    return n
