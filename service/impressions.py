"""Impressions, feedback and the attribution window: how served results become training examples.

Redis layout (all keys expire on their own as a safety net)::

    wn:imp:<request_id>       hash   "_": the shared sections, ts, arm, model version (JSON)
                                     "_due": when the attribution window closes (Unix seconds)
                                     "i:<item id>": {"candidate": features as served, "position": slot}
    wn:imp:due                zset   request_id scored by its window's close
    wn:fb:<request_id>        list   feedback events in arrival order (JSON)
    wn:imp:done:<request_id>  string set for a day once the window closed (feedback then: "expired")

The response never waits for Redis: impressions go to an in-memory buffer
that a thread writes in pipelined batches every `flush_interval_s` (kept and
retried while Redis is down, bounded by `impression_buffer`; the oldest are
dropped and counted beyond it). Feedback is checked and appended atomically
(a Lua script), so feedback racing the window's close is either joined or
reported expired, never lost silently. When a window closes, each served item
becomes one labelled example (CONTRACT §2) on the training stream
(`XADD <[stream] key> MAXLEN ~ <maxlen> * example <json>`), with the task
defaults for labels that got no feedback (click -> 0; tasks without a default,
the satisfaction labels, stay missing).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from watchnext.config import Config
from watchnext.entities import key_feature

from .observability import Metrics, log

logger = logging.getLogger("watchnext.service.impressions")

IMP = "wn:imp:"
DUE = "wn:imp:due"
FB = "wn:fb:"
DONE = "wn:imp:done:"
EXP_EVENTS = "wn:exp:ev:"  # per experiment: its closed impressions as JSON lines (see service/experiments.py)
DONE_TTL_S = 86_400
CLOSE_BATCH = 500
CLOSE_MARGIN_S = 0.25
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

# KEYS: impression, feedback list, tombstone. ARGV: item field, event, now, ttl
_FEEDBACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 'expired' end
  return 'unknown'
end
local due = redis.call('HGET', KEYS[1], '_due')
if due and tonumber(due) <= tonumber(ARGV[3]) then return 'expired' end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 'unknown_item' end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 'ok'
"""

# KEYS: due zset. ARGV: now, limit. Pops the due request ids atomically (one closer per id).
_POP_DUE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return ids
"""

REASONS = {
    "unknown": "no impression with this request_id (never served, or served by another deployment)",
    "expired": "the attribution window of this impression has closed",
    "unknown_item": "item_id was not among the items served for this request_id",
}


def redis_client(url: str, timeout_s: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 1.0),
                                retry=Retry(NoBackoff(), 0))


class ImpressionLog:
    """Buffers impressions, writes them in batches, joins feedback and closes attribution windows."""

    def __init__(self, config: Config, url: str, metrics: Metrics, flush_interval_s: float = 0.05,
                 max_buffer: int = 100_000, close_interval_s: float = 0.0):
        self.config, self.metrics = config, metrics
        self.client = redis_client(url)
        self.window = config.service.attribution_window_s
        self.ttl = int(self.window * 2 + 3600)
        self.flush_interval_s, self.max_buffer = flush_interval_s, max_buffer
        # how long an unknown request_id is waited for: a replica's flush interval, its write, and a margin
        self.unknown_grace_s = 3 * flush_interval_s + 0.1
        self.close_interval_s = close_interval_s or min(1.0, max(0.05, self.window / 4))
        self.buf: deque[dict] = deque()
        self.pending: dict[str, int] = {}  # request_id -> impressions of it still in the buffer
        self._buf_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._feedback = self.client.register_script(_FEEDBACK_LUA)
        self._pop_due = self.client.register_script(_POP_DUE_LUA)
        self.defaults = {t.name: t.default for t in config.tasks}
        self.tasks = {t.name: t for t in config.tasks}
        self.user_key = key_feature(config, "user")

    # ------------------------------------------------------------ impressions
    def add(self, impression: dict[str, Any]) -> None:
        """Queue one response's impression; never blocks on Redis."""
        with self._buf_lock:
            self.buf.append(impression)
            rid = impression["request_id"]
            self.pending[rid] = self.pending.get(rid, 0) + 1
            while len(self.buf) > self.max_buffer:
                old = self.buf.popleft()
                self._unpend(old["request_id"])
                self.metrics.impressions_dropped.inc()
            self.metrics.log_backlog.set(len(self.buf))

    def _unpend(self, rid: str) -> None:
        n = self.pending.get(rid, 0) - 1
        if n > 0:
            self.pending[rid] = n
        else:
            self.pending.pop(rid, None)

    def flush(self) -> int:
        """Write everything buffered; on a Redis error the batch goes back to the buffer. Returns the count written."""
        with self._flush_lock:
            with self._buf_lock:
                batch = list(self.buf)
                self.buf.clear()
            if not batch:
                return 0
            try:
                pipe = self.client.pipeline(transaction=False)
                for imp in batch:
                    self._write(pipe, imp)
                pipe.execute()
            except REDIS_ERRORS as e:
                with self._buf_lock:
                    self.buf.extendleft(reversed(batch))
                    while len(self.buf) > self.max_buffer:
                        self._unpend(self.buf.popleft()["request_id"])
                        self.metrics.impressions_dropped.inc()
                    self.metrics.log_backlog.set(len(self.buf))
                self.metrics.redis_up.set(0)
                raise ConnectionError(str(e)) from None
            with self._buf_lock:
                for imp in batch:
                    self._unpend(imp["request_id"])
                self.metrics.log_backlog.set(len(self.buf))
            self.metrics.impressions_logged.inc(len(batch))
            self.metrics.redis_up.set(1)
            return len(batch)

    def _write(self, pipe, imp: dict[str, Any]) -> None:
        rid = imp["request_id"]
        key = IMP + rid
        due = imp["ts"] + self.window
        shared = {k: imp.get(k) for k in ("ts", "request_id", "user", "query", "context", "experiment", "arm",
                                          "model_version")}
        for k in ("user", "query", "context"):  # sections the store filled are merged here, off the request's path
            if hasattr(shared[k], "resolve"):
                shared[k] = shared[k].resolve()
        # orjson: this runs for every response, beside the rank threads
        mapping = {"_": orjson.dumps(shared), "_due": repr(due)}
        for item_id, cand, pos in imp["items"]:
            mapping[f"i:{item_id}"] = orjson.dumps({"candidate": cand, "position": pos})
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.ttl)
        pipe.zadd(DUE, {rid: due})

    def backlog(self) -> int:
        return len(self.buf)

    # ------------------------------------------------------------ feedback
    def record_feedback(self, events: list[dict[str, Any]]) -> list[str]:
        """Join checked feedback events with their impressions. Returns 'ok' or a reason key per event.

        An 'unknown' answer may be early: another replica may still hold the impression in its buffer (it
        writes every flush interval). The caller looks again after `unknown_grace_s` (app.py does, without
        holding a thread) and then counts the final answers with `count_feedback`.
        Raises ConnectionError when Redis cannot be reached.
        """
        if any(e["request_id"] in self.pending for e in events):
            self.flush()  # the impression may still be in the buffer
        return self._join(events)

    def count_feedback(self, results: list[str]) -> None:
        for r in results:
            self.metrics.feedback.inc(1, "accepted" if r == "ok" else r)

    def _join(self, events: list[dict[str, Any]]) -> list[str]:
        now = time.time()
        try:
            pipe = self.client.pipeline(transaction=False)
            for e in events:
                rid = e["request_id"]
                payload = orjson.dumps({"item_id": e["item_id"], "labels": e["labels"], "ts": now})
                self._feedback(keys=[IMP + rid, FB + rid, DONE + rid], args=[f"i:{e['item_id']}", payload, now, self.ttl],
                               client=pipe)
            res = pipe.execute()
        except REDIS_ERRORS as e:
            self.metrics.redis_up.set(0)
            raise ConnectionError(str(e)) from None
        return [r.decode() if isinstance(r, bytes) else str(r) for r in res]

    # ------------------------------------------------------------ closing windows
    def close_due(self, now: float | None = None) -> int:
        """Turn every impression whose window has closed into labelled examples on the stream. Returns examples sent."""
        # a small margin: feedback checked a moment before `now` can still be in flight
        now = (time.time() - CLOSE_MARGIN_S) if now is None else now
        sent = 0
        while True:
            ids = [i.decode() for i in self._pop_due(keys=[DUE], args=[now, CLOSE_BATCH])]
            if not ids:
                return sent
            examples = self._examples_for(ids)
            examples.sort(key=lambda e: (e["ts"], e["request_id"], e.get("position") or 0))
            st = self.config.stream
            pipe = self.client.pipeline(transaction=False)
            for ex in examples:
                pipe.xadd(st.key, {"example": json.dumps(ex, separators=(",", ":"))}, maxlen=st.maxlen, approximate=True)
            for name, lines in self.experiment_events(examples).items():
                pipe.rpush(EXP_EVENTS + name, b"\n".join(lines))
            for rid in ids:
                pipe.delete(IMP + rid, FB + rid)
                pipe.set(DONE + rid, b"1", ex=DONE_TTL_S)
            pipe.execute()
            self.metrics.examples.inc(len(examples))
            sent += len(examples)
            if len(ids) < CLOSE_BATCH:
                return sent

    def _examples_for(self, ids: list[str]) -> list[dict]:
        """The labelled examples of impressions `ids`: their records and feedback, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(IMP + rid)
            pipe.lrange(FB + rid, 0, -1)
        res = pipe.execute()
        examples: list[dict] = []
        for i in range(len(ids)):
            examples += self.examples_of(res[2 * i], res[2 * i + 1])
        return examples

    def open_events(self, name: str) -> bytes:
        """Experiment `name`'s impressions whose window is still open, with the feedback so far (labels without
        feedback take the task defaults), as the report's JSON lines. Read after the closed ones: an impression
        closing in between is missed, never counted twice."""
        ids = [i.decode() for i in self.client.zrange(DUE, 0, -1)]
        lines: list[bytes] = []
        for at in range(0, len(ids), CLOSE_BATCH):
            chunk = ids[at:at + CLOSE_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for rid in chunk:
                pipe.hget(IMP + rid, "_")
            shared = pipe.execute()
            mine = [rid for rid, sh in zip(chunk, shared) if sh is not None and json.loads(sh).get("experiment") == name]
            if not mine:
                continue
            lines += self.experiment_events(self._examples_for(mine)).get(name, [])
        return b"\n".join(lines)

    def experiment_events(self, examples: list[dict[str, Any]]) -> dict[str, list[bytes]]:
        """The report's compact events (ts, user_id, arm, model_version, labels) of examples served in experiments."""
        out: dict[str, list[bytes]] = {}
        for ex in examples:
            name = ex.get("experiment")
            if name is None:
                continue
            ev = {"ts": ex["ts"], "user_id": str(ex["user"].get(self.user_key)), "arm": ex["arm"],
                  "model_version": ex["model_version"], "labels": ex["labels"]}
            out.setdefault(name, []).append(json.dumps(ev, separators=(",", ":")).encode())
        return out

    def examples_of(self, imp: dict[bytes, bytes], feedback: list[bytes]) -> list[dict[str, Any]]:
        if not imp or b"_" not in imp:
            return []
        shared = json.loads(imp[b"_"])
        got: dict[str, dict[str, Any]] = {}
        for raw in feedback:
            ev = json.loads(raw)
            labels = got.setdefault(ev["item_id"], {})
            labels.update({k: v for k, v in ev["labels"].items() if v is not None})  # later feedback wins
        out = []
        for field, raw in imp.items():
            if not field.startswith(b"i:"):
                continue
            item_id = field[2:].decode()
            item = json.loads(raw)
            given = got.get(item_id, {})
            labels = {t: given.get(t, self.defaults[t]) for t in self.tasks}
            out.append({
                "ts": shared["ts"], "request_id": shared["request_id"],
                "user": shared["user"], "query": shared["query"], "context": shared["context"],
                "candidate": item["candidate"], "position": item["position"], "labels": labels,
                "experiment": shared.get("experiment"), "arm": shared.get("arm"),
                "model_version": shared.get("model_version"),
            })
        return out

    # ------------------------------------------------------------ threads
    def start(self) -> None:
        def flusher() -> None:
            delay = self.flush_interval_s
            while not self._stop.wait(delay):
                try:
                    self.flush()
                    if delay != self.flush_interval_s:
                        log(logger, logging.INFO, "impression_log_recovered")
                    delay = self.flush_interval_s
                except ConnectionError as e:
                    if delay == self.flush_interval_s:  # one line per outage
                        log(logger, logging.WARNING, "impression_log_unavailable", error=str(e)[:200],
                            buffered=len(self.buf))
                    delay = min(1.0, delay * 2)
                except Exception as e:
                    log(logger, logging.ERROR, "impression_flush_failed", error=repr(e))

        def closer() -> None:
            failing = False
            while not self._stop.wait(self.close_interval_s):
                try:
                    self.close_due()
                    failing = False
                except REDIS_ERRORS as e:
                    if not failing:
                        log(logger, logging.WARNING, "attribution_close_failed", error=str(e)[:200])
                    failing = True
                except Exception as e:
                    log(logger, logging.ERROR, "attribution_close_failed", error=repr(e))

        for fn in (flusher, closer):
            t = threading.Thread(target=fn, name=f"watchnext-{fn.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout_s: float = 10.0) -> int:
        """Stop the threads and flush what is buffered (retrying until `timeout_s`). Returns impressions left unwritten."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.buf and time.monotonic() < deadline:
            try:
                self.flush()
            except ConnectionError:
                time.sleep(0.2)
        left = len(self.buf)
        log(logger, logging.INFO if not left else logging.ERROR, "impression_log_stopped", unwritten=left)
        self.client.close()
        return left

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except REDIS_ERRORS:
            return False
