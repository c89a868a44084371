"""Online A/B experiments: definitions in Redis, the live one applied in every process, arms' models side by side.

One experiment is live at a time (its arms split every user with an id; a
second PUT of another name is refused with 409 until the first is stopped).
Redis holds the state, so every service process sharing the Redis serves the
same split, and a restarted process finds it again::

    wn:exp:live          string  the live experiment's definition (Experiment JSON); absent: none live
    wn:exp:defs          hash    name -> {"experiment": definition, "status": "live" | "stopped", "stopped_at": ts}
    wn:exp:ev:b2:<hash>  list    the experiment's closed impressions, JSON lines (one element per closed batch):
                                 {"ts", "user_id", "arm", "model_version", "labels"} — what the report reads;
                                 <hash> is `events_key`'s BLAKE2b of the name, so no client string becomes a key

Earlier versions kept each definition under wn:exp:def:<name> (moved into the
hash when a process starts) and events under wn:exp:ev:<name> (still read, and
cleared with the new key). Whatever is read back is validated again: an entry
that fails (written by an older version, or by hand) is skipped and logged —
a live one is refused, the list leaves it out, GET answers 409 — and never
turns into a 500 for every request.

Each process polls `wn:exp:live` every `[service] model_poll_s`. A new
definition is applied only after every arm's version is loaded and warmed
(`ModelManager.load`), by one reference assignment, so requests in flight keep
the experiment (and models) they took, and stopping never fails a request.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.json as pj

from analysis.abreport import LABELS, events_from_table
from analysis.abstats import CONFIDENCE, report, timeseries
from watchnext.config import Config
from watchnext.experiments import Arm, Experiment, ExperimentError, parse_json
from watchnext.scoring import weight_vector

from .errors import BadRequest, Conflict, NotFound
from .impressions import REDIS_ERRORS, redis_client
from .keys import EXP_DEFS, EXP_EVENTS, EXP_LIVE, events_key
from .models import LoadedModel, ModelManager, VersionRefused
from .observability import log

logger = logging.getLogger("watchnext.service.experiments")

LIVE, DEFS, EV = EXP_LIVE, EXP_DEFS, EXP_EVENTS
LEGACY_DEF = "wn:exp:def:"  # + name: one string per definition (earlier versions)


def _legacy_events_key(name: str) -> str:
    return EV + name  # earlier versions


# The live experiment's name, or nil when none is live or its definition cannot be read (a PUT replaces it).
_LIVE_NAME_LUA = """
local function live_name()
  local live = redis.call('GET', KEYS[1])
  if not live then return nil end
  local ok, def = pcall(cjson.decode, live)
  if ok and type(def) == 'table' and type(def['name']) == 'string' then return def['name'] end
  return nil
end
"""

# KEYS: live, definitions, events, legacy events. ARGV: name, live JSON, definition JSON.
# Returns the name of another live experiment (refused) or 'ok'.
_PUT_LUA = _LIVE_NAME_LUA + """
local cur = live_name()
if cur and cur ~= ARGV[1] then return cur end
if not cur then redis.call('DEL', KEYS[3], KEYS[4]) end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 'ok'
"""

# KEYS: live, definitions. ARGV: name, definition JSON ('': remove it). Stops NAME if it is the live one.
_STOP_LUA = _LIVE_NAME_LUA + """
if live_name() == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] == '' then redis.call('HDEL', KEYS[2], ARGV[1]) else redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return 'ok'
"""


@dataclass(frozen=True)
class LiveExperiment:
    """The experiment a request is routed by; immutable (swapped whole)."""

    exp: Experiment
    models: dict[int, LoadedModel]  # every pinned arm version, loaded and warmed
    raw: bytes  # the stored definition, to tell a change

    def route(self, user_id: str, promoted: LoadedModel) -> tuple[Arm, LoadedModel, np.ndarray]:
        """The user's arm, the model that scores for it, and its score weights (T,) in that model's task order."""
        arm = self.exp.arm_for(user_id)
        model = promoted if arm.version is None else self.models[arm.version]
        w = model.weights if arm.weights is None else weight_vector(model.session.task_names, arm.weights)
        return arm, model, w


def view(stored: dict[str, Any]) -> dict[str, Any]:
    """The API's form of a stored definition."""
    return {**stored["experiment"], "status": stored["status"], "stopped_at": stored.get("stopped_at")}


def read_stored(name: str, raw: bytes) -> dict[str, Any]:
    """A stored definition, validated as a PUT body is; raises ExperimentError naming what is wrong."""
    data = parse_json(raw)
    if not isinstance(data, dict) or not {"experiment", "status"} <= set(data):
        raise ExperimentError("<stored>", "expected {experiment, status, stopped_at}")
    exp = Experiment.from_dict(data["experiment"])
    if exp.name != name:
        raise ExperimentError("name", f"the definition stored as {name!r} is named {exp.name!r}")
    status, stopped_at = data["status"], data.get("stopped_at")
    if status not in ("live", "stopped"):
        raise ExperimentError("status", f"expected live or stopped, got {status!r}")
    if stopped_at is not None and (isinstance(stopped_at, bool) or not isinstance(stopped_at, (int, float))
                                   or not math.isfinite(stopped_at)):
        raise ExperimentError("stopped_at", f"expected Unix seconds, got {stopped_at!r}")
    return {"experiment": exp.to_dict(), "status": status, "stopped_at": stopped_at}


class Experiments:
    """The experiments API's state in Redis and the live experiment of this process."""

    def __init__(self, config: Config, url: str, models: ModelManager):
        self.config, self.models = config, models
        self.client = redis_client(url)  # replies are bytes (see redis_client): hence the casts
        self.live: LiveExperiment | None = None
        self.lock = threading.Lock()  # one apply at a time (poll thread and API)
        self._put = self.client.register_script(_PUT_LUA)
        self._stop_script = self.client.register_script(_STOP_LUA)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: bytes | None = None
        self._unreadable: dict[str, bytes] = {}  # name -> the stored entry last logged as unreadable

    # ------------------------------------------------------------ applying
    def load_arms(self, exp: Experiment) -> dict[int, LoadedModel]:
        """Load and warm every pinned arm version (reusing what is loaded); raises ExperimentError naming the arm."""
        out: dict[int, LoadedModel] = {}
        cur = self.live
        for i, a in enumerate(exp.arms):
            v = a.version
            if v is None or v in out:
                continue
            serving = self.models.current
            if cur is not None and v in cur.models:
                out[v] = cur.models[v]
            elif serving is not None and serving.version == v:
                out[v] = serving
            else:
                try:
                    out[v] = self.models.load(v)
                except VersionRefused as e:
                    raise ExperimentError(f"arms[{i}].version", f"version {v} cannot serve: {e}") from None
        return out

    def apply(self, raw: bytes | None, models: dict[int, LoadedModel] | None = None) -> None:
        """Make `raw` (a stored definition, None: no experiment) the live one in this process."""
        with self.lock:
            cur = self.live
            if raw is None:
                if cur is not None:
                    self.live = None
                    log(logger, logging.INFO, "experiment_stopped", experiment=cur.exp.name)
                return
            if cur is not None and cur.raw == raw:
                return
            exp = Experiment.from_json(raw, self.config)
            if models is None:
                models = self.load_arms(exp)
            self.live = LiveExperiment(exp, models, raw)
            self._refused = None
            log(logger, logging.INFO, "experiment_live", experiment=exp.name,
                arms=[{"name": a.name, "share": a.share, "version": a.version} for a in exp.arms])

    def refresh(self) -> None:
        raw = cast(bytes | None, self.client.get(LIVE))
        try:
            self.apply(raw)
        except ExperimentError as e:
            if raw != self._refused:  # one line per definition
                log(logger, logging.ERROR, "experiment_refused", reason=str(e),
                    keeping=self.live.exp.name if self.live else None)
                self._refused = raw

    def start(self, poll_s: float) -> None:
        def loop() -> None:
            failing = False
            while not self._stop.wait(poll_s):
                try:
                    self.refresh()
                    failing = False
                except REDIS_ERRORS as e:  # keep the current split while Redis is away
                    if not failing:
                        log(logger, logging.WARNING, "experiment_poll_failed", error=str(e)[:200])
                    failing = True
                except Exception as e:  # a poll must never kill the thread
                    log(logger, logging.ERROR, "experiment_poll_failed", error=repr(e))

        try:
            self.migrate()
            self.refresh()
        except REDIS_ERRORS as e:
            log(logger, logging.WARNING, "experiment_poll_failed", error=str(e)[:200])
        self._thread = threading.Thread(target=loop, name="watchnext-experiment-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.close()

    def migrate(self) -> None:
        """Move definitions of earlier versions (wn:exp:def:<name>) into the hash; one already there wins."""
        for key in self.client.scan_iter(match=LEGACY_DEF + "*", count=1000):
            raw = self.client.get(key)
            if raw is not None:
                self.client.hsetnx(DEFS, key[len(LEGACY_DEF):], raw)
            self.client.delete(key)

    # ------------------------------------------------------------ the API
    def _read(self, name: str, raw: bytes) -> dict[str, Any] | None:
        """`read_stored`, or None (logged once per entry) when the entry cannot be used."""
        try:
            return read_stored(name, raw)
        except ExperimentError as e:
            if self._unreadable.get(name) != raw:
                log(logger, logging.ERROR, "experiment_unreadable", experiment=name, reason=str(e)[:300])
                self._unreadable[name] = raw
            return None

    def stored(self, name: str) -> dict[str, Any]:
        raw = cast(bytes | None, self.client.hget(DEFS, name))
        if raw is None:
            raise NotFound("name", f"no experiment {name!r}")
        got = self._read(name, raw)
        if got is None:
            raise Conflict("name", f"the stored definition of {name!r} cannot be read (see the log); "
                                   "PUT it again or DELETE it")
        return got

    def put(self, name: str, body: Any, versions: list[int]) -> dict[str, Any]:
        """Validate, load every arm's version, store, and go live here (other processes follow within a poll)."""
        try:
            exp = Experiment.from_dict(body, self.config, name=name)
            exp.check_versions(versions)
        except ExperimentError as e:
            raise BadRequest("body" if e.field in ("", "<body>") else e.field, e.reason) from None
        live = self.client.get(LIVE)
        try:
            cur = None if live is None else Experiment.from_json(live)
        except ExperimentError:  # unreadable: refused by every process, so nothing is live; this PUT replaces it
            cur = None
        if cur is not None:
            if cur.name != name:
                raise Conflict("name", f"experiment {cur.name!r} is live; stop it first (one experiment at a time)")
            if exp.created_at is None:  # an update of the live experiment keeps its start
                exp = replace(exp, created_at=cur.created_at)
        if exp.created_at is None:
            exp = replace(exp, created_at=time.time())
        try:
            models = self.load_arms(exp)  # before it goes live anywhere
        except ExperimentError as e:
            raise Conflict(e.field, e.reason) from None
        raw = exp.to_json().encode()
        stored = {"experiment": exp.to_dict(), "status": "live", "stopped_at": None}
        other = self._put(keys=[LIVE, DEFS, events_key(name), _legacy_events_key(name)],
                          args=[name, raw, json.dumps(stored)])
        if other != b"ok":
            raise Conflict("name", f"experiment {other.decode()!r} is live; stop it first (one experiment at a time)")
        self.apply(raw, models)
        return view(stored)

    def delete(self, name: str) -> dict[str, Any]:
        """Stop `name` (its definition and events are kept); an entry that cannot be read is removed."""
        raw = cast(bytes | None, self.client.hget(DEFS, name))
        if raw is None:
            raise NotFound("name", f"no experiment {name!r}")
        stored = self._read(name, raw)
        if stored is not None and stored["status"] == "live":
            stored = {**stored, "status": "stopped", "stopped_at": time.time()}
        self._stop_script(keys=[LIVE, DEFS], args=[name, json.dumps(stored) if stored is not None else ""])
        if self.live is not None and self.live.exp.name == name:
            self.apply(None)
        if stored is None:
            return {"name": name, "status": "removed", "stopped_at": time.time()}
        return view(stored)

    def list(self) -> list[dict[str, Any]]:
        """Every readable experiment, by name."""
        entries = sorted(cast(dict[bytes, bytes], self.client.hgetall(DEFS)).items())
        read = [self._read(name.decode(errors="replace"), raw) for name, raw in entries]
        return [view(s) for s in read if s is not None]

    def legacy_events(self, name: str) -> bytes:
        """Closed impressions an earlier version kept under wn:exp:ev:<name> (nothing writes there now)."""
        return b"\n".join(cast(list[bytes], self.client.lrange(_legacy_events_key(name), 0, -1)))

    def events(self, name: str) -> bytes:
        """The experiment's closed impressions as JSON lines (under either key scheme)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(_legacy_events_key(name), 0, -1)
        pipe.lrange(events_key(name), 0, -1)
        legacy, current = pipe.execute()
        return b"\n".join(legacy + current)


# ---------------------------------------------------------------- the report

_EVENT_SCHEMA = pa.schema([
    ("ts", pa.float64()),
    ("user_id", pa.string()),
    ("arm", pa.string()),
    ("labels", pa.struct([(name, pa.float64()) for name in LABELS])),
])


def report_of(exp: Experiment, lines: bytes, confidence: float = CONFIDENCE, points: int = 0) -> dict[str, Any]:
    """abstats.report over the experiment's closed impressions (JSON lines, parsed by Arrow in one pass);
    with `points`, also each metric's cumulative estimate at that many times (`timeseries`, for the chart)."""
    if lines.strip():
        table = pj.read_json(pa.BufferReader(lines), parse_options=pj.ParseOptions(
            explicit_schema=_EVENT_SCHEMA, unexpected_field_behavior="ignore"),
            read_options=pj.ReadOptions(block_size=1 << 24))
    else:
        table = _EVENT_SCHEMA.empty_table()
    table = table.append_column("experiment", pa.array([exp.name] * table.num_rows, pa.string()))
    events, dropped = events_from_table(table, exp)
    rep = report(exp, events, None, confidence)
    rep["skipped_events"] = dropped
    if points:
        rep["timeseries"] = timeseries(exp, events, points, confidence)
    return rep
