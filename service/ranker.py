"""POST /v1/rank, the work: fill absent features from the store, encode once, run once, combine, keep top_k.

The only rank request in flight runs on the event loop (`rank_early`: the model
starts on the first share of the candidates while the rest are read); with
others in flight each runs in a worker thread (ONNX Runtime and the native scan
release the GIL), so the event loop stays free to read their bodies, feedback
and health checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from watchnext.config import Config
from watchnext.scoring import combine

from .experiments import LiveExperiment
from .features import FeatureStore, feature_key, key_feature
from .models import LoadedModel
from .observability import Metrics
from .request import SHARED, RankInput, RequestCodec

CONTROL = "control"


@dataclass
class Ranked:
    body: dict[str, Any]
    impression: dict[str, Any]
    candidates: int


class Ranker:
    def __init__(self, config: Config, store: FeatureStore, metrics: Metrics):
        self.config, self.store, self.metrics = config, store, metrics
        self.codec = RequestCodec(config)
        self.mode = config.score.combine
        self.source_features = {s: {f.name for f in config.features if f.source == s} for s in SHARED}
        self.user_key = key_feature(config, "user")  # the id that assigns an experiment's arm

    def rank(self, body: bytes, model: LoadedModel, live: LiveExperiment | None = None) -> Ranked:
        """Rank one request with `model` (the promoted version), or, when an experiment is live and the request
        names its user, with the user's arm's version and weights."""
        return self.finish(self.codec.parse(body), model, live)

    def looks_up(self, inp: RankInput) -> bool:
        """Whether ranking `inp` asks the feature store (it leaves features out): a network round trip."""
        return self.store.enabled and bool(self._store_plan(inp)[0])

    def finish(self, inp: RankInput, model: LoadedModel, live: LiveExperiment | None = None) -> Ranked:
        """`rank` for a parsed request."""
        arm, experiment, model, weights = self._route(inp.shared, model, live)
        self._prepare(inp)
        n = inp.n
        inputs = self.codec.encode(inp)
        session = model.session
        heads = session.run(inputs) if n else np.zeros((0, len(session.task_names)), np.float32)  # (B, T)
        return self._post(inp, heads, model, weights, arm, experiment)

    def rank_early(self, body: bytes, model: LoadedModel, live: LiveExperiment | None = None) -> Ranked | RankInput:
        """`rank`, with the model at work on the first share of the candidates while this thread reads the rest.

        For the only request in flight on the CPU, where the calling thread would otherwise parse and
        encode everything before the model starts (500 candidates: 0.3 ms), and the pool's thread would
        then start its part late (waking it: about 0.1 ms here). The first share runs whole on the pool;
        the rest, once read, as the session's other parts. Any doubt (a value to check, sections after
        the candidates that differ from those before them, a feature-store look-up, a body the scan leaves
        to orjson) and the first share's heads are dropped and the request takes `finish`, so what is served is the same. Returns the
        parsed request instead when ranking it waits on the feature store (the caller runs `finish` off
        the event loop).
        """
        parts = getattr(model.session, "parts", 1)
        early = self.codec.start(body, parts)
        if early is None or early.shared is None or early.scan.done:
            return self._ordinary(self.codec.finish_early(early) if early is not None else self.codec.parse(body),
                                  model, live)
        arm, experiment, routed, weights = self._route(early.shared, model, live)
        first, k = None, early.scan.n  # the first share's rows
        lookups = self.store.enabled and self._shared_lookups(early.shared)
        if not lookups and getattr(routed.session, "parts", 1) == parts:
            x = self.codec.encode_rows(early, 0, k)
            first = routed.session.submit(x) if x is not None else None
        try:
            inp = self.codec.finish_early(early)
            scanned = early.scan.done and inp.n == early.scan.n  # not parsed another way after all
            rest = None
            # the sections as read before the candidates must be the request's, to the bit (-0.0 is not 0.0)
            same = scanned and orjson.dumps(inp.shared) == orjson.dumps(early.shared)
            if first is not None and same and not self.looks_up(inp):
                rest = self.codec.encode_rows(early, k, inp.n)
            if rest is None:
                return self._ordinary(inp, model, live)
            self._prepare(inp)
            tail = routed.session.run(rest, parts - 1)  # before waiting for the share, which runs meanwhile
            heads = np.concatenate([first.result(), tail])
        finally:
            if first is not None and not first.done():  # an exception on the way: the pool's part ends first
                first.exception()
        return self._post(inp, heads, routed, weights, arm, experiment)

    def _ordinary(self, inp: RankInput, model: LoadedModel, live: LiveExperiment | None) -> Ranked | RankInput:
        """rank_early's way out: `finish` here, or the parsed request back when it waits on the feature store."""
        return inp if self.looks_up(inp) else self.finish(inp, model, live)

    def _route(self, shared: dict, model: LoadedModel, live: LiveExperiment | None) -> tuple:
        """(arm, experiment, model, weights) for a request with these shared sections."""
        uid = shared["user"].get(self.user_key) if live is not None and self.user_key else None
        if uid is None:
            return CONTROL, None, model, model.weights
        a, model, weights = live.route(str(uid), model)
        return a.name, live.exp.name, model, weights

    def _prepare(self, inp: RankInput) -> None:
        """Counts the request's unknown features and fills what it leaves out from the store."""
        if inp.unknown_features:
            self.metrics.unknown_features.inc(inp.unknown_features)
        if self.store.enabled:
            self.fill(inp)

    def _post(self, inp: RankInput, heads: np.ndarray, model: LoadedModel, weights: Any, arm: str,
              experiment: str | None) -> Ranked:
        """The response and the impression, from the heads of every candidate."""
        n = inp.n
        scores = combine(heads, weights, self.mode)  # (B,)
        finite = np.isfinite(heads).all(axis=1) & np.isfinite(scores)
        if not finite.all():  # never let NaN or inf reach a client; count it
            self.metrics.nonfinite.inc(int((~finite).sum()))
            idx = np.flatnonzero(finite)
        else:
            idx = np.arange(n)
        k = min(inp.top_k, len(idx))
        s = scores[idx]
        if k < len(idx):  # partial sort: the top k of B in O(B)
            part = np.argpartition(-s, k - 1)[:k]
            top = part[np.argsort(-s[part], kind="stable")]
        else:
            top = np.argsort(-s, kind="stable")
        order = idx[top]
        objects = inp.objects(order)
        if self.config.item_id is not None:
            ids = [o[self.config.item_id] for o in objects]
        else:
            ids = [str(i) for i in order.tolist()]
        names = model.session.task_names
        head_rows = heads[order].astype(np.float64).tolist()
        items = [
            {"id": i, "score": sc, "heads": dict(zip(names, h))}
            for i, sc, h in zip(ids, scores[order].tolist(), head_rows)
        ]
        version = str(model.version)
        served = inp.served(objects, self.codec.known["candidate"])
        impression = {
            "ts": time.time(),
            "request_id": inp.request_id,
            **{s: inp.shared[s] for s in SHARED},
            "experiment": experiment,
            "arm": arm,
            "model_version": version,
            "items": [(i, c, pos) for pos, (i, c) in enumerate(zip(ids, served))],
        }
        body_out = {"request_id": inp.request_id, "model_version": version, "arm": arm, "experiment": experiment,
                    "items": items}
        return Ranked(body_out, impression, n)

    def _shared_lookups(self, shared: dict) -> list[str]:
        """The shared sections that leave out something the store holds for them."""
        out = []
        for s in ("user", "query"):
            kf, sec = self.store.keys[s], shared[s]
            if kf is not None and sec.get(kf) is not None and not self.source_features[s] <= sec.keys():
                out.append(s)
        return out

    def _store_plan(self, inp: RankInput) -> tuple[list[str], list[str], np.ndarray]:
        """The store keys of what `inp` leaves out, the shared sections they fill, and the candidate rows."""
        if inp.store_plan is not None:
            return inp.store_plan
        shared_keys = self._shared_lookups(inp.shared)
        keys = [feature_key(s, inp.shared[s][self.store.keys[s]]) for s in shared_keys]
        rows = np.zeros(0, np.int64)
        if self.config.item_id is not None and inp.n:
            rows = np.flatnonzero(self.codec.missing_candidate_rows(inp))
            if len(rows):
                ids = [o[self.config.item_id] for o in inp.objects(rows)]
                keys += [feature_key("candidate", i) for i in ids]
        inp.store_plan = keys, shared_keys, rows
        return inp.store_plan

    def fill(self, inp: RankInput) -> None:
        """Read what the request left out from the feature store, in one round trip."""
        keys, shared_keys, rows = self._store_plan(inp)
        got = self.store.get(keys) if keys else None
        if not got:
            return
        for s, v in zip(shared_keys, got):
            stored = self.codec.clean_stored(s, v) if v is not None else None
            if stored:
                inp.shared[s] = {**stored, **inp.shared[s]}
        if len(rows):
            cands = [self.codec.clean_stored("candidate", v) if v is not None else None for v in got[len(shared_keys):]]
            if any(c is not None for c in cands):
                inp.candidates = self.codec.fill_candidates(inp.candidates, rows, cands)
