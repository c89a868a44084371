"""Online features in Redis: what a request leaves out is read from here.

Key layout (one JSON object per entity, feature name -> value)::

    wn:f:user:<user id>          e.g. wn:f:user:u17  -> {"user_country": "NL", "user_recent_videos": ["v1", "v9"]}
    wn:f:query:<query id>        e.g. wn:f:query:v9  -> {"query_embedding": [0.1, ...]}
    wn:f:candidate:<item id>     e.g. wn:f:candidate:v3 -> {"video_age_days": 3.5, "video_channel": "c7", ...}

The id of a section is its key feature: `[item] id` for candidates, and the
first categorical feature of the source for user and query (user_id,
query_video_id in the shipped config). Context has no entity and no entry.

All the lookups of a request go out as one MGET: one round trip, with a tight
timeout (`[service] feature_timeout_ms`). When Redis is unreachable or slow the
request goes on with the values it has (missing values take the model's
"missing" rows) and the miss is counted; after a failure the store is skipped
for `feature_backoff_s`, then tried again, so it recovers by itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from watchnext.config import Config
from watchnext.encoding import SECTIONS, Encoder, Problems, section_type
from watchnext.examples import clean_section

from .observability import Metrics, log

logger = logging.getLogger("watchnext.service.features")
PREFIX = "wn:f:"
STORE_SOURCES = ("user", "query", "candidate")


def key_feature(config: Config, source: str) -> str | None:
    """The feature whose value names a section's entity in the store (None: the section has no entries)."""
    if source == "candidate":
        return config.item_id
    if source == "context":
        return None
    return next((f.name for f in config.features if f.source == source and f.kind == "categorical"), None)


def feature_key(source: str, entity_id: str) -> str:
    return f"{PREFIX}{source}:{entity_id}"


class FeatureStore:
    """Reads entries for a request in one MGET; degrades to 'nothing found' when Redis is away."""

    def __init__(self, config: Config, url: str | None, metrics: Metrics, timeout_ms: float, backoff_s: float = 1.0):
        self.config, self.metrics = config, metrics
        self.keys = {s: key_feature(config, s) for s in STORE_SOURCES}
        self.backoff_s = backoff_s
        self.client = None
        if url:
            t = timeout_ms / 1000
            # no retries: a slow or absent Redis must cost a request one timeout at most
            self.client = redis.Redis.from_url(url, socket_timeout=t, socket_connect_timeout=t,
                                               retry=Retry(NoBackoff(), 0))
        self._down_until = 0.0
        self._up = True
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def get(self, keys: list[str]) -> list[Any] | None:
        """Parsed entries for `keys` (None where absent); None when the store could not be asked."""
        if not keys:
            return []
        if self.client is None:
            self.metrics.feature_misses.inc(len(keys), "disabled")
            return None
        if time.monotonic() < self._down_until:
            self.metrics.feature_misses.inc(len(keys), "outage")
            return None
        try:
            raw = self.client.mget(keys)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            with self._lock:
                first, self._up = self._up, False
                self._down_until = time.monotonic() + self.backoff_s
            self.metrics.feature_misses.inc(len(keys), "outage")
            self.metrics.redis_up.set(0)
            if first:  # one line per outage, not one per retry
                log(logger, logging.WARNING, "feature_store_unavailable", error=str(e)[:200],
                    retry_every_s=self.backoff_s)
            return None
        if not self._up:
            self._up = True
            log(logger, logging.INFO, "feature_store_available")
        self.metrics.redis_up.set(1)
        try:  # one parse for the whole reply; a corrupt entry sends it down the careful path
            out = json.loads(b"[" + b",".join(b"null" if b is None else b for b in raw) + b"]")
            if len(out) != len(raw):
                raise ValueError("an entry holds more than one JSON value")
        except ValueError:
            out = [_parse_entry(b) for b in raw]
        hits = sum(1 for d in out if d is not None)
        self.metrics.feature_hits.inc(hits)
        if len(keys) - hits:
            self.metrics.feature_misses.inc(len(keys) - hits, "absent")
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


# ---------------------------------------------------------------- loading


def _parse_entry(b: bytes | None) -> Any:
    if b is None:
        return None
    try:
        return json.loads(b)
    except ValueError:
        return None


def entities_of(obj: dict, config: Config, where: str) -> Iterable[tuple[str, str, dict]]:
    """(source, id, features) found in one input line.

    A line is either an entity record ``{"source": "candidate", "id": "v3", "features": {...}}``
    or an example / rank-request-shaped object whose sections carry their own ids.
    """
    if "source" in obj and "features" in obj:
        src, ent = obj.get("source"), obj.get("id")
        if src not in STORE_SOURCES:
            raise ValueError(f"{where}: source: expected one of {', '.join(STORE_SOURCES)}, got {src!r}")
        if not isinstance(ent, (str, int)) or isinstance(ent, bool):
            raise ValueError(f"{where}: id: expected a string id, got {ent!r}")
        feats = obj.get("features")
        if not isinstance(feats, dict):
            raise ValueError(f"{where}: features: expected an object")
        yield src, str(ent), clean_section(feats, config, src)
        return
    sections = [(s, obj.get(s)) for s in SECTIONS if s in STORE_SOURCES]
    sections += [("candidate", c) for c in obj.get("candidates") or []]
    for src, sec in sections:
        if not isinstance(sec, dict):
            continue
        kf = key_feature(config, src)
        if kf is None or sec.get(kf) is None:
            continue
        feats = clean_section(sec, config, src)
        ent = feats.pop(kf)
        if feats:
            yield src, ent, feats


def load_file(client: redis.Redis, config: Config, path: str | Path, batch: int = 5000) -> dict[str, int]:
    """Write the entities of a JSON-lines file to the store. An entity's fields merge over the
    file's lines (later lines win); its entry replaces what the store held for it.

    Raises ValueError naming FILE:LINE and the field on a bad line.
    """
    encoder = Encoder(config)
    types = {s: section_type(config, s) for s in STORE_SOURCES}
    merged: dict[str, dict] = {}
    lines = 0
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object")
            try:
                for src, ent, feats in entities_of(obj, config, where):
                    probs = Problems(1)  # the encoder's own checks: finite numbers, vector lengths
                    encoder.encode_section(src, pa.array([feats], type=types[src]), 1, encoder.empty_inputs(1), probs)
                    bad = probs.first()
                    if bad is not None:
                        raise ValueError(bad[1])
                    merged.setdefault(feature_key(src, ent), {}).update(feats)
            except ValueError as e:
                msg = str(e)
                raise ValueError(msg if msg.startswith(str(path)) else f"{where}: {msg}") from None
            lines += 1
    items = list(merged.items())
    for lo in range(0, len(items), batch):
        pipe = client.pipeline(transaction=False)
        for k, v in items[lo : lo + batch]:
            pipe.set(k, json.dumps(v, separators=(",", ":")))
        pipe.execute()
    counts = {s: sum(1 for k in merged if k.startswith(f"{PREFIX}{s}:")) for s in STORE_SOURCES}
    return {"lines": lines, "entities": len(merged), **counts}
