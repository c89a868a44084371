"""The whole loop, nothing mocked: rank -> feedback -> labelled example on the Redis stream ->
`watchnext train --stream --promote` consumes it -> a new version is exported and promoted ->
the next rank is served by it.

A real redis-server, a real uvicorn on a loopback port, the real trainer as a child process.
"""

from __future__ import annotations

import json
import shutil

import httpx
import redis

from tests.helpers import TrainerProcess, stream_id, wait_for
from tests.service.fixtures import live_service, write_config
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.repository import ModelRepository

STREAM_FAST = {"export_every_examples": 1, "export_interval_s": 1.0, "checkpoint_interval_s": 1.0}


def test_rank_feedback_stream_train_promote_serve(trained, models_dir, redis_url, tmp_path):
    cfg_path = write_config(tmp_path, trainer={"batch_size": 256, "report_every_examples": 2_000,
                                               "eval_window": 5_000, **STREAM_FAST})
    config = load_config(cfg_path)
    assert config.hash == load_config(trained["config_path"]).hash  # same model, faster trainer settings
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(trained["root"] / "ckpt.pt", ckpt)  # the trainer carries on from version 2
    repo = ModelRepository(models_dir, config.model.name)
    r = redis.Redis.from_url(redis_url)
    trainer = None
    try:
        with live_service(cfg_path, models_dir, redis_url) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            trainer = TrainerProcess(cfg_path, models_dir, ckpt, redis_url, tmp_path / "trainer.log", "loop-test")
            # 1. rank: served by version 2
            req = rank_requests(trained["history"], 1, top_k=5)[0]
            first = c.post("/v1/rank", json=req).json()
            assert first["model_version"] == "2"
            served = [it["id"] for it in first["items"]]
            # 2. feedback on the top item
            fb = c.post("/v1/feedback", json={"request_id": req["request_id"], "item_id": served[0],
                                             "labels": {"click": 1, "watch_time": 120.0, "like": 1}})
            assert fb.json() == {"accepted": 1, "dropped": []}
            # 3. the window closes: five labelled examples on the stream
            entries = wait_for(lambda: r.xrange(config.stream.key) if r.xlen(config.stream.key) >= 5 else None,
                               15, "the labelled examples on the stream")
            examples = [json.loads(f[b"example"]) for _, f in entries]
            assert [e["candidate"]["video_id"] for e in sorted(examples, key=lambda e: e["position"])] == served
            top = next(e for e in examples if e["candidate"]["video_id"] == served[0])
            assert top["labels"] == {"click": 1.0, "watch_time": 120.0, "dismiss": 0.0, "like": 1.0, "rating": None}
            last_entry = max(stream_id(i) for i, _ in entries)
            # 4. the trainer consumes them, exports version 3 and promotes it
            wait_for(lambda: repo.promoted() == 3, 90, "version 3 to be exported and promoted")
            meta = repo.metadata(3)
            assert meta["parent"] == 2
            assert stream_id(meta["watermark"]["source"]["last_id"]) >= last_entry  # it trained on our examples
            assert meta["watermark"]["examples"] == repo.metadata(2)["watermark"]["examples"] + 5
            # 5. the next rank is served by it
            wait_for(lambda: c.get("/readyz").json()["model_version"] == "3", 10, "the service to swap to version 3")
            again = c.post("/v1/rank", json=req).json()
            assert again["model_version"] == "3"
            assert again["items"] != first["items"]  # a different model, different scores
            # the trainer acknowledged what it trained
            wait_for(lambda: r.xpending(config.stream.key, config.stream.group)["pending"] == 0, 10, "acknowledgements")
    finally:
        code = trainer.stop() if trainer is not None else None
        r.close()
    assert code == 0, trainer.log()
