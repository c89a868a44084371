"""Redis killed under load: the service keeps ranking (degraded, counted) and recovers by itself."""

from __future__ import annotations

import json
import threading
import time

import httpx
import redis

from service.features import load_file
from tests.service.fixtures import live_service
from tests.service.traffic import rank_requests
from watchnext.config import load_config
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
    reqs = rank_requests(trained["history"], 20)
    features.write_text("".join(json.dumps(r) + "\n" for r in reqs))

    def load() -> None:
        c = redis.Redis.from_url(server.url)
        load_file(c, config, features)
        c.close()

    load()
    bodies = [ids_only(r) for r in reqs]
    results: list[tuple[float, int, float]] = []  # (time, status, seconds)
    stop = threading.Event()
    try:
        with live_service(trained["config_path"], models_dir, server.url, feature_backoff_s=0.5) as srv:
            m = srv.service.metrics

            def worker(k: int) -> None:
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    i = k
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            status = c.post("/v1/rank", json=bodies[i % len(bodies)]).status_code
                        except httpx.HTTPError:
                            status = -1
                        results.append((time.monotonic(), status, time.perf_counter() - t0))
                        i += 3

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            hits_before = m.feature_hits.get()
            assert hits_before > 0 and m.feature_misses.get("outage") == 0

            server.proc.kill()  # SIGKILL: no goodbye
            server.proc.wait()
            t_kill = time.monotonic()
            time.sleep(2.0)
            with httpx.Client(base_url=srv.url) as c:
                ready = c.get("/readyz")
                assert ready.status_code == 200 and ready.json()["redis"] is False and ready.json()["degraded"] is True
                assert "watchnext_redis_up 0" in c.get("/metrics").text
            outage_misses = m.feature_misses.get("outage")
            assert outage_misses > 0
            backlog_during = srv.service.log.backlog()
            assert backlog_during > 0  # impressions wait in the buffer

            server = start_embedded(tmp_path / "redis2", port=port, appendonly=False)  # Redis comes back
            load()
            t_back = time.monotonic()
            deadline = t_back + 10
            while time.monotonic() < deadline and not (m.feature_hits.get() > hits_before + 50 and srv.service.log.backlog() < 20):
                time.sleep(0.05)
            stop.set()
            for t in threads:
                t.join(30)
            deadline = time.monotonic() + 3
            while srv.service.log.backlog() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert m.feature_hits.get() > hits_before + 50, "online features did not come back"
            assert srv.service.log.backlog() == 0, "the impression buffer did not drain"
            logged = m.impressions_logged.get()
            with httpx.Client(base_url=srv.url) as c:
                assert c.get("/readyz").json()["redis"] is True
        during = [r for r in results if t_kill <= r[0] <= t_back]
        assert [r for r in results if r[1] != 200] == []  # not one failed request, before, during or after
        assert len(during) > 20
        # degraded, not stalled: a request during the outage costs no more than a timeout
        assert sorted(r[2] for r in during)[len(during) // 2] < 0.5
        r = redis.Redis.from_url(server.url)
        assert r.zcard("wn:imp:due") + r.xlen("watchnext:training") > 0  # the buffered impressions reached Redis
        r.close()
        assert logged >= len(results) - 5
    finally:
        stop.set()
        server.stop()
