"""Live traffic from the synthetic world: `watchnext simulate traffic` (torch-free).

Users of the world that `simulate history` writes (same spec and seed: the same
users, videos and tastes) ask a running service for rankings and then behave by
the world's truth:

    request   the world picks the user's query video (one of their recent watches)
              and `candidates` videos the way `World.requests` does; the request
              carries every feature, so the service needs no feature store
    ranking   POST /v1/rank; the answer's order is the slot each item is shown in
    behaviour `World.outcomes` with the position bias of those slots: dismiss,
              click, watch time, like, survey rating
    feedback  POST /v1/feedback with what the user did (clicked items: click,
              watch_time, like and, when surveyed, rating; dismissed: dismiss)

For every arm the service reports (its `arm` and `model_version`) the run adds
up the world's *expected* outcomes of the items shown in the slots they were
shown in (`World.expected`), so an A/B report's estimates can be checked against
the truth, next to the realised counts. The metrics are the A/B report's
(`analysis.abstats.METRICS`): click-through rate, watch time per impression,
likes per click, dismiss rate, mean survey rating.

The world's clock starts where the simulated history ends and runs with the wall
clock, so the drift of tastes and the publishing of videos carry on from the
history a model was trained on. Clicked videos join the user's recent watches.

Load is a closed loop: `concurrency` clients (asyncio tasks sharing one httpx
connection pool of that size) each send a request, act, send the feedback and
go again until `duration` seconds have passed; every request has a timeout.
All world computation runs on the event loop's thread, so the world needs no
locks. Only loopback URLs are accepted: the traffic is synthetic and its
feedback becomes training data wherever it lands.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from analysis.abstats import METRICS
from analysis.tables import table
from simulation.world import DAY, DEVICES, POOL, SLATE, World
from watchnext.errors import WatchnextError

# running sums per arm, all over the impressions shown
#   truth:    sum of expected outcomes (the world's probabilities in the slots shown)
#   realised: sum of sampled outcomes
_SUMS = ("impressions", "click", "watch", "like", "dismiss", "rating")


class TrafficError(WatchnextError):
    """A problem with the target or the options: printed as one line by the CLI."""


def check_url(url: str) -> str:
    """The base URL without a trailing slash; refuses anything but http(s) to a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TrafficError("--url", f"expected http://HOST:PORT, got {url!r}")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise TrafficError("--url", f"{host} is not a loopback address (127.0.0.0/8, ::1, localhost); simulated "
                           "traffic is only sent to a service on this machine, because its feedback becomes training data")
    return url.rstrip("/")


@dataclass
class Tally:
    """One arm (arm name, model version): users, requests and the sums of `_SUMS`, true and realised."""

    arm: str
    version: str
    experiment: str | None = None
    users: set[int] = field(default_factory=set)
    requests: int = 0
    truth: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0.0))
    realised: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS + ("ratings",), 0.0))

    def add_realised(self, labels: dict[str, np.ndarray]) -> None:
        r, clicked = self.realised, labels["click"] > 0
        r["impressions"] += len(clicked)
        r["click"] += float(clicked.sum())
        r["watch"] += float(np.nansum(labels["watch_time"]))
        r["like"] += float(np.nansum(labels["like"]))
        r["dismiss"] += float(labels["dismiss"].sum())
        r["rating"] += float(np.nansum(labels["rating"]))
        r["ratings"] += float((~np.isnan(labels["rating"])).sum())


def add_expected(sums: dict[str, float], e: dict[str, np.ndarray]) -> None:
    """Add the expected outcomes of impressions: clicks, watch seconds, likes, dismisses, and the
    click-weighted expected rating (a survey follows a click at a fixed rate, so the mean rating
    of the answers is sum(p_click * E[rating]) / sum(p_click))."""
    p = e["click"]
    sums["impressions"] += len(p)
    sums["click"] += float(p.sum())
    sums["watch"] += float((p * e["watch_time"]).sum())
    sums["like"] += float((p * e["like"]).sum())
    sums["dismiss"] += float(e["dismiss"].sum())
    sums["rating"] += float((p * e["rating"]).sum())


def rates(s: dict[str, float], rating_n: str = "click") -> dict[str, float | None]:
    """The report's metrics from the sums (keys of `abstats.METRICS`); None where undefined."""

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {
        "ctr": ratio(s["click"], s["impressions"]),
        "watch_time": ratio(s["watch"], s["impressions"]),
        "like_rate": ratio(s["like"], s["click"]),
        "dismiss_rate": ratio(s["dismiss"], s["impressions"]),
        "rating": ratio(s["rating"], s[rating_n]),
    }


class Traffic:
    """One run of simulated users against a service; `run()` returns the summary (see `summary`)."""

    def __init__(self, world: World, url: str, users: int = 100, duration: float = 60.0, concurrency: int = 4,
                 candidates: int = 2 * SLATE, top_k: int = SLATE, seed: int = 0, timeout: float = 10.0,
                 experiment: str = "live", events: IO[str] | None = None,
                 on_progress: Callable[[float, dict[str, Any]], None] | None = None):
        s = world.spec
        if not 1 <= users <= s.users:
            raise TrafficError("--users", f"expected 1..{s.users} (the users in the world), got {users}")
        if not duration > 0:
            raise TrafficError("--duration", f"expected seconds > 0, got {duration}")
        if not 1 <= concurrency <= 256:
            raise TrafficError("--concurrency", f"expected 1..256, got {concurrency}")
        if not 1 <= candidates <= 50:
            raise TrafficError("--candidates", f"expected 1..50, got {candidates}")
        if not 1 <= top_k:
            raise TrafficError("--top-k", f"expected >= 1, got {top_k}")
        if not timeout > 0:
            raise TrafficError("--timeout", f"expected seconds > 0, got {timeout}")
        self.world, self.url = world, check_url(url)
        self.duration, self.concurrency, self.timeout = float(duration), concurrency, float(timeout)
        self.candidates, self.top_k, self.experiment = candidates, min(top_k, candidates), experiment
        self.events, self.on_progress = events, on_progress
        self.rng = np.random.default_rng([seed, 0x7AFF1C])
        # N distinct users of the world; each asks as often as the world's activity says
        self.users = np.sort(self.rng.choice(s.users, size=users, replace=False))
        w = world.activity[self.users]
        self.cum = np.cumsum(w / w.sum())
        self.world_t0 = s.start_ts + s.days * DAY  # where the history ends
        self.token = secrets.token_hex(4)  # request ids unique across runs (the service remembers ids for a day)
        self.tallies: dict[tuple[str, str], Tally] = {}
        self.candidate_order = dict.fromkeys(_SUMS, 0.0)  # the truth had the world's own order been shown
        self.sent = 0
        self.failed: Counter[str] = Counter()
        self.feedback: Counter[str] = Counter()
        self.latency: list[float] = []
        self.elapsed = 0.0
        self.interrupted = False

    # ------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Drive traffic for `duration` seconds; raises TrafficError when no service answers at `url`.

        Ctrl-C stops early: the summary then covers what was done (`interrupted` is true).
        """
        try:
            asyncio.run(self._main())
        except KeyboardInterrupt:
            self.interrupted = True
        return self.summary()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits, trust_env=False) as client:
            await self._check_ready(client)
            self.t0 = time.monotonic()
            deadline = self.t0 + self.duration
            workers = [asyncio.create_task(self._worker(client, deadline)) for _ in range(self.concurrency)]
            ticker = asyncio.create_task(self._ticker())
            try:
                # a worker stops starting requests at the deadline; each request and feedback has a timeout
                _, late = await asyncio.wait(workers, timeout=self.duration + 2 * self.timeout + 5)
                if late:
                    self.failed["stopped in flight at the time limit"] += len(late)
                for t in workers:
                    if t.done() and not t.cancelled() and (err := t.exception()) is not None:
                        raise err  # a bug in the simulator: do not hide it
            finally:
                for t in (*workers, ticker):
                    t.cancel()
                await asyncio.gather(*workers, ticker, return_exceptions=True)
                self.elapsed = time.monotonic() - self.t0
                self._progress()

    async def _check_ready(self, client: httpx.AsyncClient) -> None:
        try:
            r = await client.get("/readyz")
        except httpx.HTTPError as e:
            raise TrafficError(self.url, f"no service answers ({type(e).__name__}: {e}); start one with "
                               "`watchnext up` or `watchnext serve`") from None
        if r.status_code != 200:
            raise TrafficError(f"{self.url}/readyz", f"answered {r.status_code}: the service is not ready to rank "
                               f"({r.text[:200]})")

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.elapsed = time.monotonic() - self.t0
            self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            imps = sum(t.realised["impressions"] for t in self.tallies.values())
            self.on_progress(min(self.elapsed, self.duration), {"requests": self.sent, "failed": sum(self.failed.values()),
                                                                 "impressions": int(imps)})

    async def _worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            ok = await self._one(client)
            if not ok:
                await asyncio.sleep(0.05)  # do not spin on a failing service

    # ------------------------------------------------------------ one request
    def _request(self) -> tuple[dict[str, Any], int, int, np.ndarray, float]:
        """A rank request of one user (drawn by activity): (body, user, device, candidate videos, world time)."""
        w = self.world
        u = int(self.users[min(int(np.searchsorted(self.cum, self.rng.random(), side="right")), len(self.users) - 1)])
        wts = self.world_t0 + (time.monotonic() - self.t0)
        # the world's pool is drawn with replacement: ask for more, keep each video once, best first
        req = w.requests_for(np.array([u]), np.array([wts]), size=min(POOL - 1, 2 * self.candidates))
        slate, query, dev = req["slate"][0], int(req["query"][0]), int(req["device"][0])
        _, first = np.unique(slate, return_index=True)
        vids = slate[np.sort(first)]
        vids = vids[vids != query][: self.candidates]
        self.sent += 1
        body = {
            "request_id": f"sim-{self.token}-{self.sent}",
            "user": w.user_features(u),
            "query": w.query_features(query),
            "context": {"device": str(DEVICES[dev]), "hour": float(int((wts % DAY) // 3600))},
            "candidates": w.candidate_features(vids, np.full(len(vids), wts)),
            "top_k": self.top_k,
        }
        return body, u, dev, vids, wts

    async def _one(self, client: httpx.AsyncClient) -> bool:
        body, u, dev, vids, wts = self._request()
        t = time.perf_counter()
        try:
            r = await client.post("/v1/rank", json=body)
        except httpx.HTTPError as e:
            self.failed[f"rank: {type(e).__name__}"] += 1
            return False
        if r.status_code != 200:
            self.failed[f"rank: HTTP {r.status_code}"] += 1
            return False
        self.latency.append(time.perf_counter() - t)
        resp = r.json()
        index = {f"v{v}": int(v) for v in vids.tolist()}
        try:
            shown = np.array([index[it["id"]] for it in resp["items"]], np.int64)  # (k,) in the slots served
        except (KeyError, TypeError):
            self.failed["rank: answer names an item not in the request"] += 1
            return False
        k, w = len(shown), self.world
        users, tsx, devs = np.full(k, u), np.full(k, wts), np.full(k, dev)
        pos = np.arange(k)
        labels, _ = w.outcomes(users, shown, tsx, pos, devs)
        arm, version = str(resp.get("arm")), str(resp.get("model_version"))
        tally = self.tallies.get((arm, version))
        if tally is None:
            tally = self.tallies[(arm, version)] = Tally(arm, version, resp.get("experiment"))
        tally.users.add(u)
        tally.requests += 1
        expected = w.expected(users, shown, tsx, pos, devs)
        add_expected(tally.truth, expected)
        tally.add_realised(labels)
        add_expected(self.candidate_order, w.expected(users, vids[:k], tsx, pos, devs))
        clicked = labels["click"] > 0
        if clicked.any():
            w.watched(users[clicked], shown[clicked])
        rid = resp.get("request_id", body["request_id"])
        if self.events is not None:
            self._log(self.events, resp, rid, u, shown, labels, expected)
        fb = self._feedback_events(rid, shown, labels)
        if fb:
            try:
                r = await client.post("/v1/feedback", json=fb)
            except httpx.HTTPError as e:
                self.feedback[f"failed: {type(e).__name__}"] += len(fb)
                return False
            if r.status_code != 200:
                self.feedback[f"failed: HTTP {r.status_code}"] += len(fb)
                return False
            out = r.json()
            self.feedback["accepted"] += int(out.get("accepted", 0))
            for d in out.get("dropped", []):
                self.feedback[f"dropped: {d.get('reason')}"] += 1
        return True

    @staticmethod
    def _feedback_events(rid: str, shown: np.ndarray, labels: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """What the user did: clicked items (click, watch time, like, rating when surveyed) and dismissed ones.

        Items left alone get no event: the service gives them the tasks' defaults (no click, no dismiss).
        """
        out = []
        for j in np.flatnonzero((labels["click"] > 0) | (labels["dismiss"] > 0)).tolist():
            if labels["click"][j] > 0:
                lab: dict[str, float] = {"click": 1, "watch_time": float(labels["watch_time"][j]),
                                         "like": int(labels["like"][j])}
                if not np.isnan(labels["rating"][j]):
                    lab["rating"] = float(labels["rating"][j])
            else:
                lab = {"dismiss": 1}
            out.append({"request_id": rid, "item_id": f"v{int(shown[j])}", "labels": lab})
        return out

    def _log(self, out: IO[str], resp: dict, rid: str, u: int, shown: np.ndarray, labels: dict[str, np.ndarray],
             expected: dict[str, np.ndarray]) -> None:
        """One event per impression, as `watchnext ab report --events` reads them (abreport.read_events)."""
        ts = round(time.time(), 3)
        exp = resp.get("experiment") or self.experiment
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        lines = []
        for j, v in enumerate(shown.tolist()):
            lab = {t: (None if np.isnan(a[j]) else float(a[j])) for t, a in labels.items()}
            truth = {t: round(float(expected[t][j]), 6) for t in ("click", "dismiss", "like", "watch_time", "rating")}
            lines.append(dumps({"ts": ts, "experiment": exp, "arm": resp.get("arm"),
                                "model_version": resp.get("model_version"), "request_id": rid,
                                "user": {"user_id": f"u{u}"}, "item_id": f"v{v}", "position": j,
                                "labels": lab, "truth": truth}))
        out.write("\n".join(lines) + "\n")

    # ------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        """Everything the run measured, JSON-ready.

        arms[i].truth: the world's expected metrics of what the arm showed, in the slots it showed them;
        arms[i].realised: the sampled outcomes' metrics and counts; candidate_order: the truth had the
        candidates been shown in the order the world generated them (a baseline for the ranker).
        """
        lat = np.asarray(self.latency) * 1000
        arms = []
        for t in self.tallies.values():
            r = t.realised
            arms.append({
                "arm": t.arm, "model_version": t.version, "experiment": t.experiment,
                "users": len(t.users), "requests": t.requests, "impressions": int(r["impressions"]),
                "truth": rates(t.truth),
                "realised": {**rates(r, rating_n="ratings"),
                             "counts": {"clicks": int(r["click"]), "watch_s": round(r["watch"], 1),
                                        "likes": int(r["like"]), "dismisses": int(r["dismiss"]),
                                        "ratings": int(r["ratings"])}},
            })
        ok = sum(t.requests for t in self.tallies.values())
        return {
            "url": self.url,
            "seconds": round(self.elapsed, 2),
            "interrupted": self.interrupted,
            "users": len(self.users),
            "concurrency": self.concurrency,
            "requests": self.sent,
            "succeeded": ok,
            "failed": dict(self.failed),
            "requests_per_s": round(ok / self.elapsed, 1) if self.elapsed > 0 else None,
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p99": round(float(np.percentile(lat, 99)), 2)}
            if len(lat) else None,
            "impressions": sum(a["impressions"] for a in arms),
            "feedback": dict(self.feedback),
            "arms": arms,
            "candidate_order": {"impressions": int(self.candidate_order["impressions"]),
                                "truth": rates(self.candidate_order)},
        }


def render_summary(s: dict[str, Any]) -> str:
    """A plain-text table: one column per arm, the world's truth of each metric next to the realised value."""
    fb = s["feedback"]
    dropped = sum(v for k, v in fb.items() if k != "accepted")
    lines = [
        ("interrupted: " if s["interrupted"] else "") + f"simulate traffic: {s['succeeded']:,} rankings from {s['users']:,} users in {s['seconds']:.1f} s "
        f"({s['requests_per_s'] or 0:,.1f}/s, {s['concurrency']} clients), {s['impressions']:,} impressions",
        f"failed requests: {sum(s['failed'].values()):,}" + "".join(f"; {k} {v:,}" for k, v in s["failed"].items())
        + (f"; latency p50 {s['latency_ms']['p50']:.1f} ms, p99 {s['latency_ms']['p99']:.1f} ms" if s["latency_ms"] else ""),
        f"feedback events: {fb.get('accepted', 0):,} accepted, {dropped:,} not"
        + "".join(f"; {k} {v:,}" for k, v in fb.items() if k != "accepted"),
        "true = the world's expected outcome of each item in the slot it was shown in; realised = what users did; "
        "candidate order = the expected outcome had the candidates been shown unranked, in the order candidate "
        "generation gave them (the baseline a ranking must beat)",
    ]
    cols = [(f"{a['experiment']}: " if a["experiment"] else "") + f"{a['arm']} (v{a['model_version']})"
            for a in s["arms"]] + ["candidate order"]
    rows = [["", *cols], ["users", *(f"{a['users']:,}" for a in s["arms"]), ""],
            ["impressions", *(f"{a['impressions']:,}" for a in s["arms"]), f"{s['candidate_order']['impressions']:,}"]]
    for m in METRICS:
        row = [m.title]
        for a in s["arms"]:
            tv, rv = a["truth"][m.name], a["realised"][m.name]
            row.append(f"{_num(tv)} (realised {_num(rv)})")
        row.append(_num(s["candidate_order"]["truth"][m.name]))
        rows.append(row)
    for key, title in [("clicks", "clicks"), ("likes", "likes"), ("dismisses", "dismisses"),
                       ("ratings", "survey answers"), ("watch_s", "watch time (s)")]:
        rows.append([title, *(f"{a['realised']['counts'][key]:,}" for a in s["arms"]), ""])
    lines.append(table(rows[0], rows[1:]))
    return "\n".join(lines)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
