"""POST /v1/rank latency and throughput for each kind of request, next to ONNX Runtime alone on the same batches.

    python bench/serve_latency.py [--sizes 100 500 2000] [--concurrency 1 8] [--modes ids-warm ids-cold json arrow]
                                  [--requests 600] [--rounds 3] [--repeat 3] [--json FILE]

Modes, each a real `watchnext serve` process (its defaults: worker processes,
threads) against an embedded redis-server loaded with the requests' features
(`write_entities`, as `watchnext features load` does):

    ids-warm   the production request: user, query video, context and candidate ids; every entry
               is in the service's cache (the requests were sent once before timing)
    ids-cold   the same request shape, every id a cache miss (a second service with a tiny cache;
               each request names other candidates): one Redis round trip for all of them
    json       every feature in the JSON body (no store look-up)
    arrow      every feature in an Arrow IPC stream body

The floor runs the same encoded batches through one ONNX Runtime session with
the service's thread settings, in this process, while the service is idle; the
two take turns (--rounds) so that a shared machine's drift weighs on both.
Each cell is measured --repeat times and judged on its median ratio. Also
measured: the cache's memory per 1M candidate entries, and the time from a
feature write to its first use in a response. Targets at 500 candidates, one
client (issue 13): ids-warm p50 <= 1.5x the floor and p99 <= 2.5x; ids-cold
p50 <= 3x; arrow p50 <= 1.5x; json p50 <= 2.5x.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.features import ENTRY_OVERHEAD, EntityCache, OnlineFeatures  # noqa: E402
from service.inference import InferenceSession  # noqa: E402
from service.observability import Metrics  # noqa: E402
from service.ranker import Ranker  # noqa: E402
from simulation.world import World, WorldSpec  # noqa: E402
from watchnext.config import load_config  # noqa: E402
from watchnext.encoding import Encoder, section_type  # noqa: E402
from watchnext.entities import RowLayout, encode_entities, write_entities  # noqa: E402
from watchnext.redis_embed import free_port, start_embedded  # noqa: E402
from watchnext.repository import ModelRepository  # noqa: E402
from watchnext.runtime import usable_cpus  # noqa: E402


def make_requests(world: World, n_candidates: int, count: int, seed: int) -> list[dict]:
    """`count` rank requests of `n_candidates` distinct simulated videos each."""
    rng = np.random.default_rng(seed)
    ts = np.full(1, world.spec.start_ts + 86_400.0)
    out = []
    for i in range(count):
        u = int(rng.integers(world.spec.users))
        vids = rng.choice(world.spec.videos, size=n_candidates, replace=n_candidates > world.spec.videos)
        cands = world.candidate_features(vids, np.repeat(ts, n_candidates))
        for j, c in enumerate(cands):
            c["video_id"] = f"{c['video_id']}-{seed}-{i}-{j}"  # distinct ids in every request (ids-cold)
        out.append({
            "request_id": f"bench-{n_candidates}-{seed}-{i}",
            "user": world.user_features(u),
            "query": world.query_features(int(world.recent[u, 0])),
            "context": {"device": "mobile", "hour": 12.0},
            "candidates": cands,
            "top_k": 20,
        })
    return out


def percentiles(lat: list[float]) -> tuple[float, float]:
    a = np.asarray(lat) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def drive(concurrency: int, total: int, open_worker) -> tuple[list[float], float]:
    """`total` timed calls shared by `concurrency` threads; (latencies, calls/s).

    open_worker() -> (call, close): `call(i)` does call number i (raising on failure), `close()` tidies up.
    """
    lat: list[float] = []
    lock = threading.Lock()
    counter = [0]
    failures: list[BaseException] = []

    def worker() -> None:
        call, close = open_worker()
        mine = []
        try:
            while True:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= total:
                    break
                t0 = time.perf_counter()
                call(i)
                mine.append(time.perf_counter() - t0)
        except BaseException as e:  # reported after the join
            failures.append(e)
        finally:
            close()
            with lock:
                lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} workers failed, first: {failures[0]}")
    return lat, total / wall


def run_clients(port: int, bodies: list[bytes], concurrency: int, total: int,
                content_type: str = "application/json") -> tuple[list[float], float]:
    """`total` requests from `concurrency` keep-alive connections; (latencies, requests/s).

    Each client is a plain socket sending prepared request bytes and reading the status line,
    the headers and Content-Length bytes of body: http.client's header parsing added about
    0.08 ms to every request (a client's cost, not the service's).
    """
    requests = [b"POST /v1/rank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n\r\n" % (content_type.encode(), len(b)) + b for b in bodies]

    def open_worker():
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")

        def call(i: int) -> None:
            sock.sendall(requests[i % len(requests)])
            status = reader.readline()
            length = None
            while True:
                line = reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"no Content-Length in the answer to request {i} ({status!r})")
            data = reader.read(length)
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{status.decode(errors='replace').strip()}: {data[:200].decode(errors='replace')}")

        def close() -> None:
            reader.close()
            sock.close()

        return call, close

    return drive(concurrency, total, open_worker)


def run_floor(session: InferenceSession, batches: list[dict], concurrency: int, total: int) -> tuple[list[float], float]:
    """The same calls straight into one ONNX Runtime session."""
    return drive(concurrency, total, lambda: (lambda i: session.run(batches[i % len(batches)]), lambda: None))


def measure(port: int, bodies: list[bytes], session: InferenceSession, batches: list[dict], n: int, conc: int,
            requests: int, rounds: int, content_type: str) -> dict:
    """One cell: the service and the floor side by side in alternating rounds, so that a shared machine's
    drift hits both alike."""
    total = requests if n < 2000 else max(100, requests // 2)
    # warm-up: every body on 8 connections one after another, so that each worker process of the service (the
    # kernel hands each new connection to one of them) has seen every request, and its cache holds their entries
    for _ in range(8):
        run_clients(port, bodies, 1, len(bodies), content_type)
    run_clients(port, bodies, conc, max(len(bodies), total // 10), content_type)
    run_floor(session, batches, conc, max(20, total // 10))
    lat, flat, wall, fwall = [], [], 0.0, 0.0
    for _ in range(rounds):
        chunk = max(conc, total // rounds)
        got, rps = run_clients(port, bodies, conc, chunk, content_type)
        lat += got
        wall += chunk / rps
        got, rps = run_floor(session, batches, conc, chunk)
        flat += got
        fwall += chunk / rps
    rps, frps = len(lat) / wall, len(flat) / fwall
    p50, p99 = percentiles(lat)
    f50, f99 = percentiles(flat)
    return {"requests": len(lat),
            "service_p50_ms": round(p50, 2), "service_p99_ms": round(p99, 2), "service_rps": round(rps, 1),
            "floor_p50_ms": round(f50, 2), "floor_p99_ms": round(f99, 2), "floor_rps": round(frps, 1),
            "p50_ratio": round(p50 / f50, 2), "p99_ratio": round(p99 / f99, 2),
            "body_kb": round(np.mean([len(b) for b in bodies]) / 1024, 1)}


def ids_only(req: dict) -> dict:
    """The production request: ids, the context, top_k; features are the store's."""
    return {"request_id": req["request_id"], "user": {"user_id": req["user"]["user_id"]},
            "query": {"query_video_id": req["query"]["query_video_id"]}, "context": req["context"],
            "candidates": [{"video_id": c["video_id"]} for c in req["candidates"]], "top_k": req["top_k"]}


def arrow_body(req: dict, config) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_struct_array(pa.array(req["candidates"], type=section_type(config, "candidate")))
    table = table.replace_schema_metadata({"request": json.dumps({k: v for k, v in req.items() if k != "candidates"})})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def load_store(url: str, config, reqs: list[dict]) -> None:
    """Every entity the requests name, into the store (as `watchnext features load` writes them)."""
    import redis

    c = redis.Redis.from_url(url)
    for source, key in (("user", "user_id"), ("query", "query_video_id")):
        write_entities(c, config, source, {r[source][key]: {k: v for k, v in r[source].items() if k != key} for r in reqs})
    write_entities(c, config, "candidate", {x["video_id"]: {k: v for k, v in x.items() if k != "video_id"}
                                           for r in reqs for x in r["candidates"]})
    c.close()


def cache_memory(config, world: World, items: int) -> dict:
    """RSS and accounted bytes of a candidate cache holding `items` entries (rows and their JSON)."""
    enc = Encoder(config)
    lay = RowLayout(enc, "candidate")
    ts = np.full(1000, world.spec.start_ts)
    cands = world.candidate_features(np.arange(1000) % world.spec.videos, ts)
    rows = encode_entities(enc, lay, cands)
    raw = np.empty(1000, object)
    raw[:] = [json.dumps(c, separators=(",", ":")).encode() for c in cands]

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    cache = EntityCache(lay, items * (lay.dtype.itemsize + ENTRY_OVERHEAD + int(max(map(len, raw))) + 1))
    for lo in range(0, items, 1000):
        own = np.empty(1000, object)
        own[:] = [r + b" " for r in raw]  # each entry its own bytes, as entries read from Redis are
        cache.put([f"m{lo + i}" for i in range(1000)], rows, own)
    grown = rss() - before
    return {"items": len(cache), "rss_mb": round(grown / 2**20, 1), "accounted_mb": round(cache.bytes / 2**20, 1),
            "row_bytes": lay.dtype.itemsize, "json_bytes_mean": round(float(np.mean([len(b) for b in raw])), 1)}


def freshness(port: int, url: str, config, req: dict, times: int = 10) -> list[float]:
    """Seconds from a feature write to the first response that used it (ids-warm service)."""
    import redis

    c = redis.Redis.from_url(url)
    body = json.dumps(ids_only(req)).encode()
    target = req["candidates"][0]["video_id"]
    base = {k: v for k, v in req["candidates"][0].items() if k != "video_id"}

    def head() -> float:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/rank", body, {"Content-Type": "application/json"})
        items = json.loads(conn.getresponse().read())["items"]
        conn.close()
        return {it["id"]: it["heads"]["click"] for it in items}.get(target, float("nan"))

    out = []
    for k in range(times):
        before = head()
        t0 = time.perf_counter()
        write_entities(c, config, "candidate", {target: {**base, "video_views": float(10 ** (k % 2 * 6 + 1))}})
        while head() == before:
            if time.perf_counter() - t0 > 10:
                raise RuntimeError("a feature write was not used within 10 s")
        out.append(time.perf_counter() - t0)
        time.sleep(0.05)
    c.close()
    return out


def ensure_model(models: Path, config_path: Path, work: Path) -> Path:
    """`models` if it has a version for this config, else train one into it."""
    config = load_config(config_path)
    repo = ModelRepository(models, config.model.name)
    v = repo.serving()
    if v is not None and repo.metadata(v).get("config_hash") == config.hash:
        return models
    from simulation.world import write_history
    from training.trainer import train_files

    hist = work / "history.jsonl"
    print("[bench] training a version on 50,000 simulated examples ...", file=sys.stderr, flush=True)
    with open(hist, "w") as fh:
        write_history(fh, 50_000, 0)
    train_files(config, [hist], work / "ckpt.pt", repo, fresh=True, promote=True)
    return models


def start_service(args, models: Path, redis_url: str, config_path: Path,
                  tree: Path = ROOT) -> tuple[subprocess.Popen, int, dict]:
    """`watchnext serve` from `tree`'s code (default: this one), ready."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "WATCHNEXT_LOG_LEVEL": "warning", "PYTHONPATH": str(tree),
           "WATCHNEXT_DEVICE": args.device}
    server = subprocess.Popen([sys.executable, "-m", "watchnext", "serve", "--config", str(config_path), "--models",
                               str(models), "--port", str(port)], env=env, cwd=tree)
    return server, port, wait_ready(server, port)


def wait_ready(server: subprocess.Popen, port: int, timeout_s: float = 60) -> dict:
    """/readyz's answer once the service on `port` is ready; kills it and raises if it is not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            r = c.getresponse()
            ready = json.loads(r.read())
            c.close()
            if r.status == 200:
                return ready
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the service did not become ready")
        time.sleep(0.2)


def cold_config_file(config_path: Path, work: Path) -> Path:
    """The ids-cold service's config: a cache too small to hold one request's candidates, so every id is a miss."""
    out = work / "cold.toml"
    out.write_text(config_path.read_text().replace("[service]", "[service]\nfeature_cache_mb = 0.01", 1))
    return out


TARGETS = {"ids-warm": (1.5, 2.5), "ids-cold": (3.0, None), "arrow": (1.5, None), "json": (2.5, None)}
MODES = ("ids-warm", "ids-cold", "json", "arrow")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "watchnext.toml")
    ap.add_argument("--models", type=Path, default=ROOT / "data" / "bench" / "models",
                    help="a model repository (default data/bench/models; a version is trained there when it has none)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--requests", type=int, default=600, help="timed requests per cell (default 600)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="the service and the floor take turns this many times per cell (default 3)")
    ap.add_argument("--repeat", type=int, default=3, help="measure each cell this many times; judged on the median")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cache-items", type=int, default=1_000_000, help="entries for the cache memory figure (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wn-bench-"))
    models = ensure_model(args.models, args.config, work)
    config = load_config(args.config)
    world = World(WorldSpec(), seed=3)
    redis = start_embedded(work / "redis", appendonly=False)
    cold_config = cold_config_file(args.config, work)
    rows, extra = [], {}
    servers = []
    try:
        warm_srv, port, ready = start_service(args, models, redis.url, args.config)
        servers.append(warm_srv)
        cold_srv, cold_port, _ = start_service(args, models, redis.url, cold_config)
        servers.append(cold_srv)
        version = int(ready["model_version"])
        onnx = ModelRepository(models, config.model.name).path(version) / "model.onnx"
        # the service's session settings: $WATCHNEXT_THREADS, else the CPUs this process may use
        session = InferenceSession(onnx, args.device, int(os.environ.get("WATCHNEXT_THREADS") or 0))
        metrics = Metrics()
        offline = Ranker(config, OnlineFeatures(config, Encoder(config), None, metrics, 20), metrics)
        print(f"[bench] version {version}, service provider {ready['provider']}, floor provider {session.provider}, "
              f"{usable_cpus()} usable CPUs, batches run as up to {session.parts} parts at once, "
              f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        for n in args.sizes:
            reqs = make_requests(world, n, 16, seed=n)
            for r in reqs:
                r["top_k"] = 20
            load_store(redis.url, config, reqs)
            full = [json.dumps(r).encode() for r in reqs]
            batches = [offline.encode(offline.prepare(b)) for b in full]
            bodies = {"json": (full, "application/json", port),
                      "arrow": ([arrow_body(r, config) for r in reqs], "application/vnd.apache.arrow.stream", port),
                      "ids-warm": ([json.dumps(ids_only(r)).encode() for r in reqs], "application/json", port),
                      "ids-cold": ([json.dumps(ids_only(r)).encode() for r in reqs], "application/json", cold_port)}
            for mode in args.modes:
                b, ctype, p = bodies[mode]
                for conc in args.concurrency:
                    for rep in range(args.repeat):
                        row = {"mode": mode, "candidates": n, "concurrency": conc, "repeat": rep,
                               **measure(p, b, session, batches, n, conc, args.requests, args.rounds, ctype)}
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
            if n == 500:
                fr = freshness(port, redis.url, config, reqs[0])
                extra["write_to_use_s"] = {"median": round(float(np.median(fr)), 4), "max": round(max(fr), 4),
                                           "runs": len(fr)}
        if args.cache_items:
            extra["cache_memory"] = cache_memory(config, world, args.cache_items)
    finally:
        for srv in servers:
            srv.terminate()
            srv.wait(30)
        redis.stop()

    print(f"\n/v1/rank vs ONNX Runtime alone ({platform.node()}, {usable_cpus()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}),"
          f" medians of {args.repeat} runs")
    print(f"{'mode':>8} {'cands':>6} {'conc':>4} | {'svc p50':>8} {'svc p99':>8} {'svc rps':>8} | {'ort p50':>8} "
          f"{'ort p99':>8} | {'p50 x':>6} {'p99 x':>6}  p50 x of each run")
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["mode"], r["candidates"], r["concurrency"]), []).append(r)
    summary = []
    for (mode, n, conc), rs in cells.items():
        med = {k: float(np.median([r[k] for r in rs])) for k in ("service_p50_ms", "service_p99_ms", "service_rps",
                                                                 "floor_p50_ms", "floor_p99_ms", "p50_ratio",
                                                                 "p99_ratio")}
        summary.append({"mode": mode, "candidates": n, "concurrency": conc, **med})
        print(f"{mode:>8} {n:>6} {conc:>4} | {med['service_p50_ms']:>8.2f} {med['service_p99_ms']:>8.2f} "
              f"{med['service_rps']:>8.1f} | {med['floor_p50_ms']:>8.2f} {med['floor_p99_ms']:>8.2f} | "
              f"{med['p50_ratio']:>6.2f} {med['p99_ratio']:>6.2f}  {', '.join(str(r['p50_ratio']) for r in rs)}")
    failed = []
    for mode, (p50_max, p99_max) in TARGETS.items():
        s = next((x for x in summary if x["mode"] == mode and x["candidates"] == 500 and x["concurrency"] == 1), None)
        if s is None:
            continue
        ok = s["p50_ratio"] <= p50_max and (p99_max is None or s["p99_ratio"] <= p99_max)
        want = f"p50 <= {p50_max}x" + (f", p99 <= {p99_max}x" if p99_max else "")
        print(f"target {mode} at 500 candidates, one client: p50 {s['p50_ratio']:.2f}x, p99 {s['p99_ratio']:.2f}x "
              f"({want}): {'met' if ok else 'NOT met'}")
        if not ok:
            failed.append(mode)
    for s in summary:
        if s["candidates"] == 500 and s["concurrency"] == 8:
            print(f"throughput {s['mode']} at 500 candidates, eight clients: {s['service_rps']:.0f} requests/s "
                  f"(ONNX Runtime alone: p50 {s['floor_p50_ms']:.2f} ms)")
    if "write_to_use_s" in extra:
        w = extra["write_to_use_s"]
        print(f"feature write -> first use in a response: median {w['median'] * 1000:.1f} ms, max {w['max'] * 1000:.1f} ms "
              f"({w['runs']} writes)")
    if "cache_memory" in extra:
        c = extra["cache_memory"]
        print(f"feature cache, {c['items']:,} candidate entries: {c['rss_mb']} MB resident "
              f"({c['accounted_mb']} MB accounted against feature_cache_mb; rows of {c['row_bytes']} bytes, "
              f"JSON {c['json_bytes_mean']} bytes on average)")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "cells": summary, **extra}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
