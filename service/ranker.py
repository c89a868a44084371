"""POST /v1/rank, the work: fill absent features from the store, encode once, run once, combine, keep top_k.

Runs in a worker thread (ONNX Runtime releases the GIL), so the event loop
stays free for other requests, feedback and health checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

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
        arm, experiment, weights = CONTROL, None, model.weights
        uid = inp.shared["user"].get(self.user_key) if live is not None and self.user_key else None
        if uid is not None:
            a, model, weights = live.route(str(uid), model)
            arm, experiment = a.name, live.exp.name
        if inp.unknown_features:
            self.metrics.unknown_features.inc(inp.unknown_features)
        if self.store.enabled:
            self.fill(inp)
        n = inp.n
        inputs = self.codec.encode(inp)
        session = model.session
        heads = session.run(inputs) if n else np.zeros((0, len(session.task_names)), np.float32)  # (B, T)
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
        names = session.task_names
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

    def _store_plan(self, inp: RankInput) -> tuple[list[str], list[str], np.ndarray]:
        """The store keys of what `inp` leaves out, the shared sections they fill, and the candidate rows."""
        if inp.store_plan is not None:
            return inp.store_plan
        keys: list[str] = []
        shared_keys: list[str] = []
        for s in ("user", "query"):
            kf, sec = self.store.keys[s], inp.shared[s]
            if kf is not None and sec.get(kf) is not None and not self.source_features[s] <= sec.keys():
                keys.append(feature_key(s, sec[kf]))
                shared_keys.append(s)
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
