"""Freshness: from a feedback event to the first response served by a version that trained on it.

    python bench/freshness.py [--mode tuned|defaults] [--rounds 3]

Runs `watchnext up` (embedded Redis, the service, the continuous trainer) in a
temporary folder, then, each round: rank a slate, send a click on its top item
(t0), find the labelled example on the training stream once the attribution
window closes, and rank again every 0.2 s until the answer names a version whose
training watermark (the last stream id it trained on) covers that example (t1).
Freshness = t1 - t0, split into the window, training + export, and pick-up.

--mode defaults uses the shipped watchnext.toml (a 30-minute attribution window:
a round takes over half an hour); --mode tuned shortens what can be shortened:

    [service] attribution_window_s = 5, model_poll_s = 0.5
    [trainer] export_every_examples = 1, export_interval_s = 1, checkpoint_interval_s = 5

Target (issue 4): under 60 s tuned.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import tomli_w  # noqa: E402

from watchnext.redis_embed import free_port  # noqa: E402

TUNED = {
    "service": {"attribution_window_s": 5.0, "model_poll_s": 0.5},
    "trainer": {"export_every_examples": 1, "export_interval_s": 1.0, "checkpoint_interval_s": 5.0},
}


def write_config(path: Path, overrides: dict) -> None:
    data = tomllib.loads((ROOT / "watchnext.toml").read_text())
    for table, values in overrides.items():
        data.setdefault(table, {}).update(values)
    path.write_text(tomli_w.dumps(data))


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, json.dumps(body).encode() if body is not None else None,
                  {"content-type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def stream_id(i: bytes | str) -> tuple[int, int]:
    a, b = (i.decode() if isinstance(i, bytes) else i).split("-")
    return int(a), int(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["tuned", "defaults"], default="tuned")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bootstrap-examples", type=int, default=20_000)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wn-fresh-"))
    cfg = work / "watchnext.toml"
    write_config(cfg, TUNED if args.mode == "tuned" else {})
    config = tomllib.loads(cfg.read_text())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), WATCHNEXT_LOG_LEVEL="warning")
    err = open(work / "up.log", "w+")
    up = subprocess.Popen([sys.executable, "-m", "watchnext", "up", "--config", str(cfg), "--models", str(work / "models"),
                           "--port", str(port), "--bootstrap-examples", str(args.bootstrap_examples)],
                          cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=err)
    rows = []
    try:
        t_start = time.monotonic()
        while True:
            try:
                if call(port, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if up.poll() is not None or time.monotonic() - t_start > 900:
                raise RuntimeError("watchnext up did not become ready; see " + str(work / "up.log"))
            time.sleep(0.5)
        print(f"[fresh] watchnext up ready after {time.monotonic() - t_start:.0f} s (bootstrap included)",
              file=sys.stderr, flush=True)
        err.seek(0)
        url = re.search(r"export REDIS_URL=(\S+)", err.read()).group(1)
        r = redis.Redis.from_url(url)
        key = config.get("stream", {}).get("key", "watchnext:training")
        history = [json.loads(line) for line, _ in zip(open(work / "data" / "bootstrap.jsonl"), range(200))]
        for k in range(args.rounds):
            base = history[(k * 10) % 190]
            req = {"request_id": f"fresh-{k}-{time.time():.0f}", "user": base["user"], "query": base["query"],
                   "context": base["context"], "candidates": [h["candidate"] for h in history[k * 10:k * 10 + 10]],
                   "top_k": 5}
            status, first = call(port, "POST", "/v1/rank", req)
            assert status == 200, first
            time.sleep(0.2)  # the impression is flushed within flush_interval_s
            t0 = time.monotonic()
            status, fb = call(port, "POST", "/v1/feedback", {"request_id": req["request_id"],
                                                             "item_id": first["items"][0]["id"],
                                                             "labels": {"click": 1, "watch_time": 100.0}})
            assert fb["accepted"] == 1, fb
            entry = None
            while entry is None:  # the window closes: the example appears on the stream
                for i, f in reversed(r.xrevrange(key, count=200)):
                    if json.loads(f[b"example"])["request_id"] == req["request_id"]:
                        entry = stream_id(i)
                time.sleep(0.1)
            t_stream = time.monotonic()
            t_published = None
            while True:
                status, body = call(port, "POST", "/v1/rank", req)
                v = int(body["model_version"])
                meta = json.loads((work / "models" / "ranker" / str(v) / "metadata.json").read_text())
                last = (meta.get("watermark") or {}).get("source", {}).get("last_id")
                if t_published is None:
                    for vv in sorted(int(p.name) for p in (work / "models" / "ranker").iterdir() if p.name.isdigit()):
                        m = json.loads((work / "models" / "ranker" / str(vv) / "metadata.json").read_text())
                        lid = (m.get("watermark") or {}).get("source", {}).get("last_id")
                        if lid and stream_id(lid) >= entry:
                            t_published = time.monotonic()
                if last and stream_id(last) >= entry:
                    t1 = time.monotonic()
                    break
                time.sleep(0.2)
            row = {"round": k, "freshness_s": round(t1 - t0, 2), "window_s": round(t_stream - t0, 2),
                   "train_export_s": round((t_published or t1) - t_stream, 2),
                   "pickup_s": round(t1 - (t_published or t1), 2), "version": v}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        r.close()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
        err.close()
    fresh = [x["freshness_s"] for x in rows]
    print(f"\nfreshness ({args.mode}): median {statistics.median(fresh):.1f} s, min {min(fresh):.1f} s, "
          f"max {max(fresh):.1f} s over {len(rows)} rounds (window {config['service'].get('attribution_window_s', 1800)} s, "
          f"export every {config['trainer'].get('export_every_examples')} examples or "
          f"{config['trainer'].get('export_interval_s')} s, poll {config['service'].get('model_poll_s', 2.0)} s)")
    if args.mode == "tuned":
        print(f"target < 60 s: {'met' if max(fresh) < 60 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
