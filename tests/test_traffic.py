"""`watchnext simulate traffic` against a real service (uvicorn on loopback, real Redis, a trained version),
and the world's expected outcomes that its truth figures rest on."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import redis

from analysis.abreport import read_events
from cli.main import main
from simulation.traffic import Traffic, TrafficError, check_url, render_summary
from simulation.world import DAY, SLATE, World, WorldSpec
from tests.helpers import SMALL_WORLD
from tests.service.fixtures import ADMIN, FAST_SERVICE, live_service, write_config
from watchnext.experiments import Experiment

# the CLI can set the world's users and videos (as `simulate history` can), not its channels and tags
WORLD = WorldSpec(users=SMALL_WORLD.users, videos=SMALL_WORLD.videos)


def test_expected_outcomes_match_the_sampled_ones():
    w = World(WorldSpec(**vars(SMALL_WORLD)), seed=3)
    r = np.random.default_rng(0)
    n = 200_000
    users, videos = r.integers(0, w.spec.users, n), r.integers(0, w.spec.videos, n)
    ts, pos = np.full(n, w.spec.start_ts + 3 * DAY), r.integers(0, SLATE, n)
    e = w.expected(users, videos, ts, pos, w.device[users])
    labels, p = w.outcomes(users, videos, ts, pos, w.device[users])
    np.testing.assert_allclose(e["click"], p["click"])
    clicked, rated = labels["click"] > 0, ~np.isnan(labels["rating"])
    # conditional on the impression: sampled minus expected averages to 0 within 4 standard errors
    for name, rows in [("watch_time", clicked), ("rating", rated), ("click", slice(None)), ("dismiss", slice(None))]:
        resid = labels[name][rows] - e[name][rows]
        assert abs(resid.mean()) < 4 * resid.std() / np.sqrt(resid.size) + 1e-9, name
    assert ((e["rating"] >= 1) & (e["rating"] <= 5)).all()
    assert (e["watch_time"] <= w.duration[videos] + 1e-9).all()


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000", "ftp://127.0.0.1/", "127.0.0.1:80"])
def test_only_loopback_urls(url):
    with pytest.raises(TrafficError):
        check_url(url)


def test_loopback_urls():
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_url("http://localhost:1") == "http://localhost:1"
    assert check_url("http://[::1]:8000") == "http://[::1]:8000"


def test_no_service_is_a_clear_error(capsys):
    from watchnext.redis_embed import free_port

    rc = main(["simulate", "traffic", "--url", f"http://127.0.0.1:{free_port()}", "--duration", "1",
               "--world-users", "300", "--world-videos", "400", "--users", "5"])
    assert rc == 2
    assert "no service answers" in capsys.readouterr().err


@pytest.fixture
def windowed_server(trained, models_dir, redis_url, tmp_path):
    """A service with an attribution window of 5 s, not the suite's 1 s: the traffic client shares this process (and
    its garbage collector) with the service, and feedback held up past the window (by a collection, or a version
    loading mid-run) would be refused as late, not lost."""
    cfg = write_config(tmp_path, service={**FAST_SERVICE, "attribution_window_s": 5.0})
    with live_service(cfg, models_dir, redis_url) as server:
        yield server


def test_traffic_against_a_live_service(windowed_server, redis_url, tmp_path, capsys):
    traffic_against(windowed_server, redis_url, tmp_path, capsys)


def traffic_against(server, redis_url, tmp_path, capsys) -> None:
    events = tmp_path / "events.jsonl"
    t0 = time.time()
    rc = main(["simulate", "traffic", "--url", server.url, "--users", "12", "--duration", "3", "--concurrency", "3",
               "--seed", "0", "--world-users", str(WORLD.users), "--world-videos", str(WORLD.videos),
               "--out", str(events), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    s = json.loads(out)

    # every ranking succeeded and every feedback event was joined with its impression
    assert s["succeeded"] >= 10 and s["succeeded"] == s["requests"] and s["failed"] == {}
    assert len(s["arms"]) == 1
    arm = s["arms"][0]
    assert arm["arm"] == "control" and arm["model_version"] == str(server.service.models.current.version)
    assert 1 <= arm["users"] <= 12 and arm["impressions"] == s["impressions"] == SLATE * s["succeeded"]
    c = arm["realised"]["counts"]
    assert s["feedback"] == {"accepted": c["clicks"] + c["dismisses"]} and c["clicks"] > 0

    # the service emits one labelled example per impression when the windows close (5 s here)
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while r.xlen("watchnext:training") < s["impressions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    examples = [json.loads(f[b"example"]) for _, f in r.xrange("watchnext:training")]
    r.close()
    assert len(examples) == s["impressions"]
    assert sum(e["labels"]["click"] for e in examples) == c["clicks"]
    assert sum(e["labels"]["dismiss"] for e in examples) == c["dismisses"]
    assert sum(e["labels"]["like"] or 0 for e in examples) == c["likes"]

    # the events file is an A/B event log: readable by the report, one row per impression
    exp = Experiment.from_dict({"name": "live", "arms": [{"name": "control", "share": 0.5}, {"name": "b", "share": 0.5}]})
    ev, dropped = read_events([events], exp)
    assert len(ev) == s["impressions"] and not any(dropped.values())
    assert ev.ts.min() >= t0 - 1 and np.nansum(ev.labels["click"]) == c["clicks"]
    rows = [json.loads(line) for line in events.read_text().splitlines()]

    # the truth, recomputed from the world for the impressions logged (user, item, slot; the world's
    # clock starts where the history ends, and a few seconds of drift are negligible)
    w = World(WORLD, seed=0)
    users = np.array([int(e["user"]["user_id"][1:]) for e in rows])
    videos = np.array([int(e["item_id"][1:]) for e in rows])
    pos = np.array([e["position"] for e in rows])
    ts = np.full(len(rows), w.spec.start_ts + w.spec.days * DAY)
    p = w.probabilities(users, videos, ts, pos, w.device[users])
    truth = arm["truth"]
    assert truth["ctr"] == pytest.approx(p["click"].mean(), rel=1e-3)
    assert truth["dismiss_rate"] == pytest.approx(p["dismiss"].mean(), rel=1e-3)
    assert truth["like_rate"] == pytest.approx((p["click"] * p["like"]).sum() / p["click"].sum(), rel=1e-3)
    exp_watch = (p["click"] * np.array([e["truth"]["watch_time"] for e in rows])).mean()
    assert truth["watch_time"] == pytest.approx(exp_watch, rel=1e-3)
    assert 1 <= truth["rating"] <= 5

    # plausible: near the world's own slates (the model was trained on 6,000 examples of this kind of world)
    ref = World(WORLD, seed=0)
    req = ref.requests(np.full(2_000, ts[0]))
    n = req["slate"].size
    ru = np.repeat(req["user"], SLATE)
    pr = ref.probabilities(ru, req["slate"].reshape(-1), np.full(n, ts[0]), np.tile(np.arange(SLATE), 2_000),
                           ref.device[ru])
    assert 0.5 * pr["click"].mean() < truth["ctr"] < 2 * pr["click"].mean()
    assert 0.3 * pr["dismiss"].mean() < truth["dismiss_rate"] < 3 * pr["dismiss"].mean()
    # and what users did agrees with the truth (generous: users' impressions are correlated)
    se = np.sqrt(truth["ctr"] * (1 - truth["ctr"]) / arm["impressions"])
    assert abs(arm["realised"]["ctr"] - truth["ctr"]) < 6 * se + 0.02

    # the terminal table names the arm and every metric
    table = render_summary(s)
    assert f"control (v{arm['model_version']})" in table and "click-through rate" in table and "realised" in table

    # and `watchnext ab report` reads the events
    assert main(["ab", "report", "live", "--events", str(events), "--arms", "control=0.5,b=0.5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["arms"][0]["impressions"] == s["impressions"]
    assert rep["arms"][0]["metrics"]["ctr"]["estimate"] == pytest.approx(arm["realised"]["ctr"])


def test_each_version_served_is_tallied_apart(windowed_server):
    """A promotion mid-run: the summary has one row per (arm, version) the service reported, nothing lost."""
    server = windowed_server
    before = server.service.models.current.version
    other = 1 if before != 1 else 2
    traffic = Traffic(World(WORLD, seed=0), server.url, users=10, duration=2.5, concurrency=2, seed=1)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(traffic.run()))
    t.start()
    time.sleep(1.0)
    r = httpx.post(f"{server.url}/v1/models/{other}/promote", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    t.join(30)
    assert not t.is_alive()
    rows = {a["model_version"]: a for a in out["arms"]}
    assert set(rows) == {str(before), str(other)} and out["failed"] == {}
    assert sum(a["requests"] for a in rows.values()) == out["succeeded"] == out["requests"]
    assert sum(a["impressions"] for a in rows.values()) == out["impressions"]
    clicks = sum(a["realised"]["counts"]["clicks"] + a["realised"]["counts"]["dismisses"] for a in rows.values())
    assert out["feedback"] == {"accepted": clicks}
    for a in rows.values():
        assert 0 < a["truth"]["ctr"] < 1 and 1 <= a["truth"]["rating"] <= 5
