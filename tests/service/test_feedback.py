"""Impressions, feedback and the attribution window, against a real Redis and a real uvicorn."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from tests.helpers import stream_examples, wait_for
from tests.service.traffic import arrow_body, rank_requests
from watchnext.config import load_config
from watchnext.examples import Decoder

ARROW = "application/vnd.apache.arrow.stream"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_feedback_joins_and_window_close_emits_labelled_examples(trained, server, client, redis_url):
    req = rank_requests(trained["history"], 1, top_k=3)[0]
    body = client.post("/v1/rank", json=req).json()
    served = [it["id"] for it in body["items"]]
    r = client.post("/v1/feedback", json=[
        {"request_id": req["request_id"], "item_id": served[0], "labels": {"click": 1, "watch_time": 50.5, "like": True}},
        {"request_id": req["request_id"], "item_id": served[1], "labels": {"dismiss": 1}},
        {"request_id": req["request_id"], "item_id": "never-served", "labels": {"click": 1}},
        {"request_id": "no-such-request", "item_id": served[0], "labels": {"click": 1}},
    ])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["accepted"] == 2
    assert [(d["index"], d["reason"]) for d in out["dropped"]] == [
        (2, "item_id was not among the items served for this request_id"),
        (3, "no impression with this request_id (never served, or served by another deployment)"),
    ]
    # a second feedback event for the same item merges (later wins)
    client.post("/v1/feedback", json={"request_id": req["request_id"], "item_id": served[0], "labels": {"rating": 4}})

    examples = wait_for(lambda: stream_examples(redis_url), timeout=10)
    assert len(examples) == 3
    by_id = {e["candidate"]["video_id"]: e for e in examples}
    assert by_id[served[0]]["labels"] == {"click": 1.0, "watch_time": 50.5, "dismiss": 0.0, "like": 1.0, "rating": 4.0}
    # no feedback: click and dismiss take their default 0; satisfaction labels stay missing
    assert by_id[served[1]]["labels"] == {"click": 0.0, "watch_time": None, "dismiss": 1.0, "like": None, "rating": None}
    assert by_id[served[2]]["labels"] == {"click": 0.0, "watch_time": None, "dismiss": 0.0, "like": None, "rating": None}
    for pos, item in enumerate(served):
        e = by_id[item]
        assert e["position"] == pos and e["request_id"] == req["request_id"]
        assert e["model_version"] == "2" and e["arm"] == "control"
        assert e["user"] == req["user"] and e["context"] == req["context"]
        src = next(c for c in req["candidates"] if c["video_id"] == item)
        assert e["candidate"] == {k: v for k, v in src.items() if v is not None}  # features as served
    # the trainer's own reader accepts every example
    config = load_config(trained["config_path"])
    dec = Decoder(config, on_bad_line="stop")
    block = "\n".join(json.dumps(e) for e in examples).encode() + b"\n"
    table, lines, ends = dec.parse_lines(block, "stream", 1)
    assert len(dec.encode(table, lines, ends, "stream")) == 3

    # after the window closed: expired, dropped with the reason
    r = client.post("/v1/feedback", json={"request_id": req["request_id"], "item_id": served[0], "labels": {"click": 1}})
    assert r.json()["dropped"][0]["reason"] == "the attribution window of this impression has closed"
    m = server.service.metrics
    assert [m.value("watchnext_feedback_total", result=r) for r in ("accepted", "expired", "unknown", "unknown_item")] \
        == [3, 1, 1, 1]
    assert m.value("watchnext_examples_emitted_total") == 3


@pytest.mark.parametrize("body,field", [
    ({"request_id": "r", "item_id": "v", "labels": {"click": 2}}, "labels.click"),
    ({"request_id": "r", "item_id": "v", "labels": {"colour": 1}}, "labels.colour"),
    ({"request_id": "r", "item_id": "v", "labels": {"watch_time": "long"}}, "labels.watch_time"),
    ({"request_id": "r", "item_id": "v", "labels": {"watch_time": -5}}, "labels.watch_time"),
    ({"request_id": "r", "item_id": "v"}, "labels"),
    ({"item_id": "v", "labels": {}}, "request_id"),
    ([{"request_id": "r", "item_id": "v", "labels": {}}, {"request_id": "r", "labels": {}}], "[1].item_id"),
    ([], "body"),
    ("click", "body"),
])
def test_bad_feedback_names_the_field(client, body, field):
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


OK = {"request_id": "r", "item_id": "v", "labels": {"click": 1}}


@pytest.mark.parametrize("labels, field, reason", [
    ({"click": 1, "rating": 1e20}, "labels.rating", "must be in the task's range [1, 5], got 1e+20"),
    ({"click": 1, "rating": -100}, "labels.rating", "must be in the task's range [1, 5], got -100.0"),
    ({"click": 1, "rating": 5.5}, "labels.rating", "must be in the task's range [1, 5], got 5.5"),
    ({"watch_time": -0.5}, "labels.watch_time", "must be in the task's range [0, 1e+07], got -0.5"),
    ({"watch_time": 1e39}, "labels.watch_time", "must be in the task's range [0, 1e+07], got 1e+39"),
    ({"watch_time": 10**400}, "labels.watch_time", "must be a finite number"),
    ({"like": 0.5}, "labels.like", "a binary label must be 0 or 1, got 0.5"),
])
def test_labels_outside_their_range_are_refused(client, redis_url, labels, field, reason):
    r = client.post("/v1/feedback", content=json.dumps({**OK, "labels": labels}).encode())
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"field": field, "reason": reason}
    # in a list, the event is named by its index, and nothing of the list is taken
    r = client.post("/v1/feedback", content=json.dumps([OK, OK, OK, {**OK, "labels": labels}, OK]).encode())
    assert r.status_code == 422 and r.json()["error"]["field"] == f"[3].{field}"
    assert redis.Redis.from_url(redis_url).xlen("watchnext:training") == 0


def test_labels_at_the_bounds_of_their_range_are_accepted(client):
    r = client.post("/v1/feedback", json={**OK, "labels": {"click": 1, "rating": 5, "watch_time": 0}})
    assert r.status_code == 200, r.text  # accepted, then dropped: no such impression
    assert r.json()["dropped"][0]["reason"].startswith("no impression with this request_id")


@pytest.mark.parametrize("body, field", [
    (b'{"request_id": "\\ud800", "item_id": "v", "labels": {"click": 1}}', "request_id"),
    (b'{"request_id": "r", "item_id": "ab\\udfff", "labels": {"click": 1}}', "item_id"),
    (b'[{"request_id": "r", "item_id": "v", "labels": {}}, {"request_id": "r", "item_id": "\\udc00x", "labels": {}}]',
     "[1].item_id"),
])
def test_a_lone_surrogate_in_an_id_is_refused(client, body, field):
    r = client.post("/v1/feedback", content=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert r.json()["error"]["reason"].startswith("not valid Unicode (a lone surrogate at character")


def test_feedback_with_nan_is_refused(client):
    r = client.post("/v1/feedback", content=b'{"request_id": "r", "item_id": "v", "labels": {"watch_time": NaN}}')
    assert r.status_code == 422 and r.json()["error"]["field"] == "labels.watch_time"


def test_online_features_fill_what_the_request_leaves_out(trained, server, client, redis_url, tmp_path):
    """`watchnext features load` writes the store; a request with ids only scores like the full request."""
    config_path = trained["config_path"]
    req = rank_requests(trained["history"], 1, top_k=10)[0]
    lines = tmp_path / "features.jsonl"
    lines.write_text(json.dumps({**req, "candidates": req["candidates"]}) + "\n")
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "watchnext", "features", "load", str(lines), "--config", str(config_path)],
                         env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout)
    assert (counts["user"], counts["query"], counts["candidate"]) == (1, 1, 10)
    r = redis.Redis.from_url(redis_url)
    stored = json.loads(r.hget("wn:f:candidate:json", req["candidates"][0]["video_id"]))
    assert r.type("wn:f:candidate:json") == b"hash" and not r.keys(f"*{req['candidates'][0]['video_id']}*")
    r.close()
    assert stored == req["candidates"][0]  # the features as stored, logged with the impressions served from them

    full = client.post("/v1/rank", json=req).json()
    ids_only = {
        "request_id": req["request_id"],
        "user": {"user_id": req["user"]["user_id"]},
        "query": {"query_video_id": req["query"]["query_video_id"]},
        "context": req["context"],
        "candidates": [{"video_id": c["video_id"]} for c in req["candidates"]],
        "top_k": 10,
    }
    filled = client.post("/v1/rank", json=ids_only).json()
    assert [it["id"] for it in filled["items"]] == [it["id"] for it in full["items"]]
    for a, b in zip(filled["items"], full["items"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["heads"] == pytest.approx(b["heads"], abs=1e-4)
    # half the candidates sent whole, half by id: only the second half is looked up, and the answer is the same
    mixed = {**ids_only, "candidates": [c if i % 2 else {"video_id": c["video_id"]}
                                        for i, c in enumerate(req["candidates"])]}
    got = client.post("/v1/rank", json=mixed).json()
    assert [it["id"] for it in got["items"]] == [it["id"] for it in full["items"]]
    assert [it["score"] for it in got["items"]] == pytest.approx([it["score"] for it in full["items"]], abs=1e-4)
    # the same as Arrow bodies: a column per feature, null where the candidate is sent by id (every candidate, or
    # every other one), or a table of the one column of ids
    config = load_config(config_path)
    for content in (arrow_body(ids_only, config), arrow_body(mixed, config), arrow_body(ids_only)):
        got = client.post("/v1/rank", content=content, headers={"content-type": ARROW}).json()
        assert [it["id"] for it in got["items"]] == [it["id"] for it in full["items"]]
        assert [it["score"] for it in got["items"]] == pytest.approx([it["score"] for it in full["items"]], abs=1e-4)
    # a request value wins over the store
    changed = {**ids_only, "candidates": [{"video_id": c["video_id"], "video_age_days": 0.0} for c in req["candidates"]]}
    assert client.post("/v1/rank", json=changed).json()["items"] != full["items"]
    m = server.service.metrics
    # user, query and candidates read from Redis once, by the first id-only request; the later ones were answered by
    # the process's cache (the mixed request: user, query and its 5 candidates sent by id; the Arrow bodies as
    # many as their JSON; the changed one: all 12), and the full request asked for nothing
    assert m.value("watchnext_feature_store_hits_total") == 1 + 1 + 10
    assert m.value("watchnext_feature_cache_hits_total") == (1 + 1 + 5) + (12 + 7 + 12) + (1 + 1 + 10)
    assert m.value("watchnext_feature_store_misses_total", reason="outage") == 0
    # the impressions log each shown candidate's features as ranked: the store's entry, the values sent, or both
    svc = server.service
    want = {c["video_id"]: {k: v for k, v in c.items() if v is not None} for c in req["candidates"]}
    for body, ctype in ((json.dumps(ids_only).encode(), None), (json.dumps(mixed).encode(), None),
                        (arrow_body(mixed, config), ARROW), (arrow_body(ids_only), ARROW)):
        ranked = svc.ranker.rank(svc.ranker.prepare(body, ctype), svc.models.current)
        # the record written to Redis, read back as the closer reads it
        rec = svc.log._record(ranked.impression)
        examples = svc.log.examples_of({k.encode(): v for k, v in rec.mapping.items()}, [])
        shown = [it["id"] for it in full["items"]]
        assert [e["candidate"]["video_id"] for e in sorted(examples, key=lambda e: e["position"])] == shown
        assert {e["candidate"]["video_id"]: e["candidate"] for e in examples} == {i: want[i] for i in shown}


def test_features_load_names_a_bad_line(trained, redis_url, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "candidate", "id": "v1", "features": {"video_age_days": 1}}\n'
                   '{"source": "candidate", "id": "v2", "features": {"video_embedding": [1, 2]}}\n')
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "watchnext", "features", "load", str(bad), "--config",
                          str(trained["config_path"])], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{bad}:2: candidate.video_embedding: expected 16 numbers" in out.stderr
