"""Redis away under load: the impression buffer's memory, and where every impression went.

    python bench/outage.py [--minutes 10] [--candidates 500] [--clients 4] [--buffer-mb 64] [--json FILE]

A real `watchnext serve` (one worker process, so that its RSS is the figure) ranks full-feature JSON bodies
(top 20) from --clients threads, against an embedded redis-server. After a warm-up, Redis is stopped for
--minutes while the load goes on, then started again on its own data (append-only file). Sampled every 5 s:
the service's RSS and its buffer (`watchnext_impression_backlog_bytes`). At the end, every answered request's
impression must be on Redis or counted as shed (`watchnext_impressions_dropped_total`), and, once the
attribution window (5 s here) has closed, every impression on Redis must be on the training stream as top-k
examples. The floor: the buffer's bound; the service's RSS growth during the outage is judged against it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_latency import ensure_model, make_requests  # noqa: E402
from simulation.world import World, WorldSpec  # noqa: E402
from watchnext.config import load_config  # noqa: E402
from watchnext.redis_embed import free_port, start_embedded  # noqa: E402

TOP_K = 20
WINDOW_S = 5.0


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (the serve command's worker)."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
            total += int(m.group(1)) * 1024 if m else 0
        except OSError:
            pass
    return total


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a /metrics text (0 when it is not there)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "watchnext.toml")
    ap.add_argument("--models", type=Path, default=ROOT / "data" / "bench" / "models")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--buffer-mb", type=float, default=64.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wn-outage-"))
    models = ensure_model(args.models, args.config, work)
    cfg = work / "watchnext.toml"
    text = args.config.read_text()
    cfg.write_text(re.sub(r"(?m)^attribution_window_s = .*$", f"attribution_window_s = {WINDOW_S}", text))
    config = load_config(cfg)
    world = World(WorldSpec(), seed=5)
    # each send gets its own request_id (the same request_id and user twice is one impression)
    bodies = [json.dumps({k: v for k, v in r.items() if k != "request_id"} | {"top_k": TOP_K}).encode()
              for r in make_requests(world, args.candidates, 64, seed=9)]

    port = free_port()
    rs = start_embedded(work / "redis", port=port, appendonly=True)
    svc_port = free_port()
    env = {**os.environ, "REDIS_URL": rs.url, "WATCHNEXT_LOG_LEVEL": "error", "PYTHONPATH": str(ROOT),
           "WATCHNEXT_WORKERS": "1", "WATCHNEXT_IMPRESSION_BUFFER_MB": str(args.buffer_mb)}
    srv = subprocess.Popen([sys.executable, "-m", "watchnext", "serve", "--config", str(cfg), "--models", str(models),
                            "--port", str(svc_port)], env=env)
    base = f"http://127.0.0.1:{svc_port}"
    stop = threading.Event()
    answered = [0] * args.clients
    failed = [0] * args.clients

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            i = k
            while not stop.is_set():
                try:
                    body = b'{"request_id":"o-%d-%d",' % (k, i) + bodies[i % len(bodies)][1:]
                    r = c.post("/v1/rank", content=body, headers={"content-type": "application/json"})
                    if r.status_code == 200:
                        answered[k] += 1
                    else:
                        failed[k] += 1
                except httpx.HTTPError:
                    failed[k] += 1
                i += args.clients

    samples = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or srv.poll() is not None:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.3)
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(20)
        rss_before = rss_bytes(srv.pid)
        print(f"[outage] warm: RSS {rss_before / 2**20:.0f} MB; stopping Redis for {args.minutes} min", file=sys.stderr)
        rs.stop()
        t_end = time.monotonic() + args.minutes * 60
        while time.monotonic() < t_end:
            time.sleep(5)
            m = httpx.get(base + "/metrics", timeout=10).text
            s = {"t": round(args.minutes * 60 - (t_end - time.monotonic())), "rss_mb": rss_bytes(srv.pid) / 2**20,
                 "buffer_mb": metric(m, "watchnext_impression_backlog_bytes") / 2**20,
                 "shed": metric(m, "watchnext_impressions_dropped_total", reason="buffer_full"),
                 "answered": sum(answered)}
            samples.append(s)
            print(f"[outage] {json.dumps(s)}", file=sys.stderr, flush=True)
        rs = start_embedded(work / "redis", port=port, appendonly=True)
        print("[outage] Redis is back", file=sys.stderr, flush=True)
        time.sleep(10)
        stop.set()
        for t in threads:
            t.join(60)
        r = redis.Redis.from_url(rs.url)
        t0 = time.monotonic()
        while True:  # the buffer drains, then every window closes
            m = httpx.get(base + "/metrics", timeout=10).text
            if (metric(m, "watchnext_impression_backlog") == 0 and r.zcard("wn:imp:due") == 0
                    and r.zcard("wn:imp:closing") == 0):
                break
            if time.monotonic() - t0 > 600:
                raise RuntimeError("the backlog did not drain in 10 minutes")
            time.sleep(1)
        drain_s = time.monotonic() - t0
        logged = metric(m, "watchnext_impressions_logged_total")
        shed = metric(m, "watchnext_impressions_dropped_total", reason="buffer_full")
        invalid = metric(m, "watchnext_impressions_dropped_total", reason="invalid")
        examples = r.xlen(config.stream.key)
        r.close()
    finally:
        stop.set()
        srv.terminate()
        srv.wait(60)
        rs.stop()

    bound = args.buffer_mb
    out = {
        "minutes": args.minutes, "candidates": args.candidates, "clients": args.clients, "buffer_mb": bound,
        "answered": sum(answered), "failed": sum(failed), "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(max(s["rss_mb"] for s in samples), 1),
        "buffer_peak_mb": round(max(s["buffer_mb"] for s in samples), 2),
        "logged": logged, "shed": shed, "invalid": invalid, "examples": examples, "drain_s": round(drain_s, 1),
    }
    out["rss_growth_mb"] = round(out["rss_peak_mb"] - out["rss_before_mb"], 1)
    out["accounted"] = logged + shed + invalid == out["answered"]
    out["examples_match"] = examples == logged * TOP_K
    ok = out["buffer_peak_mb"] <= bound and out["accounted"] and out["examples_match"] and out["failed"] == 0
    print(f"\nRedis away {args.minutes} min under {args.clients} clients, {args.candidates} candidates (top {TOP_K}):")
    print(f"  answered {out['answered']:,} (failed {out['failed']}); buffer peak {out['buffer_peak_mb']} MB of "
          f"{bound} MB; RSS {out['rss_before_mb']} -> peak {out['rss_peak_mb']} MB (+{out['rss_growth_mb']} MB, "
          f"{out['rss_growth_mb'] / bound:.2f}x the bound)")
    print(f"  logged {logged:,.0f} + shed {shed:,.0f} + invalid {invalid:,.0f} = answered: {out['accounted']}; "
          f"examples {examples:,} = {TOP_K} x logged: {out['examples_match']}; drained in {out['drain_s']} s")
    if args.json:
        args.json.write_text(json.dumps({"summary": out, "samples": samples}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
