"""Online features: encoded entries in Redis, the byte-bounded cache in front of them, and the change stream that
brings a write to every service process."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import redis

from service.features import ENTRY_OVERHEAD, GRAVE_OVERHEAD, EntityCache, OnlineFeatures
from service.observability import Metrics
from tests.helpers import serve_processes, wait_for
from tests.service.fixtures import ADMIN
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.encoding import Encoder, Problems
from watchnext.entities import RowLayout, encode_entities, write_entities

VIDEO = {"video_channel": "c1", "video_tags": ["t1", "t2"], "video_age_days": 3.0, "video_duration_s": 300.0,
         "video_views": 1000.0, "video_embedding": [0.25] * 16}


def store(config, url, cache_mb: float = 4.0) -> OnlineFeatures:
    return OnlineFeatures(config, Encoder(config), url, Metrics(), 500, 0.2, int(cache_mb * (1 << 20)))


def test_stored_rows_are_what_the_encoder_makes(small_config, redis_url):
    r = redis.Redis.from_url(redis_url)
    write_entities(r, small_config, "candidate", {"a": VIDEO, "b": {"video_views": 5.0}})
    s = store(small_config, redis_url)
    plan = s.plan({"candidate": ["a", "b", "nope"]})
    assert plan.misses == 3
    s.fetch(plan)
    got = s.stored(plan, "candidate")
    assert got.found.tolist() == [True, True, False]
    enc = Encoder(small_config)
    import pyarrow as pa

    from watchnext.encoding import section_type

    want = enc.encode_columns("candidate", pa.array([{**VIDEO, "video_id": "a"}, {"video_views": 5.0, "video_id": "b"},
                                                     None], type=section_type(small_config, "candidate")), 3, Problems(3))
    for name in want.values:
        assert np.array_equal(got.columns.values[name], want.values[name]), name
        assert got.columns.present[name].tolist() == want.present[name].tolist(), name
    texts = got.texts(np.arange(3))  # the entries' JSON, as an impression takes it
    assert json.loads(texts[0]) == {**VIDEO, "video_id": "a"} and texts[2] == b""
    assert s.metrics.value("watchnext_feature_store_hits_total") == 2
    assert s.metrics.value("watchnext_feature_store_misses_total", reason="absent") == 1
    again = s.plan({"candidate": ["a", "b", "nope"]})  # all cached now, the absent id too
    assert again.misses == 0 and s.metrics.value("watchnext_feature_cache_hits_total") == 3
    one = s.read("candidate", ["b", "a"])  # the one-call form: the same entries
    assert one.found.tolist() == [True, True] and json.loads(one.texts([1])[0]) == {**VIDEO, "video_id": "a"}
    assert s.metrics.value("watchnext_feature_store_hits_total") == 2  # from the cache: Redis was not asked again
    assert not [k for k in r.keys("*") if b"nope" in k or k.endswith(b":a")]  # ids are hash fields, not keys
    s.close()
    r.close()


def test_corrupt_entries_read_as_absent_and_are_counted(small_config, redis_url):
    r = redis.Redis.from_url(redis_url)
    enc = Encoder(small_config)
    lay = RowLayout(enc, "candidate")
    good = encode_entities(enc, lay, [{**VIDEO, "video_id": "ok"}])
    bad_row = good.copy()
    bad_row["video_channel"] = 10**9  # past its table
    nan_row = good.copy()
    nan_row["video_embedding"][0, 3] = np.nan
    r.hset(lay.rows_key, mapping={"ok": good.tobytes(), "short": b"xx", "range": bad_row.tobytes(),
                                  "nan": nan_row.tobytes()})
    s = store(small_config, redis_url)
    plan = s.plan({"candidate": ["ok", "short", "range", "nan"]})
    s.fetch(plan)
    got = s.stored(plan, "candidate")
    assert got.found.tolist() == [True, False, False, False]
    assert s.metrics.value("watchnext_feature_store_misses_total", reason="corrupt") == 3
    assert not got.columns.present["video_embedding"][1:].any()
    assert np.isfinite(got.columns.values["video_embedding"]).all()
    s.close()
    r.close()


def lookup(cache: EntityCache, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hit, the entries as structured rows, their JSON)."""
    absent = np.zeros(1, cache.layout.dtype)
    hit, cols, slots, stamps = cache.lookup(ids, {n: absent[n] for n in absent.dtype.names})
    rows = np.zeros(len(ids), cache.layout.dtype)
    for name, a in cols.items():
        rows[name] = a
    return hit, rows, cache.texts(slots, stamps)


def test_cache_is_bounded_in_bytes_and_keeps_what_is_used(small_config):
    enc = Encoder(small_config)
    lay = RowLayout(enc, "candidate")
    budget = 200 * (lay.dtype.itemsize + ENTRY_OVERHEAD) + 20_000
    cache = EntityCache(lay, budget)
    row = encode_entities(enc, lay, [{**VIDEO, "video_id": "x"}])
    raw = np.empty(1, object)
    raw[0] = b"x" * 100
    hot = [f"hot{i}" for i in range(20)]
    cache.put(hot, np.repeat(row, 20), np.repeat(raw, 20))
    for k in range(50):  # 2,500 entries through a cache that holds about 170
        ids = [f"v{k}-{i}" for i in range(50)]
        cache.put(ids, np.repeat(row, 50), np.repeat(raw, 50))
        assert lookup(cache, hot)[0].all()  # used on every round: never evicted
        assert cache.bytes <= budget, (k, cache.bytes)
    assert 100 < len(cache) < 220
    assert cache.bytes == len(cache) * cache.entry_bytes + 100 * len(cache)
    hit, rows, texts = lookup(cache, hot)
    assert hit.all() and texts.tolist() == [b"x" * 100] * 20 and np.array_equal(rows, np.repeat(row, 20))


def test_json_is_taken_as_it_was_at_the_look_up_after_a_refresh_an_eviction_or_a_clear(small_config):
    """A look-up copies the rows and leaves the JSON (an impression's features) for `texts`: an entry replaced or
    evicted in between still gives the JSON that was ranked, from the graves; after a clear, nothing."""
    enc = Encoder(small_config)
    lay = RowLayout(enc, "candidate")
    lost: list[int] = []
    cache = EntityCache(lay, 64 * (lay.dtype.itemsize + ENTRY_OVERHEAD + 8), lost.append)  # the smallest: 64 entries
    row = encode_entities(enc, lay, [{**VIDEO, "video_id": "x"}])

    def put(ids: list[str], text: bytes) -> None:
        raw = np.empty(len(ids), object)
        raw[:] = [text] * len(ids)
        cache.put(ids, np.repeat(row, len(ids)), raw)

    absent = np.zeros(1, lay.dtype)
    put(["a", "b", "c"], b"old")
    hit, _, slots, stamps = cache.lookup(["a", "b", "nope", "c"], {n: absent[n] for n in absent.dtype.names})
    assert hit.tolist() == [True, True, False, True]
    put(["a"], b"new")  # a refresh after the look-up
    assert cache.texts(slots, stamps).tolist() == [b"old", b"old", b"", b"old"]
    assert lookup(cache, ["a"])[2].tolist() == [b"new"]  # a look-up from now on gets the refreshed entry
    for k in range(4):  # 256 other entries through a 64-entry cache: b and c are evicted, their slots reused
        put([f"v{k}-{i}" for i in range(64)], b"other")
    assert "b" not in cache.slot and "c" not in cache.slot
    assert cache.texts(slots, stamps).tolist() == [b"old", b"old", b"", b"old"]
    # kept: a's entry before and after its refresh, b's and c's; not the entries written and evicted unread
    assert sorted(cache.graves.values()) == [b"new", b"old", b"old", b"old"]
    assert cache.grave_bytes == sum(len(t) + GRAVE_OVERHEAD for t in cache.graves.values()) and not lost
    cache.clear()
    assert cache.texts(slots, stamps).tolist() == [b"", b"", b"", b""] and not cache.graves
    assert lost == [3]  # a, b and c, counted (watchnext_feature_json_lost_total); "nope" was never held


def test_a_put_whose_eviction_takes_one_of_its_own_ids_gives_no_id_another_entry(small_config):
    """An id of the batch that the put's own eviction frees must not leave its slot to another id of the batch with
    its row and JSON (each id gets its own entry; one that no longer fits is not cached)."""
    enc = Encoder(small_config)
    lay = RowLayout(enc, "candidate")
    cache = EntityCache(lay, 65 * (lay.dtype.itemsize + ENTRY_OVERHEAD + 10))
    absent = np.zeros(1, lay.dtype)

    def put(ids: list[str], views: float) -> None:
        rows = encode_entities(enc, lay, [{**VIDEO, "video_views": views, "video_id": i} for i in ids])
        raw = np.empty(len(ids), object)
        raw[:] = [f"{i}-json".encode() for i in ids]
        cache.put(ids, rows, raw)

    put(["A"], 7.0)  # the least recently used entry from here on
    put([f"F{i}" for i in range(cache.capacity - 1)], 1.0)  # the cache is full
    put([f"B{i}" for i in range(8)] + ["A"], 2.0)  # its eviction takes A
    cached = []
    for i in [f"B{i}" for i in range(8)] + ["A"]:
        hit, cols, s, st = cache.lookup([i], {n: absent[n] for n in absent.dtype.names})
        if hit[0]:
            cached.append(i)
            assert cache.texts(s, st).tolist() == [f"{i}-json".encode()], i
            assert cols["video_views"][0] == np.float32(np.log1p(2.0)), i
    assert cached == [f"B{i}" for i in range(8)]  # A, freed by the eviction, no longer fit: not cached
    assert len(set(cache.slot.values())) == len(cache.slot) == int((cache.ids != None).sum())  # noqa: E711
    assert cache.bytes == sum(cache.entry_bytes + len(cache.raw[s]) for s in cache.slot.values())


def test_a_write_reaches_the_cache_through_the_change_stream(small_config, redis_url):
    r = redis.Redis.from_url(redis_url)
    write_entities(r, small_config, "candidate", {"a": VIDEO})
    s = store(small_config, redis_url)
    s.start()
    try:
        plan = s.plan({"candidate": ["a", "later"]})
        s.fetch(plan)
        assert s.stored(plan, "candidate").found.tolist() == [True, False]
        time.sleep(0.3)  # the follower is reading the stream
        t0 = time.monotonic()
        write_entities(r, small_config, "candidate", {"a": {**VIDEO, "video_views": 9.0}, "later": VIDEO})

        def fresh():
            p = s.plan({"candidate": ["a", "later"]})
            return p.misses == 0 and s.stored(p, "candidate").columns.values["video_views"].tolist()[0] == \
                np.float32(np.log1p(9.0)) and s.stored(p, "candidate").found.all()
        wait_for(fresh, 2.0, "the write to reach the cache")
        assert time.monotonic() - t0 < 2.0 and s.followed >= 1
    finally:
        s.close()
        r.close()


def test_a_feature_write_reaches_both_service_processes(trained, models_dir, redis_url, tmp_path):
    """Two `watchnext serve` processes rank by id from their caches; a feature written to the store changes what
    both answer within the documented bound (one change-stream round trip; 2 s allowed here)."""
    config = load_config(trained["config_path"])
    req = rank_requests(trained["history"], 1, top_k=10)[0]
    r = redis.Redis.from_url(redis_url)
    write_entities(r, config, "candidate", {c["video_id"]: {k: v for k, v in c.items() if k != "video_id"}
                                            for c in req["candidates"]})
    body = {"candidates": [{"video_id": c["video_id"]} for c in req["candidates"]], "top_k": 10}
    target = req["candidates"][0]["video_id"]
    with serve_processes(2, trained["config_path"], models_dir, redis_url, ADMIN, tmp_path) as urls:
        clients = [httpx.Client(base_url=u, timeout=10) for u in urls]
        try:
            def score_of(c: httpx.Client) -> float:
                r = c.post("/v1/rank", json=body)
                assert r.status_code == 200, r.text
                return {it["id"]: it["heads"]["click"] for it in r.json()["items"]}[target]

            before = [score_of(c) for c in clients]  # both have the entries cached now
            assert before[0] == before[1]
            changed = {k: v for k, v in req["candidates"][0].items() if k != "video_id"}
            changed["video_views"] = 1e9
            changed["video_age_days"] = 0.0
            time.sleep(0.5)
            t0 = time.monotonic()
            write_entities(r, config, "candidate", {target: changed})
            seen = [None, None]
            while time.monotonic() - t0 < 2.0 and None in seen:
                for k, c in enumerate(clients):
                    if seen[k] is None and score_of(c) != before[k]:
                        seen[k] = time.monotonic() - t0
            assert None not in seen, f"not every process used the write within 2 s: {seen}"
            after = [score_of(c) for c in clients]
            assert after[0] == after[1] != before[0]
        finally:
            for c in clients:
                c.close()
            r.close()
