"""Model lifecycle: promotion and rollback through the API, refusals, and swaps under load."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import numpy as np

from tests.service.fixtures import ADMIN, live_service
from tests.service.test_rank import direct_scores
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.repository import ModelRepository

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def wait_version(client: httpx.Client, version: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").json()["model_version"] == str(version):
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} not serving after {timeout} s")


def test_promote_and_rollback_need_the_admin_token(client):
    r = client.post("/v1/models/1/promote")
    assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
    r = client.post("/v1/models/1/promote", headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401
    assert client.get("/readyz").json()["model_version"] == "2"  # nothing changed

    r = client.post("/v1/models/1/promote", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"promoted": 1, "serving": 1, "provider": "CPUExecutionProvider"}
    assert client.get("/readyz").json()["model_version"] == "1"  # swapped before the answer
    models = client.get("/v1/models").json()
    assert models["promoted"] == 1 and models["loaded"]["version"] == 1
    assert [v["serving"] for v in models["versions"]] == [True, False]

    client.post("/v1/models/2/promote", headers=AUTH)
    r = client.post("/v1/models/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == 1
    r = client.post("/v1/models/9/promote", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["field"] == "version"
    r = client.post("/v1/models/x/promote", headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["field"] == "version"


def test_admin_endpoints_are_off_without_a_token(trained, models_dir, redis_url):
    with live_service(trained["config_path"], models_dir, redis_url) as srv:
        srv.service.settings = srv.service.settings.with_(admin_token=None)
        with httpx.Client(base_url=srv.url) as c:
            r = c.post("/v1/models/rollback", headers=AUTH)
            assert r.status_code == 401 and "WATCHNEXT_ADMIN_TOKEN" in r.json()["error"]["reason"]


def test_cli_promotion_is_picked_up_within_seconds(server, client, models_dir):
    repo = ModelRepository(models_dir, "ranker")
    t0 = time.monotonic()
    repo.promote(1)  # what `watchnext models promote 1` does
    wait_version(client, 1, timeout=5)
    assert time.monotonic() - t0 < 2.0  # model_poll_s = 0.2 in the test config
    repo.promote(2)
    wait_version(client, 2, timeout=5)
    repo.rollback()  # what `watchnext models rollback` does
    wait_version(client, 1, timeout=5)


def test_mismatched_or_corrupt_versions_are_refused_and_the_current_one_keeps_serving(server, client, models_dir, capfd):
    repo = ModelRepository(models_dir, "ranker")
    # version 3: trained under another config (its hash differs)
    shutil.copytree(models_dir / "ranker" / "2", models_dir / "ranker" / "3")
    meta_path = models_dir / "ranker" / "3" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config_hash"] = "0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    # version 4: a damaged file (checksum no longer matches)
    shutil.copytree(models_dir / "ranker" / "2", models_dir / "ranker" / "4")
    onnx = models_dir / "ranker" / "4" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])

    r = client.post("/v1/models/3/promote", headers=AUTH)
    assert r.status_code == 409 and "config hash 0123456789abcdef does not match" in r.json()["error"]["reason"]
    repo.promote(4)  # behind the service's back: the poller must refuse it
    deadline = time.monotonic() + 5
    while "4" not in client.get("/v1/models").json()["refused"] and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = client.get("/v1/models").json()["refused"]
    assert "checksum does not match" in refused["4"]
    time.sleep(0.5)  # several polls: refused once, not reloaded each time
    assert server.service.metrics.value("watchnext_model_refused_total") == 2
    assert client.get("/readyz").json()["model_version"] == "2"
    r = client.post("/v1/rank", json={"candidates": [{"video_id": "v1"}]})
    assert r.status_code == 200 and r.json()["model_version"] == "2"
    err = capfd.readouterr().err
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{") and '"model_refused"' in x]
    assert {ln["version"] for ln in lines} == {3, 4} and all(ln["serving"] == 2 for ln in lines)


def test_promotion_storm_fails_no_request_and_every_response_names_its_version(trained, server, client):
    """4 clients rank while versions 1 and 2 are promoted back and forth (API and file)."""
    config = load_config(trained["config_path"])
    reqs = rank_requests(trained["history"], 8, top_k=5)
    expected = {}  # (request index, version) -> (ids, scores) computed without the service
    for v in (1, 2):
        onnx = trained["models"] / "ranker" / str(v) / "model.onnx"
        for i, req in enumerate(reqs):
            _, scores, _ = direct_scores(config, onnx, req)
            top = np.argsort(-scores, kind="stable")[:5]
            expected[i, str(v)] = ([req["candidates"][j]["video_id"] for j in top], scores[top])

    stop = threading.Event()
    results: list[tuple[int, int, dict | str]] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                i = int(rng.integers(len(reqs)))
                try:
                    r = c.post("/v1/rank", json=reqs[i])
                    results.append((i, r.status_code, r.json() if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:
                    results.append((i, -1, repr(e)))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    repo = server.service.deps.repo
    swaps = 0
    t_end = time.monotonic() + 6
    while time.monotonic() < t_end:
        v = 1 + swaps % 2
        if swaps % 3 == 2:
            repo.promote(v)  # through the file: the poller swaps
            time.sleep(0.3)
        else:
            assert client.post(f"/v1/models/{v}/promote", headers=AUTH).status_code == 200
            time.sleep(0.1)
        swaps += 1
    stop.set()
    for t in threads:
        t.join(30)

    failed = [r for r in results if r[1] != 200]
    assert failed == []
    assert len(results) > 100
    seen = set()
    for i, _, body in results:
        ids, scores = expected[i, body["model_version"]]
        assert [it["id"] for it in body["items"]] == ids
        assert np.allclose([it["score"] for it in body["items"]], scores, rtol=1e-6)
        seen.add(body["model_version"])
    assert seen == {"1", "2"}
    assert server.service.metrics.value("watchnext_model_swaps_total") >= swaps // 2


def test_a_worker_started_on_a_corrupt_promoted_version_serves_the_last_good_one(trained, models_dir, redis_url, capfd):
    repo = ModelRepository(models_dir, "ranker")
    shutil.copytree(models_dir / "ranker" / "2", models_dir / "ranker" / "3")
    onnx = models_dir / "ranker" / "3" / "model.onnx"
    onnx.write_bytes(b"\x00not an onnx model" * 64)
    repo.promote(1)
    repo.promote(3)  # behind every check's back (the repository alone does not load versions)
    with live_service(trained["config_path"], models_dir, redis_url) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/readyz")
        body = r.json()
        # the version promoted before 3 serves (1), not the newest loadable one (2)
        assert r.status_code == 200 and body["ready"] is True and body["model_version"] == "1"
        fb = body["serving_fallback"]
        assert fb["promoted"] == 3 and fb["serving"] == 1
        assert fb["reason"].startswith(f"{onnx}: checksum does not match metadata.json")
        r = c.post("/v1/rank", json={"candidates": [{"video_id": "v1"}]})
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        models = c.get("/v1/models").json()
        assert models["promoted"] == 3 and models["loaded"]["version"] == 1
        assert list(models["refused"]) == ["3"] and models["serving_fallback"] == fb
        assert srv.service.metrics.value("watchnext_model_refused_total") == 1
        time.sleep(0.5)  # several polls: the refusal is not repeated, the fallback keeps serving
        assert srv.service.metrics.value("watchnext_model_refused_total") == 1 and c.get("/readyz").json()["model_version"] == "1"

        repo.promote(2)  # a loadable promotion ends the fallback
        wait_version(c, 2, timeout=5)
        body = c.get("/readyz").json()
        assert body["ready"] is True and "serving_fallback" not in body
        assert c.get("/v1/models").json()["serving_fallback"] is None
    err = capfd.readouterr().err
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{") and '"model_refused"' in x]
    assert [(ln["version"], ln["serving"]) for ln in lines] == [(3, None)] and str(onnx) in lines[0]["reason"]


def test_only_when_no_version_can_serve_is_it_503(trained, models_dir, redis_url):
    for v in (1, 2):
        (models_dir / "ranker" / str(v) / "model.onnx").write_bytes(b"\x01" * 1000)
    with live_service(trained["config_path"], models_dir, redis_url) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and r.json()["model_version"] is None
        assert "serving_fallback" not in r.json()
        assert sorted(c.get("/v1/models").json()["refused"]) == ["1", "2"]
        assert c.post("/v1/rank", json={"candidates": [{"video_id": "v1"}]}).status_code == 503
        # a good version appears: served at the next poll
        shutil.copytree(trained["models"] / "ranker" / "2", models_dir / "ranker" / "3")
        wait_version(c, 3, timeout=5)
        assert c.get("/readyz").status_code == 200


def test_damaged_metadata_or_state_files_are_named_and_never_a_500(server, client, models_dir):
    meta = models_dir / "ranker" / "1" / "metadata.json"
    meta.write_text('{"config_hash": "')
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    rows = {v["version"]: v for v in r.json()["versions"]}
    assert rows[1]["error"].startswith(f"{meta}: not valid JSON: ") and rows[2]["serving"] is True
    r = client.post("/v1/models/1/promote", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["field"] == "version"
    assert f"version 1 cannot serve: {meta}: not valid JSON" in r.json()["error"]["reason"]

    state = models_dir / "ranker" / "serving.json"
    state.write_text('{"promoted": ')
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    assert r.json()["state_error"].startswith(f"{state}: not valid JSON: ") and r.json()["promoted"] is None
    time.sleep(0.5)  # polls: the version serving keeps serving, and says why it is not the promoted one
    body = client.get("/readyz").json()
    assert body["ready"] is True and body["model_version"] == "2"
    assert body["serving_fallback"]["promoted"] is None and str(state) in body["serving_fallback"]["reason"]
    r = client.post("/v1/models/rollback", headers=AUTH)
    assert r.status_code == 409 and str(state) in r.json()["error"]["reason"]
    r = client.post("/v1/models/2/promote", headers=AUTH)
    assert r.status_code == 409 and str(state) in r.json()["error"]["reason"]
    assert state.read_text() == '{"promoted": '
