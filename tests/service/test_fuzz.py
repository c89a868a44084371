"""Mutated rank, feedback and experiment bodies against a live service (real uvicorn, real Redis, a real model).

Seeded and bounded (a few hundred bodies, ~30 s). Asserts: no 5xx; every 4xx names a field and a reason; the
service still ranks a clean body afterwards; and every accepted rank's impression reaches the training stream
exactly once (one example per served item).
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from typing import Any

import httpx
import numpy as np
import redis

from tests.helpers import stream_examples, wait_for
from tests.service.fixtures import ADMIN
from tests.service.prom import nonzero
from tests.service.traffic import rank_requests

SEED = 20261202
NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**400, 0.5, -0.0, 1e39, -1e39, 1e308,
    5e-324, math.nan, math.inf, -math.inf, "", " ", "x" * 5000, "\ud800", "a\udfffb", "\x00", "a\n", "é🎬", "NaN",
    [], {}, [None], [1, "a", None], [[[]]], {"a": {"b": {"c": [1]}}}, {"": 1}, list(range(300)),
]
RAW: list[bytes] = [
    b"", b"{", b"[", b"null", b"[]", b"{}", b'"x"', b"\xff\xfe\xfd", b"[" * 100_000, b'{"a":' * 50_000,
    b'{"request_id": NaN}', b'{"top_k": Infinity}', b"\x00" * 64, b'{"a": "\\ud800"}',
]


def _paths(obj: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, at + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, at + (i,))
    return out


def _set(obj: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def mutate(rng: np.random.Generator, base: Any) -> Any:
    """0 to 3 mutations at random places: a nasty value, a deleted or renamed key, a list duplicated."""
    obj = copy.deepcopy(base)
    for _ in range(int(rng.choice(4, p=[0.25, 0.45, 0.2, 0.1]))):
        paths = _paths(obj)
        path = paths[int(rng.integers(len(paths)))]
        kind = int(rng.integers(5))
        if kind <= 1 or not path:
            obj = _set(obj, path, copy.deepcopy(NASTY[int(rng.integers(len(NASTY)))]))
        elif kind == 2:
            obj = _set(obj, path, None, delete=True)
        elif kind == 3 and isinstance(path[-1], str):  # a key renamed
            v = _get(obj, path)
            _set(obj, path, None, delete=True)
            _set(obj, path[:-1] + (f"{path[-1]}_{int(rng.integers(9))}",), v)
        else:
            v = _get(obj, path)
            _set(obj, path, [v, v] if not isinstance(v, list) else v * 3)
    return obj


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def encode(rng: np.random.Generator, body: Any) -> bytes:
    """JSON (NaN/Infinity literals and lone surrogate escapes kept), sometimes cut short or with a byte flipped."""
    raw = json.dumps(body).encode()
    r = rng.random()
    if r < 0.05 and raw:
        raw = raw[: int(rng.integers(len(raw)))]
    elif r < 0.10 and raw:
        i = int(rng.integers(len(raw)))
        raw = raw[:i] + bytes([int(rng.integers(256))]) + raw[i + 1:]
    return raw


def check(r: httpx.Response, what: str) -> bool:
    """True for 200; asserts the answer is a 2xx or a 4xx naming a field."""
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["field"], str) and err["field"], f"{what}: {r.text[:300]}"
        assert isinstance(err["reason"], str) and err["reason"], f"{what}: {r.text[:300]}"
        return False
    return r.status_code == 200


def test_fuzzed_bodies_get_no_5xx_and_accepted_impressions_reach_the_stream_once(trained, server, client, redis_url):
    rng = np.random.default_rng(SEED)
    bases = rank_requests(trained["history"], 40, top_k=3)
    expect: dict[str, set[str]] = {}  # request_id -> items served (ranks whose request_id was not mutated)
    statuses: Counter = Counter()
    hdr = {"content-type": "application/json"}
    auth = {**hdr, "authorization": f"Bearer {ADMIN}"}
    for i in range(260):
        base = dict(bases[i % len(bases)], request_id=f"fz-{i}")
        body = mutate(rng, base)
        tracked = isinstance(body, dict) and body.get("request_id") == f"fz-{i}"
        r = client.post("/v1/rank", content=encode(rng, body), headers=hdr)
        statuses[("rank", r.status_code)] += 1
        if check(r, f"rank #{i}") and tracked and r.json()["request_id"] == f"fz-{i}":  # (a flipped byte may change it)
            expect[f"fz-{i}"] = {it["id"] for it in r.json()["items"]}
    for i, raw in enumerate(RAW):
        check(client.post("/v1/rank", content=raw, headers=hdr), f"rank raw #{i}")
        check(client.post("/v1/feedback", content=raw, headers=hdr), f"feedback raw #{i}")
        check(client.put("/v1/experiments/fz", content=raw, headers=auth), f"experiment raw #{i}")
    served = sorted(expect.items())
    assert len(served) > 80, statuses  # enough accepted ranks to check the stream by
    for i in range(150):
        rid, items = served[i % len(served)]
        base = {"request_id": rid, "item_id": sorted(items)[0], "labels": {"click": 1, "watch_time": 30.0}}
        r = client.post("/v1/feedback", content=encode(rng, mutate(rng, base)), headers=hdr)
        statuses[("feedback", r.status_code)] += 1
        check(r, f"feedback #{i}")
    exp_base = {"arms": [{"name": "control", "share": 0.5},
                         {"name": "treat", "share": 0.5, "version": 1, "weights": {"click": 1.0}}],
                "salt": "s", "meta": {"owner": "fuzz"}}
    for i in range(100):
        r = client.put("/v1/experiments/fz", content=encode(rng, mutate(rng, exp_base)), headers=auth)
        statuses[("experiment", r.status_code)] += 1
        check(r, f"experiment #{i}")
        if i % 10 == 9:  # whatever went live, ranking and reading experiments still work
            assert client.post("/v1/rank", json=dict(bases[0], request_id=f"clean-{i}")).status_code == 200
            expect[f"clean-{i}"] = set()
            assert client.get("/v1/experiments").status_code == 200
    assert statuses[("experiment", 200)] > 0 and statuses[("feedback", 200)] > 0
    client.delete("/v1/experiments/fz", headers=auth)

    r = redis.Redis.from_url(redis_url)
    assert wait_for(lambda: server.service.log.backlog() == 0 and r.zcard("wn:imp:due") + r.zcard("wn:imp:closing") == 0,
                    30)
    r.close()
    got = Counter((e["request_id"], e["candidate"]["video_id"]) for e in stream_examples(redis_url))
    for rid, items in expect.items():
        if rid.startswith("clean-"):
            assert sum(n for (q, _), n in got.items() if q == rid) == 3
            continue
        assert {v for (q, v) in got if q == rid} == items, rid
        assert all(got[(rid, v)] == 1 for v in items), rid  # exactly once
    assert not nonzero(server.service.metrics, "watchnext_impressions_dropped_total")
