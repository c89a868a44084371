"""Impressions, feedback and the attribution window: how served results become training examples.

Keys (listed in service/keys.py). No client string is ever part of a key: an impression is named by a token
the server makes from digests of the request_id and of the user's id and a random part (`keys.token`), so the
same request_id sent for two users is two impressions, and no request_id can name another key. A response for
a request_id and user whose impression still waits for its window is merged into it (a retry is the same
impression); once a closer has taken it, a new response starts a new one. Every key expires on its own.

The response never waits for Redis: impressions go to an in-memory buffer that a thread writes in pipelined
batches every `flush_interval_s`. The buffer is bounded in bytes (the `impression_buffer_mb` setting, per worker
process); while Redis is down it keeps the newest and sheds the oldest, counted in
`watchnext_impressions_dropped_total{reason="buffer_full"}`. An impression that cannot be stored (it fails to
serialise) is dropped alone and counted as `reason="invalid"`; the rest of its batch is written.

Feedback is checked and appended atomically (a Lua script), so feedback racing the window's close is either
joined or reported expired, never lost silently. Feedback names a request_id and an item: it joins the one
impression of that request_id that served the item (two users served the same item under one request_id:
"ambiguous", dropped and counted, never credited to the wrong user).

Closing is crash-safe. A closer takes due tokens under a lease (moving them from `due` to `closing`), builds
their examples, and writes them in one Lua script per group of impressions: the examples go to the training
stream (`XADD <[stream] key> MAXLEN ~ <maxlen>`; with `[stream] shards` = S > 1, each to the key
`<key>:<crc32(user id) % S>`, so one user's examples stay in order on one key) and the impressions are deleted
in the same atomic step, and only while the lease is still its own. The stream keys come from the config alone
and reach the script as KEYS. A closer killed at any point leaves its tokens in `closing`; when the
lease ends, the next closer takes them again. So every impression's examples reach the stream exactly once.
Labels that got no feedback take the task defaults (click -> 0; tasks without a default stay missing).

Randomised logging (`explore_share`): an explored request's items carry `propensity` (the probability of being
shown at their position under the exploration, 0.5 or 1.0) and their original `rank`; their examples carry
`"propensity"` and `"explore": {"rank": r}`. Examples of requests that were not explored carry neither (the
example reader takes propensity 1.0 and no rank), so they are byte for byte what they were before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import pyarrow as pa
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from watchnext.config import Config
from watchnext.entities import key_feature

from .keys import CLOSING, DUE, OWNER, digest, done_key, events_key, fb_key, imp_key, token, users_key
from .observability import Metrics, log

logger = logging.getLogger("watchnext.service.impressions")

DONE_TTL_S = 86_400
CLOSE_BATCH = 200  # tokens taken per lease
COMMIT_BYTES = 4 << 20  # examples per atomic write (whole impressions; one larger impression goes alone)
FLUSH_BYTES = 4 << 20  # impressions per pipelined write
CLOSE_MARGIN_S = 0.25
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# what a write may meet besides an outage: an error reply (OOM under maxmemory, READONLY during a failover)
WRITE_ERRORS = (*REDIS_ERRORS, redis.exceptions.RedisError)


# KEYS: the request's impression set, closing. ARGV: R, item field, event, now, ttl.
# Joins the latest open impression of this request_id that served the item, when every impression that served it
# (open, past its window or closed) was one user's; otherwise "ambiguous". An impression a closer has taken
# (in `closing`) counts as closed: its feedback list may already have been read.
_FEEDBACK_LUA = """
local members = redis.call('SMEMBERS', KEYS[1])
if #members == 0 then return 'unknown' end
local best, best_due, user, users, expired, open = nil, nil, nil, 0, false, false
local function served_by(m)
  if user ~= m:match('^[^:]+') then users = users + 1; user = m:match('^[^:]+') end
end
for _, m in ipairs(members) do
  local tok = ARGV[1] .. ':' .. m
  local imp = 'wn:imp:{' .. ARGV[1] .. '}:' .. m
  if redis.call('EXISTS', imp) == 1 then
    open = true
    local has = redis.call('HEXISTS', imp, ARGV[2]) == 1
    local due = tonumber(redis.call('HGET', imp, '_due') or '0')
    if due <= tonumber(ARGV[4]) or redis.call('ZSCORE', KEYS[2], tok) then
      expired = true
      if has then served_by(m) end
    elseif has then
      served_by(m)
      if not best_due or due > best_due then best, best_due = m, due end
    end
  else
    local done = 'wn:done:{' .. ARGV[1] .. '}:' .. m
    if redis.call('EXISTS', done) == 1 then
      expired = true
      if redis.call('SISMEMBER', done, ARGV[2]) == 1 then served_by(m) end
    end
  end
end
if users > 1 then return 'ambiguous' end
if best then
  local fb = 'wn:fb:{' .. ARGV[1] .. '}:' .. best
  redis.call('RPUSH', fb, ARGV[3])
  redis.call('EXPIRE', fb, ARGV[5])
  return 'ok'
end
if expired then return 'expired' end
if open then return 'unknown_item' end
return 'unknown'
"""

# KEYS: the request's impression set, due. ARGV: R, U, new G, due, ttl, the hash's fields: field, value, field,
# value... in one argument, each a 4-byte big-endian length and its bytes (`_fields`; redis-py checks and encodes
# each argument in Python: 45 of them for 20 items, and one argument took the pipeline's share of the writer's
# time per impression from 76 to 52-60 us, docs/benchmarks.md, 2026-12-04, 21:36 UTC).
# A response for a request_id and user whose impression still waits for its window (in `due`) is merged into it
# (a retry is the same impression); otherwise it starts its own (G), never writing into one a closer has taken.
_WRITE_LUA = """
local g = ARGV[3]
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local u, mg = m:match('^([^:]+):(.+)$')
  if u == ARGV[2] and redis.call('ZSCORE', KEYS[2], ARGV[1] .. ':' .. m) then g = mg; break end
end
local member = ARGV[2] .. ':' .. g
local imp = 'wn:imp:{' .. ARGV[1] .. '}:' .. member
local kv, at, s = {}, 1, ARGV[6]
while at <= #s do
  local len, from = struct.unpack('>I4', s, at)
  kv[#kv + 1] = string.sub(s, from, from + len - 1)
  at = from + len
end
for i = 1, #kv, 1000 do
  redis.call('HSET', imp, unpack(kv, i, math.min(i + 999, #kv)))
end
redis.call('EXPIRE', imp, ARGV[5])
redis.call('SADD', KEYS[1], member)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1] .. ':' .. member)
return g
"""

# KEYS: due, closing, owner. ARGV: now, limit, lease end, closer id.
# Takes tokens whose lease ended (a closer died holding them), then due ones, under a new lease.
_CLAIM_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local room = tonumber(ARGV[2]) - #ids
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, room)
  if #due > 0 then
    redis.call('ZREM', KEYS[1], unpack(due))
    for _, t in ipairs(due) do ids[#ids + 1] = t end
  end
end
for _, t in ipairs(ids) do
  redis.call('ZADD', KEYS[2], ARGV[3], t)
  redis.call('HSET', KEYS[3], t, ARGV[4])
end
return ids
"""

# KEYS: closing, owner, then the training stream's S keys (`Stream.keys()`: the one key, or its S shards).
# ARGV: closer id, maxlen, done ttl, n tokens, then per token (token, impression key, feedback key, tombstone
# key, impression-set key), m examples, then per example (its shard, 1..S, and the example), then (events key,
# events) pairs. Everything or nothing, and only while every token is still this closer's. The tombstone keeps
# the items served (feedback for them then answers "expired"; for another user's: "ambiguous").
_COMMIT_LUA = """
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  if redis.call('HGET', KEYS[2], ARGV[5 + i * 5]) ~= ARGV[1] then return -1 end
end
local at = 5 + n * 5
local m = tonumber(ARGV[at])
for i = 0, m - 1 do
  local shard = tonumber(ARGV[at + 1 + 2 * i])
  redis.call('XADD', KEYS[2 + shard], 'MAXLEN', '~', ARGV[2], '*', 'example', ARGV[at + 2 + 2 * i])
end
at = at + 2 * m + 1
while at < #ARGV do
  redis.call('RPUSH', ARGV[at], ARGV[at + 1])
  at = at + 2
end
for i = 0, n - 1 do
  local b = 5 + i * 5
  local items = redis.call('HKEYS', ARGV[b + 1])
  redis.call('DEL', ARGV[b + 1], ARGV[b + 2], ARGV[b + 3])
  for j = 1, #items, 500 do
    redis.call('SADD', ARGV[b + 3], unpack(items, j, math.min(j + 499, #items)))
  end
  redis.call('SADD', ARGV[b + 3], '_')
  redis.call('EXPIRE', ARGV[b + 3], ARGV[3])
  if redis.call('TTL', ARGV[b + 4]) < tonumber(ARGV[3]) then redis.call('EXPIRE', ARGV[b + 4], ARGV[3]) end
  redis.call('ZREM', KEYS[1], ARGV[b])
  redis.call('HDEL', KEYS[2], ARGV[b])
end
return m
"""

REASONS = {
    "unknown": "no impression with this request_id (never served, or served by another deployment)",
    "expired": "the attribution window of this impression has closed",
    "unknown_item": "item_id was not among the items served for this request_id",
    "ambiguous": "this request_id served this item to more than one user; give each request its own request_id",
}


@dataclass
class _Record:
    """One impression ready for Redis: its token and hash fields, serialised (exact size known)."""

    rid: str
    tok: str
    due: float
    fields: bytes  # the hash's field, value, field, value..., each length-prefixed (`_fields`, _WRITE_LUA)
    nbytes: int

    @property
    def mapping(self) -> dict[str, bytes]:
        """The hash's fields as a dict (the record as Redis will hold it)."""
        kv, at = [], 0
        while at < len(self.fields):
            n = int.from_bytes(self.fields[at:at + 4], "big")
            kv.append(self.fields[at + 4:at + 4 + n])
            at += 4 + n
        return {k.decode(): v for k, v in zip(kv[::2], kv[1::2])}


_json = msgspec.json.Encoder().encode


def _fields(mapping: dict[str, bytes]) -> bytes:
    """A hash's fields as _WRITE_LUA reads them: field, value, field, value..., each a 4-byte big-endian length
    and its bytes."""
    parts = []
    for k, v in mapping.items():
        kb = k.encode()
        parts += [len(kb).to_bytes(4, "big"), kb, len(v).to_bytes(4, "big"), v]
    return b"".join(parts)


def approx_bytes(imp: dict[str, Any]) -> int:
    """What a queued impression holds, before it is serialised (arrays' own sizes; a rough figure for dicts)."""
    n = 1024
    for k in ("user", "query", "context"):
        v = imp.get(k)
        n += getattr(v, "nbytes", None) or 96 * len(v or ())
    items = imp["items"]
    return n + (getattr(items, "nbytes", None) or 2048 * len(items))


def _rows(stream: bytes | None) -> list[dict[str, Any]]:
    """The rows of a record's Arrow IPC stream (ServedItems.for_record in service/ranker.py) as dicts; raises
    ValueError where the stream is missing or cannot be read."""
    if stream is None:
        raise ValueError("the record's sent rows are missing")
    try:
        return pa.ipc.open_stream(stream).read_all().to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"the record's sent rows cannot be read: {e}") from None


def redis_client(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """The impression log's and the experiments' client. Without decode_responses: every reply is bytes, where
    redis-py's types say `bytes | str` (they cover either setting); the `cast`s on its replies say bytes."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 1.0),
                                retry=Retry(NoBackoff(), 0))


class ImpressionLog:
    """Buffers impressions, writes them in batches, joins feedback and closes attribution windows."""

    def __init__(self, config: Config, url: str, metrics: Metrics, flush_interval_s: float = 0.05,
                 max_bytes: int = 64 << 20, close_interval_s: float = 0.0, lease_s: float = 30.0):
        self.config, self.metrics = config, metrics
        self.client = redis_client(url)
        self.window = config.service.attribution_window_s
        self.ttl = int(self.window * 2 + 3600)
        self.flush_interval_s, self.max_bytes = flush_interval_s, max_bytes
        # how long an unknown request_id is waited for: a replica's flush interval, its write, and a margin
        self.unknown_grace_s = 3 * flush_interval_s + 0.1
        self.close_interval_s = close_interval_s or min(1.0, max(0.05, self.window / 4))
        self.lease_s = lease_s
        self.closer_id = uuid.uuid4().hex
        # queued impressions (dicts, as the ranker made them) or _Records (serialised by a failed flush)
        self.buf: deque[tuple[str, int, Any]] = deque()  # (request_id, bytes, impression or _Record)
        self.buf_bytes = 0
        self.inflight = 0  # entries taken by a flush that has not finished
        self.pending: dict[str, int] = {}  # request_id -> impressions of it still in the buffer
        self._buf_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._feedback = self.client.register_script(_FEEDBACK_LUA)
        self._claim = self.client.register_script(_CLAIM_LUA)
        self._commit = self.client.register_script(_COMMIT_LUA)
        self._write_one = self.client.register_script(_WRITE_LUA)
        self.defaults = {t.name: t.default for t in config.tasks}
        self.tasks = {t.name: t for t in config.tasks}
        self.user_key = key_feature(config, "user")
        self.item_key = config.item_id
        self.stream_keys = config.stream.keys()  # from the config alone: the one key, or its shards

    # ------------------------------------------------------------ impressions
    def add(self, impression: dict[str, Any]) -> None:
        """Queue one response's impression; never blocks on Redis."""
        rid = impression["request_id"]
        self._push([(rid, approx_bytes(impression), impression)], front=False)

    def _push(self, entries: list[tuple[str, int, Any]], front: bool, settled: bool = False) -> None:
        """Queue entries (at the front: a batch that could not be written; `settled`: they were the entries in
        flight); then shed the oldest past the bound."""
        with self._buf_lock:
            if settled:
                self.inflight = 0
            if front:
                self.buf.extendleft(reversed(entries))
            else:
                self.buf.extend(entries)
            for rid, n, _ in entries:
                self.buf_bytes += n
                if not front:
                    self.pending[rid] = self.pending.get(rid, 0) + 1
            shed = 0
            while self.buf_bytes > self.max_bytes and len(self.buf) > 1:
                old_rid, n, _ = self.buf.popleft()
                self.buf_bytes -= n
                self._unpend(old_rid)
                shed += 1
            if shed:
                self.metrics.impressions_dropped.labels("buffer_full").inc(shed)
            if front or shed:  # a request's impression leaves the gauges to the flush that writes it
                self.set_gauges()

    def set_gauges(self) -> None:
        """The backlog gauges: set by each flush that writes or fails and by a /metrics scrape, not by each
        request."""
        self.metrics.log_backlog.set(self.backlog())
        self.metrics.log_backlog_bytes.set(self.buf_bytes)

    def _unpend(self, rid: str) -> None:
        n = self.pending.get(rid, 0) - 1
        if n > 0:
            self.pending[rid] = n
        else:
            self.pending.pop(rid, None)

    def compact(self) -> None:
        """Serialise everything buffered (while Redis is away): an impression as the ranker left it holds about
        twice its serialised size in objects and Arrow buffers; as a record it holds what the bound counts."""
        with self._flush_lock:
            with self._buf_lock:
                if all(isinstance(e[2], _Record) for e in self.buf):
                    return
                old, self.buf = self.buf, deque()
                self.buf_bytes = 0
                self.inflight = len(old)
            recs: list[_Record] = []
            try:
                recs = self._records(list(old))
            finally:
                self._push([(r.rid, r.nbytes, r) for r in recs], front=True, settled=True)

    def _take(self) -> list[tuple[str, int, Any]]:
        """The oldest buffered entries, up to FLUSH_BYTES (at least one)."""
        with self._buf_lock:
            out: list[tuple[str, int, Any]] = []
            size = 0
            while self.buf and (not out or size + self.buf[0][1] <= FLUSH_BYTES):
                e = self.buf.popleft()
                size += e[1]
                out.append(e)
            self.buf_bytes -= size
            self.inflight = len(out)
            return out

    def flush(self) -> int:
        """Write everything buffered, in pipelined chunks; on a Redis error the chunk goes back to the front of the
        buffer (serialised, so a retry costs no work and its size is exact). Returns the count written."""
        written = 0
        with self._flush_lock:
            while True:
                entries = self._take()
                if not entries:
                    return written
                records = self._records(entries)
                try:
                    pipe = self.client.pipeline(transaction=False)
                    for rec in records:
                        self._write(pipe, rec)
                    pipe.execute()
                except Exception as e:  # kept: written again (the same tokens) when Redis takes writes
                    self._push([(r.rid, r.nbytes, r) for r in records], front=True, settled=True)
                    if not isinstance(e, WRITE_ERRORS):
                        raise
                    self.metrics.redis_up.set(0)
                    raise ConnectionError(str(e)) from None
                with self._buf_lock:
                    for rec in records:
                        self._unpend(rec.rid)
                    # counted before they leave the backlog: whoever sees the backlog empty sees them counted
                    self.metrics.impressions_logged.inc(len(records))
                    self.inflight = 0
                    self.set_gauges()
                self.metrics.redis_up.set(1)
                written += len(records)

    def _records(self, entries: list[tuple[str, int, Any]]) -> list[_Record]:
        """Serialise queued impressions; one that cannot be is dropped alone and counted."""
        out = []
        for rid, _, obj in entries:
            if isinstance(obj, _Record):
                out.append(obj)
                continue
            try:
                out.append(self._record(obj))
            except Exception as e:  # a value JSON cannot hold, a section that cannot be resolved: this one only
                with self._buf_lock:
                    self._unpend(rid)
                self.metrics.impressions_dropped.labels("invalid").inc()
                log(logger, logging.ERROR, "impression_invalid", request_id=rid[:64], error=repr(e)[:300])
        return out

    def _record(self, imp: dict[str, Any]) -> _Record:
        rid = imp["request_id"]
        due = imp["ts"] + self.window
        shared: dict[str, Any] = {k: imp.get(k) for k in ("ts", "request_id", "user", "query", "context", "experiment", "arm",
                                          "model_version")}
        for k in ("user", "query", "context"):  # sections the store filled are merged here, off the request's path
            if hasattr(shared[k], "resolve"):
                shared[k] = shared[k].resolve()
        user = (shared["user"] or {}).get(self.user_key)
        tok = token(rid, "" if user is None else str(user))
        # msgspec: fast, and its bytes are their own size (orjson's small outputs each held 4 KB, 6-8x what
        # the impression buffer counted)
        mapping = {"_": _json(shared), "_due": repr(due).encode()}
        explore = imp.get("explore")
        items, sent = imp["items"], None
        if hasattr(items, "for_record"):  # the ranker's items (service/ranker.py, ServedItems)
            items, sent = items.for_record()
        # the rows the request sent for the shown items, an Arrow IPC stream in shown order, under a field of this
        # record's own: a response merged into the impression (a retry) keeps its items' rows apart
        at = None
        if sent is not None:
            at = tok.rsplit(":", 1)[1]
            mapping[f"s:{at}"] = sent
        # randomised order: each item's propensity and original rank (watchnext/explore.py)
        prop, rank = (explore["propensity"].tolist(), explore["rank"].tolist()) if explore is not None else ((), ())
        for item_id, cand, pos in items:
            rec: dict[str, Any] = {"candidate": cand, "position": pos}
            if at is not None:
                rec["sent"] = at
            if explore is not None:
                rec["propensity"], rec["rank"] = prop[pos], rank[pos]
            mapping[f"i:{item_id}"] = _json(rec)
        fields = _fields(mapping)
        return _Record(rid, tok, due, fields, 300 + len(fields) + len(tok))  # what the buffer's bound counts

    def _write(self, pipe, rec: _Record) -> None:
        r, u, g = rec.tok.split(":")
        self._write_one(keys=[users_key(r), DUE], args=[r, u, g, rec.due, self.ttl, rec.fields], client=pipe)

    def backlog(self) -> int:
        """Impressions not yet written: buffered, or in a write not yet finished."""
        return len(self.buf) + self.inflight

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
            self.metrics.feedback.labels("accepted" if r == "ok" else r).inc()

    def _join(self, events: list[dict[str, Any]]) -> list[str]:
        now = time.time()
        try:
            pipe = self.client.pipeline(transaction=False)
            for e in events:
                r = digest(e["request_id"])
                payload = _json({"item_id": e["item_id"], "labels": e["labels"], "ts": now})
                self._feedback(keys=[users_key(r), CLOSING], args=[r, f"i:{e['item_id']}", payload, now, self.ttl],
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
            toks = [t.decode() for t in self._claim(keys=[DUE, CLOSING, OWNER],
                                                     args=[now, CLOSE_BATCH, time.time() + self.lease_s,
                                                           self.closer_id])]
            if not toks:
                return sent
            for group, examples in self._groups(toks):
                sent += self._send(group, examples)
            if len(toks) < CLOSE_BATCH:
                return sent

    def _groups(self, toks: list[str]):
        """(tokens, their examples as JSON) in groups of whole impressions of about COMMIT_BYTES, in time order."""
        pipe = self.client.pipeline(transaction=False)
        for t in toks:
            pipe.hgetall(imp_key(t))
            pipe.lrange(fb_key(t), 0, -1)
        res = pipe.execute()
        per: list[tuple[tuple, str, list[dict]]] = []
        for i, t in enumerate(toks):
            if not res[2 * i]:  # its hash expired before a closer came (closers down longer than its TTL)
                self.metrics.examples_refused.inc()
                log(logger, logging.WARNING, "impression_expired_unclosed", token=t)
            try:
                exs = self.examples_of(res[2 * i], res[2 * i + 1])
            except Exception as e:  # a damaged record: its impression is closed without examples, and counted
                self.metrics.examples_refused.inc()
                log(logger, logging.ERROR, "impression_unreadable", token=t, error=repr(e)[:300])
                exs = []
            exs.sort(key=lambda e: e.get("position") or 0)
            first = (exs[0]["ts"], exs[0]["request_id"]) if exs else (0.0, "")
            per.append((first, t, exs))
        per.sort(key=lambda p: p[0])
        group: list[str] = []
        lines: list[tuple[str, dict]] = []
        size = 0
        for _, t, exs in per:
            blobs = [json.dumps(e, separators=(",", ":")) for e in exs]
            n = sum(len(b) for b in blobs)
            if group and size + n > COMMIT_BYTES:
                yield group, lines
                group, lines, size = [], [], 0
            for ex in exs:  # after the blobs: the token goes to the report's events, not to the stream
                ex["_token"] = t
            group.append(t)
            lines += list(zip(blobs, exs))
            size += n
        if group:
            yield group, lines

    def _send(self, toks: list[str], lines: list[tuple[str, dict]]) -> int:
        """One atomic write: the examples to the stream, the impressions closed. 0 when the lease was lost."""
        st = self.config.stream
        args: list[Any] = [self.closer_id, st.maxlen, DONE_TTL_S, len(toks)]
        for t in toks:
            args += [t, imp_key(t), fb_key(t), done_key(t), users_key(t.split(":")[0])]
        args.append(len(lines))
        for b, ex in lines:
            args += [self.shard_of(ex) + 1, b]
        for name, evs in self.experiment_events([e for _, e in lines]).items():
            args += [events_key(name), b"\n".join(evs)]
        n = int(self._commit(keys=[CLOSING, OWNER, *self.stream_keys], args=args))
        if n < 0:  # another closer took these over (our lease ran out): it writes them
            log(logger, logging.WARNING, "close_lease_lost", impressions=len(toks))
            return 0
        self.metrics.examples.inc(n)
        return n

    def shard_of(self, example: dict[str, Any]) -> int:
        """The stream shard (0-based index into `stream_keys`) of an example: by its user's id, so one user's
        examples go to one key, in order (`Stream.shard_of`; a user without an id goes to the shard of "")."""
        if len(self.stream_keys) == 1:
            return 0
        user = (example.get("user") or {}).get(self.user_key) if self.user_key else None
        return self.config.stream.shard_of("" if user is None else str(user))

    def events_with_open(self, name: str) -> bytes:
        """Experiment `name`'s closed impressions and, with the feedback so far (labels without feedback take the
        task defaults), those still open or being closed, as the report's JSON lines; each impression once.

        One transaction reads the closed events and the open tokens (waiting or taken by a closer). An open one
        whose hash is gone when read was closed since: its events are taken from what the closed list gained
        after the snapshot (events carry their token), so none is missed or counted twice."""
        key = events_key(name)
        pipe = self.client.pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.zrange(DUE, 0, -1)
        pipe.zrange(CLOSING, 0, -1)
        closed, due, closing = pipe.execute()
        toks = [t.decode() for t in due + closing]
        lines: list[bytes] = [ln for batch in closed for ln in batch.split(b"\n") if ln]
        gone: set[str] = set()
        for at in range(0, len(toks), CLOSE_BATCH):
            chunk = toks[at:at + CLOSE_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for t in chunk:
                pipe.hget(imp_key(t), "_")
            shared = pipe.execute()
            gone.update(t for t, sh in zip(chunk, shared) if sh is None)
            mine = [t for t, sh in zip(chunk, shared) if sh is not None and json.loads(sh).get("experiment") == name]
            if not mine:
                continue
            pipe = self.client.pipeline(transaction=False)
            for t in mine:
                pipe.hgetall(imp_key(t))
                pipe.lrange(fb_key(t), 0, -1)
            res = pipe.execute()
            for i, t in enumerate(mine):
                exs = self.examples_of(res[2 * i], res[2 * i + 1])
                if not exs:
                    gone.add(t)
                lines += self.experiment_events(exs).get(name, [])
        if gone:
            for batch in cast(list[bytes], self.client.lrange(key, len(closed), -1)):
                lines += [ln for ln in batch.split(b"\n") if ln and json.loads(ln).get("t") in gone]
        return b"\n".join(lines)

    def experiment_events(self, examples: list[dict[str, Any]]) -> dict[str, list[bytes]]:
        """The report's compact events (ts, user_id, arm, model_version, labels) of examples served in experiments."""
        out: dict[str, list[bytes]] = {}
        for ex in examples:
            name = ex.get("experiment")
            if name is None:
                continue
            ev = {"ts": ex["ts"], "user_id": str(ex["user"].get(self.user_key)), "arm": ex["arm"],
                  "model_version": ex["model_version"], "labels": ex["labels"], "t": ex.get("_token")}
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
        sent: dict[str, list[dict[str, Any]]] = {}  # a response's rows sent for its shown items, by its field
        for field, raw in imp.items():
            if not field.startswith(b"i:"):
                continue
            item_id = field[2:].decode()
            # a candidate's store entry is logged as it was read from Redis: one that is not JSON loses its item; so
            # does one whose sent row cannot be read
            try:
                item = json.loads(raw)
                if not isinstance(item, dict) or not isinstance(item.get("position"), int | None):
                    raise ValueError("not an item record")
                cand = item["candidate"] if isinstance(item.get("candidate"), dict) else {}  # anything else: nothing
                if "sent" in item:  # the values the request sent, over the store entry
                    at = str(item["sent"])
                    if at not in sent:
                        sent[at] = _rows(imp.get(f"s:{at}".encode()))
                    pos = item["position"]
                    if pos is None or not 0 <= pos < len(sent[at]):
                        raise ValueError("no sent row at the item's position")
                    cand.update({k: v for k, v in sent[at][pos].items() if v is not None})
            except ValueError:
                self.metrics.examples_refused.inc()
                log(logger, logging.ERROR, "impression_item_unreadable", item_id=item_id[:64])
                continue
            if self.item_key is not None:  # the field names the item (a logged store entry may not)
                cand[self.item_key] = item_id
            given = got.get(item_id, {})
            labels = {t: given.get(t, self.defaults[t]) for t in self.tasks}
            ex = {
                "ts": shared["ts"], "request_id": shared["request_id"],
                "user": shared["user"], "query": shared["query"], "context": shared["context"],
                "candidate": cand, "position": item["position"], "labels": labels,
                "experiment": shared.get("experiment"), "arm": shared.get("arm"),
                "model_version": shared.get("model_version"),
            }
            if "propensity" in item:  # explored: absent on the other requests (the reader takes 1.0)
                ex["propensity"] = item["propensity"]
                ex["explore"] = {"rank": item["rank"]}
            out.append(ex)
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
                            buffered=len(self.buf), buffered_bytes=self.buf_bytes)
                    delay = min(1.0, delay * 2)
                    self.compact()
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
