"""Entities in the online feature store: one encoded row per user, query video or candidate video.

The service ranks candidates named by id, so what the store holds must be
ready to use: each entity is kept **encoded** (hashed, transformed, checked by
the same `Encoder` the trainer uses), as a fixed-width row of a numpy
structured type, so a batch of entries becomes model columns with one
`np.frombuffer`, never a JSON parse per entity. Beside it the entity's features
as JSON, which the service logs with the impressions it serves (training
examples carry raw values, docs/examples.md).

Redis layout (entity ids are hash fields, never key names)::

    wn:f:<source>:<layout>   hash    entity id -> encoded row (RowLayout.dtype bytes)
    wn:f:<source>:json       hash    entity id -> its features as JSON (the id included)
    wn:f:changes             stream  one entry per write: source, ids (a JSON list); every service
                                     replica follows it and refreshes the entries it caches

`<layout>` hashes the source's feature definitions (names, kinds, buckets,
lengths, transforms, defaults): a config that encodes differently reads other
rows, never misread ones. Sources: user, query and candidate (context has no
entity). An entity's id is its section's key feature: `[item] id` for
candidates, the first categorical feature for user and query.

Writers use `write_entities` (as `watchnext features load` does): the rows,
the JSON and the change entry go in one MULTI/EXEC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import pyarrow as pa
import redis

from .config import Config
from .encoding import SECTIONS, Columns, Encoder, Problems, section_type
from .examples import DataError, clean_section

PREFIX = "wn:f:"
CHANGES = "wn:f:changes"
CHANGES_MAXLEN = 100_000  # entries (each names a batch of ids); a replica further behind clears its cache
STORE_SOURCES = ("user", "query", "candidate")
FORMAT = 1  # of the encoded rows; part of the layout hash


def key_feature(config: Config, source: str) -> str | None:
    """The feature whose value names a section's entity in the store (None: the section has no entries)."""
    if source == "candidate":
        return config.item_id
    if source == "context":
        return None
    return next((f.name for f in config.features if f.source == source and f.kind == "categorical"), None)


class RowLayout:
    """One source's encoded entity row: a present flag per feature, then each feature's encoded value.

    `pack(columns)` -> structured (n,) rows; `columns(fields)` -> Columns. Little-endian, fixed width
    (`dtype.itemsize` bytes), so stored bytes read the same on every machine.
    """

    def __init__(self, encoder: Encoder, source: str):
        self.encoder, self.source = encoder, source
        self.features = encoder.section_features[source]
        fields: list[tuple] = [("present", "u1", (len(self.features),))]
        spec = []
        for f in self.features:
            dtype, shape = encoder.value_spec(f)
            fields.append((f.name, "<i8" if dtype == "int64" else "<f4", shape))
            spec.append([f.name, f.kind, f.buckets, f.max_len, f.size, f.transform, f.default])
        self.dtype = np.dtype(fields)
        blob = json.dumps([FORMAT, source, spec], sort_keys=True).encode()
        self.hash = hashlib.sha256(blob).hexdigest()[:12]
        self.rows_key = f"{PREFIX}{source}:{self.hash}"
        self.json_key = f"{PREFIX}{source}:json"

    def pack(self, c: Columns) -> np.ndarray:
        rows = np.zeros(c.n, self.dtype)
        for j, f in enumerate(self.features):
            rows[f.name] = c.values[f.name]
            rows["present"][:, j] = c.present[f.name]
        return rows

    def columns(self, fields: dict[str, np.ndarray]) -> Columns:
        """Columns of the rows' fields, each an array of n rows (as `EntityCache` keeps them)."""
        present = fields["present"].view(bool)
        return Columns(len(present), {f.name: fields[f.name] for f in self.features},
                       {f.name: present[:, j] for j, f in enumerate(self.features)})

    def check(self, rows: np.ndarray) -> np.ndarray:
        """(n,) bool: rows a well-behaved writer could have written (flags 0/1, ids within their table, finite
        numbers, absent values at their defaults). Stored bytes are not trusted: the others are dropped."""
        # (n, F) flags: all(axis=1) is (n,), never the scalar numpy's types allow for
        ok = cast(np.ndarray, (rows["present"] <= 1).all(axis=1))
        absent = self.encoder.absent(self.source, 1)
        for j, f in enumerate(self.features):
            v, p = rows[f.name], rows["present"][:, j].astype(bool)
            flat = v.reshape(len(rows), -1)
            if f.kind in ("categorical", "categorical_list"):
                good = ((flat >= 0) & (flat <= f.buckets)).all(axis=1)
                if f.kind == "categorical":
                    good &= (flat[:, 0] > 0) == p
            else:
                good = np.isfinite(flat).all(axis=1)
            good &= p | (flat == absent.values[f.name].reshape(1, -1)).all(axis=1)
            ok &= good
        return ok


def encode_entities(encoder: Encoder, layout: RowLayout, items: Sequence[dict[str, Any]],
                    where: Sequence[str] | None = None) -> np.ndarray:
    """Encoded rows of cleaned entity sections (the key feature included). Raises DataError naming the field of
    the first bad value ("candidate.video_views", after where[i] when given: "candidate 'v3': candidate.video_views")."""
    n = len(items)
    problems = Problems(n)
    arr = pa.array(list(items), type=section_type(encoder.config, layout.source))
    cols = encoder.encode_columns(layout.source, arr, n, problems)
    bad = problems.first()
    if bad is not None:
        row, field, reason = bad
        raise DataError(f"{where[row]}: {field}" if where is not None else field, reason)
    return layout.pack(cols)


def write_entities(client: redis.Redis, config: Config, source: str, entities: dict[str, dict[str, Any]],
                   batch: int = 5000, encoder: Encoder | None = None) -> int:
    """Write entities of one source ({id: features}, features as in a request section) to the store: their
    encoded rows, their JSON and a change entry per batch, each batch in one MULTI/EXEC. An entry replaces
    what the store held for that id. Raises DataError naming the id and the field of a bad value."""
    if source not in STORE_SOURCES:
        raise ValueError(f"source: expected one of {', '.join(STORE_SOURCES)}, got {source!r}")
    kf = key_feature(config, source)
    if kf is None:
        raise ValueError(f"source {source}: the config names no key feature for it")
    encoder = encoder or Encoder(config)
    layout = RowLayout(encoder, source)
    ids = list(entities)
    for lo in range(0, len(ids), batch):
        part = ids[lo : lo + batch]
        items = [{**clean_section(entities[i], config, source), kf: i} for i in part]
        rows = encode_entities(encoder, layout, items, [f"{source} {i!r}" for i in part])
        w = layout.dtype.itemsize
        blob = rows.tobytes()
        pipe = client.pipeline(transaction=True)
        pipe.hset(layout.rows_key, mapping={i: blob[k * w : (k + 1) * w] for k, i in enumerate(part)})
        pipe.hset(layout.json_key, mapping={i: orjson.dumps(it) for i, it in zip(part, items)})
        pipe.xadd(CHANGES, {"source": source, "ids": orjson.dumps(part)}, maxlen=CHANGES_MAXLEN, approximate=True)
        pipe.execute()
    return len(ids)


# ---------------------------------------------------------------- loading files


def entities_of(obj: dict, config: Config) -> Iterable[tuple[str, str, dict]]:
    """(source, id, features) found in one input line; DataError naming the field of the line at fault.

    A line is either an entity record ``{"source": "candidate", "id": "v3", "features": {...}}``
    or an example / rank-request-shaped object whose sections carry their own ids.
    """
    if "source" in obj and "features" in obj:
        src, ent = obj.get("source"), obj.get("id")
        if src not in STORE_SOURCES:
            raise DataError("source", f"expected one of {', '.join(STORE_SOURCES)}, got {src!r}")
        if not isinstance(ent, (str, int)) or isinstance(ent, bool) or ent == "":
            raise DataError("id", f"expected a non-empty string id, got {ent!r}")
        feats = obj.get("features")
        if not isinstance(feats, dict):
            raise DataError("features", "expected an object")
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

    Raises DataError naming FILE:LINE and the field on a bad line ("entities.jsonl:3: candidate.video_views").
    """
    encoder = Encoder(config)
    layouts = {s: RowLayout(encoder, s) for s in STORE_SOURCES if key_feature(config, s) is not None}
    merged: dict[str, dict[str, dict]] = {s: {} for s in layouts}
    lines = 0
    with open(path, "rb") as fh:
        for ln, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{ln}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(where, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where, f"not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(where, "expected a JSON object")
            try:
                for src, ent, feats in entities_of(obj, config):
                    if src not in layouts:
                        continue
                    kf = key_feature(config, src)
                    assert kf is not None  # layouts holds only the sources with a key feature
                    encode_entities(encoder, layouts[src], [{**feats, kf: ent}])  # checks it: names the field
                    merged[src].setdefault(ent, {}).update(feats)
            except DataError as e:
                raise DataError(f"{where}: {e.field}" if e.field else where, e.reason) from None
            lines += 1
    counts = {s: write_entities(client, config, s, merged[s], batch, encoder) for s in merged}
    return {"lines": lines, "entities": sum(counts.values()), **counts}
