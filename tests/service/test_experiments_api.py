"""Online A/B experiments through the API: two service processes on one Redis, a restart, a stop under load,
validation, and the report from real impressions and feedback. Nothing is mocked."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from tests.helpers import serve_process, stream_examples, wait_for
from tests.service.fixtures import ADMIN, live_service
from watchnext.experiments import Experiment

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CANDS = [{"video_id": "v1"}, {"video_id": "v2"}, {"video_id": "v3"}]
SPLIT = {"arms": [{"name": "control", "share": 0.6},
                  {"name": "old", "share": 0.4, "version": 1, "weights": {"click": 1.0, "like": 4.0}}]}


def rank(c: httpx.Client, user: str | None) -> dict:
    body = {"candidates": CANDS, "top_k": 3, **({"user": {"user_id": user}} if user is not None else {})}
    r = c.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_assignment_is_the_same_in_two_processes_and_after_a_restart(trained, models_dir, redis_url, tmp_path):
    users = [f"u{i}" for i in range(2000)]
    with live_service(trained["config_path"], models_dir, redis_url) as a, httpx.Client(base_url=a.url) as ca:
        r = ca.put("/v1/experiments/sat", json=SPLIT, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "live" and r.json()["salt"] == "sat"
        shown = ca.get("/v1/experiments/sat").json()
        exp = Experiment.from_dict({k: v for k, v in shown.items() if k not in ("status", "stopped_at")})
        got_a = {u: rank(ca, u) for u in users}
        arms = {u: g["arm"] for u, g in got_a.items()}
        want = np.array(exp.arm_names())[exp.assign(np.array(users))]
        assert [arms[u] for u in users] == want.tolist()
        assert {(g["arm"], g["model_version"]) for g in got_a.values()} == {("control", "2"), ("old", "1")}
        share = np.mean([arms[u] == "old" for u in users])
        assert abs(share - 0.4) < 0.035  # 2,000 users: sd ~0.011
        assert {g["experiment"] for g in got_a.values()} == {"sat"}
        assert ca.get("/v1/models").json()["experiment"] == {"name": "sat", "loaded": [1]}  # side by side with 2
        outside = rank(ca, None)  # no user id: the promoted version, outside the experiment
        assert (outside["arm"], outside["model_version"], outside["experiment"]) == ("control", "2", None)

        sample = users[:300]
        for restart in range(2):  # a second process, then that process restarted
            with serve_process(trained["config_path"], models_dir, redis_url, ADMIN, tmp_path) as url, \
                    httpx.Client(base_url=url) as cb:
                got_b = {u: rank(cb, u) for u in sample}
            for u in sample:
                assert (got_b[u]["arm"], got_b[u]["model_version"]) == (arms[u], got_a[u]["model_version"]), (restart, u)
                # the same arm scores the same: version and weights agree across processes
                assert [i["id"] for i in got_b[u]["items"]] == [i["id"] for i in got_a[u]["items"]]
                assert np.allclose([i["score"] for i in got_b[u]["items"]], [i["score"] for i in got_a[u]["items"]],
                                   rtol=1e-5)


def test_stopping_under_load_returns_all_traffic_to_the_promoted_version(trained, models_dir, redis_url):
    with live_service(trained["config_path"], models_dir, redis_url) as a, \
            live_service(trained["config_path"], models_dir, redis_url) as b, httpx.Client(base_url=a.url) as ca:
        assert ca.put("/v1/experiments/sat", json=SPLIT, headers=AUTH).status_code == 200
        wait_for(lambda: b.service.experiments.live is not None, timeout=5)
        results: list[tuple[float, int, str, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(base_url=(a.url, b.url)[k % 2], timeout=10) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        r = c.post("/v1/rank", json={"user": {"user_id": f"c{k}-{i % 50}"}, "candidates": CANDS})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                            continue
                        g = r.json()
                        results.append((time.monotonic(), k, g["arm"], g["model_version"]))
                    except httpx.HTTPError as e:
                        failures.append(repr(e))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        r = ca.delete("/v1/experiments/sat", headers=AUTH)
        stopped = time.monotonic()
        assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    before = [x for x in results if x[0] < stopped]
    after = [x for x in results if x[0] > stopped + 0.5]  # model_poll_s = 0.2: process b follows within a poll
    assert {x[2] for x in before} == {"control", "old"} and len(before) > 40
    assert len(after) > 40 and {(x[2], x[3]) for x in after} == {("control", "2")}
    assert {x[1] % 2 for x in after} == {0, 1}  # both processes


def test_validation_errors_name_the_field(client):
    def put(body, headers=AUTH, name="e1"):
        return client.put(f"/v1/experiments/{name}", json=body, headers=headers)

    assert put(SPLIT, headers={}).status_code == 401
    for body, field in [
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": "x"}]}, "arms[1].share"),
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "version": 9}]}, "arms[1].version"),
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"nope": 1}}]},
         "arms[1].weights.nope"),
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}, "arms[1].name"),
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}, "arms"),
        ({"arms": [{"name": "a", "share": 1.0}]}, "arms"),
        ({**SPLIT, "name": "other"}, "name"),
        ({**SPLIT, "colour": 1}, "colour"),
    ]:
        r = put(body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.json())
    r = client.put("/v1/experiments/e1", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    assert client.get("/v1/experiments/e1").status_code == 404
    assert put(SPLIT).status_code == 200
    r = put(SPLIT, name="e2")
    assert r.status_code == 409 and r.json()["error"]["field"] == "name" and "'e1' is live" in r.json()["error"]["reason"]
    assert client.delete("/v1/experiments/e2", headers=AUTH).status_code == 404
    assert client.delete("/v1/experiments/e1").status_code == 401
    assert client.delete("/v1/experiments/e1", headers=AUTH).status_code == 200
    assert put(SPLIT, name="e2").status_code == 200
    listed = client.get("/v1/experiments").json()["experiments"]
    assert [(e["name"], e["status"]) for e in listed] == [("e1", "stopped"), ("e2", "live")]
    r = client.get("/v1/experiments/e2/report", params={"confidence": 2})
    assert r.status_code == 422 and r.json()["error"]["field"] == "confidence"


def put_raw(c: httpx.Client, name: str, body) -> httpx.Response:
    """PUT with json.dumps's escapes (httpx would refuse to encode a lone surrogate as UTF-8)."""
    return c.put(f"/v1/experiments/{name}", content=body if isinstance(body, bytes) else json.dumps(body),
                 headers={**AUTH, "Content-Type": "application/json"})


def assert_ranks_with_users(c: httpx.Client, experiment: str | None = None) -> None:
    for u in ("u1", "u2", "u3", "u4"):
        assert rank(c, u)["experiment"] == experiment


def test_bodies_that_cannot_be_served_are_refused_and_nothing_is_stored(client, redis_url):
    import redis

    two = [{"name": "control", "share": 0.5}, {"name": "b", "share": 0.5}]
    for body, status, field in [
        ({"salt": "s\ud800", "arms": two}, 422, "salt"),
        ({"meta": {"note": "\udfff!"}, "arms": two}, 422, "meta.note"),
        ({"meta": {"owner": {"team": ["x", "\ud800"]}}, "arms": two}, 422, "meta.owner.team[1]"),
        ({"meta": {"\ud800": 1}, "arms": two}, 422, "meta"),
        ({"meta": {"a": {"b": {"c": {"d": {}}}}}, "arms": two}, 422, "meta.a.b.c.d"),  # 5 levels
        ({"meta": {"note": "x" * 5000}, "arms": two}, 422, "meta"),
        ({"arms": [two[0], {**two[1], "weights": {"like": 1e308}}]}, 422, "arms[1].weights.like"),
        ({"arms": [two[0], {**two[1], "weights": {"click": -2e6}}]}, 422, "arms[1].weights.click"),
        ({"arms": [{"name": "a\n", "share": 0.5}, two[1]]}, 422, "arms[0].name"),
        ({"name": "e1\n", "arms": two}, 422, "name"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body"),
        (b'{"meta": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, 400, "body"),
    ]:
        r = put_raw(client, "e1", body)
        assert r.status_code == status, (str(body)[:80], r.text[:300])
        assert r.json()["error"]["field"] == field, (str(body)[:80], r.json())
    r = client.put("/v1/experiments/e1%0A", json={"arms": two}, headers=AUTH)  # the URL's name in full too
    assert r.status_code == 422 and r.json()["error"]["field"] == "name", r.text
    # nothing was stored, nothing went live, and everyone is still served
    assert client.get("/v1/experiments/e1").status_code == 404
    assert client.get("/v1/experiments").json() == {"experiments": []}
    assert_ranks_with_users(client)
    r = redis.Redis.from_url(redis_url)
    assert r.get("wn:exp:live") is None and r.hlen("wn:exp:defs") == 0
    # the largest weights and meta that pass are served with finite scores
    big = {"meta": {"note": "n\u00e9" * 1000, "a": {"b": {"c": [1, 2.5, None, True]}}},
           "arms": [two[0], {**two[1], "weights": {"click": 1e6, "like": -1e6}}]}
    r = put_raw(client, "e1", big)
    assert r.status_code == 200, r.text
    assert client.get("/v1/experiments/e1").json()["meta"] == json.loads(json.dumps(big["meta"]))
    users = [f"u{i}" for i in range(40)]
    got = [rank(client, u) for u in users]
    assert {g["arm"] for g in got} == {"control", "b"}
    assert all(len(g["items"]) == len(CANDS) and all(np.isfinite(i["score"]) for i in g["items"]) for g in got)


def test_unreadable_stored_definitions_never_fail_a_request(trained, models_dir, redis_url, capfd):
    """Entries an older version (or a hand) wrote that no longer validate are skipped and logged: ranks,
    the list and the report keep answering, and the entry can be replaced or deleted."""
    import redis

    r = redis.Redis.from_url(redis_url)
    old = {"name": "old", "salt": "\ud800", "created_at": 1.0, "meta": {},
           "arms": [{"name": "control", "share": 0.5, "version": None, "weights": None},
                    {"name": "b", "share": 0.5, "version": None, "weights": None}]}
    r.set("wn:exp:live", json.dumps(old))  # as the version before this one stored it: live, with a lone surrogate
    r.set("wn:exp:def:old", json.dumps({"experiment": old, "status": "live", "stopped_at": None}))
    r.set("wn:exp:def:junk", b"\xff{ not json")
    good = {**old, "name": "fine", "salt": "fine"}
    r.set("wn:exp:def:fine", json.dumps({"experiment": good, "status": "stopped", "stopped_at": 2.0}))
    with live_service(trained["config_path"], models_dir, redis_url) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert_ranks_with_users(c)  # the live definition was refused: nobody is in an experiment
        listed = c.get("/v1/experiments")
        assert listed.status_code == 200, listed.text
        assert [(e["name"], e["status"]) for e in listed.json()["experiments"]] == [("fine", "stopped")]
        for name in ("old", "junk"):
            got = c.get(f"/v1/experiments/{name}")
            assert got.status_code == 409 and got.json()["error"]["field"] == "name", got.text
            assert c.get(f"/v1/experiments/{name}/report").status_code == 409
        assert c.get("/v1/experiments/fine/report").status_code == 200
        # garbage written while it runs: into the hash, and over the live key
        r.hset("wn:exp:defs", "bad", json.dumps({"experiment": {**good, "name": "bad", "arms": [
            {"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"click": 1e308}}]},
            "status": "stopped"}))
        r.set("wn:exp:live", b"{")
        time.sleep(0.5)  # model_poll_s = 0.2
        assert_ranks_with_users(c)
        assert [e["name"] for e in c.get("/v1/experiments").json()["experiments"]] == ["fine"]
        # an unreadable entry is deleted whole; a PUT replaces the unreadable live one
        d = c.delete("/v1/experiments/old", headers=AUTH)
        assert d.status_code == 200 and d.json()["status"] == "removed", d.text
        assert c.get("/v1/experiments/old").status_code == 404
        assert put_raw(c, "new", SPLIT).status_code == 200
        assert {rank(c, f"u{i}")["experiment"] for i in range(10)} == {"new"}
        assert r.hlen("wn:exp:defs") == 4 and r.keys("wn:exp:def:*") == []
    # the log names each unreadable entry once, however often it was read
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    unreadable = sorted(e["experiment"] for e in logged if e.get("event") == "experiment_unreadable")
    assert unreadable == ["bad", "junk", "old"], logged
    refused = [e for e in logged if e.get("event") == "experiment_refused"]
    assert len(refused) == 2 and "salt: not valid Unicode" in refused[0]["reason"], refused


def test_report_gives_per_arm_metrics_from_impressions_and_feedback(client, redis_url):
    exp_body = {"arms": [{"name": "control", "share": 0.5}, {"name": "treat", "share": 0.5, "version": 1}]}
    assert client.put("/v1/experiments/rep", json=exp_body, headers=AUTH).status_code == 200
    rng = np.random.default_rng(7)
    clicks = {"control": 0, "treat": 0}
    served = {"control": 0, "treat": 0}
    users = {"control": set(), "treat": set()}
    accepted = 0
    for i in range(300):
        user = f"r{i % 120}"
        g = rank(client, user)
        served[g["arm"]] += len(g["items"])
        users[g["arm"]].add(user)
        p = 0.3 if g["arm"] == "treat" else 0.1
        feedback = [{"request_id": g["request_id"], "item_id": it["id"], "labels": {"click": 1}}
                    for it in g["items"] if rng.random() < p]
        if feedback:  # at once: the test config's attribution window is 1 s
            clicks[g["arm"]] += len(feedback)
            accepted += client.post("/v1/feedback", json=feedback).json()["accepted"]
    assert accepted == sum(clicks.values()) > 50
    want = sum(served.values())
    # before the windows close: the open impressions with their feedback so far
    now = client.get("/v1/experiments/rep/report", params={"include_open": "true"}).json()
    assert now["impressions"] == want and now["include_open"] is True
    open_ctr = {a["name"]: a["metrics"]["ctr"]["estimate"] for a in now["arms"]}
    assert all(abs(open_ctr[a] - clicks[a] / served[a]) < 1e-9 for a in served)

    def done():
        rep = client.get("/v1/experiments/rep/report").json()
        return rep if rep["impressions"] == want else None

    rep = wait_for(done, timeout=10)  # the 1 s attribution window closes
    by = {a["name"]: a for a in rep["arms"]}
    for arm in ("control", "treat"):
        assert by[arm]["users"] == len(users[arm]) and by[arm]["impressions"] == served[arm]
        assert abs(by[arm]["metrics"]["ctr"]["estimate"] - clicks[arm] / served[arm]) < 1e-9
        lo, hi = by[arm]["metrics"]["ctr"]["ci"]
        assert lo < clicks[arm] / served[arm] < hi
    d = rep["differences"][0]["metrics"]["ctr"]
    assert d["significant"] and d["ci"][0] > 0  # 0.3 against 0.1
    assert rep["srm"]["flagged"] is False and rep["status"] == "live"
    table = client.get("/v1/experiments/rep/report", params={"format": "table"})
    assert table.status_code == 200 and "experiment rep" in table.text and "treat" in table.text
    # each impression on the training stream says which experiment, arm and version served it
    ex = stream_examples(redis_url)
    assert len(ex) == want
    assert {(e["experiment"], e["arm"], e["model_version"]) for e in ex} == {("rep", "control", "2"),
                                                                           ("rep", "treat", "1")}


def test_open_reports_are_built_one_at_a_time(server, client, redis_url):
    """include_open=true reads every open impression (about 1 s per 30k): a second one while the first is
    being built answers 429 naming include_open; closed-only reports are not held back."""
    import redis

    assert client.put("/v1/experiments/rep", json=SPLIT, headers=AUTH).status_code == 200
    r = redis.Redis.from_url(redis_url)
    first: list[httpx.Response] = []
    r.execute_command("CLIENT", "PAUSE", "1500")  # Redis answers nobody for 1.5 s (under the 2 s socket timeout)
    t = threading.Thread(target=lambda: first.append(client.get("/v1/experiments/rep/report",
                                                                params={"include_open": "true"})))
    t.start()
    assert wait_for(lambda: getattr(server.app.state, "open_report_busy", False), timeout=5)
    with httpx.Client(base_url=server.url, timeout=10) as other:
        busy = other.get("/v1/experiments/rep/report", params={"include_open": "true"})
        r.execute_command("CLIENT", "UNPAUSE")
        assert busy.status_code == 429 and busy.json()["error"]["field"] == "include_open", busy.text
        t.join(10)
        assert first[0].status_code == 200 and first[0].json()["include_open"] is True, first[0].text
        again = other.get("/v1/experiments/rep/report", params={"include_open": "true"})
        assert again.status_code == 200, again.text
        assert other.get("/v1/experiments/rep/report").status_code == 200


def test_cli_creates_shows_reports_and_stops(server, capsys):
    from cli.main import main

    target = ["--url", server.url, "--token", ADMIN]
    assert main(["ab", "create", "cli", "--arm", "control=0.5", "--arm", "sat=0.5:1:w=click=1,like=4", *target]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["arms"][1] == {"name": "sat", "share": 0.5, "version": 1, "weights": {"click": 1.0, "like": 4.0}}
    assert main(["ab", "show", "cli", *target]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "live"
    assert main(["ab", "report", "cli", "--json", "--open", "--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == "cli"
    assert main(["ab", "create", "bad", "--arm", "control=0.5", "--arm", "b=2", *target]) == 2
    assert "422: arms[1].share: must be between" in capsys.readouterr().err
    assert main(["ab", "stop", "cli", *target]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "stopped"
    assert main(["ab", "show", "nope", *target]) == 2
    assert "404: name: no experiment 'nope'" in capsys.readouterr().err


def test_up_demo_runs_an_experiment_prints_its_report_and_writes_the_chart(server, tmp_path, capfd):
    from cli.stack import run_demo

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert run_demo(server.url, ADMIN, server.service.config, 4, env, tmp_path / "demo.png")
    out = capfd.readouterr()
    assert "experiment demo:" in out.out and "engagement" in out.out and "satisfaction" in out.out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert server.service.experiments.live is None  # stopped at the end
