"""`watchnext up`: Redis, the service and the continuous trainer as one process tree.

    watchnext up
      ├── redis-server            (embedded, unless REDIS_URL is set)
      ├── the service             (this process: uvicorn)
      └── watchnext train --stream --promote   (a child process: torch stays out of the service)

On an empty repository a first version is trained on simulated history (a
child `watchnext train --data`), and the history's users and videos are loaded
into the online feature store. Ctrl-C stops the service first (its impression
buffer is flushed), then the trainer (it checkpoints and acknowledges what it
trained), then Redis.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

import numpy as np

from cli.main import CliError
from service.settings import Settings, build_deps
from watchnext.repository import RepositoryError

DATA = Path("data")


def say(msg: str) -> None:
    print(f"[up] {msg}", file=sys.stderr, flush=True)


def watchnext_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "watchnext", *args]


def bootstrap(config_args: list[str], examples: int, checkpoint: str) -> Path:
    """Train and promote a first version on simulated history (the continuous trainer carries it on)."""
    history = DATA / "bootstrap.jsonl"
    if not history.is_file():
        say(f"simulating {examples:,} examples of history into {history}")
        subprocess.run(watchnext_cmd("simulate", "history", "--out", str(history), "--examples", str(examples)),
                       check=True, stdout=subprocess.DEVNULL)
    say("training a first version on it (watchnext train --data ... --fresh --promote)")
    done = subprocess.run(watchnext_cmd("train", "--data", str(history), "--fresh", "--promote", *config_args,
                                        "--checkpoint", checkpoint),
                          check=True, stdout=subprocess.PIPE, text=True)
    try:
        tasks = json.loads(done.stdout)["metrics"]["tasks"]
        aucs = ", ".join(f"{name} {t['auc']:.3f}" for name, t in tasks.items() if t.get("auc") is not None)
        say(f"version 1: progressive AUC on the last examples it trained on: {aucs} (0.5 is a coin, 1.0 a perfect "
            f"ranking; {truth_auc(history)})")
    except (ValueError, KeyError, TypeError):
        pass  # the summary is a courtesy: the version is there either way
    return history


def truth_auc(history: Path, last: int = 100_000) -> str:
    """What good looks like here: the click AUC of the simulated world's own probabilities on the same examples."""
    from watchnext.metrics import auc

    with open(history, "rb") as fh:
        lines = deque(fh, maxlen=last)  # the file is ~1 KB a line: keep only the last lines in memory
    truth, click = [], []
    for line in lines:
        row = json.loads(line)
        if row.get("labels", {}).get("click") is not None and "truth" in row:
            truth.append(row["truth"]["click"])
            click.append(row["labels"]["click"])
    if not truth:
        return "no truth in the history to compare with"
    return f"the world's true click probabilities score {auc(np.asarray(click), np.asarray(truth)):.3f}"


def load_features(history: Path, deps, redis_url: str) -> None:
    import redis

    from watchnext.entities import load_file

    client = redis.Redis.from_url(redis_url)
    try:
        counts = load_file(client, deps.config, history)
    finally:
        client.close()
    say(f"online features: {counts['user']:,} users, {counts['query']:,} queries, {counts['candidate']:,} videos "
        f"from {history}")


def example_request(history: Path | None, item_id: str | None) -> dict:
    """A rank request with real ids: only ids, the store fills in the rest."""
    if history is not None and history.is_file():
        with open(history) as fh:
            rows = [json.loads(next(fh)) for _ in range(10)]
        ukey = next(iter(rows[0]["user"]), None)
        qkey = next(iter(rows[0]["query"]), None)
        req = {
            "user": {ukey: rows[0]["user"][ukey]} if ukey else {},
            "query": {qkey: rows[0]["query"][qkey]} if qkey else {},
            "context": rows[0]["context"],
            "candidates": [{item_id: r["candidate"][item_id]} for r in rows[:5]] if item_id else
            [r["candidate"] for r in rows[:3]],
            "top_k": 3,
        }
        return req
    return {"candidates": [{item_id or "id": "v1"}, {item_id or "id": "v2"}], "top_k": 2}


def run_stack(args, settings: Settings) -> int:
    from cli.serve import REDIS_DIR, embedded_note, run_server
    from watchnext.redis_embed import redis_for

    embedded = None
    if settings.redis_url is None:
        url, embedded = redis_for(None, REDIS_DIR)
        settings = settings.with_(redis_url=url)
        say(f"Redis: {embedded_note(url, embedded is not None)}")
    else:
        say(f"Redis: {settings.redis_url}")
    token_note = ""
    if not settings.workers:
        # one worker process: here the service shares the machine with the trainer and Redis (make run's demo on
        # 2 cores: 366-409 rankings/s with one, 274-292/s with two)
        settings = settings.with_(workers=1)
    if settings.admin_token is None:
        settings = settings.with_(admin_token=secrets.token_urlsafe(24))
        token_note = " (generated; set WATCHNEXT_ADMIN_TOKEN to choose one)"
    trainer: subprocess.Popen | None = None
    try:
        deps = build_deps(settings)
        config_args = ["--models", settings.models_dir] + (["--config", settings.config_path] if settings.config_path else [])
        history = DATA / "bootstrap.jsonl"
        ckpt = args.checkpoint or str(Path("checkpoints") / f"{deps.config.model.name}.pt")
        usable = [v for v in deps.repo.versions() if _config_hash(deps.repo, v) == deps.config.hash]
        if not usable:  # empty, or every version was trained under another config
            if deps.repo.versions():
                say(f"no version in {deps.repo.dir} was trained under this config (hash {deps.config.hash})")
            history = bootstrap(config_args, args.bootstrap_examples, ckpt)
            load_features(history, deps, settings.redis_url)
        env = {**os.environ, "REDIS_URL": settings.redis_url}
        if not args.no_trainer:
            cmd = watchnext_cmd("train", "--stream", "--promote", *config_args, "--checkpoint", ckpt)
            # its own process group: Ctrl-C reaches us, and we stop the trainer after the service
            trainer = subprocess.Popen(cmd, env=env, start_new_session=True)
            say(f"continuous trainer: pid {trainer.pid}, consuming {deps.config.stream.key} "
                f"(exports every {deps.config.trainer.export_every_examples:,} examples or "
                f"{deps.config.trainer.export_interval_s:g} s, promoted as they come)")
            threading.Thread(target=_watch, args=(trainer,), daemon=True).start()
        url = f"http://{settings.host}:{settings.port}"
        req = example_request(history, deps.config.item_id)
        say(f"service: {url}   (docs {url}/docs, metrics {url}/metrics)")
        say(f"admin token: {settings.admin_token}{token_note}")
        print(f"\nFor other shells (the commands read these):\n  export WATCHNEXT_URL={url} "
              f"WATCHNEXT_ADMIN_TOKEN={settings.admin_token} REDIS_URL={settings.redis_url}\n"
              "\nTry:\n  curl -s " + f"{url}/v1/rank -H 'content-type: application/json' -d '{json.dumps(req)}'\n",
              file=sys.stderr, flush=True)
        if getattr(args, "demo", 0):
            threading.Thread(target=run_demo, args=(url, settings.admin_token, deps.config, args.demo, env),
                             daemon=True).start()
        run_server(settings, deps)
    except subprocess.CalledProcessError as e:
        raise CliError("", f"bootstrap step failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}") from None
    finally:
        if trainer is not None and trainer.poll() is None:
            say("stopping the trainer (it checkpoints first)")
            trainer.send_signal(signal.SIGTERM)
            try:
                trainer.wait(60)
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait(10)
        if embedded is not None:
            embedded.stop()
        say("stopped")
    return 0


def _watch(proc: subprocess.Popen) -> None:
    code = proc.wait()
    if code not in (0, -signal.SIGTERM):
        say(f"the continuous trainer exited with status {code}; the service keeps serving the current version")


# ---------------------------------------------------------------- the demo (`watchnext up --demo S`, `make run`)

DEMO = "demo"


def demo_arms(config) -> dict:
    """Engagement-only weights (the config's weights on engagement tasks) against the config's own weights,
    which also value satisfaction (likes, ratings, dismissals)."""
    groups = {t.name: t.group for t in config.tasks}
    weights = dict(config.score.weights)
    engagement = {t: w for t, w in weights.items() if groups.get(t) == "engagement"}
    return {"arms": [{"name": "engagement", "share": 0.5, "weights": engagement},
                     {"name": "satisfaction", "share": 0.5, "weights": weights}]}


def run_demo(url: str, token: str, config, seconds: float, env: dict, chart: Path = DATA / "demo.png") -> bool:
    """Once the service is ready: start experiment `demo`, drive `simulate traffic` at it for `seconds`, print the
    report (impressions with open windows included) and write the chart, then stop the experiment."""
    import time

    import httpx

    auth = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                say("demo: the service did not become ready; skipped")
                return False
            time.sleep(0.2)
        r = httpx.put(f"{url}/v1/experiments/{DEMO}", json=demo_arms(config), headers=auth, timeout=120)
        if r.status_code != 200:
            say(f"demo: could not start the experiment: {r.status_code} {r.text[:300]}")
            return False
        say(f"demo: experiment {DEMO!r} live (engagement-only weights against satisfaction weights); "
            f"simulated users for {seconds:g} s")
        subprocess.run(watchnext_cmd("simulate", "traffic", "--url", url, "--users", "300", "--duration", str(seconds)),
                       env=env, check=True)
        time.sleep(0.5)  # the last feedback is joined
        subprocess.run(watchnext_cmd("ab", "report", DEMO, "--url", url, "--open", "--chart", str(chart)),
                       env=env, check=True)
        httpx.delete(f"{url}/v1/experiments/{DEMO}", headers=auth, timeout=30)
        say(f"demo: experiment stopped (all traffic back on the promoted version); "
            f"again: watchnext ab report {DEMO} --url {url} --open")
        return True
    except (httpx.HTTPError, subprocess.CalledProcessError, OSError) as e:
        say(f"demo: failed ({e}); the service keeps serving")
        return False


def _config_hash(repo, version: int) -> str | None:
    """The config hash a version was trained under; None when its metadata cannot be read (it is not used)."""
    try:
        return repo.metadata(version).get("config_hash")
    except RepositoryError:
        return None
