"""`watchnext serve --backend triton`: the model call goes to Triton; everything else stays in the service.

No real Triton runs here: tests/service/triton_standin.py is a real HTTP server
speaking the parts of Triton's protocol tritonclient uses (binary tensors
included), running the repository's real ONNX files with ONNX Runtime. The
service is the real one (uvicorn on a loopback port, real Redis), and its
answers through Triton are compared with the same service on ONNX Runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from cli.main import main as watchnext_main
from service.settings import Settings, SettingsError
from tests.helpers import expected_workers, wait_for
from tests.service.fixtures import ADMIN, live_service
from tests.service.prom import sample
from tests.service.traffic import rank_requests
from tests.service.triton_standin import TritonStandin
from watchnext.config import load_config
from watchnext.redis_embed import free_port
from watchnext.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MODEL = "ranker"


def readyz(c: httpx.Client) -> dict:
    return c.get("/readyz").json()


def serving(c: httpx.Client, version: int) -> bool:
    body = readyz(c)
    return body["ready"] and body["model_version"] == str(version)


def assert_same_ranking(a: dict, b: dict) -> None:
    """Same items in the same order, heads and scores within 1e-5."""
    assert [it["id"] for it in a["items"]] == [it["id"] for it in b["items"]]
    assert a["model_version"] == b["model_version"]
    for x, y in zip(a["items"], b["items"]):
        assert x["heads"].keys() == y["heads"].keys()
        np.testing.assert_allclose(list(x["heads"].values()), list(y["heads"].values()), rtol=1e-5, atol=1e-5)
        assert x["score"] == pytest.approx(y["score"], rel=1e-5, abs=1e-5)


@pytest.fixture
def standin(models_dir):
    with TritonStandin(models_dir) as t:
        yield t


@pytest.fixture
def triton_server(trained, models_dir, redis_url, standin):
    with live_service(trained["config_path"], models_dir, redis_url, backend="triton", triton_url=standin.url) as srv:
        yield srv


@pytest.fixture
def tc(triton_server):
    with httpx.Client(base_url=triton_server.url, timeout=30) as c:
        yield c


# ---------------------------------------------------------------- settings and set-up


def test_settings_name_the_backend_and_its_url():
    with pytest.raises(SettingsError, match=r"triton_url \(WATCHNEXT_TRITON_URL, --triton-url\).*host:port"):
        Settings(backend="triton")
    with pytest.raises(SettingsError, match="without a scheme"):
        Settings(backend="triton", triton_url="http://localhost:8000")
    with pytest.raises(SettingsError, match="backend.*onnxruntime, triton.*'tensorrt'"):
        Settings(backend="tensorrt")
    s = Settings.from_env({"WATCHNEXT_BACKEND": "triton", "WATCHNEXT_TRITON_URL": "triton:8000"})
    assert (s.backend, s.triton_url) == ("triton", "triton:8000")
    assert Settings.from_env({}).backend == "onnxruntime"
    assert Settings(backend="triton", triton_url="gpu-box:8000/triton").triton_url == "gpu-box:8000/triton"
    # a flag wins over the environment
    s = Settings.from_env({"WATCHNEXT_BACKEND": "triton"}, backend="onnxruntime")
    assert s.backend == "onnxruntime"


def test_serve_stops_with_a_clear_message_on_bad_triton_settings(capsys, monkeypatch):
    monkeypatch.delenv("WATCHNEXT_TRITON_URL", raising=False)
    monkeypatch.delenv("WATCHNEXT_BACKEND", raising=False)
    assert watchnext_main(["serve", "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "triton_url" in err and "--triton-url" in err and "localhost:8000" in err
    # tritonclient missing: the install command, before anything starts
    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)
    assert watchnext_main(["serve", "--backend", "triton", "--triton-url", "127.0.0.1:1"]) == 2
    assert "pip install 'watchnext[triton]'" in capsys.readouterr().err


# ---------------------------------------------------------------- ranking through Triton


def test_rank_through_triton_matches_onnxruntime(trained, models_dir, redis_url, standin, triton_server, tc):
    body = readyz(tc)
    assert body["ready"] and body["model_version"] == "2"
    assert body["provider"] == "triton" and body["backend"] == "triton"
    assert body["triton_url"] == standin.url and body["backend_error"] is None
    warm = standin.calls[(MODEL, "2")]
    assert warm == 3  # the warm-up batches went to Triton
    reqs = rank_requests(trained["history"], 6, top_k=5)
    with live_service(trained["config_path"], models_dir, redis_url) as ort_srv, \
            httpx.Client(base_url=ort_srv.url, timeout=30) as oc:
        assert readyz(oc)["backend"] == "onnxruntime" and readyz(oc)["provider"] == "CPUExecutionProvider"
        expected = [oc.post("/v1/rank", json=r).json() for r in reqs]
    got = [tc.post("/v1/rank", json=r) for r in reqs]
    assert all(r.status_code == 200 for r in got), got[0].text
    for e, g in zip(expected, got):
        assert_same_ranking(g.json(), e)
    assert standin.calls[(MODEL, "2")] == warm + len(reqs)  # each request was one call to Triton
    infers = [(p, h) for m, p, h in standin.requests if m == "POST"]
    assert infers and all(p == f"/v2/models/{MODEL}/versions/2/infer" for p, _ in infers)
    assert all("Inference-Header-Content-Length" in h for _, h in infers)  # binary tensors, not JSON lists

    # rank work runs in several worker threads at once: each has its own client
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(lambda r: tc.post("/v1/rank", json=r), reqs * 4))
    for i, r in enumerate(again):
        assert r.status_code == 200, r.text
        assert_same_ranking(r.json(), expected[i % len(reqs)])
    # the impression log is the service's own
    metrics = tc.get("/metrics").text
    assert sample(metrics, "watchnext_model_info", version="2", provider="triton") == 1


def test_input_datatypes_are_checked_against_the_config(trained, standin):
    from service.triton import TritonBackend
    from watchnext.encoding import Encoder

    session = TritonBackend(standin.url).session(MODEL, 2)
    specs = Encoder(load_config(trained["config_path"])).input_specs()
    assert sorted(session.input_names) == sorted(n for n, _, _ in specs)
    assert session.check_inputs(specs) is None
    wrong = [(n, "int64" if d == "float32" else d, s) for n, d, s in specs]
    assert "datatype FP32, the config encodes INT64" in session.check_inputs(wrong)
    longer = [(n, d, tuple(x + 1 for x in s)) if s else (n, d, s) for n, d, s in specs]
    assert "shape" in session.check_inputs(longer)


# ---------------------------------------------------------------- versions


def test_promotion_is_served_through_triton_once_triton_has_it(trained, models_dir, standin, triton_server, tc, capfd):
    repo = ModelRepository(models_dir, MODEL)
    req = rank_requests(trained["history"], 1, top_k=5)[0]
    standin.hidden.add(1)  # Triton has not loaded version 1 yet
    repo.promote(1)
    time.sleep(1.0)  # five polls
    assert serving(tc, 2)  # refused: version 2 keeps serving
    refused = tc.get("/v1/models").json()["refused"]
    assert "not have ranker version 1 ready" in refused["1"] and standin.url in refused["1"]
    logs = [ln for ln in capfd.readouterr().err.splitlines() if '"model_refused"' in ln]
    assert len(logs) == 1 and '"retry": true' in logs[0]  # once, not once per poll
    r = tc.post("/v1/models/1/promote", headers=AUTH)  # the admin API says why
    assert r.status_code == 409 and "not have ranker version 1 ready" in r.json()["error"]["reason"]

    before = standin.calls[(MODEL, "1")]
    standin.hidden.clear()  # Triton's poll picks it up: so does the service's
    wait_for(lambda: serving(tc, 1), 10, "version 1 to serve through Triton")
    got = tc.post("/v1/rank", json=req).json()
    assert got["model_version"] == "1"
    assert standin.calls[(MODEL, "1")] == before + 3 + 1  # warm-up, then the request
    # the same answer ONNX Runtime gives for version 1
    from tests.service.test_rank import direct_scores

    heads, scores, names = direct_scores(load_config(trained["config_path"]), models_dir / MODEL / "1" / "model.onnx", req)
    ids = [c["video_id"] for c in req["candidates"]]
    order = np.argsort(-scores, kind="stable")[:5]
    assert [it["id"] for it in got["items"]] == [ids[i] for i in order]
    for it, i in zip(got["items"], order):
        np.testing.assert_allclose([it["heads"][n] for n in names], heads[i], rtol=1e-5, atol=1e-5)

    r = tc.post("/v1/models/2/promote", headers=AUTH)  # through the API: loaded from Triton before the swap
    assert r.status_code == 200 and r.json() == {"promoted": 2, "serving": 2, "provider": "triton"}


# ---------------------------------------------------------------- Triton down


def test_triton_down_is_a_clear_error_not_a_fallback(trained, standin, triton_server, tc):
    req = rank_requests(trained["history"], 1)[0]
    assert tc.post("/v1/rank", json=req).status_code == 200
    standin.stop()
    r = tc.post("/v1/rank", json=req)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["field"] == "model" and f"Triton at {standin.url}" in err["reason"]
    body = tc.get("/readyz")
    assert body.status_code == 503
    body = body.json()
    assert body["ready"] is False and body["model_version"] == "2" and body["provider"] == "triton"
    assert "unreachable" in body["backend_error"]
    standin.start()  # back on the same port
    wait_for(lambda: readyz(tc)["ready"], 10, "ready again")
    assert tc.post("/v1/rank", json=req).status_code == 200


def test_service_started_before_triton_waits_for_it(trained, models_dir, redis_url):
    port = free_port()
    t = TritonStandin(models_dir, port)
    with live_service(trained["config_path"], models_dir, redis_url, backend="triton", triton_url=t.url) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False and body["model_version"] is None
        assert f"Triton at 127.0.0.1:{port} is unreachable" in body["backend_error"]
        r = c.post("/v1/rank", json={"candidates": [{"video_id": "a"}]})
        assert r.status_code == 503 and r.json()["error"]["field"] == "model"
        with t:
            wait_for(lambda: serving(c, 2), 10, "version 2 to serve once Triton is up")


# ---------------------------------------------------------------- the command


def test_watchnext_serve_backend_triton(trained, models_dir, redis_url, standin):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "WATCHNEXT_CONFIG": str(trained["config_path"]),
           "WATCHNEXT_MODELS": str(models_dir), "WATCHNEXT_LOG_LEVEL": "warning"}
    env.pop("WATCHNEXT_BACKEND", None)
    proc = subprocess.Popen([sys.executable, "-m", "watchnext", "serve", "--port", str(port), "--backend", "triton",
                             "--triton-url", standin.url], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            def up() -> bool:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    return c.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, 60, "watchnext serve --backend triton to be ready")
            assert readyz(c)["provider"] == "triton"
            req = rank_requests(trained["history"], 1, top_k=3)[0]
            r = c.post("/v1/rank", json=req)
            assert r.status_code == 200 and len(r.json()["items"]) == 3
            # each worker process's three warm-up batches (the second may still be warming up when the first
            # answers /readyz), and the request
            calls = 3 * max(1, expected_workers()) + 1
            wait_for(lambda: standin.calls[(MODEL, "2")] >= calls, 30, "every worker's warm-up")
            time.sleep(0.5)
            assert standin.calls[(MODEL, "2")] == calls
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stderr.close()


def test_a_client_finalized_as_its_thread_ends_raises_nothing(monkeypatch):
    """A thread's client is finalized when the thread ends, after gevent's per-thread state is gone: its `close`
    then raised AttributeError (gevent's hub look-up) as an "exception ignored". The backend's client takes that
    end quietly; a client dropped after a failure is closed in its own thread first."""
    from service.triton import TritonBackend, TritonError

    backend = TritonBackend("127.0.0.1:1")
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    c = backend.client()

    def gone(*a, **k):
        raise AttributeError("'_Threadlocal' object has no attribute 'loop'")

    monkeypatch.setattr(c._pool, "join", gone)
    backend._local.client = None
    del c
    assert seen == []
    # what tritonclient's own client does in the same place: the reason for the subclass
    plain = backend.http.InferenceServerClient("127.0.0.1:1")
    monkeypatch.setattr(plain._pool, "join", gone)
    del plain
    assert len(seen) == 1 and isinstance(seen[0], AttributeError)
    # a broken connection: the thread's client is closed and a fresh one made on the next call
    with pytest.raises(TritonError, match="unreachable"):
        backend.model_ready("ranker", 1)
    assert backend._local.client is None and backend.client() is not None
