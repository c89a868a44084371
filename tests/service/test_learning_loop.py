"""From served impressions to training examples: nothing lost, nothing trusted (real Redis, real uvicorn)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import msgspec
import numpy as np
import pyarrow as pa
import redis

from service.impressions import ImpressionLog
from service.observability import Metrics
from service.ranker import ServedItems
from tests.helpers import stream_examples, wait_for
from tests.service.fixtures import live_service
from tests.service.prom import nonzero
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.encoding import section_type
from watchnext.redis_embed import free_port, start_embedded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _keys(url: str) -> list[str]:
    r = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() for k in r.scan_iter(count=1000))
    finally:
        r.close()


def _drained(url: str) -> bool:
    r = redis.Redis.from_url(url)
    try:
        return r.zcard("wn:imp:due") + r.zcard("wn:imp:closing") == 0
    finally:
        r.close()


def test_client_request_ids_never_become_redis_keys(trained, server, client, redis_url):
    """Finding 1: `"request_id": "due"` overwrote the index of open impressions; ids like `done:X` aliased keys."""
    reqs = rank_requests(trained["history"], 6, top_k=2)
    hostile = ["due", "wn:imp:due", "done:r0", "{x}", "r0:u", "watchnext:training"]
    for req, rid in zip(reqs, hostile):
        req["request_id"] = rid
    served = {}
    for req in reqs:
        r = client.post("/v1/rank", json=req)
        assert r.status_code == 200, r.text
        served[req["request_id"]] = [it["id"] for it in r.json()["items"]]
    fb = [{"request_id": rid, "item_id": items[0], "labels": {"click": 1}} for rid, items in served.items()]
    out = client.post("/v1/feedback", json=fb)
    assert out.status_code == 200 and out.json() == {"accepted": 6, "dropped": []}
    keys = [k for k in _keys(redis_url) if k != "watchnext:training"]  # the stream: the config's key
    h, g = "[0-9a-f]{20}", "[0-9a-f]{12}"
    layout = re.compile(rf"wn:(imp:(due|closing|owner)|imp:{{{h}}}(:{h}:{g})?|(fb|done):{{{h}}}:{h}:{g}|f:.+|exp:.+)")
    assert keys and all(layout.fullmatch(k) for k in keys), keys  # every key the server's, in one namespace
    assert redis.Redis.from_url(redis_url).type("wn:imp:due") == b"zset"
    assert wait_for(lambda: _drained(redis_url) and len(stream_examples(redis_url)) >= 12, 15)
    examples = stream_examples(redis_url)
    assert len(examples) == 12  # 6 impressions x top 2, each once
    clicked = {(e["request_id"], e["candidate"]["video_id"]) for e in examples if e["labels"]["click"] == 1.0}
    assert clicked == {(rid, items[0]) for rid, items in served.items()}


def test_one_request_id_for_two_users_is_two_impressions(trained, server, client, redis_url):
    """Finding 1: the same request_id for two users merged their impressions (one user's click trained as another's)."""
    a, b = rank_requests(trained["history"], 2, top_k=3)
    b["request_id"] = a["request_id"]
    assert a["user"]["user_id"] != b["user"]["user_id"]
    ids_a = {c["video_id"] for c in a["candidates"]}
    b["candidates"] = [c for c in b["candidates"] if c["video_id"] not in ids_a]
    shared = dict(a["candidates"][0])
    got_a = [it["id"] for it in client.post("/v1/rank", json=a).json()["items"]]
    got_b = [it["id"] for it in client.post("/v1/rank", json=b).json()["items"]]
    assert not set(got_a) & set(got_b)
    rid = a["request_id"]
    out = client.post("/v1/feedback", json=[{"request_id": rid, "item_id": got_b[0], "labels": {"click": 1}}]).json()
    assert out["accepted"] == 1
    # the same item served to both users under one request_id: refused as ambiguous, never credited to one of them
    c = dict(b, candidates=[shared], top_k=1)
    c["user"] = dict(b["user"], user_id=str(b["user"]["user_id"]) + "-other")
    client.post("/v1/rank", json=dict(a, candidates=[shared], top_k=1, user=dict(a["user"])))
    client.post("/v1/rank", json=c)
    out = client.post("/v1/feedback", json={"request_id": rid, "item_id": shared["video_id"], "labels": {"click": 1}})
    assert out.json()["dropped"][0]["reason"].startswith("this request_id served this item to more than one user")
    assert wait_for(lambda: _drained(redis_url) and len(stream_examples(redis_url)) >= 7, 15)
    examples = stream_examples(redis_url)
    by = {(e["user"]["user_id"], e["candidate"]["video_id"]): e["labels"]["click"] for e in examples}
    assert by[(b["user"]["user_id"], got_b[0])] == 1.0
    assert all(v == 0.0 for (u, v_id), v in by.items() if (u, v_id) != (b["user"]["user_id"], got_b[0]))
    assert server.service.metrics.value("watchnext_feedback_total", result="ambiguous") == 1


def _impressions(config, n: int, items: int, ts: float) -> list[dict]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        out.append({
            "ts": ts, "request_id": f"r{i}", "user": {"user_id": f"u{rng.integers(50)}"},
            "query": {"query_video_id": "q"}, "context": {"device": "mobile"},
            "experiment": None, "arm": "control", "model_version": "1",
            "items": [(f"v{i}-{j}", {"video_id": f"v{i}-{j}", "video_age_days": float(j)}, j) for j in range(items)],
        })
    return out


def test_an_impression_that_cannot_be_stored_is_dropped_alone(trained, redis_url):
    """Finding 2: one impression orjson refused made the whole flush fail, and the batch was lost uncounted."""
    config = load_config(trained["config_path"])
    m = Metrics()
    log = ImpressionLog(config, redis_url, m)
    imps = _impressions(config, 20, 2, time.time())
    imps[7]["items"][1][1]["video_id"] = "bad\ud800"  # a lone surrogate: not storable as UTF-8 JSON
    for imp in imps:
        log.add(imp)
    assert log.flush() == 19
    assert (m.value("watchnext_impressions_logged_total"), m.value("watchnext_impressions_dropped_total", reason="invalid"),
            log.backlog()) == (19, 1, 0)
    r = redis.Redis.from_url(redis_url)
    assert r.zcard("wn:imp:due") == 19
    log.client.close()


def test_a_logged_store_entry_that_is_not_json_loses_its_item_alone(trained, redis_url):
    """A candidate named by id is logged with its store entry's JSON as read from Redis, unparsed
    (`ServedItems.for_record`); an entry another writer damaged loses that item's example, counted, and no other."""
    config = load_config(trained["config_path"])
    m = Metrics()
    log = ImpressionLog(config, redis_url, m)
    imp = _impressions(config, 1, 1, time.time() - config.service.attribution_window_s - 60)[0]
    imp["items"] = [("v1", msgspec.Raw(b'{"video_id":"v1","video_age_days":2.5}'), 0),
                    ("v2", msgspec.Raw(b'{"video_age_days":'), 1),  # cut short
                    ("v3", msgspec.Raw(b'[1,2]'), 2),  # JSON, not an object: read as nothing
                    ("v4", msgspec.Raw(b'{"video_id":"other","video_age_days":1.0}'), 3)]  # the record names the item
    log.add(imp)
    assert log.flush() == 1
    assert log.close_due() == 3
    got = {e["candidate"]["video_id"]: (e["candidate"], e["position"]) for e in stream_examples(redis_url)}
    assert got == {"v1": ({"video_id": "v1", "video_age_days": 2.5}, 0), "v3": ({"video_id": "v3"}, 2),
                   "v4": ({"video_id": "v4", "video_age_days": 1.0}, 3)}
    assert m.value("watchnext_examples_refused_total") == 1
    log.client.close()


def test_sent_rows_are_laid_over_store_entries_each_response_its_own_and_a_damaged_stream_loses_its_items(
        trained, redis_url):
    """The values a request sent for its shown items are logged as one Arrow IPC stream per response
    (`ServedItems.for_record`) and laid over the items' store entries when read. A retry merged into the same
    impression keeps its own rows; a stream another writer damaged loses its items alone, each counted."""
    config = load_config(trained["config_path"])
    m = Metrics()
    log = ImpressionLog(config, redis_url, m)
    t = section_type(config, "candidate")
    past = time.time() - config.service.attribution_window_s - 60

    def served(rid: str, ids: list[str], ages: list[float | None], order: list[int], raw: list[bytes]) -> dict:
        """An impression of candidates `ids` (the ages sent), showing rows `order` with store entries `raw`."""
        sent = pa.array([{"video_id": i, "video_age_days": a} for i, a in zip(ids, ages)], type=t)
        imp = _impressions(config, 1, 1, past)[0]
        imp["request_id"] = rid
        shown = [ids[j] for j in order]
        imp["items"] = ServedItems(shown, np.array(raw, dtype=object), sent, np.array(order))
        return imp

    # the first response shows c (not looked up) then a (its store entry has a view count)
    log.add(served("r1", ["a", "b", "c"], [1.5, None, 3.0], [2, 0], [b"", b'{"video_views":10.0}']))
    # its retry (same request_id and user): shows b, sent no age, over its entry, then a with another age
    log.add(served("r1", ["a", "b"], [7.0, None], [1, 0], [b'{"video_age_days":9.0}', b'{"video_views":5.0}']))
    # another request whose sent rows will be damaged, and one with none sent at all
    log.add(served("r2", ["d", "e"], [2.0, 4.0], [0, 1], [b"", b""]))
    plain = _impressions(config, 1, 1, past)[0]
    plain["request_id"] = "r3"
    plain["items"] = ServedItems(["f"], np.array([b'{"video_age_days":6.0}'], dtype=object), None, np.array([0]))
    log.add(plain)
    assert log.flush() == 4
    r = redis.Redis.from_url(redis_url)
    imp_keys = [k for k in r.scan_iter("wn:imp:{*}:*")]
    assert len(imp_keys) == 3  # the retry merged into the first response's impression
    for k in imp_keys:
        fields = r.hkeys(k)
        if b"i:d" in fields:
            (blob,) = [f for f in fields if f.startswith(b"s:")]
            r.hset(k, blob, b"not an arrow stream")
    assert log.close_due() == 4
    got = {e["candidate"]["video_id"]: (e["candidate"], e["position"]) for e in stream_examples(redis_url)}
    assert got == {
        "c": ({"video_id": "c", "video_age_days": 3.0}, 0),  # the first response's; no store entry looked up
        "a": ({"video_id": "a", "video_age_days": 7.0, "video_views": 5.0}, 1),  # the retry's row and entry
        "b": ({"video_id": "b", "video_age_days": 9.0}, 0),  # a null sent keeps the store's value
        "f": ({"video_id": "f", "video_age_days": 6.0}, 0),
    }
    assert m.value("watchnext_examples_refused_total") == 2  # d and e
    r.close()
    log.client.close()


def test_a_record_reaches_redis_byte_for_byte(trained, redis_url):
    """A record's fields go to the write script as one argument of length-prefixed fields (`_fields`): what Redis
    holds is the record's mapping exactly, binary values (an Arrow stream), empty and long ones included."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    imp = _impressions(config, 1, 1, time.time())[0]
    t = section_type(config, "candidate")
    long_entry = json.dumps({"video_id": "v1", "video_tags": ["t" * 100] * 1000}).encode()  # 100 KB
    sent = pa.array([{"video_id": "v1", "video_age_days": 2.0}, {"video_id": "v2", "video_age_days": None}], type=t)
    imp["items"] = ServedItems(["v1", "v2"], np.array([long_entry, b""], dtype=object), sent, np.array([0, 1]))
    rec = log._record(imp)
    pipe = log.client.pipeline(transaction=False)
    log._write(pipe, rec)
    pipe.execute()
    r = redis.Redis.from_url(redis_url)
    (key,) = list(r.scan_iter("wn:imp:{*}:*"))
    held = {k.decode(): v for k, v in r.hgetall(key).items()}
    assert held == rec.mapping and len(held) == 5  # _, _due, s:<G>, i:v1, i:v2
    assert held["i:v1"] == b'{"candidate":' + long_entry + b',"position":0,"sent":"' + key.decode().rsplit(":")[-1].encode() + b'"}'
    assert any(b"\x00" in v for v in held.values())  # the Arrow stream, binary, whole
    r.close()
    log.client.close()


def test_rank_with_a_lone_surrogate_is_refused_and_the_next_flush_is_whole(trained, server, client, redis_url):
    """Finding 2 through the API: 4xx naming the field, and the impressions around it all reach Redis."""
    reqs = rank_requests(trained["history"], 4, top_k=2)
    bad = json.dumps(dict(reqs[0], request_id="x")).replace('"x"', '"\\ud800"')
    r = client.post("/v1/rank", content=bad, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "surrogate" in r.json()["error"]["reason"]
    bad = json.dumps(reqs[1]).replace('"video_id": "', '"video_id": "\\udfff', 1)
    r = client.post("/v1/rank", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["reason"]
    for req in reqs[2:]:
        assert client.post("/v1/rank", json=req).status_code == 200
    m = server.service.metrics
    assert wait_for(lambda: m.value("watchnext_impressions_logged_total") == 2, 5)
    assert not nonzero(m, "watchnext_impressions_dropped_total")


def test_buffer_is_bounded_in_bytes_while_redis_is_away(trained, models_dir, tmp_path):
    """Finding 5: bounded by count only, the buffer held 2.3 GB per worker; now a byte bound, shed oldest, counted."""
    port = free_port()
    rs = start_embedded(tmp_path / "r1", port=port, appendonly=False)
    bound_mb = 0.25
    reqs = rank_requests(trained["history"], 200, top_k=10)
    try:
        with live_service(trained["config_path"], models_dir, rs.url, impression_buffer_mb=bound_mb) as srv:
            log, m = srv.service.log, srv.service.metrics
            rs.stop()
            peak = 0
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for req in reqs:
                    assert c.post("/v1/rank", json=req).status_code == 200
                    peak = max(peak, log.buf_bytes)
            assert 0 < peak <= bound_mb * (1 << 20)
            shed = m.value("watchnext_impressions_dropped_total", reason="buffer_full")
            assert shed > 0 and log.backlog() + shed == len(reqs)
            # the backlog gauges, set by the flusher's failed writes (not by each request)
            assert wait_for(lambda: (m.value("watchnext_impression_backlog"), m.value("watchnext_impression_backlog_bytes"))
                            == (log.backlog(), log.buf_bytes), 5)
            rs = start_embedded(tmp_path / "r2", port=port, appendonly=False)
            assert wait_for(lambda: log.backlog() == 0, 10)
            assert wait_for(lambda: m.value("watchnext_impression_backlog") == 0, 5)
            assert m.value("watchnext_impressions_logged_total") + shed == len(reqs)  # every impression written or counted as shed
            assert redis.Redis.from_url(rs.url).zcard("wn:imp:due") + len(stream_examples(rs.url)) // 10 > 0
    finally:
        rs.stop()


CLOSER = """
import sys, time
sys.path.insert(0, {root!r})
import service.impressions as imp
from service.impressions import ImpressionLog
from service.observability import Metrics
from watchnext.config import load_config
imp.CLOSE_BATCH, imp.COMMIT_BYTES = 7, 3000  # many small atomic writes: kills land between them
log = ImpressionLog(load_config({config!r}), {url!r}, Metrics(), lease_s=0.4)
send = log._send
log._send = lambda *a: (time.sleep(0.02), send(*a))[1]  # ~150 writes: >= 3 s, so the kills land mid-work
print("ready", flush=True)
while True:
    log.close_due(now=time.time() + 10)
    time.sleep(0.01)
"""


def test_closer_killed_at_random_points_loses_and_duplicates_nothing(trained, redis_url):
    """Finding 6: the closer removed ids from the due index before writing; kill -9 between lost them."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    imps = _impressions(config, 300, 3, time.time())
    for imp in imps:
        log.add(imp)
    assert log.flush() == 300
    log.client.close()
    r = redis.Redis.from_url(redis_url)
    code = CLOSER.format(root=ROOT, config=str(trained["config_path"]), url=redis_url)
    rng = np.random.default_rng(11)
    mid = 0  # kills that left the work half done (the work takes >= 3 s; the 9 kills come within 1.4 s)
    for _ in range(9):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.15)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        mid += 0 < r.xlen("watchnext:training") and r.zcard("wn:imp:due") + r.zcard("wn:imp:closing") > 0
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)  # then one to the end
    p.stdout.readline()
    assert wait_for(lambda: r.zcard("wn:imp:due") + r.zcard("wn:imp:closing") == 0, 60)
    p.kill()
    p.wait()
    p.stdout.close()
    assert mid >= 3, mid
    examples = stream_examples(redis_url)
    pairs = [(e["request_id"], e["candidate"]["video_id"]) for e in examples]
    assert len(pairs) == 900 and len(set(pairs)) == 900  # every impression's examples once
    assert r.hlen("wn:imp:owner") == 0
    r.close()


def _imp(rid: str, user: str, items: list[str], ts: float) -> dict:
    return {"ts": ts, "request_id": rid, "user": {"user_id": user}, "query": {"query_video_id": "q"},
            "context": {"device": "mobile"}, "experiment": None, "arm": "control", "model_version": "1",
            "items": [(v, {"video_id": v}, j) for j, v in enumerate(items)]}


def _fb(rid: str, item: str) -> dict:
    return {"request_id": rid, "item_id": item, "labels": {"click": 1.0}}


def test_a_retry_written_while_its_first_impression_closes_keeps_its_items_and_feedback(trained, redis_url):
    """Review F1: a retry (same request_id and user) was written into the hash a closer was closing, then deleted."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    now = time.time()
    log.add(_imp("S", "A", ["x", "y"], now - 100))  # window long closed
    log.flush()
    toks = log._claim(keys=["wn:imp:due", "wn:imp:closing", "wn:imp:owner"],
                      args=[now, 10, now + 30, log.closer_id])  # a closer takes it ...
    groups = list(log._groups([t.decode() for t in toks]))  # ... and reads it
    log.add(_imp("S", "A", ["z"], now))  # the retry, its window open
    log.flush()
    assert log.record_feedback([_fb("S", "z")]) == ["ok"]
    assert log.record_feedback([_fb("S", "x")]) == ["expired"]  # the first one is being closed
    for group, lines in groups:
        log._send(group, lines)
    assert log.close_due(now=now + config.service.attribution_window_s + 5) == 1
    got = {(e["candidate"]["video_id"], e["labels"]["click"]) for e in stream_examples(redis_url)}
    assert got == {("x", 0.0), ("y", 0.0), ("z", 1.0)}
    log.client.close()


def test_a_retry_inside_the_window_is_the_same_impression(trained, redis_url):
    """The same request_id and user answered twice while the window is open: one impression, each item once."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    now = time.time()
    log.add(_imp("S", "A", ["x", "y"], now - 1))
    log.add(_imp("S", "A", ["y", "z"], now))
    log.add(_imp("S", "B", ["x"], now))  # another user: another impression
    assert log.flush() == 3
    r = redis.Redis.from_url(redis_url)
    assert r.zcard("wn:imp:due") == 2
    assert log.record_feedback([_fb("S", "z")]) == ["ok"]
    assert log.close_due(now=now + config.service.attribution_window_s + 5) == 4
    got = sorted((e["user"]["user_id"], e["candidate"]["video_id"], e["position"], e["labels"]["click"])
                 for e in stream_examples(redis_url))
    assert got == [("A", "x", 0, 0.0), ("A", "y", 0, 0.0), ("A", "z", 1, 1.0), ("B", "x", 0, 0.0)]
    r.close()
    log.client.close()


def test_a_late_click_is_never_credited_to_another_users_impression(trained, redis_url):
    """Review F2: user A's late click on x joined user B's open impression of x under the same request_id."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    now = time.time()
    log.add(_imp("S", "A", ["x"], now - 100))
    log.add(_imp("S", "B", ["x", "w"], now))
    log.flush()
    assert log.record_feedback([_fb("S", "x")]) == ["ambiguous"]  # A's window passed, not yet closed
    assert log.close_due() == 1  # A's closes
    assert log.record_feedback([_fb("S", "x"), _fb("S", "w")]) == ["ambiguous", "ok"]  # A's closed; w: B's only
    log.client.close()


def test_feedback_for_an_impression_a_closer_has_taken_is_expired_not_lost(trained, redis_url):
    """Review F3: feedback checked against a stale clock was joined after the closer read the list, then deleted."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    now = time.time()
    log.add(_imp("S", "A", ["x"], now - config.service.attribution_window_s + 0.5))  # closes in 0.5 s
    log.flush()
    log._claim(keys=["wn:imp:due", "wn:imp:closing", "wn:imp:owner"], args=[now + 1, 10, now + 30, log.closer_id])
    assert log.record_feedback([_fb("S", "x")]) == ["expired"]  # its window is still open by the clock
    log.client.close()


def test_an_error_reply_keeps_the_batch_and_it_is_written_later(trained, redis_url):
    """Review F4: an error reply (OOM under maxmemory) dropped the batch uncounted and left it pending forever."""
    config = load_config(trained["config_path"])
    m = Metrics()
    log = ImpressionLog(config, redis_url, m)
    r = redis.Redis.from_url(redis_url)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        for i in range(5):
            log.add(_imp(f"r{i}", "A", ["x"], time.time()))
        try:
            log.flush()
            raise AssertionError("the write did not fail")
        except ConnectionError as e:
            assert "maxmemory" in str(e)
        assert (log.backlog(), len(log.pending), m.value("watchnext_impressions_logged_total")) == (5, 5, 0)
    finally:
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", policy)
    assert log.flush() == 5 and log.pending == {} and r.zcard("wn:imp:due") == 5
    assert not nonzero(m, "watchnext_impressions_dropped_total")
    r.close()
    log.client.close()


def test_an_open_report_counts_each_impression_once_while_the_closer_works(trained, redis_url):
    """Impressions a closer has taken, or closes between the report's reads, are counted once (an open-window
    report missed 141 of 900 items when a closer held them)."""
    config = load_config(trained["config_path"])
    log = ImpressionLog(config, redis_url, Metrics())
    now = time.time()
    for i, ts in enumerate([now - 100, now - 100, now]):  # two due, one open
        log.add(dict(_imp(f"S{i}", f"U{i}", ["x", "y"], ts), experiment="e1", arm="control"))
    log.flush()

    def users(lines: bytes) -> list[str]:
        return sorted(json.loads(ln)["user_id"] for ln in lines.split(b"\n") if ln)

    want = ["U0", "U0", "U1", "U1", "U2", "U2"]
    claimed = [t.decode() for t in log._claim(keys=["wn:imp:due", "wn:imp:closing", "wn:imp:owner"],
                                              args=[now, 10, now + 30, log.closer_id])]
    assert len(claimed) == 2
    assert users(log.events_with_open("e1")) == want  # taken by a closer, not yet written
    groups = list(log._groups(claimed))
    snapshot = log.client.pipeline

    def pipeline(transaction=True, **kw):  # the closer commits right after the report's snapshot
        p = snapshot(transaction=transaction, **kw)
        if transaction:
            run = p.execute

            def execute():
                out = run()
                for group, lines in groups:
                    log._send(group, lines)
                return out
            p.execute = execute
        return p

    log.client.pipeline = pipeline
    assert users(log.events_with_open("e1")) == want  # closed between the snapshot and the reads
    log.client.pipeline = snapshot
    assert users(log.events_with_open("e1")) == want  # closed
    log.client.close()
