"""Position bias under a confounded logging policy: which remedy recovers the relevance?

    python bench/position_bias.py [--strengths 2,4,8] [--seeds 0,1,2] [--examples 100000] [--json out.json]

For each logging-policy strength (how strongly the simulated production ranking
orders slates by relevance, `WorldSpec.policy_strength`; 0 = uniformly random,
the unconfounded world) and each seed, simulates one world and three files:

* logged:   `--examples` examples in the policy's order, `--explore-share` of the
            requests with adjacent pairs swapped at random (RandPair), as the service logs;
* unbiased: as many examples of the same requests, each slate in uniformly random
            order (`unbiased_history`), to train the reference "trained on unbiased data";
* test:     `--test` unbiased examples of other requests of the same world.

Every variant (`VARIANTS`: a name, `[section] key = value` overrides of the bench's
small config, and which file it trains on) is trained once through the project's
trainer (`training.trainer.train_files`) and judged on the test set by what serving
sees, the click head without position:

* click AUC against the true attraction (`truth.click_nopos`): the expected AUC had
  each impression been a click with that probability (no label noise);
* NDCG@10 per request, gains = `truth.click_nopos`;
* for variants with a shallow tower, its per-position logit (averaged over the test
  rows, position 0 subtracted) against the world's log-examination curve.

Targets (the issue "Position bias that survives a confounded logging policy"), one
variant must meet all, means of the seeds: at every confounded strength it beats
"no tower" by >= 0.02 click AUC and recovers >= 50% of the gap between "no tower" and
"unbiased data"; at strength 0 it costs at most 0.003 click AUC. Exit status 1 (and
the reasons) when no variant does.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.world import DEVICE_P, DEVICES, SLATE, World, WorldSpec, history, write_history  # noqa: E402
from training.trainer import Trainer, train_files  # noqa: E402
from watchnext.config import parse_config  # noqa: E402
from watchnext.examples import Decoder, ExampleFiles  # noqa: E402
from watchnext.metrics import ndcg_by_group  # noqa: E402

NO_TOWER = "no tower"
REFERENCE = "unbiased data"
TARGET_GAIN, TARGET_SHARE, TARGET_COST = 0.02, 0.5, 0.003

# (name, overrides as {"section.key": value}, training file: "logged" | "unbiased")
VARIANTS: list[tuple[str, dict, str]] = [
    (NO_TOWER, {"bias.features": []}, "logged"),
    ("position feature", {"bias.features": ["position"], "bias.mode": "feature"}, "logged"),
    ("tower", {}, "logged"),  # the shipped shallow tower: position and device, 10% position dropout
    ("tower + obs. dropout", {"bias.observation_dropout": 0.3}, "logged"),
    ("tower + grad. reversal", {"bias.gradient_reversal": 1.0}, "logged"),
    ("tower + cross", {"bias.cross": ["position", "device"]}, "logged"),  # one row per (slot, device)
    ("IPW (estimated)", {"bias.features": [], "trainer.ipw": "estimated", "trainer.ipw_min_count": 50}, "logged"),
    # the previous IPW: the click loss of a row weighted by 1 / p (re-weights positions, does not debias)
    ("IPW weights (estimated)", {"bias.features": [], "trainer.ipw": "estimated", "trainer.ipw_min_count": 50,
                                 "trainer.ipw_method": "weight"}, "logged"),
    # the world's own curve (`world_curve`): what an offline randomisation experiment would give
    ("IPW (true curve)", {"bias.features": [], "trainer.ipw": "curve", "trainer.ipw_curve": "world"}, "logged"),
    # c / p up to 4 instead of 10: less variance, some bias left at the lowest positions
    ("IPW (true curve; clip 4)", {"bias.features": [], "trainer.ipw": "curve", "trainer.ipw_curve": "world",
                                  "trainer.ipw_clip": 4.0}, "logged"),
    ("IPW (estimated; clip 4)", {"bias.features": [], "trainer.ipw": "estimated", "trainer.ipw_min_count": 50,
                                 "trainer.ipw_clip": 4.0}, "logged"),
    (REFERENCE, {}, "unbiased"),  # the shipped tower, on slates in random order
]

# A small config made for this bench: a few features, small embeddings and experts (seconds per training).
CONFIG = """
[item]
id = "video_id"

[[features]]
name = "user_id"
source = "user"
kind = "categorical"
buckets = 4096
dim = 8

[[features]]
name = "user_embedding"
source = "user"
kind = "vector"
size = 16

[[features]]
name = "query_embedding"
source = "query"
kind = "vector"
size = 16

[[features]]
name = "device"
source = "context"
kind = "categorical"
buckets = 16
dim = 4

[[features]]
name = "video_id"
source = "candidate"
kind = "categorical"
buckets = 4096
dim = 8

[[features]]
name = "video_views"
source = "candidate"
kind = "numeric"
transform = "log1p"

[[features]]
name = "video_embedding"
source = "candidate"
kind = "vector"
size = 16

[[tasks]]
name = "click"
kind = "binary"
group = "engagement"
default = 0.0

[bias]
features = ["position", "device"]
dropout = 0.1

[model]
arch = "mmoe"
experts = 2
expert_layers = [32, 16]
tower_layers = [8]
expert_dropout = 0.0
interaction_dim = 4
interaction_heads = 2

[score]
weights = { click = 1.0 }

[trainer]
batch_size = 256
learning_rate = 0.003
embedding_learning_rate = 0.03
checkpoint_every_examples = 10000000
checkpoint_interval_s = 100000
report_every_examples = 10000000
eval_window = 10000
"""


def bench_config(overrides: dict, threads: int, world: WorldSpec | None = None):
    """The bench's config with `{"section.key": value}` overrides; ConfigError when a key is not (yet) known.
    The value "world" of `trainer.ipw_curve` is the examination curve of `world` (`world_curve`)."""
    data = tomllib.loads(CONFIG)
    data["trainer"]["threads"] = threads
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if key == "trainer.ipw_curve" and value == "world":
            value = world_curve(world or WorldSpec())
        data.setdefault(section, {})[name] = copy.deepcopy(value)
    return parse_config(data, f"<bench config {overrides}>")


def world_curve(spec: WorldSpec, positions: int = SLATE) -> list[float]:
    """The world's examination by position, averaged over the devices' population shares (`DEVICE_P`):
    p(k) = sum_d P(d) (1 / (1 + k)) ** (position_bias * exam_device[d]); p(0) = 1. One curve for every device
    (what `ipw_curve` takes), so a device examined faster or slower than the average keeps a residual bias."""
    k = np.arange(positions, dtype=np.float64)[:, None]
    eta = spec.position_bias * np.asarray(spec.exam_device, np.float64)[None, :]
    return [round(float(x), 6) for x in (DEVICE_P[None, :] * (1.0 / (1.0 + k)) ** eta).sum(1)]


# ---------------------------------------------------------------- data


def world_spec(args, strength: float, explore: float) -> WorldSpec:
    return WorldSpec(users=args.users, videos=args.videos, channels=max(args.videos // 10, 1), tags=100,
                     policy_strength=strength, policy_popularity=args.policy_popularity, explore_share=explore,
                     position_bias=args.position_bias)


def make_data(args, strength: float, seed: int, work: Path) -> dict:
    """Write the logged, unbiased and test files of one world; returns their paths and the test truth."""
    d = work / f"s{strength:g}-seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    files = {"logged": d / "logged.jsonl", "unbiased": d / "unbiased.jsonl", "test": d / "test.jsonl"}
    with open(files["logged"], "w") as fh:
        write_history(fh, args.examples, seed, world_spec(args, strength, args.explore_share))
    # the same world and seed: the same requests as the logged file, each slate in random order
    with open(files["unbiased"], "w") as fh:
        write_history(fh, args.examples, seed, world_spec(args, strength, 0.0), unbiased=True)
    # other requests of the same world: its own draws of users, queries and timestamps
    world = World(world_spec(args, strength, 0.0), seed)
    world.rng = np.random.default_rng([seed, 2027])
    rows = []
    with open(files["test"], "w") as fh:
        for ex in history(world, args.test, seed + 1000, unbiased=True):
            fh.write(json.dumps(ex, separators=(",", ":")) + "\n")
            rows.append((ex["request_id"], ex["truth"]["click_nopos"], ex["truth"]["exam"], ex["position"],
                         ex["labels"]["click"], ex["context"]["device"]))
    rid, cn, exam, pos, click, dev = zip(*rows)
    index = {d: i for i, d in enumerate(DEVICES.tolist())}
    devices = np.array([index[x] for x in dev])
    spec = world.spec
    eta = spec.position_bias * np.asarray(spec.exam_device)[devices]
    truth = {"request": np.array(rid), "click_nopos": np.array(cn), "exam": np.array(exam),
             "position": np.array(pos), "click": np.array(click), "eta": eta}
    return {"files": files, "truth": truth}


# ---------------------------------------------------------------- metrics


def soft_auc(p: np.ndarray, score: np.ndarray) -> float:
    """AUC against probabilistic labels: each row is a positive with weight p and a negative with 1 - p.

    = sum_{i != j} p_i (1 - p_j) [s_i > s_j] (ties 1/2) / sum_{i != j} p_i (1 - p_j): the expected AUC of
    labels drawn from p, without their noise. Vectorised: one sort, cumulative sums over tie groups.
    """
    p, s = np.asarray(p, np.float64), np.asarray(score, np.float64)
    order = np.argsort(s, kind="mergesort")
    s, p = s[order], p[order]
    q = 1.0 - p
    first = np.concatenate([[True], s[1:] != s[:-1]])
    grp = np.cumsum(first) - 1
    q_grp = np.bincount(grp, weights=q)
    q_below = np.concatenate([[0.0], np.cumsum(q_grp)[:-1]])  # negatives' weight strictly below each group
    wins = np.sum(p * (q_below[grp] + 0.5 * q_grp[grp])) - 0.5 * np.sum(p * q)  # drop each row's pair with itself
    total = p.sum() * q.sum() - np.sum(p * q)
    return float(wins / total)


def evaluate(net, config, test: Path, truth: dict) -> dict:
    """The serving click head (no position) on the test file; the tower's position curve when there is one."""
    import torch

    decoder = Decoder(config, on_bad_line="stop", check_order=False)
    names = net.ranker.input_names
    col = config.task_index("click")
    logits, curve = [], []
    net.eval()
    with torch.no_grad():
        for chunk, _ in ExampleFiles([str(test)], decoder):
            inputs = {k: torch.from_numpy(chunk.inputs[k]) for k in names}
            logits.append(net.ranker.raw(inputs)[0][:, col].numpy())
            if getattr(net, "bias", None) is not None and _tower_takes_position(config):
                curve.append(_tower_curve(net, inputs, len(chunk)))
    score = np.concatenate(logits).astype(np.float64)
    if len(score) != len(truth["click_nopos"]):
        raise RuntimeError(f"{test}: scored {len(score)} rows, expected {len(truth['click_nopos'])}")
    cn = truth["click_nopos"]
    out = {
        "auc": soft_auc(cn, score),
        "ndcg10": ndcg_by_group(truth["request"], score, cn, 10),
        "auc_clicks": soft_auc(truth["click"], score),  # the sampled clicks at the random slots (noisy)
    }
    if curve:
        n = np.array([c[1] for c in curve], np.float64)
        learned = np.sum([c[0] * k for c, k in zip(curve, n)], axis=0) / n.sum()
        out["tower_curve"] = (learned - learned[0]).round(4).tolist()
    return out


def _tower_takes_position(config) -> bool:
    return "position" in config.bias.tower_features


def _tower_curve(net, inputs: dict, n: int) -> tuple[np.ndarray, int]:
    """The tower's click logit with every row put at slot k, averaged over the rows, for k < SLATE."""
    import torch

    out = []
    for k in range(SLATE):
        slot = torch.full((n,), k, dtype=torch.int64)
        bias_logits, _ = net.bias(net.position_rows(slot, False), inputs)
        out.append(float(bias_logits[:, 0].mean()))
    return np.array(out), n


def true_curve(truth: dict) -> list[float]:
    """The world's log-examination at slot k minus slot 0, averaged over the test rows' devices."""
    return (-truth["eta"].mean() * np.log1p(np.arange(SLATE))).round(4).tolist()


# ---------------------------------------------------------------- the run


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="wn-posbias-"))
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    # the world's curve does not depend on the policy's strength
    configs = {name: bench_config(over, args.threads, world_spec(args, 1.0, args.explore_share))
               for name, over, _ in variants}
    runs = []
    strengths = sorted(set(args.strengths) | ({0.0} if args.unconfounded else set()))
    for strength in strengths:
        for seed in args.seeds:
            t0 = time.perf_counter()
            data = make_data(args, strength, seed, work)
            t_data = time.perf_counter() - t0
            truth = data["truth"]
            ceiling = {"auc": soft_auc(truth["click_nopos"], truth["click_nopos"]),
                       "ndcg10": ndcg_by_group(truth["request"], truth["click_nopos"], truth["click_nopos"], 10)}
            print(f"strength {strength:g} seed {seed}: data in {t_data:.1f}s; truth AUC {ceiling['auc']:.4f}",
                  file=sys.stderr)
            for name, _, source in variants:
                if name not in configs:
                    continue
                cfg = configs[name]
                ckpt = work / f"s{strength:g}-seed{seed}" / f"{_slug(name)}.pt"
                t1 = time.perf_counter()
                res = train_files(cfg, [data["files"][source]], ckpt, None, fresh=True)
                net = Trainer.load(ckpt, cfg).net
                m = evaluate(net, cfg, data["files"]["test"], truth)
                m["train_s"] = round(time.perf_counter() - t1, 1)
                m["examples"] = res.trained_now
                ckpt.unlink(missing_ok=True)
                runs.append({"strength": strength, "seed": seed, "variant": name, **m,
                             "truth_auc": ceiling["auc"], "truth_ndcg10": ceiling["ndcg10"],
                             "true_curve": true_curve(truth)})
                print(f"  {name:<24} AUC {m['auc']:.4f}  NDCG@10 {m['ndcg10']:.4f}  ({m['train_s']:.1f}s)",
                      file=sys.stderr)
            if not args.keep:
                for f in data["files"].values():
                    f.unlink(missing_ok=True)
    return {"runs": runs, "strengths": strengths, "seeds": args.seeds,
            "variants": [v[0] for v in variants if v[0] in configs],
            "settings": {k: getattr(args, k) for k in ("examples", "test", "users", "videos",
                                                                 "policy_popularity", "position_bias", "explore_share")}}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def summarise(result: dict) -> dict:
    """Per (strength, variant): mean and sd over seeds, the difference with no tower (paired by seed) and the
    share of the gap to "unbiased data" recovered; then the targets."""
    runs = result["runs"]
    table: dict = {}
    for strength in result["strengths"]:
        by = {v: {r["seed"]: r for r in runs if r["strength"] == strength and r["variant"] == v}
              for v in result["variants"]}
        base = by.get(NO_TOWER, {})
        ref = by.get(REFERENCE, {})
        row = {}
        for v, seeds in by.items():
            if not seeds:
                continue
            e: dict = {}
            for metric in ("auc", "ndcg10"):
                x = np.array([seeds[s][metric] for s in sorted(seeds)])
                e[metric] = {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0}
                common = sorted(set(seeds) & set(base))
                if common:
                    d = np.array([seeds[s][metric] - base[s][metric] for s in common])
                    e[metric]["vs_no_tower"] = float(d.mean())
                    both = sorted(set(common) & set(ref))
                    if both:
                        gap = np.mean([ref[s][metric] - base[s][metric] for s in both])
                        mine = np.mean([seeds[s][metric] - base[s][metric] for s in both])
                        e[metric]["gap"] = float(gap)
                        e[metric]["share_of_gap"] = float(mine / gap) if abs(gap) > 1e-9 else None
            curves = [seeds[s]["tower_curve"] for s in seeds if "tower_curve" in seeds[s]]
            if curves:
                learned = np.mean(curves, axis=0)
                true = np.array(next(iter(seeds.values()))["true_curve"])
                e["tower_curve"] = learned.round(3).tolist()
                e["true_curve"] = true.round(3).tolist()
                e["curve_rmse"] = float(np.sqrt(np.mean((learned - true) ** 2)))
            row[v] = e
        table[f"{strength:g}"] = row
    return {"table": table, "targets": targets(result, table)}


def targets(result: dict, table: dict) -> dict:
    """Which variants meet every target; the reasons of those that do not."""
    confounded = [f"{s:g}" for s in result["strengths"] if s > 0]
    candidates = [v for v in result["variants"] if v not in (NO_TOWER, REFERENCE)]
    reasons: dict[str, list[str]] = {}
    for v in candidates:
        why = []
        for s in confounded:
            e = table[s].get(v, {}).get("auc", {})
            gain, share = e.get("vs_no_tower"), e.get("share_of_gap")
            if gain is None or gain < TARGET_GAIN:
                why.append(f"strength {s}: {_f(gain)} vs no tower (< +{TARGET_GAIN})")
            if share is None or share < TARGET_SHARE:
                why.append(f"strength {s}: {_pct(share)} of the gap (< {TARGET_SHARE:.0%})")
        if "0" in table:
            gain = table["0"].get(v, {}).get("auc", {}).get("vs_no_tower")
            if gain is None or gain < -TARGET_COST:
                why.append(f"strength 0: {_f(gain)} vs no tower (costs more than {TARGET_COST})")
        else:
            why.append("strength 0 not run (--no-unconfounded)")
        reasons[v] = why
    passing = [v for v, why in reasons.items() if not why]
    return {"passing": passing, "failing": {v: w for v, w in reasons.items() if w}, "ok": bool(passing)}


def _f(x) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def render(result: dict, summary: dict) -> str:
    lines = []
    for metric, label in (("auc", "click AUC vs truth.click_nopos"), ("ndcg10", "NDCG@10 (gains truth.click_nopos)")):
        lines.append(f"\n{label}, unbiased test; mean ± sd of seeds {result['seeds']}; Δ = vs no tower (paired); "
                     "gap% = share of the gap no tower -> unbiased data recovered")
        lines.append(f"{'variant':<24}" + "".join(f"{'strength ' + s:>36}" for s in summary["table"]))
        for v in result["variants"]:
            cells = []
            for s, row in summary["table"].items():
                e = row.get(v, {}).get(metric)
                if not e:
                    cells.append(f"{'-':>36}")
                    continue
                cell = f"{e['mean']:.4f}±{e['sd']:.4f}"
                if v != NO_TOWER and "vs_no_tower" in e:
                    cell += f" Δ{e['vs_no_tower']:+.4f}"
                    if v != REFERENCE and e.get("share_of_gap") is not None and float(s) > 0:
                        cell += f" {e['share_of_gap']:>4.0%}"
                cells.append(f"{cell:>36}")
            lines.append(f"{v:<24}" + "".join(cells))
    lines.append("\ntower's position logit (slot k minus slot 0, mean of seeds) vs the true log-examination")
    for s, row in summary["table"].items():
        for v, e in row.items():
            if "tower_curve" in e:
                lines.append(f"  strength {s:<4} {v:<24} rmse {e['curve_rmse']:.3f}  learned "
                             + " ".join(f"{x:+.2f}" for x in e["tower_curve"]))
        true = next((e["true_curve"] for e in row.values() if "true_curve" in e), None)
        if true:
            lines.append(f"  strength {s:<4} {'true log exam':<24}{'':>11}  true    " + " ".join(f"{x:+.2f}" for x in true))
    t = summary["targets"]
    lines.append("")
    if t["ok"]:
        lines.append(f"PASS: {', '.join(t['passing'])} meet every target")
    else:
        lines.append("FAIL: no variant meets every target")
        for v, why in t["failing"].items():
            lines.append(f"  {v}: " + "; ".join(why))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strengths", type=_floats, default=[2.0, 4.0, 8.0], help="confounded policy strengths (> 0)")
    ap.add_argument("--no-unconfounded", dest="unconfounded", action="store_false",
                    help="skip the strength-0 world (the 'costs at most 0.003' check)")
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    ap.add_argument("--examples", type=int, default=100_000, help="training examples per world (each file)")
    ap.add_argument("--test", type=int, default=20_000, help="unbiased test examples per world")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--videos", type=int, default=400)
    ap.add_argument("--policy-popularity", type=float, default=1.0,
                    help="the logging policy's weight on popularity (the world's default is 0.3): a popularity-driven "
                    "policy, as in the issue's data")
    ap.add_argument("--position-bias", type=float, default=1.0,
                    help="the world's examination exponent scale, exam = (1 / (1 + slot)) ** (this * device factor) "
                    "(the world's default is 0.6; 1.0: examination falls to 0.1 at slot 9 on mobile)")
    ap.add_argument("--explore-share", type=float, default=0.2, help="share of logged requests with RandPair swaps")
    ap.add_argument("--variants", type=lambda s: [x.strip() for x in s.split(",")], help="names of VARIANTS to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: small batches gain nothing from more, and lose much on a busy "
                    "machine; 0: the CPUs this process may use)")
    ap.add_argument("--work", help="folder for the simulated files (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the simulated files")
    ap.add_argument("--json", type=Path, help="write every run and the summary here")
    args = ap.parse_args(argv)
    for flag, v in (("--examples", args.examples), ("--test", args.test), ("--users", args.users),
                    ("--videos", args.videos)):
        if v <= 0:
            ap.error(f"{flag}: must be > 0, got {v}")
    if any(s <= 0 for s in args.strengths):
        ap.error(f"--strengths: confounded strengths must be > 0 (strength 0 runs unless --no-unconfounded), "
                 f"got {args.strengths}")
    if not (np.isfinite(args.position_bias) and args.position_bias >= 0):
        ap.error(f"--position-bias: must be a finite number >= 0, got {args.position_bias}")
    if not 0.0 <= args.explore_share <= 1.0:
        ap.error(f"--explore-share: must be in [0, 1], got {args.explore_share}")
    unknown = set(args.variants or []) - {v[0] for v in VARIANTS}
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; known: {[v[0] for v in VARIANTS]}")
    t0 = time.perf_counter()
    result = run(args)
    summary = summarise(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(render(result, summary))
    print(f"\n{len(result['runs'])} trainings in {result['seconds']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({**result, **summary}, indent=1))
    return 0 if summary["targets"]["ok"] else 1


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
