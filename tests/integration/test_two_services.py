"""Two `watchnext serve` processes and one `watchnext train --stream --promote` on one Redis and one model repository.

Nothing is mocked: a real redis-server, two real uvicorns in their own OS processes on two loopback ports, the real
continuous trainer as a child process. Three things must not depend on which process a request reaches:

* assignment: an experiment created through A splits every user the same way in A and in B;
* promotion: a version promoted through A's admin API (or `watchnext models promote`) is served by both;
* the feedback join: feedback sent to the other process than the one that ranked is joined with the impression, the
  labelled examples on the training stream carry it (and the task defaults where none came), the trainer trains on
  them, exports and promotes a version, and both processes then serve that version.
"""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import redis

from cli.main import main as watchnext_main
from tests.helpers import TrainerProcess, serve_processes, stream_examples, stream_id, wait_for
from tests.service.fixtures import ADMIN, write_config
from tests.service.traffic import rank_requests
from watchnext.config import load_config
from watchnext.experiments import Experiment
from watchnext.repository import ModelRepository

AUTH = {"Authorization": f"Bearer {ADMIN}"}
# the trainer exports (and promotes) once a second while there is something new, as in test_loop.py
STREAM_FAST = {"export_every_examples": 1_000_000, "export_interval_s": 1.0, "checkpoint_interval_s": 1.0}
CANDS = [{"video_id": "v1"}, {"video_id": "v2"}, {"video_id": "v3"}]
SPLIT = {"arms": [{"name": "control", "share": 0.7},
                  {"name": "treat", "share": 0.3, "version": 1, "weights": {"click": 1.0, "like": 4.0}}]}
USERS = [f"user-{i}" for i in range(1000)]
NO_FEEDBACK = {"click": 0.0, "watch_time": None, "dismiss": 0.0, "like": None, "rating": None}  # the task defaults


def serving(c: httpx.Client) -> str:
    return c.get("/readyz").json()["model_version"]


def rank(c: httpx.Client, body: dict) -> dict:
    r = c.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def feedback(c: httpx.Client, events: list[dict]) -> dict:
    r = c.post("/v1/feedback", json=events)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_services_one_trainer_agree_on_assignment_promotion_and_feedback(trained, models_dir, redis_url, tmp_path):
    cfg_path = write_config(tmp_path, trainer={"batch_size": 256, "report_every_examples": 2_000,
                                               "eval_window": 5_000, **STREAM_FAST})
    config = load_config(cfg_path)
    assert config.hash == load_config(trained["config_path"]).hash  # the trained versions serve under it
    assert config.service.attribution_window_s == 1.0 and config.service.model_poll_s == 0.2
    repo = ModelRepository(models_dir, config.model.name)
    assert repo.versions() == [1, 2] and repo.promoted() is None  # nothing promoted: the newest, 2, serves
    r = redis.Redis.from_url(redis_url)
    trainer = None
    try:
        with serve_processes(2, cfg_path, models_dir, redis_url, ADMIN, tmp_path) as (url_a, url_b), \
                httpx.Client(base_url=url_a, timeout=30) as a, httpx.Client(base_url=url_b, timeout=30) as b:
            assert serving(a) == serving(b) == "2"

            # ---- promotion: version 1 through A's admin API, then 2 again with `watchnext models promote`;
            # both processes serve it within a second (they poll the repository every 0.2 s)
            def by_api() -> None:
                res = a.post("/v1/models/1/promote", headers=AUTH)
                assert res.status_code == 200, res.text
                assert serving(a) == "1"  # the API answers once A has swapped

            def by_command() -> None:
                assert watchnext_main(["models", "promote", "2", "--models", str(models_dir),
                                       "--config", str(cfg_path)]) == 0

            for want, promote in (("1", by_api), ("2", by_command)):
                t0 = time.monotonic()
                promote()
                for c in (a, b):
                    wait_for(lambda c=c, want=want: serving(c) == want, 5, f"{c.base_url} to serve version {want}")
                assert time.monotonic() - t0 < 2.0
                assert repo.promoted() == int(want)
                for c in (a, b):  # every answer names the version that scored it
                    got = rank(c, {"candidates": CANDS, "top_k": 3})
                    assert (got["model_version"], got["arm"], got["experiment"]) == (want, "control", None)

            # ---- assignment: an experiment created through A; both split every user the same way
            made = a.put("/v1/experiments/split", json=SPLIT, headers=AUTH)
            assert made.status_code == 200, made.text
            assert made.json()["status"] == "live" and made.json()["salt"] == "split"
            wait_for(lambda: b.get("/v1/models").json()["experiment"] == {"name": "split", "loaded": [1]}, 5,
                     "B to apply the experiment")
            assert a.get("/v1/models").json()["experiment"] == {"name": "split", "loaded": [1]}
            shown = b.get("/v1/experiments/split").json()
            exp = Experiment.from_dict({k: v for k, v in shown.items() if k not in ("status", "stopped_at")})
            want_arms = np.array(exp.arm_names())[exp.assign(np.array(USERS))].tolist()
            got = {}
            for name, c in (("A", a), ("B", b)):
                got[name] = [rank(c, {"user": {"user_id": u}, "candidates": CANDS, "top_k": 2}) for u in USERS]
            for i, u in enumerate(USERS):
                ga, gb = got["A"][i], got["B"][i]
                assert ga["arm"] == gb["arm"] == want_arms[i], (u, ga["arm"], gb["arm"], want_arms[i])
                assert ga["model_version"] == gb["model_version"] == {"control": "2", "treat": "1"}[ga["arm"]], u
                assert ga["experiment"] == gb["experiment"] == "split"
                # the same arm scores the same in both processes: version and weights agree
                assert [it["id"] for it in ga["items"]] == [it["id"] for it in gb["items"]], u
                assert np.allclose([it["score"] for it in ga["items"]], [it["score"] for it in gb["items"]],
                                   rtol=1e-5), u
            treat = sum(arm == "treat" for arm in want_arms)
            assert 0.27 < treat / len(USERS) < 0.33, treat  # configured 0.3; 1,000 users: sd 0.015
            # different weights score differently: the arms are not the same ranker under two names
            by_arm = {g["arm"]: g for g in got["A"]}
            assert by_arm["control"]["items"][0]["score"] != by_arm["treat"]["items"][0]["score"]
            # stopped through B: A follows
            stopped = b.delete("/v1/experiments/split", headers=AUTH)
            assert stopped.status_code == 200 and stopped.json()["status"] == "stopped", stopped.text
            wait_for(lambda: a.get("/v1/models").json()["experiment"] is None, 5, "A to drop the stopped experiment")
            for c in (a, b):
                g = rank(c, {"user": {"user_id": USERS[0]}, "candidates": CANDS, "top_k": 2})
                assert (g["arm"], g["model_version"], g["experiment"]) == ("control", "2", None)

            # ---- feedback join: rank on one process, send the feedback to the other
            # two slates of the history (one request id each) without a repeated candidate
            req_a, req_b = [q for q in rank_requests(trained["history"], 20, top_k=4)
                            if len({c["video_id"] for c in q["candidates"]}) == len(q["candidates"])][:2]
            on_a, on_b = rank(a, req_a), rank(b, req_b)
            assert on_a["model_version"] == on_b["model_version"] == "2"
            items_a = [it["id"] for it in on_a["items"]]
            items_b = [it["id"] for it in on_b["items"]]
            assert len(set(items_a)) == len(set(items_b)) == 4
            # at once, before the other process has written its impressions (every 50 ms): the process that
            # gets the feedback looks again after its grace period instead of dropping it as unknown
            ra, rb = req_a["request_id"], req_b["request_id"]
            assert feedback(b, [  # ranked by A, fed back to B
                {"request_id": ra, "item_id": items_a[0], "labels": {"click": 1, "watch_time": 42.5}},
                {"request_id": ra, "item_id": items_a[2], "labels": {"dismiss": 1}},
            ]) == {"accepted": 2, "dropped": []}
            assert feedback(a, [  # ranked by B, fed back to A; and more about A's first item, to A
                {"request_id": rb, "item_id": items_b[1], "labels": {"click": 1, "watch_time": 7.0, "rating": 4}},
                {"request_id": rb, "item_id": "not-served", "labels": {"click": 1}},
                {"request_id": ra, "item_id": items_a[0], "labels": {"like": 1}},
            ]) == {"accepted": 2, "dropped": [{"index": 1, "request_id": rb, "item_id": "not-served",
                                               "reason": "item_id was not among the items served for this request_id"}]}

            # the windows close (1 s): every served item becomes one labelled example on the stream
            mine = wait_for(lambda: (lambda ex: ex if len(ex) == 8 else None)(
                [e for e in stream_examples(redis_url, config.stream.key) if e["request_id"] in (ra, rb)]),
                10, "the 8 labelled examples of the two requests")
            got_labels = {(e["request_id"], e["candidate"]["video_id"]): e["labels"] for e in mine}
            assert got_labels == {
                (ra, items_a[0]): {"click": 1.0, "watch_time": 42.5, "dismiss": 0.0, "like": 1.0, "rating": None},
                (ra, items_a[1]): NO_FEEDBACK,
                (ra, items_a[2]): {"click": 0.0, "watch_time": None, "dismiss": 1.0, "like": None, "rating": None},
                (ra, items_a[3]): NO_FEEDBACK,
                (rb, items_b[0]): NO_FEEDBACK,
                (rb, items_b[1]): {"click": 1.0, "watch_time": 7.0, "dismiss": 0.0, "like": None, "rating": 4.0},
                (rb, items_b[2]): NO_FEEDBACK,
                (rb, items_b[3]): NO_FEEDBACK,
            }
            for e in mine:
                items = items_a if e["request_id"] == ra else items_b
                assert e["position"] == items.index(e["candidate"]["video_id"])
                assert (e["model_version"], e["arm"], e["experiment"]) == ("2", "control", None)
                assert e["user"] == (req_a if e["request_id"] == ra else req_b)["user"]

            # every window closes: one example per item served so far (2 promotions x 2 processes x 3, the
            # experiment's 2 x 1,000 x 2, 2 x 2 after the stop, the 8 above), and nothing more until the next rank
            total = 2 * 2 * 3 + 2 * len(USERS) * 2 + 2 * 2 + 2 * 4
            wait_for(lambda: r.xlen(config.stream.key) >= total, 10, f"{total} examples on the stream")
            assert r.xlen(config.stream.key) == total and r.zcard("wn:imp:due") == 0
            last_entry = stream_id(r.xrevrange(config.stream.key, count=1)[0][0])

            # ---- the trainer carries on from version 2, trains on all of it, exports and promotes
            ckpt = tmp_path / "ckpt.pt"
            shutil.copy(trained["root"] / "ckpt.pt", ckpt)
            trainer = TrainerProcess(cfg_path, models_dir, ckpt, redis_url, tmp_path / "trainer.log", "two-services")

            def covering() -> int | None:
                v = repo.promoted()
                if v is None or v <= 2:
                    return None
                return v if stream_id(repo.metadata(v)["watermark"]["source"]["last_id"]) >= last_entry else None

            new = wait_for(covering, 60, "a promoted version trained on the whole stream", step=0.1)
            meta = repo.metadata(new)
            assert meta["watermark"]["examples"] == repo.metadata(2)["watermark"]["examples"] + total
            chain, v = [], new
            while v != 2:
                chain.append(v)
                v = repo.metadata(v)["parent"]
            assert chain == list(range(new, 2, -1))  # each export continues the one before, back to 2
            for c in (a, b):
                wait_for(lambda c=c: serving(c) == str(new), 5, f"{c.base_url} to serve version {new}")
            for c, req in ((a, req_b), (b, req_a)):
                again = rank(c, req)
                assert again["model_version"] == str(new)
                assert again["items"] != (on_b if req is req_b else on_a)["items"]  # another model, other scores
            wait_for(lambda: r.xpending(config.stream.key, config.stream.group)["pending"] == 0, 10,
                     "the trainer to acknowledge what it trained")
    finally:
        code = trainer.stop() if trainer is not None else None
        r.close()
    assert code == 0, trainer.log()
