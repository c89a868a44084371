"""Redis killed under load: requests whose ids are cached keep ranking with their features, the rest go on without
(counted), nothing answers 5xx, and the service recovers by itself."""

from __future__ import annotations

import json
import threading
import time

import httpx
import redis

from tests.helpers import wait_for
from tests.service.fixtures import live_service
from tests.service.prom import sample
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.entities import load_file
from watchnext.redis_embed import start_embedded


def ids_only(req: dict) -> dict:
    return {
        "user": {"user_id": req["user"]["user_id"]},
        "query": {"query_video_id": req["query"]["query_video_id"]},
        "context": req["context"],
        "candidates": [{"video_id": c["video_id"]} for c in req["candidates"]],
        "top_k": 5,
    }


def test_redis_outage_degrades_and_recovers(trained, models_dir, tmp_path):
    config = load_config(trained["config_path"])
    server = start_embedded(tmp_path / "redis", appendonly=False)
    port = server.port
    features = tmp_path / "features.jsonl"
    reqs = rank_requests(trained["history"], 40)
    features.write_text("".join(json.dumps(r) + "\n" for r in reqs))

    def load() -> None:
        c = redis.Redis.from_url(server.url)
        load_file(c, config, features)
        c.close()

    load()
    warm = [ids_only(r) for r in reqs[:20]]  # ranked before the outage: in the cache
    cold = [ids_only(r) for r in reqs[20:]]  # first seen during the outage, then after it
    results: list[tuple[float, int, float]] = []  # (time, status, seconds)
    answers: dict[int, list[list]] = {}  # warm request -> every answer's (id, score) list
    stop = threading.Event()
    try:
        with live_service(trained["config_path"], models_dir, server.url, feature_backoff_s=0.5) as srv:
            m = srv.service.metrics

            def worker(k: int) -> None:
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    i = k
                    while not stop.is_set():
                        j = i % len(warm)
                        t0 = time.perf_counter()
                        try:
                            r = c.post("/v1/rank", json=warm[j])
                            status = r.status_code
                            if status == 200:
                                answers.setdefault(j, []).append([(it["id"], it["score"]) for it in r.json()["items"]])
                        except httpx.HTTPError:
                            status = -1
                        results.append((time.monotonic(), status, time.perf_counter() - t0))
                        i += 3

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            assert wait_for(lambda: len(answers) == len(warm), 20)
            hits_before = m.value("watchnext_feature_store_hits_total")
            assert hits_before > 0 and m.value("watchnext_feature_store_misses_total", reason="outage") == 0

            server.proc.kill()  # SIGKILL: no goodbye
            server.proc.wait()
            t_kill = time.monotonic()
            time.sleep(1.0)
            with httpx.Client(base_url=srv.url) as c:
                for body in cold[:10]:  # ids the cache never saw: ranked without their features, counted
                    assert c.post("/v1/rank", json=body).status_code == 200
                time.sleep(1.0)
                ready = c.get("/readyz")
                assert ready.status_code == 200 and ready.json()["redis"] is False and ready.json()["degraded"] is True
                assert sample(c.get("/metrics").text, "watchnext_redis_up") == 0
            # every id of those requests that no warm request had named is a miss, counted
            seen = {(s, b[s][k]) for b in warm for s, k in (("user", "user_id"), ("query", "query_video_id"))}
            seen |= {("candidate", c["video_id"]) for b in warm for c in b["candidates"]}
            unseen = sum((s, b[s][k]) not in seen for b in cold[:10] for s, k in (("user", "user_id"),
                                                                                  ("query", "query_video_id")))
            unseen += sum(("candidate", c["video_id"]) not in seen for b in cold[:10] for c in b["candidates"])
            assert unseen > 20 and m.value("watchnext_feature_store_misses_total", reason="outage") == unseen
            backlog_during = srv.service.log.backlog()
            assert backlog_during > 0  # impressions wait in the buffer

            server = start_embedded(tmp_path / "redis2", port=port, appendonly=False)  # Redis comes back
            load()
            t_back = time.monotonic()
            with httpx.Client(base_url=srv.url) as c:  # the store answers again: new ids are read from it
                def store_back() -> bool:
                    before = m.value("watchnext_feature_store_hits_total")
                    c.post("/v1/rank", json=cold[10 + int(before) % 10])
                    return m.value("watchnext_feature_store_hits_total") > before
                assert wait_for(store_back, 10), "online features did not come back"
            stop.set()
            for t in threads:
                t.join(30)
            assert wait_for(lambda: srv.service.log.backlog() == 0, 5), "the impression buffer did not drain"
            logged = m.value("watchnext_impressions_logged_total")
            with httpx.Client(base_url=srv.url) as c:
                assert c.get("/readyz").json()["redis"] is True
        during = [r for r in results if t_kill <= r[0] <= t_back]
        assert [r for r in results if r[1] != 200] == []  # not one failed request, before, during or after
        assert len(during) > 20
        # cached ids kept their features: every warm request got the same answer before, during and after
        for j, got in answers.items():
            assert all(g == got[0] for g in got), f"request {j} changed its answer during the outage"
        # degraded, not stalled
        assert sorted(r[2] for r in during)[len(during) // 2] < 0.5
        r = redis.Redis.from_url(server.url)
        assert r.zcard("wn:imp:due") + r.xlen("watchnext:training") > 0  # the buffered impressions reached Redis
        r.close()
        assert logged >= len(results) - 5
    finally:
        stop.set()
        server.stop()
