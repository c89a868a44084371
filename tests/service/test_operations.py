"""Settings, start-up refusals, health, metrics, graceful shutdown, and the CUDA provider where there is one."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from service.inference import CUDA, InferenceSession
from service.keys import digest
from service.observability import CANDIDATE_BUCKETS, LATENCY_BUCKETS
from service.settings import Settings, SettingsError
from tests.helpers import ServeProcess, children_by_kind, expected_workers, running, wait_for
from tests.service.fixtures import live_service
from tests.service.prom import sample, samples, types
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.encoding import Encoder
from watchnext.errors import WatchnextError
from watchnext.runtime import cuda_driver_present, usable_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("env,overrides,message", [
    ({"WATCHNEXT_ADMIN_TOKEN": "short"}, {}, "setting admin_token (WATCHNEXT_ADMIN_TOKEN): must be at least 16 characters"),
    ({}, {"admin_token": 12345}, "setting admin_token (WATCHNEXT_ADMIN_TOKEN): expected str"),  # a secret: not repeated
    ({"WATCHNEXT_THREADS": "two"}, {}, "setting threads (WATCHNEXT_THREADS, --threads): expected int, got 'two'"),
    ({"WATCHNEXT_THREADS": "5.0"}, {}, "setting threads (WATCHNEXT_THREADS, --threads): expected int, got '5.0'"),
    ({"REDIS_URL": "localhost:6379"}, {},
     "setting redis_url (REDIS_URL): expected redis://, rediss:// or unix://, got 'localhost:6379'"),
    ({}, {"port": 70000}, "setting port (--port): must be in 0..65535, got 70000"),
    ({}, {"port": "70000"}, "setting port (--port): must be in 0..65535, got 70000"),  # a flag, as text
    ({}, {"device": "tpu"}, "setting device (WATCHNEXT_DEVICE, --device): expected one of auto, cpu, cuda, got 'tpu'"),
    ({"WATCHNEXT_BODY_TIMEOUT_S": "0"}, {}, "setting body_timeout_s (WATCHNEXT_BODY_TIMEOUT_S): must be > 0, got 0.0"),
    ({"WATCHNEXT_IMPRESSION_BUFFER_MB": "1e9"}, {},
     "setting impression_buffer_mb (WATCHNEXT_IMPRESSION_BUFFER_MB): must be > 0 and < 1048576, got 1000000000.0"),
    ({}, {"flush_interval_s": 0}, "setting flush_interval_s: must be > 0, got 0"),
    ({}, {"colour": "red"}, "unknown setting 'colour'"),
])
def test_bad_settings_are_refused_with_the_setting_named(env, overrides, message):
    with pytest.raises(SettingsError) as e:
        Settings.from_env(env, **overrides)
    assert str(e.value) == message
    assert isinstance(e.value, WatchnextError) and isinstance(e.value, ValueError)
    assert (f"{e.value.field}: {e.value.reason}" if e.value.field else e.value.reason) == message


def test_settings_from_env_and_flags(monkeypatch):
    s = Settings.from_env({"WATCHNEXT_MODELS": "/m", "WATCHNEXT_THREADS": "1", "REDIS_URL": "redis://h:1/0"},
                          models_dir=None, port=9000)
    assert (s.models_dir, s.threads, s.redis_url, s.port) == ("/m", 1, "redis://h:1/0", 9000)
    # a flag wins over the environment; None: not given
    assert Settings.from_env({"WATCHNEXT_THREADS": "3"}, threads="4").threads == 4
    assert Settings.from_env({"WATCHNEXT_THREADS": "3"}, threads=None).threads == 3
    # only the settings' own variables, by their exact names; an empty one is unset
    s = Settings.from_env({"WATCHNEXT_PORT": "1", "WATCHNEXT_HOST": "0.0.0.0", "watchnext_threads": "3",
                           "WATCHNEXT_DEVICE": "", "WATCHNEXT_WORKER_SETTINGS": "{}"})
    assert s == Settings()
    # the process environment is read by from_env alone, never by Settings(...)
    monkeypatch.setenv("WATCHNEXT_THREADS", "3")
    assert Settings().threads == 0 and Settings.from_env().threads == 3


def test_each_settings_variable_is_read_into_its_field():
    """`Settings.variables()` (what the README and the deploy files are held to) is what from_env reads."""
    text = {"config_path": "/c.toml", "models_dir": "/m", "redis_url": "unix:///r.sock", "admin_token": "t" * 16,
            "device": "cpu", "threads": "3", "rank_workers": "0", "workers": "2", "log_level": "debug",
            "backend": "triton", "triton_url": "h:1", "impression_buffer_mb": "8", "body_timeout_s": "2.5"}
    variables = Settings.variables()
    assert set(variables) == set(text)
    for name, var in variables.items():
        flags = {"triton_url": "t:2"} if name == "backend" else {}  # triton needs its URL
        s = Settings.from_env({var: text[name]}, **flags)
        assert s == Settings(**{name: text[name]}, **flags) != Settings(**flags), (name, var)


def test_serve_stops_at_start_on_bad_settings_or_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "REDIS_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-m", "watchnext", "serve", "--port", "70000"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "setting port (--port): must be in 0..65535, got 70000" in out.stderr
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


# one worker process of `serve --workers N`, as far as its metrics go: prometheus_client imported with
# PROMETHEUS_MULTIPROC_DIR set (the environment), its figures written to the files there
WORKER_METRICS = """
import json, os, sys
from service.observability import Metrics, retire_workers
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
n, versions, redis_up, started, serving = json.loads(sys.argv[1])
m = Metrics(directory)
m.workers.set(int(started))  # as Service.start does (a process still starting has not)
m.rank_ok.inc(n)
for _ in range(n):
    m.rank_latency.observe(0.004)
m.log_backlog.set(n)
for v in versions:
    m.serving(v, "cpu")
m.redis_up.set(redis_up)
if serving is None:
    print(os.getpid())
else:  # as the supervisor does: the processes not serving any more leave the live gauges
    gone = retire_workers(directory, serving + [os.getpid()])
    sys.stdout.write(json.dumps(gone) + "\\n" + m.exposition().decode())
"""


def test_metrics_of_worker_processes_add_up(tmp_path):
    """prometheus_client's multiprocess mode: counters and histograms sum over every process (an ended one's
    counts too); gauges only over live ones that have started serving (livesum, livemin; model_info each pair one
    of them serves)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def worker(n: int, versions: list[int], redis_up: int, started: bool = True, serving: list[int] | None = None) -> str:
        out = subprocess.run([sys.executable, "-c", WORKER_METRICS, json.dumps([n, versions, redis_up, started, serving])],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    ended = int(worker(5, [1], 1))
    live = int(worker(3, [3], 0))
    starting = int(worker(0, [], 0, started=False))  # its model not loaded yet, Redis not asked: left out of the gauges
    gone, text = worker(2, [2, 4], 1, serving=[live, starting]).split("\n", 1)  # swapped from 2 to 4
    assert json.loads(gone) == [ended]
    assert sample(text, "watchnext_requests_total", endpoint="/v1/rank", status="200") == 10
    assert sample(text, "watchnext_rank_latency_seconds_bucket", le="0.005") == 10
    assert sample(text, "watchnext_rank_latency_seconds_count") == 10
    assert sample(text, "watchnext_impression_backlog") == 5  # 2 + 3: the ended process's backlog is not there any more
    assert sample(text, "watchnext_model_version") == 3 and sample(text, "watchnext_redis_up") == 0
    info = samples(text)["watchnext_model_info"]
    assert info == {frozenset({("version", "3"), ("provider", "cpu")}): 1,
                    frozenset({("version", "4"), ("provider", "cpu")}): 1}  # not 1 (ended), not 2 (swapped out)
    assert sample(text, "watchnext_worker_processes") == 2
    assert types(text)["watchnext_requests_total"] == "counter" and "_created" not in text


def test_metrics_exposition_parses_with_the_names_and_buckets_it_had(trained, server, client):
    """The whole /metrics text parses with prometheus_client's parser; every metric keeps its name, type and
    labels, and the histograms their buckets."""
    for req in rank_requests(trained["history"], 2):
        assert client.post("/v1/rank", json=req).status_code == 200
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert types(text) == {
        "watchnext_rank_latency_seconds": "histogram", "watchnext_rank_candidates": "histogram",
        "watchnext_requests_total": "counter", "watchnext_model_version": "gauge", "watchnext_model_info": "gauge",
        "watchnext_model_swaps_total": "counter", "watchnext_model_refused_total": "counter",
        "watchnext_feature_store_misses_total": "counter", "watchnext_feature_store_hits_total": "counter",
        "watchnext_feature_cache_hits_total": "counter", "watchnext_unknown_features_total": "counter",
        "watchnext_feature_json_lost_total": "counter",
        "watchnext_explored_requests_total": "counter", "watchnext_nonfinite_outputs_total": "counter",
        "watchnext_impressions_logged_total": "counter", "watchnext_impressions_dropped_total": "counter",
        "watchnext_impression_backlog": "gauge", "watchnext_impression_backlog_bytes": "gauge",
        "watchnext_examples_refused_total": "counter", "watchnext_feedback_total": "counter",
        "watchnext_examples_emitted_total": "counter", "watchnext_redis_up": "gauge",
        "watchnext_worker_processes": "gauge",
    }
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]
    for name, buckets in (("watchnext_rank_latency_seconds", LATENCY_BUCKETS), ("watchnext_rank_candidates", CANDIDATE_BUCKETS)):
        les = [float(s.labels["le"]) for s in families[name].samples if s.name == name + "_bucket"]
        assert les == [*map(float, buckets), float("inf")]
    labels = {s.name: tuple(sorted(s.labels)) for f in families.values() for s in f.samples if s.labels}
    assert labels["watchnext_requests_total"] == ("endpoint", "status")
    assert labels["watchnext_model_info"] == ("provider", "version")
    assert labels["watchnext_feature_store_misses_total"] == ("reason",)
    assert sample(text, "watchnext_requests_total", endpoint="/v1/rank", status="200") == 2
    assert sample(text, "watchnext_worker_processes") == 1


def worker_rank_counts(directory: str) -> dict[int, float]:
    """Each worker process's own count of answered rank requests: its counter file in the shared metrics
    directory, read with prometheus_client's multiprocess reader."""
    out = {}
    for path in glob.glob(os.path.join(directory, "counter_*.db")):
        pid = int(os.path.basename(path)[len("counter_"):-len(".db")])
        for family in MultiProcessCollector.merge([path]):
            for s in family.samples:
                if s.name == "watchnext_requests_total" and s.labels == {"endpoint": "/v1/rank", "status": "200"}:
                    out[pid] = s.value
    return out


def test_serve_with_two_worker_processes_counts_every_request_and_survives_a_killed_worker(trained, tmp_path):
    """`--workers 2`: both processes share the port; /metrics (prometheus_client's multiprocess mode) adds up
    what each served; a worker killed outright is replaced, its counts stay in the sums and its gauges go."""
    serve = ServeProcess(trained["config_path"], trained["models"], None, None, tmp_path / "serve.log", cwd=tmp_path,
                         log_level="info", extra_env={"WATCHNEXT_WORKERS": "2"})
    reqs = rank_requests(trained["history"], 160, top_k=3)
    assert len(reqs) == 160

    def started() -> list[int]:
        """The worker processes that have started serving: a worker logs service_started once it counts itself
        in watchnext_worker_processes, before uvicorn takes connections in it."""
        return sorted(e["pid"] for e in serve.events("service_started"))

    def rank_one(req) -> None:
        with httpx.Client(base_url=serve.url, timeout=30) as c:  # a new connection: the kernel hands it to either worker
            r = c.post("/v1/rank", json=req)
            assert r.status_code == 200, r.text

    def scrape() -> str:
        with httpx.Client(base_url=serve.url, timeout=30) as c:
            r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples(r.text)  # parses
        return r.text

    def ranked(text: str) -> float | None:
        return sample(text, "watchnext_requests_total", endpoint="/v1/rank", status="200")

    try:
        serve.wait_ready()  # one worker answers /readyz; the other may still be starting
        workers = children_by_kind(serve.proc.pid)["worker"]
        assert len(workers) == 2
        wait_for(lambda: set(started()) >= set(workers), 60, f"both worker processes {workers} to start serving")
        assert started() == sorted(workers)
        (directory,) = {e["shared_metrics"] for e in serve.events("service_started")}  # PROMETHEUS_MULTIPROC_DIR

        for req in reqs[:20]:
            rank_one(req)
        text = scrape()
        assert ranked(text) == 20
        assert sample(text, "watchnext_rank_latency_seconds_count") == 20
        assert sample(text, "watchnext_worker_processes") == 2
        # both workers answer some (concurrent clients, should the kernel have picked one worker every time so far)
        sent = 20
        with ThreadPoolExecutor(4) as pool:
            while sent < 100 and not (len(worker_rank_counts(directory)) == 2 and all(worker_rank_counts(directory).values())):
                list(pool.map(rank_one, reqs[sent:sent + 20]))
                sent += 20
        per = worker_rank_counts(directory)
        assert sorted(per) == sorted(workers) and all(n > 0 for n in per.values()), per
        assert ranked(scrape()) == sent == sum(per.values())  # the sum over both processes

        os.kill(workers[0], signal.SIGKILL)

        def replacement() -> list[int]:  # the killed worker gone, the other still there, and one new one
            now = children_by_kind(serve.proc.pid).get("worker", [])
            return [pid for pid in now if pid not in workers] if len(now) == 2 and workers[0] not in now \
                and workers[1] in now else []

        (new,) = wait_for(replacement, 60, "the supervisor to start a new worker")
        # the supervisor takes the killed worker out of the live gauges (mark_process_dead); its counters stay
        wait_for(lambda: not glob.glob(os.path.join(directory, f"gauge_live*_{workers[0]}.db")), 10,
                 "the killed worker's live gauges to be removed")
        assert os.path.exists(os.path.join(directory, f"counter_{workers[0]}.db"))
        # the new process exists, but until it has started /metrics rightly counts one worker serving
        wait_for(lambda: new in started(), 60, f"the new worker process {new} to start serving")
        assert started() == sorted(workers + [new])
        serve.wait_ready()
        for req in reqs[sent:sent + 20]:
            rank_one(req)
        text = scrape()
        assert ranked(text) == sent + 20  # the killed worker's requests still counted
        assert sample(text, "watchnext_rank_latency_seconds_count") == sent + 20
        assert sample(text, "watchnext_worker_processes") == 2
        assert sample(text, "watchnext_model_version") == 2
        assert [dict(k)["version"] for k in samples(text)["watchnext_model_info"]] == ["2"]  # each worker's pair
    finally:
        code = serve.stop()
    assert code == 128 + signal.SIGTERM
    assert (tmp_path / "serve.log").read_text().count('"service_stopped"') == 2
    assert not os.path.exists(directory)  # the parent removes the metrics directory


def test_health_ready_and_metrics(trained, server, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"ready": True, "model_version": "2", "provider": "CPUExecutionProvider", "backend": "onnxruntime",
                     "redis": True, "degraded": False, "impression_backlog": 0}
    for req in rank_requests(trained["history"], 3):
        assert client.post("/v1/rank", json=req).status_code == 200
    text = client.get("/metrics").text
    assert sample(text, "watchnext_model_info", version="2", provider="CPUExecutionProvider") == 1
    assert sample(text, "watchnext_model_version") == 2
    assert sample(text, "watchnext_rank_latency_seconds_count") == 3
    assert sample(text, "watchnext_rank_latency_seconds_bucket", le="+Inf") == 3
    assert sample(text, "watchnext_rank_candidates_sum") == 30  # three slates of 10
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
