"""Randomised logging on a live service (real uvicorn, real Redis, real ONNX): explored requests are shown in
RandPair order, and their examples carry propensity and original rank to the training stream and the reader."""

from __future__ import annotations

import json

import httpx
import numpy as np

from tests.helpers import stream_examples, wait_for
from tests.service.fixtures import FAST_SERVICE, live_service, write_config
from tests.service.prom import sample
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.examples import Decoder
from watchnext.explore import explore_draw, explore_order

SHARE = 0.5


def _ids(n_explored: int, n_plain: int) -> tuple[list[str], list[str]]:
    """Request ids whose hash puts them in (and out of) the explored half."""
    explored, plain = [], []
    i = 0
    while len(explored) < n_explored or len(plain) < n_plain:
        rid = f"explore-test-{i}"
        (explored if explore_draw(rid, SHARE) is not None else plain).append(rid)
        i += 1
    return explored[:n_explored], plain[:n_plain]


def test_explored_requests_swap_adjacent_pairs_and_their_examples_carry_propensities(trained, models_dir, redis_url,
                                                                                     tmp_path):
    cfg = write_config(tmp_path, service={**FAST_SERVICE, "explore_share": SHARE})
    explored, plain = _ids(8, 4)
    reqs = rank_requests(trained["history"], 12, top_k=7)
    for req, rid in zip(reqs, explored + plain):
        req["request_id"] = rid
    served: dict[str, dict] = {}
    with live_service(cfg, models_dir, redis_url) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for req in reqs:
            r = c.post("/v1/rank", json=req)
            assert r.status_code == 200, r.text
            served[req["request_id"]] = r.json()
            again = c.post("/v1/rank", json=req).json()  # a retry is shown the same order
            assert [it["id"] for it in again["items"]] == [it["id"] for it in r.json()["items"]]
        swapped_any = 0
        for rid, body in served.items():
            items = body["items"]
            scores = np.array([it["score"] for it in items])
            rank = np.argsort(np.argsort(-scores, kind="stable"), kind="stable")  # original rank per shown item
            if rid in plain:
                assert rank.tolist() == list(range(len(items)))
                continue
            assert np.abs(rank - np.arange(len(items))).max() <= 1  # adjacent swaps only
            assert sorted(rank.tolist()) == list(range(len(items)))
            rng, offset = explore_draw(rid, SHARE)
            perm, _ = explore_order(np.sort(scores)[::-1], rng, offset)  # what the service drew, redrawn
            np.testing.assert_array_equal(rank, perm)
            swapped_any += int((rank != np.arange(len(items))).sum())
        assert swapped_any > 0
        # a click on the first shown item of every request
        fb = [{"request_id": rid, "item_id": b["items"][0]["id"], "labels": {"click": 1}} for rid, b in served.items()]
        assert c.post("/v1/feedback", json=fb).json()["accepted"] == 12
        metrics = c.get("/metrics").text
        assert sample(metrics, "watchnext_explored_requests_total") == 16  # 8 explored requests, each sent twice
        n = sum(len(b["items"]) for b in served.values())
        assert wait_for(lambda: len(stream_examples(redis_url)) >= n, 20, "the examples")
    examples = stream_examples(redis_url)
    assert len(examples) == n
    by_rid: dict[str, list[dict]] = {}
    for e in examples:
        by_rid.setdefault(e["request_id"], []).append(e)
    for rid, body in served.items():
        exs = sorted(by_rid[rid], key=lambda e: e["position"])
        assert [e["candidate"]["video_id"] for e in exs] == [it["id"] for it in body["items"]]
        if rid in plain:
            assert all("propensity" not in e and "explore" not in e for e in exs)
            continue
        scores = np.array([it["score"] for it in body["items"]])
        rank = np.argsort(np.argsort(-scores, kind="stable"), kind="stable")
        rng, offset = explore_draw(rid, SHARE)
        _, prop = explore_order(np.sort(scores)[::-1], rng, offset)
        assert [e["explore"]["rank"] for e in exs] == rank.tolist()
        assert [e["propensity"] for e in exs] == prop.tolist()
        assert exs[0]["labels"]["click"] == 1.0 and all(e["labels"]["click"] == 0.0 for e in exs[1:])
    # the trainer's reader takes them in: propensity and rank per row
    config = load_config(cfg)
    dec = Decoder(config, check_order=False)
    block = ("\n".join(json.dumps(e) for e in examples) + "\n").encode()
    chunk = dec.encode(*dec.parse_lines(block, "stream", 1), "stream")
    assert dec.bad.count == 0 and len(chunk) == n
    want_rank = [e["explore"]["rank"] if "explore" in e else -1 for e in examples]
    assert chunk.explore_rank.tolist() == want_rank
    assert chunk.propensity.tolist() == [e.get("propensity", 1.0) for e in examples]
    assert (chunk.explore_rank >= 0).sum() == sum(len(served[r]["items"]) for r in explored)
