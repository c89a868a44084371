"""Model quality on simulated history against the best achievable, MMoE vs shared-bottom.

    python bench/quality.py [--examples 1000000] [--tail 100000]

Simulates N examples (or reuses --data), trains one pass with the default
config as MMoE and as shared-bottom, and compares, on the last `tail`
examples, each binary task's progressive AUC with the AUC of the world's true
probabilities on the same examples. Target (issue 3):
(model AUC - 0.5) >= 0.8 * (true AUC - 0.5) for every binary task, and MMoE
beats shared-bottom on the task that disagrees most with click.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.world import WorldSpec, write_history  # noqa: E402
from training.trainer import train_files  # noqa: E402
from watchnext.config import load_config  # noqa: E402
from watchnext.metrics import auc  # noqa: E402


def truth_auc(path: Path, tail: int, config) -> dict:
    rows = deque(maxlen=tail)
    with open(path) as fh:
        for line in fh:
            rows.append(line)
    recs = [json.loads(r) for r in rows]
    out = {}
    click = np.array([r["labels"]["click"] for r in recs])
    for t in config.binary_tasks:
        y = np.array([np.nan if r["labels"].get(t.name) is None else r["labels"][t.name] for r in recs])
        m = ~np.isnan(y)
        if t.given:
            m &= click == 1
        p = np.array([r["truth"][t.name] for r in recs])
        out[t.name] = {"true_auc": auc(y[m] > 0, p[m]), "n": int(m.sum())}
        if t.name + "_nopos" in recs[0]["truth"]:
            pn = np.array([r["truth"][t.name + "_nopos"] for r in recs])
            out[t.name]["true_auc_without_position"] = auc(y[m] > 0, pn[m])
    # which task disagrees most with click: lowest correlation of true probabilities
    pc = np.array([r["truth"]["click_nopos"] for r in recs])
    for t in config.binary_tasks:
        if t.name != "click":
            out[t.name]["corr_with_click"] = float(np.corrcoef(pc, [r["truth"][t.name] for r in recs])[0, 1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--tail", type=int, default=100_000)
    ap.add_argument("--data", type=Path, help="reuse this simulated history instead of writing one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=2000, help="users in the simulated world (about 500 impressions each)")
    args = ap.parse_args()
    base = load_config()
    work = Path(tempfile.mkdtemp(prefix="wn-quality-"))
    data = args.data or work / "history.jsonl"
    if not args.data:
        print(f"simulating {args.examples:,} examples -> {data}", file=sys.stderr)
        with open(data, "w") as fh:
            write_history(fh, args.examples, args.seed, WorldSpec(users=args.users))
    truth = truth_auc(data, args.tail, base)
    results = {}
    for arch in ("mmoe", "shared_bottom"):
        cfg = dataclasses.replace(
            base,
            model=dataclasses.replace(base.model, arch=arch),
            trainer=dataclasses.replace(base.trainer, eval_window=args.tail),
        )
        res = train_files(cfg, [data], work / f"{arch}.pt", None, fresh=True)
        results[arch] = {"examples_per_s": round(res.trained_now / res.seconds), "tasks": res.report["tasks"]}
        print(f"{arch}: {res.trained_now:,} examples in {res.seconds:.1f}s", file=sys.stderr)
    ok = True
    print(f"\nlast {args.tail:,} of {results['mmoe'] and args.examples:,} examples; AUC (serving heads | with bias tower)")
    print(f"{'task':<10}{'true':>8}{'true-nopos':>12}{'mmoe':>16}{'shared_bottom':>18}{'ratio mmoe':>12}  pass")
    for t in base.binary_tasks:
        tr = truth[t.name]
        m, s = results["mmoe"]["tasks"][t.name], results["shared_bottom"]["tasks"][t.name]
        best = m["auc_with_bias"]
        ratio = (best - 0.5) / (tr["true_auc"] - 0.5)
        passed = ratio >= 0.8
        ok &= passed
        tnp = tr.get("true_auc_without_position")
        print(
            f"{t.name:<10}{tr['true_auc']:>8.4f}{(tnp if tnp else float('nan')):>12.4f}"
            f"{m['auc']:>8.4f}|{m['auc_with_bias']:.4f}{s['auc']:>9.4f}|{s['auc_with_bias']:.4f}{ratio:>12.3f}  {passed}"
        )
    others = [t for t in base.binary_tasks if t.name != "click"]
    # least related to click: the smallest |correlation| of true probabilities
    worst = min(others, key=lambda t: abs(truth[t.name]["corr_with_click"]))
    m_auc = results["mmoe"]["tasks"][worst.name]["auc"]
    s_auc = results["shared_bottom"]["tasks"][worst.name]["auc"]
    beats = m_auc > s_auc
    ok &= beats
    print(
        f"\ntask that disagrees most with click: {worst.name} (corr {truth[worst.name]['corr_with_click']:.3f}); "
        f"MMoE {m_auc:.4f} vs shared_bottom {s_auc:.4f}: {'MMoE better' if beats else 'MMoE NOT better'}"
    )
    print(f"throughput: mmoe {results['mmoe']['examples_per_s']:,}/s, shared_bottom {results['shared_bottom']['examples_per_s']:,}/s")
    print(json.dumps({"truth": truth, "results": results}, indent=None), file=sys.stderr)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
