"""Settings, start-up refusals, health, metrics, graceful shutdown, and the CUDA provider where there is one."""

from __future__ import annotations

import json
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
from service.keys import digest
from service.observability import Metrics, SharedMetrics
from service.settings import Settings, SettingsError
from tests.helpers import ServeProcess, children_by_kind, expected_workers, running, wait_for
from tests.service.fixtures import live_service
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.encoding import Encoder
from watchnext.runtime import usable_cpus

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


def test_settings_pick_one_worker_process_per_cpu():
    assert Settings(workers=3).worker_count() == 3
    assert Settings(device="cpu").worker_count() == usable_cpus()
    assert Settings(device="auto").worker_count() == (1 if cuda_driver_present() else usable_cpus())
    with pytest.raises(SettingsError, match="workers .* must be >= 0, got -1"):
        Settings(workers=-1)
    s = Settings(workers=2, admin_token="x" * 16, redis_url="redis://h:1/0")
    assert Settings.from_json(s.to_json()) == s


def test_metrics_of_worker_processes_add_up(tmp_path):
    """Counters and histograms sum over every process (an ended one's counts too); gauges only over live ones."""
    me, live, ended = Metrics(), Metrics(), Metrics()
    for m, n in ((me, 2), (live, 3), (ended, 5)):
        m.requests.inc(n, "/v1/rank", "200")
        for _ in range(n):
            m.rank_latency.observe(0.004)
        m.log_backlog.set(n)
    me.model_version.set(4), live.model_version.set(3), ended.model_version.set(1)
    me.model_info.replace(("4", "cpu")), live.model_info.replace(("3", "cpu")), ended.model_info.replace(("1", "cpu"))
    live.redis_up.set(0)
    me.redis_up.set(1)
    ended_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True).stdout.strip()
    (tmp_path / f"{os.getppid()}.json").write_text(json.dumps(live.snapshot()))  # a live process
    (tmp_path / f"{ended_pid}.json").write_text(json.dumps(ended.snapshot()))
    (tmp_path / "notes.txt").write_text("not a snapshot")
    shared = SharedMetrics(me, tmp_path)
    text = shared.render()
    assert 'watchnext_requests_total{endpoint="/v1/rank",status="200"} 10' in text
    assert 'watchnext_rank_latency_seconds_bucket{le="0.005"} 10' in text and "watchnext_rank_latency_seconds_count 10" in text
    assert "watchnext_impression_backlog 5" in text  # 2 + 3: the ended process's backlog is not there any more
    assert "watchnext_model_version 3" in text and "watchnext_redis_up 0" in text
    assert 'watchnext_model_info{version="3",provider="cpu"} 1' in text and 'version="1"' not in text
    assert "watchnext_worker_processes 2" in text
    shared.write()  # this process's own file, which render skips
    assert json.loads((tmp_path / f"{os.getpid()}.json").read_text()) == me.snapshot()
    assert shared.render() == text


def test_serve_with_two_worker_processes_counts_every_request_and_survives_a_killed_worker(trained, tmp_path):
    """`--workers 2`: both processes share the port; /metrics adds them up; a worker killed outright is
    replaced, and its counts stay in the sums."""
    serve = ServeProcess(trained["config_path"], trained["models"], None, None, tmp_path / "serve.log", cwd=tmp_path,
                         log_level="info", extra_env={"WATCHNEXT_WORKERS": "2"})
    reqs = rank_requests(trained["history"], 40, top_k=3)

    def started() -> list[int]:
        """The worker processes that have started serving: a worker logs service_started once its figures are
        shared (its file in the metrics directory written), before uvicorn takes connections in it."""
        return sorted(e["pid"] for e in serve.events("service_started"))

    try:
        serve.wait_ready()  # one worker answers /readyz; the other may still be starting
        workers = children_by_kind(serve.proc.pid)["worker"]
        assert len(workers) == 2
        wait_for(lambda: set(started()) >= set(workers), 60, f"both worker processes {workers} to start serving")
        assert started() == sorted(workers)

        def rank_all(batch) -> None:
            for req in batch:  # a new connection each: the kernel hands them to either worker
                with httpx.Client(base_url=serve.url, timeout=30) as c:
                    r = c.post("/v1/rank", json=req)
                    assert r.status_code == 200, r.text

        rank_all(reqs[:20])
        with httpx.Client(base_url=serve.url, timeout=30) as c:
            text = c.get("/metrics").text
        assert 'watchnext_requests_total{endpoint="/v1/rank",status="200"} 20' in text
        assert "watchnext_rank_latency_seconds_count 20" in text and "watchnext_worker_processes 2" in text
        os.kill(workers[0], signal.SIGKILL)

        def replacement() -> list[int]:  # the killed worker gone, the other still there, and one new one
            now = children_by_kind(serve.proc.pid).get("worker", [])
            return [pid for pid in now if pid not in workers] if len(now) == 2 and workers[0] not in now \
                and workers[1] in now else []

        (new,) = wait_for(replacement, 60, "the supervisor to start a new worker")
        # the new process exists, but until it has started /metrics rightly counts one worker serving
        wait_for(lambda: new in started(), 60, f"the new worker process {new} to start serving")
        assert started() == sorted(workers + [new])
        serve.wait_ready()
        rank_all(reqs[20:])
        with httpx.Client(base_url=serve.url, timeout=30) as c:
            text = c.get("/metrics").text
        assert 'watchnext_requests_total{endpoint="/v1/rank",status="200"} 40' in text
        assert "watchnext_worker_processes 2" in text
    finally:
        code = serve.stop()
    assert code == 128 + signal.SIGTERM
    assert (tmp_path / "serve.log").read_text().count('"service_stopped"') == 2


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
    want = sorted(f'{digest(q["request_id"])}:{digest(str(q["user"]["user_id"]))}' for q in reqs)
    assert sorted(x.decode().rsplit(":", 1)[0] for x in r.zrange("wn:imp:due", 0, -1)) == want
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
        kinds = children_by_kind(serve.proc.pid)
        kids = sum(kinds.values(), [])
        # the embedded redis-server and the worker processes (one per CPU)
        assert {k: len(v) for k, v in kinds.items() if k != "tracker"} == {
            "redis": 1, **({"worker": expected_workers()} if expected_workers() else {})}
    finally:
        code = serve.stop()  # SIGTERM
    assert code == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5  # multiprocessing's resource tracker ends a moment after its parent
    while (alive := [k for k in kids if running(k)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == [], "children left running"
    assert "service_stopped" in (tmp_path / "serve.log").read_text()
