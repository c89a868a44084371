"""Settings, start-up refusals, health, metrics, graceful shutdown, and the CUDA provider where there is one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import redis

from service.inference import CUDA, InferenceSession, cuda_driver_present
from service.settings import Settings, SettingsError
from tests.helpers import ServeProcess, children_of, running
from tests.service.fixtures import live_service
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.encoding import Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("env,overrides,message", [
    ({"WATCHNEXT_ADMIN_TOKEN": "short"}, {}, "admin_token (WATCHNEXT_ADMIN_TOKEN): must be at least 16 characters"),
    ({"WATCHNEXT_THREADS": "two"}, {}, "WATCHNEXT_THREADS: expected int, got 'two'"),
    ({"REDIS_URL": "localhost:6379"}, {}, "redis_url (REDIS_URL): expected redis://"),
    ({}, {"port": 70000}, "setting port: must be in 0..65535, got 70000"),
    ({}, {"device": "tpu"}, "setting device: expected one of auto, cpu, cuda, got 'tpu'"),
])
def test_bad_settings_are_refused_with_the_setting_named(env, overrides, message):
    with pytest.raises(SettingsError) as e:
        Settings.from_env(env, **overrides)
    assert message in str(e.value)


def test_settings_from_env_and_flags():
    s = Settings.from_env({"WATCHNEXT_MODELS": "/m", "WATCHNEXT_THREADS": "1", "REDIS_URL": "redis://h:1/0"},
                          models_dir=None, port=9000)
    assert (s.models_dir, s.threads, s.redis_url, s.port) == ("/m", 1, "redis://h:1/0", 9000)


def test_serve_stops_at_start_on_bad_settings_or_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "REDIS_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-m", "watchnext", "serve", "--port", "70000"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "setting port: must be in 0..65535" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[service]\nmax_candidates = -1\n")
    out = subprocess.run([sys.executable, "-m", "watchnext", "serve", "--config", str(bad)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and str(bad) in out.stderr


def test_health_ready_and_metrics(trained, server, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"ready": True, "model_version": "2", "provider": "CPUExecutionProvider", "backend": "onnxruntime",
                     "redis": True, "degraded": False, "impression_backlog": 0}
    for req in rank_requests(trained["history"], 3):
        assert client.post("/v1/rank", json=req).status_code == 200
    text = client.get("/metrics").text
    assert 'watchnext_model_info{version="2",provider="CPUExecutionProvider"} 1' in text
    assert "watchnext_model_version 2" in text
    assert "watchnext_rank_latency_seconds_count 3" in text
    assert 'watchnext_rank_latency_seconds_bucket{le="+Inf"} 3' in text
    assert "watchnext_rank_candidates_sum 30" in text  # three slates of 10
    assert "# TYPE watchnext_impression_backlog gauge" in text
    assert "# TYPE watchnext_feature_store_misses_total counter" in text


def test_not_ready_without_a_model(trained, tmp_path, redis_url):
    with live_service(trained["config_path"], tmp_path / "empty", redis_url) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = c.post("/v1/rank", json={"candidates": [{"video_id": "v1"}]})
        assert r.status_code == 503 and r.json()["error"]["field"] == "model"


def test_graceful_shutdown_flushes_the_impression_buffer(trained, models_dir, redis_url):
    reqs = rank_requests(trained["history"], 5)
    # a flush interval longer than the test: only the shutdown can write these impressions
    with live_service(trained["config_path"], models_dir, redis_url, flush_interval_s=3600.0) as srv:
        with httpx.Client(base_url=srv.url) as c:
            for req in reqs:
                assert c.post("/v1/rank", json=req).status_code == 200
        assert srv.service.log.backlog() == 5
    r = redis.Redis.from_url(redis_url)
    assert sorted(x.decode() for x in r.zrange("wn:imp:due", 0, -1)) == sorted(q["request_id"] for q in reqs)
    r.close()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_driver_present(), reason="needs a CUDA GPU")
def test_cuda_provider_with_io_binding_matches_cpu(trained):
    config = load_config(trained["config_path"])
    onnx = trained["models"] / "ranker" / "2" / "model.onnx"
    gpu, cpu = InferenceSession(onnx, "cuda"), InferenceSession(onnx, "cpu")
    assert gpu.provider == CUDA
    x = Encoder(config).empty_inputs(257)
    assert np.allclose(gpu.run(x), cpu.run(x), rtol=1e-4, atol=1e-5)


def test_serve_stops_its_embedded_redis_on_sigterm(trained, tmp_path):
    """`kill` / `docker stop` send SIGTERM: serve shuts down gracefully and takes its embedded redis-server with it."""
    serve = ServeProcess(trained["config_path"], trained["models"], None, None, tmp_path / "serve.log", cwd=tmp_path,
                         log_level="info")
    try:
        serve.wait_ready()
        kids = children_of(serve.proc.pid)
        assert len(kids) == 1  # the embedded redis-server
    finally:
        code = serve.stop()  # SIGTERM
    assert code == 128 + signal.SIGTERM
    time.sleep(0.3)
    assert not running(kids[0]), "redis-server left running"
    assert "service_stopped" in (tmp_path / "serve.log").read_text()
