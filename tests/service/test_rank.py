"""POST /v1/rank against a real uvicorn: ranking, units, limits, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from service.features import OnlineFeatures
from service.inference import InferenceSession
from service.observability import Metrics
from service.ranker import Ranker
from service.request import RequestCodec
from tests.service.prom import sample
from tests.service.traffic import arrow_body, candidates_pool, rank_requests
from watchnext.config import load_config
from watchnext.encoding import Encoder, section_type
from watchnext.scoring import combine, weight_vector


def offline_ranker(config, redis_url=None) -> Ranker:
    m = Metrics()
    return Ranker(config, OnlineFeatures(config, Encoder(config), redis_url, m, 500), m)


def encode(config, body: bytes, content_type=None, redis_url=None) -> dict[str, np.ndarray]:
    """The model's inputs for a request body, as the service builds them."""
    r = offline_ranker(config, redis_url)
    return r.encode(r.prepare(body, content_type))


def direct_scores(config, onnx_path, req: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Heads and scores computed without the service: the encoder and ONNX Runtime alone."""
    sess = InferenceSession(onnx_path, "cpu", 1)
    heads = sess.run(encode(config, json.dumps(req).encode()))
    w = weight_vector(sess.task_names, config.score.weights)
    return heads, combine(heads, w, config.score.combine), sess.task_names


def test_batch_in_parts_equals_one_run(trained):
    """On the CPU a batch runs as parts at once (one ORT thread each): the same heads as one run, in order."""
    config = load_config(trained["config_path"])
    onnx = trained["models"] / "ranker" / "2" / "model.onnx"
    pool = candidates_pool(trained["history"], 300)
    whole = InferenceSession(onnx, "cpu", 1)
    split3 = InferenceSession(onnx, "cpu", 3)
    assert (whole.parts, split3.parts) == (1, 3)
    for n in (1, 47, 96, 97, 145, 300):
        inputs = encode(config, json.dumps({"candidates": pool[:n]}).encode())
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
    assert sample(metrics, "watchnext_unknown_features_total") == 1  # the user's; candidates' unknown keys are not counted


BAD = [
    # (body, status, field, words in the reason)
    (b"{not json", 400, "body", "not valid JSON"),
    (b"[1, 2]", 422, "body", "expected `object`"),
    (b'{"candidates": 5}', 422, "candidates", "expected `array`"),
    (b'{"user": []}', 422, "user", "expected `object"),
    (b'{"candidates": [{"video_id": "v1"}, 7]}', 422, "candidates[1]", "expected `object`"),
    (b'{"candidates": [{"video_id": "v1"}, {"video_id": "v2", "video_age_days": "old"}]}', 422,
     "candidates[1].video_age_days", "expected `float | null`, got `str`"),
    (b'{"candidates": [{"video_id": "v1", "video_age_days": NaN}]}', 400, "body", "not valid JSON"),
    (b'{"candidates": [{"video_id": "v1", "video_views": Infinity}]}', 400, "body", "not valid JSON"),
    (b'{"candidates": [{"video_id": "v1", "video_views": 1e400}]}', 422, "candidates[0].video_views", "out of range"),
    (b'{"candidates": [{"video_id": "v1", "video_views": 1e39}]}', 422, "candidates[0].video_views", "float32"),
    (b'{"candidates": [{"video_id": "v1", "video_age_days": true}]}', 422, "candidates[0].video_age_days",
     "got `bool`"),
    (b'{"candidates": [{"video_id": "v1"}, {"video_id": "v2", "video_embedding": [1, 2]}]}', 422,
     "candidates[1].video_embedding", "expected 16 numbers"),
    (b'{"candidates": [{"video_id": "v1", "video_age_days": -3}]}', 422, "candidates[0].video_age_days", "> -1"),
    (b'{"candidates": [{"video_channel": "c1"}]}', 422, "candidates[0].video_id", "is required"),
    (b'{"candidates": [{"video_id": [1]}]}', 422, "candidates[0].video_id", "expected `int | str`"),
    (b'{"candidates": [{"video_id": "v1", "video_tags": ["a", null]}]}', 422, "candidates[0].video_tags[1]",
     "got `null`"),
    (b'{"candidates": [{"video_id": "v1", "video_embedding": [1, null, 3]}]}', 422,
     "candidates[0].video_embedding[1]", "got `null`"),
    (b'{"candidates": [{"video_id": "v1"}, {"video_id": "v2"}, {"video_id": "v3"}, {"video_id": "v2"}]}', 422,
     "candidates[3].video_id", "repeats candidates[1]"),
    (b'{"query": {"query_embedding": [1, NaN, 3]}, "candidates": []}', 400, "body", "not valid JSON"),
    (b'{"context": {"hour": "noon"}, "candidates": []}', 422, "context.hour", "expected a number"),
    (b'{"context": {"hour": 1e39}, "candidates": []}', 422, "context.hour", "float32"),  # no rows, still checked
    (b'{"context": {"hour": 1' + b"0" * 400 + b'}, "candidates": []}', 422, "context.hour", "float64"),
    (b'{"user": {"user_embedding": [1e39, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}, "candidates": [{"video_id": "a"}]}',
     422, "user.user_embedding", "float32"),
    (b'{"user": {"user_recent_videos": ["a", null]}, "candidates": []}', 422, "user.user_recent_videos",
     "expected a string or integer id"),
    (b'{"user": {"user_embedding": [0.5, true, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}, "candidates": []}', 422,
     "user.user_embedding", "expected a number, got True"),
    (b'{"candidates": [], "top_k": 0}', 422, "top_k", ">= 1"),
    (b'{"candidates": [], "top_k": "5"}', 422, "top_k", None),
    (b'{"request_id": {"a": 1}, "candidates": []}', 422, "request_id", None),
    (b'{"request_id": "", "candidates": []}', 422, "request_id", "length >= 1"),
    (b'{"user": {"user_id": "u1"}}', 422, "candidates", "is required"),
    (b'{"candidates": [{"video_id": "a\\ud800"}]}', 400, "body", "surrogate pair"),
    (b'{"candidates": [{"video_id": "a\xed\xa0\x80"}]}', 400, "body", "UTF-8"),
    (b'{"pad": ' + b"[" * 100_000 + b"]" * 100_000 + b', "candidates": []}', 400, "body", "nested too deeply"),
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
    assert svc.metrics.value("watchnext_nonfinite_outputs_total") == 3


def test_service_never_imports_torch():
    code = "import sys, service.app, cli.serve; assert 'torch' not in sys.modules, 'torch imported'; " \
           "assert not any(m == 'training' or m.startswith('training.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)




ODD = [
    # (a piece of a body, the status it gets, the field named) -- the same answer whatever else the body holds
    (b'"video_views": 18446744073709551617', 200, None),  # an integer past int64 where a number is read
    (b'"video_views": 1e39', 422, "candidates[0].video_views"),  # past float32
    (b'"video_tags": ["a", null]', 422, "candidates[0].video_tags[1]"),
    (b'"video_embedding": null', 200, None),
    (b'"deep": ' + b"[" * 50 + b"]" * 50, 200, None),  # nesting the decoder takes, in an unknown key
    (b'"deep": ' + b"[" * 5000 + b"]" * 5000, 400, "body"),
    (b'"video_channel": "\\ud800"', 400, "body"),  # a lone surrogate
    (b'"video_channel": "\\ud83d\\ude00"', 200, None),  # a pair is one character
]
OTHERS = [  # what else a body may hold: booleans elsewhere, integer ids, other candidates, several features
    b'{"request_id": "r", "top_k": 3, "candidates": [{"video_id": "v1", %s}]}',
    b'{"user": {"user_id": 7, "flag": true}, "candidates": [{"video_id": "v1", "on": false, %s}, {"video_id": 2}]}',
    b'{"candidates": [{"video_id": "v1", "video_age_days": 3, %s}, {"video_id": "v2", "x": [true, null]}]}',
]


@pytest.mark.parametrize("piece,status,field", ODD, ids=[f"{i}" for i in range(len(ODD))])
def test_one_answer_per_body(trained, client, piece, status, field):
    for other in OTHERS:
        r = client.post("/v1/rank", content=other % piece, headers={"content-type": "application/json"})
        assert r.status_code == status, (other, r.text)
        if field is not None:
            assert r.json()["error"]["field"] == field


def test_integer_ids_of_any_size_are_their_decimal_strings(trained, client):
    big = 2**70
    r = client.post("/v1/rank", content=b'{"candidates": [{"video_id": %d}, {"video_id": -5}]}' % big,
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert {it["id"] for it in r.json()["items"]} == {str(big), "-5"}
    r = client.post("/v1/rank", content=b'{"candidates": [{"video_id": %d}, {"video_id": "%d"}]}' % (big, big),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "repeats" in r.json()["error"]["reason"]


def test_arrow_body_ranks_like_the_json_body(trained, client):
    config = load_config(trained["config_path"])
    for req in rank_requests(trained["history"], 3, top_k=10):
        want = client.post("/v1/rank", json=req).json()
        got = client.post("/v1/rank", content=arrow_body(req, config),
                          headers={"content-type": "application/vnd.apache.arrow.stream"})
        assert got.status_code == 200, got.text
        assert got.json()["items"] == want["items"] and got.json()["request_id"] == req["request_id"]


def test_ids_at_reads_an_arrow_columns_ids_as_its_values():
    """`RankInput.ids_at` reads the top k's ids from an Arrow column's buffers: the same strings as Arrow's own,
    for a column that is a slice of a larger one, for ids of any script and for the empty id."""
    import pyarrow as pa

    from service.request import FEW_ROWS, RankInput

    rng = np.random.default_rng(5)
    words = ["", "a", "vidéo-7", "動画", "🎬x", "z" * 40]
    values = [f"{words[i % len(words)]}{i}" if i % 7 else words[i % len(words)] for i in range(300)]
    col = pa.array(values, pa.string()).slice(17, 250)
    want = values[17:267]
    inp = RankInput("r", {}, 10, len(col), col, None, 0)
    for k in (0, 1, FEW_ROWS, FEW_ROWS + 1, 250):
        rows = rng.permutation(250)[:k]
        assert inp.ids_at(rows) == [want[i] for i in rows], k


def test_bad_arrow_bodies_name_the_field(trained, client):
    import pyarrow as pa

    config = load_config(trained["config_path"])
    ct = {"content-type": "application/vnd.apache.arrow.stream"}
    r = client.post("/v1/rank", content=b"not arrow", headers=ct)
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"

    def stream(table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return sink.getvalue().to_pybytes()

    cases = [
        (pa.table({"video_id": ["a", "b"], "video_views": [True, False]}), "candidates.video_views", "numbers"),
        (pa.table({"video_id": ["a", "b"], "video_views": [1.0, float("nan")]}), "candidates[1].video_views", "finite"),
        (pa.table({"video_id": ["a", None]}), "candidates[1].video_id", "is required"),
        (pa.table({"video_id": ["a", "a"]}), "candidates[1].video_id", "repeats"),
        (pa.table({"video_id": ["a"], "video_tags": [["x", None]]}), "candidates[0].video_tags", "null inside"),
        (pa.table({"video_id": ["a"]}).replace_schema_metadata({"request": '{"top_k": 0}'}), "request.top_k", ">= 1"),
        (pa.table({"video_id": pa.array([b"a", b"\xed\xa0\x80"]).view(pa.string())}), "candidates.video_id", "UTF8"),
        (pa.table({"video_id": ["a"], "video_tags": pa.array([[b"\xff"]], pa.list_(pa.binary())).view(
            pa.list_(pa.string()))}), "candidates.video_tags", "UTF8"),
    ]
    # the same faults in a body of every candidate column, each of the config's type (the request's fast path):
    # the same answer
    good = pa.Table.from_struct_array(pa.array([
        {"video_id": "a", "video_tags": ["x"], "video_views": 1.0, "video_embedding": [0.5] * 16},
        {"video_id": "b", "video_tags": ["y", "z"], "video_views": 2.0, "video_embedding": [0.25] * 16}],
        type=section_type(config, "candidate")))

    assert good.schema.equals(RequestCodec(config).schema)  # what the fast path takes

    def full(name, values):
        return good.set_column(good.schema.get_field_index(name), name, pa.array(values, good.schema.field(name).type))

    cases += [
        (full("video_id", ["a", None]), "candidates[1].video_id", "is required"),
        (full("video_id", ["a", "a"]), "candidates[1].video_id", "repeats"),
        (full("video_tags", [["x"], ["y", None]]), "candidates[1].video_tags", "null inside"),
        (full("video_views", [1.0, float("inf")]), "candidates[1].video_views", "finite"),
        (full("video_embedding", [[0.5] * 16, [0.5] * 15]), "candidates[1].video_embedding", "16 numbers"),
        (good.set_column(0, "video_id", pa.array([b"a", b"\xed\xa0\x80"]).view(pa.string())), "candidates.video_id",
         "UTF8"),
    ]
    for table, field, words in cases:
        r = client.post("/v1/rank", content=stream(table), headers=ct)
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["field"] == field and words in r.json()["error"]["reason"], r.text
    # integer ids and float32 / int columns are read as the JSON values would be
    ok = pa.table({"video_id": pa.array([3, 4], pa.int32()), "video_views": pa.array([1, 2], pa.int8())})
    r = client.post("/v1/rank", content=stream(ok), headers=ct)
    assert r.status_code == 200 and {it["id"] for it in r.json()["items"]} == {"3", "4"}
    assert config.item_id == "video_id"
    # a stream of several batches of the config's columns is one request
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, good.schema) as w:
        w.write_table(good)
        w.write_table(full("video_id", ["c", "d"]))
    r = client.post("/v1/rank", content=sink.getvalue().to_pybytes(), headers=ct)
    assert r.status_code == 200 and {it["id"] for it in r.json()["items"]} == {"a", "b", "c", "d"}


def test_the_ids_only_type_answers_as_the_full_type(trained):
    """Bodies naming only ids are decoded by a narrower type first: every body gets what the full type gives."""
    from service.errors import ServiceError
    from service.request import RequestCodec

    codec = RequestCodec(load_config(trained["config_path"]))
    bodies = [
        b'{"candidates": [{"video_id": "a"}, {"video_id": "b"}], "top_k": 1, "user": {"user_id": "u"}}',
        b'{"candidates": [{"video_id": "a"}, {"video_id": 2}]}',
        b'{"candidates": [{"video_id": "a", "colour": "red"}]}',
        b'{"candidates": [{"video_id": "a"}, {"video_id": "a"}]}',
        b'{"candidates": [{"video_id": "a"}], "top_k": 0}',
        b'{"candidates": [{"video_id": "a"}], "user": {"user_embedding": [1e39]}}',
        b'{"candidates": [{"video_id": ""}], "request_id": 7}',
        b'{"candidates": [{"video_id": "a"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"candidates": []}',
    ]
    for body in bodies:
        def answer(full: bool, body: bytes = body):
            saved = codec.ids_decoder
            codec.ids_decoder = None if full else saved
            try:
                inp = codec.parse(body)
                return ("ok", inp.request_id if inp.request_id.isdigit() or len(inp.request_id) != 32 else "-",
                        inp.shared, inp.top_k, inp.n, inp.ids, inp.candidates is None or not len(inp.candidates))
            except ServiceError as e:
                return ("error", e.status, e.field, e.reason)
            finally:
                codec.ids_decoder = saved
        assert answer(False) == answer(True), body[:80]
