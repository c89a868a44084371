"""POST /v1/rank against a real uvicorn: ranking, units, limits, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from service.errors import BadRequest
from service.inference import InferenceSession
from service.request import RequestCodec
from tests.service.traffic import candidates_pool, rank_requests
from watchnext.config import load_config
from watchnext.scoring import combine, weight_vector


def direct_scores(config, onnx_path, req: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Heads and scores computed without the service: the encoder and ONNX Runtime alone."""
    codec = RequestCodec(config)
    inp = codec.parse(json.dumps(req).encode())
    sess = InferenceSession(onnx_path, "cpu", 1)
    heads = sess.run(codec.encode(inp))
    w = weight_vector(sess.task_names, config.score.weights)
    return heads, combine(heads, w, config.score.combine), sess.task_names


def test_batch_in_parts_equals_one_run(trained):
    """On the CPU a batch runs as parts at once (one ORT thread each): the same heads as one run, in order."""
    config = load_config(trained["config_path"])
    onnx = trained["models"] / "ranker" / "2" / "model.onnx"
    codec = RequestCodec(config)
    pool = candidates_pool(trained["history"], 300)
    whole = InferenceSession(onnx, "cpu", 1)
    split3 = InferenceSession(onnx, "cpu", 3)
    assert (whole.parts, split3.parts) == (1, 3)
    for n in (1, 47, 96, 97, 145, 300):
        inputs = codec.encode(codec.parse(json.dumps({"candidates": pool[:n]}).encode()))
        a, b = whole.run(inputs), split3.run(inputs)
        assert a.shape == b.shape == (n, len(whole.task_names))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        assert np.array_equal(split3.run(inputs), b)  # and the same on every call


def test_rank_returns_top_k_best_first_in_label_units(trained, client):
    config = load_config(trained["config_path"])
    req = rank_requests(trained["history"], 1, top_k=4)[0]
    r = client.post("/v1/rank", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == req["request_id"]
    assert body["model_version"] == "2" and body["arm"] == "control"
    assert len(body["items"]) == 4
    heads, scores, names = direct_scores(config, trained["models"] / "ranker" / "2" / "model.onnx", req)
    ids = [c["video_id"] for c in req["candidates"]]
    expect = np.argsort(-scores, kind="stable")[:4]
    assert [it["id"] for it in body["items"]] == [ids[i] for i in expect]
    for it, i in zip(body["items"], expect):
        assert it["score"] == pytest.approx(scores[i], rel=1e-6)
        assert list(it["heads"]) == names
        assert [it["heads"][t] for t in names] == pytest.approx(heads[i].tolist(), rel=1e-6)
    # label units: probabilities for binary tasks, seconds (not log seconds) for watch time
    for it in body["items"]:
        for t in config.tasks:
            if t.kind == "binary":
                assert 0.0 <= it["heads"][t.name] <= 1.0
        assert it["heads"]["watch_time"] > 1.0  # log1p inverted: simulated watches last minutes
    scores_out = [it["score"] for it in body["items"]]
    assert scores_out == sorted(scores_out, reverse=True)


def test_one_candidate_and_generated_request_id(trained, client):
    c = candidates_pool(trained["history"], 1)[0]
    r = client.post("/v1/rank", json={"candidates": [c]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["request_id"]) == 32 and len(body["items"]) == 1
    assert body["items"][0]["id"] == c["video_id"]


def test_integer_ids_and_only_ids(trained, client):
    r = client.post("/v1/rank", json={"user": {"user_id": 17}, "candidates": [{"video_id": 3}, {"video_id": "v4"}]})
    assert r.status_code == 200, r.text
    assert {it["id"] for it in r.json()["items"]} == {"3", "v4"}


def test_default_top_k_and_empty_candidates(trained, client):
    cands = candidates_pool(trained["history"], 30)
    r = client.post("/v1/rank", json={"candidates": cands})
    assert len(r.json()["items"]) == 20  # [service] default_top_k
    r = client.post("/v1/rank", json={"candidates": []})
    assert r.status_code == 200 and r.json()["items"] == []


def test_unknown_features_are_ignored_and_counted(trained, client):
    cands = candidates_pool(trained["history"], 3)
    base = client.post("/v1/rank", json={"request_id": "a", "candidates": cands}).json()
    extra = [{**c, "colour": "red", "shininess": 3} for c in cands]
    r = client.post("/v1/rank", json={"request_id": "a", "user": {"mood": "happy"}, "candidates": extra})
    assert r.status_code == 200
    assert r.json()["items"] == base["items"]  # same scores: unknown keys change nothing
    metrics = client.get("/metrics").text
    assert "watchnext_unknown_features_total 7" in metrics


BAD = [
    # (body, status, field, words in the reason)
    (b"{not json", 400, "body", "not valid JSON"),
    (b"[1, 2]", 422, "body", "expected a JSON object"),
    (b'{"candidates": 5}', 422, "candidates", "expected a list"),
    (b'{"user": []}', 422, "user", "expected an object"),
    (b'{"candidates": [{"video_id": "v1"}, 7]}', 422, "candidates[1]", "expected an object"),
    (b'{"candidates": [{"video_id": "v1"}, {"video_id": "v2", "video_age_days": "old"}]}', 422,
     "candidates[1].video_age_days", "expected a number"),
    (b'{"candidates": [{"video_id": "v1", "video_age_days": NaN}]}', 422, "candidates[0].video_age_days", "finite"),
    (b'{"candidates": [{"video_id": "v1", "video_views": Infinity}]}', 422, "candidates[0].video_views", "finite"),
    (b'{"candidates": [{"video_id": "v1", "video_age_days": true}]}', 422, "candidates[0].video_age_days", "expected a number"),
    (b'{"candidates": [{"video_id": "v1"}, {"video_id": "v2", "video_embedding": [1, 2]}]}', 422,
     "candidates[1].video_embedding", "expected 16 numbers"),
    (b'{"candidates": [{"video_id": "v1", "video_age_days": -3}]}', 422, "candidates[0].video_age_days", "> -1"),
    (b'{"candidates": [{"video_channel": "c1"}]}', 422, "candidates[0].video_id", "is required"),
    (b'{"candidates": [{"video_id": [1]}]}', 422, "candidates[0].video_id", "expected a string"),
    (b'{"candidates": [{"video_id": "v1"}, {"video_id": "v2"}, {"video_id": "v3"}, {"video_id": "v2"}]}', 422,
     "candidates[3].video_id", "repeats candidates[1]"),
    (b'{"query": {"query_embedding": [1, NaN, 3]}, "candidates": []}', 422, "query.query_embedding", None),
    (b'{"context": {"hour": "noon"}, "candidates": []}', 422, "context.hour", "expected a number"),
    (b'{"context": {"hour": 1e39}, "candidates": []}', 422, "context.hour", "float32"),  # no rows, still checked
    (b'{"user": {"user_embedding": [1e39, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}, "candidates": [{"video_id": "a"}]}',
     422, "user.user_embedding", "float32"),
    (b'{"candidates": [], "top_k": 0}', 422, "top_k", ">= 1"),
    (b'{"candidates": [], "top_k": "5"}', 422, "top_k", None),
    (b'{"request_id": {"a": 1}, "candidates": []}', 422, "request_id", None),
    (b'{"user": {"user_id": "u1"}}', 422, "candidates", "is required"),
]


@pytest.mark.parametrize("body,status,field,words", BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_field(client, body, status, field, words):
    r = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field
    if words:
        assert words in err["reason"]


def test_limits_on_candidates_and_body_size(trained, client):
    cands = [{"video_id": f"v{i}"} for i in range(2001)]
    r = client.post("/v1/rank", json={"candidates": cands})
    assert r.status_code == 413 and r.json()["error"]["field"] == "candidates"
    assert "at most 2000" in r.json()["error"]["reason"]
    big = b'{"candidates": [], "pad": "' + b"x" * (8 * 1024 * 1024) + b'"}'
    r = client.post("/v1/rank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    # without a Content-Length (chunked): cut off once past the limit
    def chunks():
        yield b'{"candidates": [], "pad": "'
        for _ in range(9):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_2000_candidates_rank(trained, client):
    pool = candidates_pool(trained["history"], 300)
    cands = [{**pool[i % len(pool)], "video_id": f"x{i}"} for i in range(2000)]
    r = client.post("/v1/rank", json={"candidates": cands, "top_k": 2000})
    assert r.status_code == 200
    items = r.json()["items"]
    assert len(items) == 2000 and len({it["id"] for it in items}) == 2000
    assert all(math.isfinite(it["score"]) for it in items)


def test_non_finite_model_output_never_reaches_a_response(trained, server, client):
    """A model that answers NaN for some rows: those rows are dropped and counted."""
    svc = server.service
    model = svc.models.current
    real_run = model.session.run

    def run(inputs):
        heads = real_run(inputs)
        heads[::2, 0] = np.nan  # every other candidate
        return heads

    model.session.run = run
    try:
        cands = candidates_pool(trained["history"], 6)
        r = client.post("/v1/rank", json={"candidates": cands, "top_k": 6})
    finally:
        model.session.run = real_run
    assert r.status_code == 200
    ids = [it["id"] for it in r.json()["items"]]
    assert ids and set(ids) <= {c["video_id"] for c in cands[1::2]}
    assert "NaN" not in r.text and "Infinity" not in r.text
    assert svc.metrics.nonfinite.get() == 3


def test_native_paths_agree_with_arrow(trained, monkeypatch):
    """The native scan of the body's bytes, orjson + the native gather, and the Arrow path (which serves where
    watchnext._native was not built): the same inputs, ids, served features and counts."""
    import watchnext.encoding

    if not watchnext.encoding.NATIVE:
        pytest.skip("watchnext._native was not built")
    config = load_config(trained["config_path"])
    codec = RequestCodec(config)
    order = np.array([2, 0, 1])
    known = codec.known["candidate"]
    for req in rank_requests(trained["history"], 3):
        req["candidates"][1]["colour"] = "red"
        req["candidates"][2]["video_views"] = None
        req["candidates"][0]["video_age_days"] = 3  # an integer
        body = json.dumps(req).encode()
        scanned = codec.parse(body)
        with monkeypatch.context() as m:
            m.setattr(codec, "_parse_scanned", lambda body: None)
            gathered = codec.parse(body)
            m.setattr(watchnext.encoding, "_native", None)
            arrow = codec.parse(body)
            arrow_inputs = codec.encode(arrow)
        assert scanned._spans is not None and gathered._rows is not None and arrow.gathered is None
        for inp in (scanned, gathered):
            assert inp.gathered is not None
            assert inp.unknown_features == arrow.unknown_features == 1
            assert inp.candidates.equals(arrow.candidates)
            inputs = codec.encode(inp)
            assert all(np.array_equal(arrow_inputs[k], inputs[k]) for k in arrow_inputs)
            assert inp.served(inp.objects(order), known) == arrow.served(arrow.objects(order), known)
            assert codec.missing_candidate_rows(inp).tolist() == codec.missing_candidate_rows(arrow).tolist()
        assert [o["video_id"] for o in scanned.objects(order)] == [req["candidates"][i]["video_id"] for i in order]
        assert "colour" not in scanned.served(scanned.objects(np.array([1])), known)[0]
    # what the scan is not sure of goes to orjson, with the same result
    for body in (b'{"candidates": [{"video_id": "a\\u0062"}]}', b'{"candidates": [{"video_id": "a", "video_id": "b"}]}',
                 b'{"candidates": [{"video_id": "a", "video_views": 12345678901234567890}]}',
                 b'{"candidates": [{"video_id": "a"}], "candidates": [{"video_id": "b"}]}'):
        assert codec._parse_scanned(body) is None
        inp = codec.parse(body)
        assert inp._rows is not None or inp._arr is not None
    assert codec.parse(b'{"candidates": [{"video_id": "a\\u0062"}]}').objects(np.array([0]))[0]["video_id"] == "ab"


def test_checking_path_agrees_with_fast_path(trained):
    """The same request through orjson + Arrow and through json + checks: the same arrays and counts."""
    config = load_config(trained["config_path"])
    codec = RequestCodec(config)
    for req in rank_requests(trained["history"], 3):
        req["candidates"][1]["colour"] = "red"  # unknown features are counted on both paths
        req["user"]["mood"] = 3
        req["candidates"][2]["video_views"] = None
        body = json.dumps(req).encode()
        fast, checked = codec._parse_fast(body), codec._parse_checked(body)
        assert fast is not None
        assert fast.candidates.equals(checked.candidates)
        assert fast.shared == checked.shared and fast.unknown_features == checked.unknown_features == 2
        assert (fast.request_id, fast.top_k) == (checked.request_id, checked.top_k)
        a, b = codec.encode(fast), codec.encode(checked)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # integer ids: Arrow refuses them, the checking path reads them as strings
    assert codec._parse_fast(b'{"candidates": [{"video_id": 3}]}') is None
    assert codec.parse(b'{"candidates": [{"video_id": 3}]}').candidates.field("video_id").to_pylist() == ["3"]
    assert codec._parse_fast(b'{"candidates": []} {"candidates": []}') is None
    # NaN, a null candidate: the checking path names the field
    for body in (b'{"candidates": [{"video_id": "a", "video_views": NaN}]}', b'{"candidates": [{"video_id": "a"}, null]}'):
        assert codec._parse_fast(body) is None
    with pytest.raises(BadRequest, match="candidates\\[1\\]"):
        codec.parse(b'{"candidates": [{"video_id": "a"}, null]}')
    # a list where a section belongs: both paths name the section
    for parse in (codec._parse_fast, codec._parse_checked):
        with pytest.raises(BadRequest, match="^user: expected an object"):
            parse(b'{"user": [], "candidates": [{"video_id": "a"}]}')


def test_service_never_imports_torch():
    code = "import sys, service.app, service.cli; assert 'torch' not in sys.modules, 'torch imported'; " \
           "assert not any(m == 'training' or m.startswith('training.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_store_fill_leaves_a_candidate_without_an_entry_missing(small_config):
    """A candidate the store has no entry for stays missing (its vector is not an empty list)."""
    import numpy as np
    import pyarrow as pa

    from service.request import RequestCodec

    codec = RequestCodec(small_config)
    arr = pa.array([{"video_id": "a"}, {"video_id": "b"}], type=codec.types["candidate"])
    stored = [{"video_embedding": [0.5] * 16, "video_age_days": 2.0}, None]
    filled = codec.fill_candidates(arr, np.array([0, 1]), stored)
    emb = filled.field("video_embedding").to_pylist()
    assert emb[0] == [0.5] * 16 and emb[1] is None
    assert filled.field("video_age_days").to_pylist() == [2.0, None]


def test_feature_store_reads_a_reply_in_one_parse_and_survives_a_corrupt_entry(small_config, redis_url):
    import redis

    from service.features import FeatureStore
    from service.observability import Metrics

    r = redis.Redis.from_url(redis_url)
    r.set("wn:f:candidate:a", b'{"video_age_days": 1.0}')
    r.set("wn:f:candidate:b", b"{not json")
    m = Metrics()
    store = FeatureStore(small_config, redis_url, m, timeout_ms=500)
    keys = ["wn:f:candidate:a", "wn:f:candidate:absent"]
    assert store.get(keys) == [{"video_age_days": 1.0}, None]
    assert store.get(keys + ["wn:f:candidate:b"]) == [{"video_age_days": 1.0}, None, None]
    assert m.feature_hits.get() == 2
    store.close()


def test_rank_early_serves_what_finish_serves(trained, redis_url):
    """The model starts on the first share of the candidates while the rest are read (Ranker.rank_early, the
    path of the only request in flight): the same items, order, scores and impression as parsing everything
    first; and wherever it is in doubt (sections after the candidates, a value to check, ids that repeat,
    a look-up in the feature store) it gives what `finish` gives, errors included."""
    from service.features import FeatureStore
    from service.models import ModelManager
    from service.observability import Metrics
    from service.ranker import Ranker
    from service.request import RankInput
    from watchnext.repository import ModelRepository

    config = load_config(trained["config_path"])
    repo = ModelRepository(trained["models"], config.model.name)
    metrics = Metrics()
    base = rank_requests(trained["history"], 1, top_k=30)[0]
    pool = candidates_pool(trained["history"], 300)

    def same(a, b) -> None:
        assert [i["id"] for i in a.body["items"]] == [i["id"] for i in b.body["items"]]
        np.testing.assert_allclose([i["score"] for i in a.body["items"]], [i["score"] for i in b.body["items"]],
                                   rtol=1e-5)
        assert {k: v for k, v in a.impression.items() if k != "ts"} == {k: v for k, v in b.impression.items() if k != "ts"}

    shares: list[int] = []  # the rows of each share submitted early
    events: list = []  # ("run", parts) for each session.run, and the wait for a share

    class Counted:  # the real future, its wait recorded
        def __init__(self, future):
            self.future = future

        def result(self):
            events.append("wait for the share")
            return self.future.result()

        def __getattr__(self, name):
            return getattr(self.future, name)

    def instrument(model) -> None:
        """The model's real session, its submits and runs recorded: the early path runs the rest as
        parts - 1 parts; `finish` runs the whole batch as the session's parts (None)."""
        submit, run = model.session.submit, model.session.run

        def counted(x):
            shares.append(len(x["video_id"]))
            return Counted(submit(x))

        def recorded(x, parts=None):
            events.append(("run", parts))
            return run(x, parts)

        model.session.submit, model.session.run = counted, recorded

    def early(ranker, body, model, live=None):
        """rank_early's answer, and what it did."""
        shares.clear()
        events.clear()
        return ranker.rank_early(body, model, live), list(events)

    dropped = [("run", None)]  # the share's heads thrown away: `finish` ran the whole batch
    for threads in (2, 3):
        model = ModelManager(config, repo, metrics, "cpu", threads).load(2)
        instrument(model)
        ranker = Ranker(config, FeatureStore(config, None, metrics, 20), metrics)
        kept = [("run", threads - 1), "wait for the share"]  # the rest ran while the share did, not after it
        for n in (95, 96, 150, 300):
            body = json.dumps({**base, "candidates": pool[:n]}).encode()
            got, did = early(ranker, body, model)
            room = n + 4  # the objects: the body's own, user, query, context, and the candidates
            assert shares == ([room // threads] if room >= 48 * threads else []), n
            assert did == (kept if shares else dropped), n
            same(got, ranker.finish(ranker.codec.parse(body), model))
        # sections after the candidates: the ones before are not the request's, so the early share is dropped
        # (unless they only add top_k); an escaped id in the rest, which the scan leaves to orjson: parsed again
        escaped = [dict(c) for c in pool[:200]]
        escaped[150]["video_id"] = "vé150"
        for tail, cands, want_did in (({"user": {**base["user"], "user_id": "someone-else"}}, pool[:200], dropped),
                                      ({"top_k": 3}, pool[:200], kept), ({}, escaped, dropped)):
            body = json.dumps({**base, "candidates": cands}).encode()
            if tail:
                body = body[:-1] + b", " + json.dumps(tail).encode()[1:]
            assert (b"\\u00e9" in body) == (cands is escaped)
            got, did = early(ranker, body, model)
            assert len(shares) == 1 and did == want_did, tail
            same(got, ranker.finish(ranker.codec.parse(body), model))
        # a value to check in the first share or in the rest, and ids that repeat: the error parse + encode give
        for i, change in ((3, {"video_views": -5.0}), (180, {"video_views": -5.0}), (190, {"video_id": pool[1]["video_id"]})):
            cands = [dict(c) for c in pool[:200]]
            cands[i].update(change)
            body = json.dumps({**base, "candidates": cands}).encode()
            with pytest.raises(BadRequest) as want:
                ranker.finish(ranker.codec.parse(body), model)
            with pytest.raises(BadRequest) as got:
                ranker.rank_early(body, model)
            assert (got.value.field, got.value.reason) == (want.value.field, want.value.reason)
        # more candidates than the limit: a 413, and no share is run for it
        many = [{"video_id": f"x{i}"} for i in range(config.service.max_candidates + 1)]
        shares.clear()
        with pytest.raises(BadRequest) as got:
            ranker.rank_early(json.dumps({**base, "candidates": many}).encode(), model)
        assert got.value.status == 413 and shares == []

    # a live experiment: each user's arm, version and weights, as `finish` routes them; a section after the
    # candidates that differs only in a zero's sign is another request too (the share is dropped)
    from service.experiments import LiveExperiment
    from watchnext.experiments import Arm, Experiment

    ranker = Ranker(config, FeatureStore(config, None, metrics, 20), metrics)
    promoted, older = (ModelManager(config, repo, metrics, "cpu", 2).load(v) for v in (2, 1))
    instrument(promoted)
    exp = Experiment("e", (Arm("control", 0.5), Arm("older", 0.5, version=1, weights={"click": 1.0, "like": 3.0})), "s")
    live = LiveExperiment(exp, {1: older}, b"")
    arms = set()
    for u in range(12):
        user = {**base["user"], "user_id": f"u{u}"}
        body = json.dumps({**base, "user": user, "candidates": pool[:200]}).encode()
        got, want = ranker.rank_early(body, promoted, live), ranker.finish(ranker.codec.parse(body), promoted, live)
        same(got, want)
        assert (got.body["arm"], got.body["model_version"]) == (want.body["arm"], want.body["model_version"])
        arms.add(got.body["arm"])
    assert arms == {"control", "older"}
    body = json.dumps({**base, "context": {**base["context"], "hour": 0.0}, "candidates": pool[:200]}).encode()
    body = body[:-1] + b', "context": ' + json.dumps({**base["context"], "hour": -0.0}).encode() + b"}"
    got, did = early(ranker, body, promoted)
    assert len(shares) == 1 and did == dropped
    assert got.impression["context"]["hour"] == 0.0 and str(got.impression["context"]["hour"]) == "-0.0"
    same(got, ranker.finish(ranker.codec.parse(body), promoted))

    # with a feature store: a candidate that leaves features out is handed back, to be finished off the loop
    model = ModelManager(config, repo, metrics, "cpu", 2).load(2)
    ranker = Ranker(config, FeatureStore(config, redis_url, metrics, 200), metrics)
    cands = [dict(c) for c in pool[:200]]
    del cands[150]["video_embedding"]
    got = ranker.rank_early(json.dumps({**base, "candidates": cands}).encode(), model)
    assert isinstance(got, RankInput) and got.n == 200
    full = ranker.rank_early(json.dumps({**base, "candidates": pool[:200]}).encode(), model)
    assert not isinstance(full, RankInput) and len(full.body["items"]) == 30
