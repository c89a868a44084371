"""POST /v1/rank, the work. One path, in these steps:

1. parse    body bytes -> `RankInput` (service/request.py): the request id, the user,
            query and context sections, top_k, the candidates' ids and any features
            sent with them (JSON by msgspec, or an Arrow IPC stream).
2. plan     what the online store must supply: the user and the query video when the
            request leaves some of their features out, and every candidate that lacks a
            feature. The cache answers what it holds (service/features.py).
3. fetch    the cache's misses from Redis, every source in one round trip (only when
            there are misses; with Redis down the request goes on without them).
4. route    the live experiment's arm for the user (its version and score weights),
            else the promoted version.
5. encode   the sent values with the trainer's encoder (`Encoder.encode_columns`);
            stored rows fill what was not sent (sent values win); the user, query and
            context rows are broadcast to every candidate (`Encoder.assemble`).
6. run      ONNX Runtime on the batch -> heads (B, T) in label units.
7. answer   the weighted score (watchnext.scoring), the top k, the response, and the
            impression to log (the top k's features as served). On the `explore_share`
            of requests chosen by a hash of the request_id (so a retry gets the same
            answer), the top k are shown in RandPair order (watchnext/explore.py) and
            the impression records each item's propensity and original rank.

The request arrives from `rank_request` in app.py, which service/front.py calls in front
of FastAPI's middleware stack. Steps 1-2 run on the event loop; app.py runs 3-7
there too when the request is the only one in flight, else on a worker thread.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import orjson
import pyarrow as pa

from watchnext.config import Config
from watchnext.encoding import Columns, Encoder, Problems, overlay, section_type
from watchnext.entities import key_feature
from watchnext.explore import explore_draw, explore_order
from watchnext.scoring import top_k

from .errors import BadRequest
from .experiments import LiveExperiment
from .features import OnlineFeatures, Plan
from .models import LoadedModel
from .observability import Metrics
from .request import SHARED, RankInput, RequestCodec

CONTROL = "control"
SECTION_MEMO = 20_000  # encoded shared sections remembered (a few hundred bytes each)


@dataclass
class Ranked:
    body: dict[str, Any]
    impression: dict[str, Any]
    candidates: int


@dataclass
class Prepared:
    """A parsed request and its store plan (steps 1-2); `needs_fetch`: step 3 goes to Redis."""

    inp: RankInput
    plan: Plan
    candidate_rows: np.ndarray  # the candidates the plan looks up (rows of the request)

    @property
    def needs_fetch(self) -> bool:
        return self.plan.misses > 0


class Ranker:
    def __init__(self, config: Config, store: OnlineFeatures, metrics: Metrics):
        self.config, self.store, self.metrics = config, store, metrics
        self.codec = RequestCodec(config)
        self.encoder: Encoder = store.encoder
        self.mode = config.score.combine
        self.types = {s: section_type(config, s) for s in SHARED}
        self.features = {s: frozenset(f.name for f in config.features if f.source == s) for s in SHARED}
        self.keys = {s: key_feature(config, s) for s in (*SHARED, "candidate")}
        self.item_id = config.item_id
        self.explore_share = config.service.explore_share
        # encoded user / query / context sections by their values: a context such as {"device": "mobile"}
        # repeats across requests, and a one-row Arrow encode costs more than the whole gather of 500 candidates
        self._sections: dict[bytes, Columns] = {}

    # ------------------------------------------------------------ 1-2
    def prepare(self, body: bytes, content_type: str | None = None) -> Prepared:
        """Parse the body and look up what it leaves to the store in the cache."""
        inp = self.codec.parse(body, content_type)
        if inp.unknown_features:
            self.metrics.unknown_features.inc(inp.unknown_features)
        wants: dict[str, list[str]] = {}
        for s in ("user", "query"):
            k, sec = self.keys[s], inp.shared[s]
            if k is not None and sec.get(k) is not None and not self.features[s] <= sec.keys():
                wants[s] = [sec[k]]
        rows = np.zeros(0, np.int64)
        if inp.ids is not None:
            rows = np.arange(inp.n) if inp.candidates is None else np.flatnonzero(self._lacking(inp.candidates))
            if len(rows):
                wants["candidate"] = inp.ids if len(rows) == inp.n and isinstance(inp.ids, list) else inp.ids_at(rows)
        if not self.store.enabled:
            wants = {}
        return Prepared(inp, self.store.plan(wants), rows)

    def _lacking(self, arr: pa.StructArray) -> np.ndarray:
        """(n,) bool: candidates sent without some feature (besides the id)."""
        out = np.zeros(len(arr), bool)
        for i, f in enumerate(arr.type):
            if f.name != self.item_id and arr.field(i).null_count:
                out |= np.asarray(arr.field(i).is_null())
        return out

    # ------------------------------------------------------------ 3-7
    def rank(self, prep: Prepared, model: LoadedModel, live: LiveExperiment | None = None) -> Ranked:
        """Rank a prepared request with `model` (the promoted version), or, when an experiment is live and the
        request names its user, with the user's arm's version and weights."""
        if prep.needs_fetch:
            self.store.fetch(prep.plan)
        inp = prep.inp
        arm, experiment, model, weights = self._route(inp.shared, model, live)
        inputs, served = self._encode(prep)
        session = model.session
        heads = session.run(inputs) if inp.n else np.zeros((0, len(session.task_names)), np.float32)  # (B, T)
        return self._answer(prep, served, heads, model, weights, arm, experiment)

    def encode(self, prep: Prepared) -> dict[str, np.ndarray]:
        """The model's inputs for a prepared request (steps 3 and 5; tests and benchmarks)."""
        if prep.needs_fetch:
            self.store.fetch(prep.plan)
        return self._encode(prep)[0]

    def _route(self, shared: dict, model: LoadedModel, live: LiveExperiment | None) -> tuple:
        """(arm, experiment, model, weights) for a request with these shared sections."""
        uid = shared["user"].get(self.keys["user"]) if live is not None and self.keys["user"] else None
        if uid is None:
            return CONTROL, None, model, model.weights
        assert live is not None  # uid is None without a live experiment
        a, model, weights = live.route(str(uid), model)
        return a.name, live.exp.name, model, weights

    def _encode(self, prep: Prepared) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The model's inputs, and what serving used beside the request: the shared sections as served and the
        candidates' stored entries."""
        inp, plan = prep.inp, prep.plan
        problems = Problems(1)
        sections: dict[str, Columns] = {}
        shared = {}  # store entries of the shared sections, for the impression
        for s in SHARED:
            sec = inp.shared[s]
            if s in plan.ids:
                st = self.store.stored(plan, s)
                if st.found[0] and sec.keys() == {self.keys[s]}:  # the request names it, the store has the rest
                    c = st.columns
                else:
                    c = overlay(self._section(s, sec, problems), st.columns)
                shared[s] = st.texts(np.zeros(1, np.int64))[0]
            else:
                c = self._section(s, sec, problems)
            sections[s] = c
        bad = problems.first()
        if bad is not None:
            _, field, reason = bad
            raise BadRequest(field, reason)
        n = inp.n
        stored = self.store.stored(plan, "candidate") if "candidate" in plan.ids else None
        if inp.candidates is not None:
            problems = Problems(n)
            cand = self.encoder.encode_columns("candidate", inp.candidates, n, problems, self._hashed(inp))
            bad = problems.first()
            if bad is not None:
                row, field, reason = bad  # field: candidate.NAME
                raise BadRequest(f"candidates[{row}]{field.removeprefix('candidate')}", reason)
            if stored is not None:  # fill the rows that lack something (sent values win)
                rows = prep.candidate_rows
                filled = overlay(cand.take(rows), stored.columns)
                for name in cand.values:
                    cand.values[name][rows] = filled.values[name]
                    cand.present[name][rows] = filled.present[name]
        elif stored is not None and stored.found.all():  # every id in the store: its rows are the inputs
            cand = stored.columns
        else:
            col = inp.ids if isinstance(inp.ids, pa.Array) else pa.array(inp.ids or [], pa.string())
            ids = pa.StructArray.from_arrays([col], names=[self.item_id])
            cand = self.encoder.encode_columns("candidate", ids if n else None, n, Problems(n), self._hashed(inp))
            if stored is not None:
                cand = overlay(cand, stored.columns)
        sections["candidate"] = cand
        return self.encoder.assemble(sections, n), {"shared": shared, "stored": stored}

    def _hashed(self, inp: RankInput) -> dict[str, np.ndarray] | None:
        """The candidates' id rows the parse hashed already (an Arrow body's), for the encoder."""
        return {self.item_id: inp.id_rows} if inp.id_rows is not None and self.item_id is not None else None

    def _section(self, source: str, sec: dict[str, Any], problems: Problems) -> Columns:
        """One shared section's row, encoded (remembered by its values; a bad value is never remembered)."""
        key = source.encode() + orjson.dumps(sec)
        got = self._sections.get(key)
        if got is None:
            mine = Problems(1)
            got = self.encoder.encode_columns(source, pa.array([sec], type=self.types[source]) if sec else None, 1,
                                              mine)
            if mine.checks:
                problems.checks += mine.checks
                return got
            if len(self._sections) >= SECTION_MEMO:
                try:  # the oldest (another thread may be at it too)
                    self._sections.pop(next(iter(self._sections)), None)
                except (StopIteration, RuntimeError):
                    pass
            self._sections[key] = got
        return got

    def _answer(self, prep: Prepared, served: dict[str, Any], heads: np.ndarray, model: LoadedModel, weights: Any,
                arm: str, experiment: str | None) -> Ranked:
        """The response and the impression, from the heads of every candidate."""
        inp = prep.inp
        n = inp.n
        # the top k, best first, ties in request order, without a row whose output is not finite (never let NaN
        # or inf reach a client): one compiled pass. combine, two finiteness checks and a sort, each a numpy call
        # whose code the request must first bring into the CPU's caches, took 100-112 us after a 3 ms sleep and an
        # ONNX Runtime call; the pass 64-75 (500 candidates, three runs in turns, 2026-12-04, 22:50)
        order, top_scores, dropped = top_k(heads, weights, self.mode, inp.top_k)
        if dropped:
            self.metrics.nonfinite.inc(dropped)
        explore = self._explore(inp.request_id, top_scores) if self.explore_share > 0 else None
        if explore is not None:
            order, top_scores = order[explore["rank"]], top_scores[explore["rank"]]
        ids = inp.ids_at(order) if inp.ids is not None else [str(i) for i in order.tolist()]
        names = model.session.task_names
        items = [
            {"id": i, "score": sc, "heads": dict(zip(names, h))}
            for i, sc, h in zip(ids, top_scores.tolist(), heads[order].tolist())
        ]
        version = str(model.version)
        impression = {
            "ts": time.time(),
            "request_id": inp.request_id,
            **{s: _Merged(served["shared"][s], inp.shared[s]) if s in served["shared"] else inp.shared[s]
               for s in SHARED},
            "experiment": experiment,
            "arm": arm,
            "model_version": version,
            "items": self._served(prep, served["stored"], order, ids),
        }
        if explore is not None:
            impression["explore"] = explore
        body = {"request_id": inp.request_id, "model_version": version, "arm": arm, "experiment": experiment,
                "items": items}
        return Ranked(body, impression, n)

    def _explore(self, request_id: str, top_scores: np.ndarray) -> dict[str, np.ndarray] | None:
        """For an explored request: {"rank": the original rank of each shown position (a permutation of the top
        k, adjacent pairs swapped), "propensity": each shown item's probability of being there}; else None."""
        draw = explore_draw(request_id, self.explore_share)
        if draw is None:
            return None
        rng, offset = draw
        perm, propensity = explore_order(top_scores, rng, offset)  # top_scores are best first: perm is the rank
        self.metrics.explored.inc()
        return {"rank": perm, "propensity": propensity}

    def _served(self, prep: Prepared, stored: Any, order: np.ndarray, ids: list[str]) -> ServedItems:
        """The features the top candidates were ranked with, worked out when the impression is written (off the
        request's path): their store entries, then the values sent."""
        inp = prep.inp
        raw = None
        if stored is not None:  # the store entries' JSON, taken now for the shown candidates only
            if len(prep.candidate_rows) == inp.n:  # every candidate was looked up (ids only): row for row
                raw = stored.texts(order)
            else:
                where = np.full(inp.n, -1, np.int64)  # request row -> row of the stored entries
                where[prep.candidate_rows] = np.arange(len(prep.candidate_rows))
                at = where[order]
                raw = np.full(len(at), b"", object)
                raw[at >= 0] = stored.texts(at[at >= 0])  # only the shown rows that were looked up
        return ServedItems(ids, raw, inp.candidates, order)


class ServedItems:
    """An impression's items, as the impression log's writer thread turns them into its record (`for_record`):
    each shown candidate's id, its store entry's JSON as read from Redis, and its position; and the values the
    request sent with its candidates (`sent`, every candidate: the shown ones, rows `order`, are taken there, off
    the request's path)."""

    def __init__(self, ids: list[str], raw: np.ndarray | None, sent: pa.StructArray | None, order: np.ndarray):
        self.ids, self.raw, self.sent, self.order = ids, raw, sent, order

    def for_record(self) -> tuple[list[tuple[str, dict[str, Any] | msgspec.Raw, int]], bytes | None]:
        """The items as the impression's record writes them, and the rows the request sent for them.

        An item is (id, its store entry's JSON as it is, `msgspec.Raw`, neither parsed nor encoded again, or {}
        where the candidate was not looked up, position). The values the request sent for the shown candidates
        go as one Arrow IPC stream of their rows in shown order, not as Python objects: the record's reader lays
        them over the store entry and sets the item id (`ImpressionLog.examples_of`). In groups of 12 after an
        ONNX Runtime call, the writer thread made a request's record in 121-134 us, where turning the rows into
        objects, merging them and writing their JSON took 189-206, and the closer read either in 173-183
        (docs/benchmarks.md, 2026-12-04, 21:36 UTC)."""
        raw = self.raw.tolist() if self.raw is not None else [b""] * len(self.ids)
        items: list[tuple[str, dict[str, Any] | msgspec.Raw, int]] = [
            (i, msgspec.Raw(r) if r else {}, pos) for pos, (i, r) in enumerate(zip(self.ids, raw))]
        if self.sent is None:
            return items, None
        rows = pa.RecordBatch.from_struct_array(self.sent).take(self.order)
        return items, _schema_message(self.sent.type) + rows.serialize().to_pybytes()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """About what this holds until it is written (the impression buffer's bound counts it)."""
        n = 128 * len(self.ids) + sum(len(i) for i in self.ids)
        n += sum(map(len, self.raw)) + 40 * len(self.raw) if self.raw is not None else 0  # JSON bytes of the top k
        # the buffers `sent` keeps alive, whole: an Arrow body's columns are views of the body (`nbytes`, the bytes
        # of the rows alone, reads every column's offsets: 43 us of the request's time after an ONNX Runtime run,
        # against 9)
        return n + (self.sent.get_total_buffer_size() if self.sent is not None else 0)


@functools.cache
def _schema_message(t: pa.StructType) -> bytes:
    """The IPC message of the schema of a struct's fields: with a record batch's message after it, an Arrow IPC
    stream (one per config: the candidates' struct type is the config's)."""
    return pa.schema(list(t)).serialize().to_pybytes()


class _Merged:
    """A shared section as served: its store entry with the request's values over it, worked out when the
    impression is written (`resolve`)."""

    def __init__(self, raw: bytes, sent: dict[str, Any]):
        self.raw, self.sent = raw, sent

    def resolve(self) -> dict[str, Any]:
        return {**_entry(self.raw), **self.sent}

    @property
    def nbytes(self) -> int:
        return 256 + len(self.raw) + 96 * len(self.sent)


def _entry(raw: bytes) -> dict[str, Any]:
    """A stored entity's JSON (not trusted: anything but an object reads as nothing)."""
    if not raw:
        return {}
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return d if isinstance(d, dict) else {}
