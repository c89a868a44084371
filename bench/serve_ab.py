"""POST /v1/rank latency of this tree against another revision's, in turns, next to ONNX Runtime alone.

    python bench/serve_ab.py --base REV [--mode ids-warm|ids-cold|json|arrow] [--candidates 500] [--rounds 10]
                             [--requests 300]

For a change to the serving code: `--base` (a commit, a branch) is checked out into a
temporary git worktree, and a `watchnext serve` of each tree (their defaults) serves one
client on a keep-alive connection per round: base, this tree, then the floor (the same
batches straight into one ONNX Runtime session), --rounds times over. Rounds in turns
put a shared machine's drift on all three alike; the figures are the medians over
rounds of each round's p50 and p99 and of their ratios to that round's floor (a change
can move the two apart: flushing impressions every 250 ms instead of 50 took 0.3 ms
off the p50 of ids-warm and put 5 ms on its p99). ids-cold serves
both trees with a 64-entry cache, smaller than one request, as bench/serve_latency.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import (  # noqa: E402
    arrow_body,
    cold_config_file,
    ensure_model,
    ids_only,
    load_store,
    make_requests,
    run_clients,
    run_floor,
    start_service,
)

from service.features import OnlineFeatures  # noqa: E402
from service.inference import InferenceSession  # noqa: E402
from service.observability import Metrics  # noqa: E402
from service.ranker import Ranker  # noqa: E402
from simulation.world import World, WorldSpec  # noqa: E402
from watchnext.config import load_config  # noqa: E402
from watchnext.encoding import Encoder  # noqa: E402
from watchnext.redis_embed import start_embedded  # noqa: E402
from watchnext.repository import ModelRepository  # noqa: E402

ARROW = "application/vnd.apache.arrow.stream"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision to compare with (a commit or a branch)")
    ap.add_argument("--mode", default="ids-warm", choices=["ids-warm", "ids-cold", "json", "arrow"])
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=300, help="timed requests per tree and round")
    ap.add_argument("--config", type=Path, default=ROOT / "watchnext.toml")
    ap.add_argument("--models", type=Path, default=ROOT / "data" / "bench" / "models")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of a table")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wn-ab-"))
    base_tree = work / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base], check=True)
    config = load_config(args.config)
    models = ensure_model(args.models, args.config, work)
    redis = start_embedded(work / "redis", appendonly=False)
    servers: list[subprocess.Popen] = []
    serve_config = cold_config_file(args.config, work) if args.mode == "ids-cold" else args.config
    try:
        ports = {}
        for name, tree in (("base", base_tree), ("this tree", ROOT)):
            proc, ports[name], _ = start_service(argparse.Namespace(device="auto"), models, redis.url, serve_config,
                                                 tree)
            servers.append(proc)
        reqs = make_requests(World(WorldSpec(), seed=3), args.candidates, 16, seed=args.candidates)
        load_store(redis.url, config, reqs)
        full = [json.dumps(r).encode() for r in reqs]
        ctype = ARROW if args.mode == "arrow" else "application/json"
        ids = [json.dumps(ids_only(r)).encode() for r in reqs]
        bodies = {"ids-warm": ids, "ids-cold": ids, "json": full, "arrow": [arrow_body(r, config) for r in reqs]}[args.mode]
        metrics = Metrics()
        offline = Ranker(config, OnlineFeatures(config, Encoder(config), None, metrics, 20), metrics)
        batches = [offline.encode(offline.prepare(b)) for b in full]
        repo = ModelRepository(models, config.model.name)
        session = InferenceSession(repo.path(repo.serving()) / "model.onnx", "auto",
                                   int(os.environ.get("WATCHNEXT_THREADS") or 0))
        for port in ports.values():  # every body on 8 connections: each worker process has seen each request
            for _ in range(8):
                run_clients(port, bodies, 1, len(bodies), ctype)
        run_floor(session, batches, 1, 50)
        p50s: dict[str, list[float]] = {name: [] for name in (*ports, "floor")}
        p99s: dict[str, list[float]] = {name: [] for name in (*ports, "floor")}
        for _ in range(args.rounds):
            for name, port in ports.items():
                lat, _ = run_clients(port, bodies, 1, args.requests, ctype)
                p50s[name].append(float(np.percentile(lat, 50)) * 1000)
                p99s[name].append(float(np.percentile(lat, 99)) * 1000)
            lat, _ = run_floor(session, batches, 1, args.requests)
            p50s["floor"].append(float(np.percentile(lat, 50)) * 1000)
            p99s["floor"].append(float(np.percentile(lat, 99)) * 1000)
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(30)
        redis.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)

    floor, floor99 = np.asarray(p50s["floor"]), np.asarray(p99s["floor"])
    rows = {}
    for name in ports:
        ratios, ratios99 = np.asarray(p50s[name]) / floor, np.asarray(p99s[name]) / floor99
        rows[name] = {"p50_ms": round(float(np.median(p50s[name])), 2), "p50_ratio": round(float(np.median(ratios)), 3),
                      "p99_ms": round(float(np.median(p99s[name])), 2),
                      "p99_ratio": round(float(np.median(ratios99)), 3),
                      "p50_ratio_each_round": [round(float(r), 3) for r in ratios]}
    if args.json:
        print(json.dumps({"mode": args.mode, "candidates": args.candidates, "rounds": args.rounds,
                          "requests": args.requests, "base": args.base,
                          "floor_p50_ms": round(float(np.median(floor)), 2),
                          "floor_p99_ms": round(float(np.median(floor99)), 2), "trees": rows}))
        return 0
    print(f"\n{args.mode}, {args.candidates} candidates, one client, {args.rounds} rounds of {args.requests} "
          f"requests (base: {args.base}); the floor's p50 {np.median(floor):.2f} ms, p99 {np.median(floor99):.2f} ms")
    print(f"{'tree':>10} | {'p50 ms':>7} | {'p50 x':>6} | {'p99 ms':>7} | {'p99 x':>6} | p50 x of each round")
    for name, r in rows.items():
        print(f"{name:>10} | {r['p50_ms']:>7.2f} | {r['p50_ratio']:>6.2f} | {r['p99_ms']:>7.2f} | {r['p99_ratio']:>6.2f} | "
              f"{', '.join(f'{x:.2f}' for x in r['p50_ratio_each_round'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
