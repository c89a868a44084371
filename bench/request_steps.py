"""Where one rank request's time goes, step by step, in one process, after the idle time a service sees.

    python bench/request_steps.py [--mode arrow|json|ids-warm|ids-cold] [--candidates 500] [--idle-ms 0 3]
                                  [--requests 400]

The service's own steps (service/ranker.py), called as app.py calls them: parse
and plan (`Ranker.prepare`), the Redis read of the cache's misses, encode, the
ONNX Runtime call, the answer and its JSON; and, off the request's path, what the
impression log's writer thread does with its impression (`record`: its Redis record,
`ImpressionLog._record`) and what the closer does with that record when the window
closes (`read`: its examples, `examples_of`). Before each request the process
sleeps --idle-ms (a service waits on the network between requests; 0: back to
back), then runs ONNX Runtime on another batch, as the previous request did. The
floor is the ONNX Runtime call alone, back to back. Medians in microseconds, per
idle time, so the two columns show what idle time costs each step: on a shared
virtual machine, numpy and Arrow calls whose code has left the CPU's caches take
several times their work (docs/benchmarks.md), while a tight Python loop does not.
ids modes read from an embedded redis-server loaded as `watchnext features load`
loads it; ids-cold gives the store a cache too small to keep one request.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_latency import arrow_body, ensure_model, ids_only, load_store, make_requests  # noqa: E402

from service.features import OnlineFeatures  # noqa: E402
from service.impressions import ImpressionLog  # noqa: E402
from service.inference import InferenceSession  # noqa: E402
from service.models import LoadedModel  # noqa: E402
from service.observability import Metrics  # noqa: E402
from service.ranker import Ranker  # noqa: E402
from simulation.world import World, WorldSpec  # noqa: E402
from watchnext.config import load_config  # noqa: E402
from watchnext.encoding import Encoder  # noqa: E402
from watchnext.redis_embed import start_embedded  # noqa: E402
from watchnext.repository import ModelRepository  # noqa: E402
from watchnext.scoring import weight_vector  # noqa: E402

STEPS = ("prepare", "fetch", "encode", "onnxruntime", "answer", "json", "total")
OFF_PATH = ("record", "read")  # the impression's: in the writer thread, and in the closer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "watchnext.toml")
    ap.add_argument("--models", type=Path, default=ROOT / "data" / "bench" / "models")
    ap.add_argument("--mode", default="arrow", choices=["arrow", "json", "ids-warm", "ids-cold"])
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--idle-ms", type=float, nargs="+", default=[0.0, 3.0])
    ap.add_argument("--requests", type=int, default=400, help="timed requests per idle time (default 400)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wn-steps-"))
    models = ensure_model(args.models, args.config, work)
    config = load_config(args.config)
    repo = ModelRepository(models, config.model.name)
    version = repo.serving()
    assert version is not None  # ensure_model trained one if there was none
    session = InferenceSession(repo.path(version) / "model.onnx", "cpu")
    model = LoadedModel(version, session, {}, weight_vector(session.task_names, config.score.weights), 0.0)
    reqs = make_requests(World(WorldSpec(), seed=3), args.candidates, 16, seed=args.candidates)
    full = [json.dumps(r).encode() for r in reqs]
    redis = None
    url = None
    if args.mode.startswith("ids"):
        redis = start_embedded(work / "redis", appendonly=False)
        url = redis.url
        load_store(url, config, reqs)
    try:
        metrics = Metrics()
        cache = 10_000 if args.mode == "ids-cold" else 256 << 20
        ranker = Ranker(config, OnlineFeatures(config, Encoder(config), url, metrics, 500, cache_bytes=cache), metrics)
        batches = [ranker.encode(ranker.prepare(b)) for b in full]
        # its Redis client is never used: records are made and read here, not written
        log = ImpressionLog(config, url or "redis://127.0.0.1:6379", metrics)
        bodies, ctype = {
            "arrow": ([arrow_body(r, config) for r in reqs], "application/vnd.apache.arrow.stream"),
            "json": (full, None),
        }.get(args.mode, ([json.dumps(ids_only(r)).encode() for r in reqs], None))

        def one(i: int) -> list[float]:
            t = [time.perf_counter()]
            prep = ranker.prepare(bodies[i % len(bodies)], ctype)
            t.append(time.perf_counter())
            if prep.needs_fetch:
                ranker.store.fetch(prep.plan)
            t.append(time.perf_counter())
            inputs, served = ranker._encode(prep)
            t.append(time.perf_counter())
            heads = session.run(inputs)
            t.append(time.perf_counter())
            ranked = ranker._answer(prep, served, heads, model, model.weights, "control", None)
            t.append(time.perf_counter())
            orjson.dumps(ranked.body)
            t.append(time.perf_counter())
            rec = log._record(ranked.impression)
            t.append(time.perf_counter())
            log.examples_of({k.encode(): v for k, v in rec.mapping.items()}, [])
            t.append(time.perf_counter())
            path = np.diff(t[:7])
            return [*path, path.sum(), t[7] - t[6], t[8] - t[7]]

        for i in range(2 * len(bodies)):  # every body once through every step (and ids-warm's cache filled)
            one(i)
        out = {}
        for idle in args.idle_ms:
            rows, floor = [], []
            for i in range(args.requests):
                if idle:
                    time.sleep(idle / 1000)
                session.run(batches[(i + 1) % len(batches)])  # the previous request's ONNX Runtime call
                rows.append(one(i))
                t0 = time.perf_counter()
                session.run(batches[i % len(batches)])  # the floor: back to back with the call before it
                floor.append(time.perf_counter() - t0)
            med = np.median(np.array(rows), axis=0) * 1e6
            out[idle] = {**dict(zip((*STEPS, *OFF_PATH), med)), "floor": float(np.median(floor) * 1e6)}
    finally:
        if redis is not None:
            redis.stop()

    print(f"{args.mode}, {args.candidates} candidates, one process; median us of {args.requests} requests per "
          "idle time (the previous request's ONNX Runtime call between each)")
    print(f"{'step':>12} " + " ".join(f"{f'idle {i:g} ms':>12}" for i in args.idle_ms))
    for step in (*STEPS, "floor"):
        print(f"{step:>12} " + " ".join(f"{out[i][step]:>12.0f}" for i in args.idle_ms))
    print(f"{'total/floor':>12} " + " ".join(f"{out[i]['total'] / out[i]['floor']:>12.2f}" for i in args.idle_ms))
    print("off the request's path, right after it:")
    for step in OFF_PATH:
        print(f"{step:>12} " + " ".join(f"{out[i][step]:>12.0f}" for i in args.idle_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
