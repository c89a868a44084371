"""Training throughput and peak memory: the whole pipeline next to its floor.

    python bench/train_throughput.py [--examples 300000] [--config PATH] [--data FILE]

Runs, each in its own process so peak memory is its own:

* pipeline: `train_files` over a JSON-lines file: read, parse, encode,
  progressive validation, train, checkpoint (no export);
* floor: the same model's bare forward + backward + optimiser steps on
  pre-encoded tensors already in memory, batch after batch.

Targets (issue 3): pipeline within 2x of the floor, and >= 20,000 examples/s on
2 cores with the default config.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pipeline(config_path: str | None, data: Path, work: Path) -> dict:
    from training.trainer import train_files
    from watchnext.config import load_config

    config = load_config(config_path)
    res = train_files(config, [data], work / "pipeline.pt", None, fresh=True)
    return {"examples": res.trained_now, "seconds": res.seconds, "peak_rss_mb": peak_rss_mb()}


def run_floor(config_path: str | None, data: Path) -> dict:
    import torch

    from training.trainer import Trainer
    from watchnext.config import load_config
    from watchnext.examples import Chunk, Decoder, ExampleFiles

    config = load_config(config_path)
    chunks = [c for c, _ in ExampleFiles([data], Decoder(config))]
    allc = Chunk.concat(chunks)
    t = Trainer(config)
    bs = config.trainer.batch_size
    batches = [t.tensors(allc.take(slice(s, s + bs))) for s in range(0, len(allc) - bs + 1, bs)]
    net = t.net.train()
    t0 = time.perf_counter()
    for inputs, labels, mask, position in batches:
        loss, _ = net(inputs, labels, mask, position, train=True)
        t.opt_dense.zero_grad(set_to_none=True)
        t.opt_sparse.zero_grad(set_to_none=True)
        loss.backward()
        t.opt_dense.step()
        t.opt_sparse.step()
    secs = time.perf_counter() - t0
    return {"examples": len(batches) * bs, "seconds": secs, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300_000)
    ap.add_argument("--config", help="config file (default: the shipped watchnext.toml)")
    ap.add_argument("--data", type=Path, help="reuse a simulated history file")
    ap.add_argument("--mode", choices=["pipeline", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode == "pipeline":
        print(json.dumps(run_pipeline(args.config, args.data, args.work)))
        return 0
    if args.mode == "floor":
        print(json.dumps(run_floor(args.config, args.data)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="wn-bench-"))
    data = args.data
    if data is None:
        from simulation.world import write_history

        data = work / "history.jsonl"
        print(f"simulating {args.examples:,} examples -> {data}", file=sys.stderr)
        with open(data, "w") as fh:
            write_history(fh, args.examples, seed=0)
    results = {}
    for mode in ("floor", "pipeline"):
        cmd = [sys.executable, __file__, "--mode", mode, "--data", str(data), "--work", str(work)]
        if args.config:
            cmd += ["--config", args.config]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    f, p = results["floor"], results["pipeline"]
    f_rate, p_rate = f["examples"] / f["seconds"], p["examples"] / p["seconds"]
    print(f"{'':<34}{'examples/s':>12}{'peak RSS MB':>14}")
    print(f"{'floor: forward+backward in memory':<34}{f_rate:>12,.0f}{f['peak_rss_mb']:>14,.0f}")
    print(f"{'pipeline: read+encode+train+ckpt':<34}{p_rate:>12,.0f}{p['peak_rss_mb']:>14,.0f}")
    ratio = f_rate / p_rate
    print(f"\npipeline is {ratio:.2f}x slower than the floor (target <= 2x); "
          f"{p_rate:,.0f} examples/s on {f['threads']} threads (target >= 20,000)")
    ok = ratio <= 2.0 and p_rate >= 20_000
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
