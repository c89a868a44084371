"""Training throughput on one process and on several (torchrun), side by side on the same simulated file.

    python bench/train_scaling.py [--examples 100000] [--held 10000] [--repeat 3] [--nproc 2]
                                  [--batch B] [--threads T] [--device cpu|cuda] [--config PATH] [--json FILE]

Simulates `--examples` + `--held` examples once (seeded, `simulation.world.write_history`): the first
`--examples` lines are trained on, the last `--held` lines (later in time, never trained on) are held out.
Then these settings, each a real `watchnext` command in a fresh checkpoint and model folder, taking turns:
one round runs each setting once (in an order that rotates from round to round), `--repeat` rounds.

    1 x b          python -m watchnext train --data FILE                    [trainer] batch_size = b
    1 x N*b        the same, batch_size = N*b: the global batch of N x b, so the same model (docs/distributed.md)
    N x b          torchrun --standalone --nproc_per_node=N -m watchnext train --data FILE   (b rows per rank)
    1 x b (t thr)  the control: 1 x b on the threads each of the N processes has (t = CPUs / N), which tells
                   the processes' effect from the threads' (left out when t is all the CPUs); N x b over it
                   is what the other N - 1 processes add

b is the config's batch_size (512 in the shipped config) unless `--batch` says otherwise.

Timing: the trainer's own figures. `watchnext train` prints, as JSON, the examples it trained this run and its
final progress report, whose `examples_per_s` is those examples over the seconds from the start of the training
loop (after Python, torch, the process group and the model are up) to the final report (after the last checkpoint,
before the ONNX export). That figure is the one compared. The interpreter's and torchrun's start-up, the process
group and the export are outside it; they show in each command's wall time, printed beside it. Under torchrun
rank 0 prints the report, and its figure counts every rank's rows (the global batches).

Speed-up: N x b over 1 x b (the same rows per process and step: the usual data-parallel figure), and N x b over
1 x N*b (the same model; what the extra processes buy for one given model). Each is the ratio of the medians;
the ratios of each round's pair are printed beside it.

Models: each run's exported version is scored on the held-out lines with
`watchnext evaluate --model latest --device cpu`; its click AUC is printed next to the trainer's progressive click
AUC over its last `[trainer] eval_window` examples. 1 x N*b and N x b should match to the 3rd or 4th digit
(the tests find the same parameters within 1e-5); 1 x b trains with half the global batch and twice the steps,
another model.

Threads: each process's torch threads are set in its config (`[trainer] threads`): the CPUs this process may use
for one process, split evenly (at least one each) for N, so every setting but the control has the same cores;
`--threads T` gives every process T instead (and drops the control). On a machine with few cores the N
processes share them, and every rank still reads and decodes the whole file (docs/distributed.md), so little or
no speed-up is expected there: the script reports what it measures. On a busy machine one process's threads
wait for each other at every parallel operation; the control row shows how much of a difference that makes.

--device cuda: `--device cuda` is passed to `watchnext train`, so torchrun's ranks use nccl, one GPU each
(cuda:LOCAL_RANK; N GPUs needed), and the single process one GPU. Untested: the machine this was written on has
no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from watchnext.runtime import usable_cpus  # noqa: E402


def write_config(base: dict, path: Path, batch: int, threads: int) -> Path:
    """`base` (a parsed config file) with `[trainer] batch_size` and `threads` set, written to `path`."""
    data = {**base, "trainer": {**base.get("trainer", {}), "batch_size": batch, "threads": threads}}
    path.write_text(tomli_w.dumps(data))
    return path


def first_json(text: str) -> dict:
    """The JSON object `watchnext train` / `evaluate` print (indented, from a line that is `{`)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "{")
    return json.JSONDecoder().raw_decode("".join(lines[start:]))[0]


def machine(device: str) -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    import torch

    out = {"host": platform.node(), "cpus": usable_cpus(), "cpu": cpu, "python": platform.python_version(),
           "torch": torch.__version__, "device": device}
    if device == "cuda":
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


class Setting:
    def __init__(self, role: str, name: str, procs: int, batch: int, threads: int):
        self.role, self.name, self.procs, self.batch, self.threads = role, name, procs, batch, threads

    def command(self, args, config: Path, data: Path, run: Path) -> list[str]:
        train = ["-m", "watchnext", "train", "--data", str(data), "--config", str(config),
                 "--models", str(run / "models"), "--checkpoint", str(run / "ckpt" / "ranker.pt"),
                 "--device", args.device]
        if self.procs == 1:
            return [sys.executable, *train]
        torchrun = Path(sys.executable).with_name("torchrun")
        return [str(torchrun), "--standalone", f"--nproc_per_node={self.procs}", *train]

    def shown(self) -> str:
        """The command as the table shows it (without the run's own paths)."""
        if self.procs == 1:
            return "python -m watchnext train --data FILE"
        return f"torchrun --standalone --nproc_per_node={self.procs} -m watchnext train --data FILE"


def run_once(args, setting: Setting, config: Path, data: Path, held: Path, run: Path, env: dict) -> dict:
    run.mkdir(parents=True)
    cmd = setting.command(args, config, data, run)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run, env={**env, "OMP_NUM_THREADS": str(setting.threads)},
                          capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{setting.name}: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = first_json(proc.stdout)
    ev = subprocess.run([sys.executable, "-m", "watchnext", "evaluate", "--config", str(config), "--models",
                         str(run / "models"), "--model", "latest", "--data", str(held), "--device", "cpu", "--json"],
                        cwd=run, env=env, capture_output=True, text=True, timeout=args.timeout)
    if ev.returncode != 0:
        raise SystemExit(f"{setting.name}: watchnext evaluate failed ({ev.returncode}):\n{ev.stderr[-3000:]}")
    scored = first_json(ev.stdout)
    rep = out["metrics"]
    return {"setting": setting.name, "procs": setting.procs, "batch_per_process": setting.batch,
            "threads_per_process": setting.threads, "examples": out["trained_this_run"],
            "examples_per_s": rep["examples_per_s"],
            "train_s": round(out["trained_this_run"] / max(rep["examples_per_s"], 1e-9), 2),
            "run_s_with_export": out["seconds"], "wall_s": round(wall, 2),
            "progressive_click_auc": rep["tasks"]["click"].get("auc"),
            "held_out_click_auc": scored["tasks"]["click"].get("auc"), "held_out_examples": scored["examples"]}


def median(rows: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=100_000, help="simulated examples to train on (default 100,000)")
    ap.add_argument("--held", type=int, default=10_000, help="simulated examples after them, held out (default 10,000)")
    ap.add_argument("--seed", type=int, default=0, help="the simulated world's seed (default 0)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds: each setting runs this many times (default 3)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the torchrun setting (default 2)")
    ap.add_argument("--batch", type=int, help="rows per process and step, b (default: the config's batch_size)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process (default 0: the usable CPUs split evenly over the processes)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu (gloo) or cuda (nccl, one GPU per rank; untested here)")
    ap.add_argument("--config", type=Path, default=ROOT / "watchnext.toml", help="the base config (default: shipped)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one command may take (default 3600)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (data, checkpoints, models)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.nproc < 2:
        ap.error("--nproc must be at least 2")

    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.nproc:
            raise SystemExit(f"--device cuda needs {args.nproc} GPUs (one per rank); "
                             f"this machine has {torch.cuda.device_count()}")
    base = tomllib.loads(args.config.read_text())
    b = args.batch or int(base.get("trainer", {}).get("batch_size", 512))
    cpus = usable_cpus()
    one_threads = args.threads or cpus
    n_threads = args.threads or max(1, cpus // args.nproc)
    n = args.nproc
    work = Path(tempfile.mkdtemp(prefix="wn-scaling-"))
    settings = [Setting("one", f"1 x {b}", 1, b, one_threads), Setting("same", f"1 x {n * b}", 1, n * b, one_threads),
                Setting("many", f"{n} x {b}", n, b, n_threads)]
    if n_threads != one_threads:
        settings.append(Setting("control", f"1 x {b} ({n_threads} thr)", 1, b, n_threads))
    configs = {s.name: write_config(base, work / f"config-{s.procs}x{s.batch}-{s.threads}t.toml", s.batch,
                                    s.threads) for s in settings}

    from simulation.world import write_history

    hist, data, held = work / "history.jsonl", work / "train.jsonl", work / "held.jsonl"
    print(f"[bench] simulating {args.examples:,} + {args.held:,} examples (seed {args.seed}) -> {work}",
          file=sys.stderr, flush=True)
    with open(hist, "w") as fh:
        write_history(fh, args.examples + args.held, seed=args.seed)
    with open(hist) as src, open(data, "w") as tr, open(held, "w") as ho:
        for i, line in enumerate(src):
            (tr if i < args.examples else ho).write(line)
    hist.unlink()

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WATCHNEXT_CONFIG", None)
    info = machine(args.device)
    print(f"[bench] {info['cpus']} usable CPUs ({info['cpu'] or 'unknown CPU'}), torch {info['torch']}, "
          f"device {args.device}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        for rnd in range(args.repeat):
            order = settings[rnd % len(settings):] + settings[:rnd % len(settings)]
            for s in order:
                row = {"round": rnd, **run_once(args, s, configs[s.name], data, held,
                                                work / f"run-{rnd}-{s.role}", env)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = []
    for s in settings:
        rs = [r for r in rows if r["setting"] == s.name]
        summary.append({"setting": s.name, "role": s.role, "command": s.shown(), "procs": s.procs, "batch_per_process": s.batch,
                        "threads_per_process": s.threads, "runs": len(rs),
                        "examples_per_s": median(rs, "examples_per_s"), "train_s": median(rs, "train_s"),
                        "wall_s": median(rs, "wall_s"),
                        "held_out_click_auc": median(rs, "held_out_click_auc"),
                        "progressive_click_auc": median(rs, "progressive_click_auc"),
                        "examples_per_s_runs": [r["examples_per_s"] for r in rs],
                        "held_out_click_auc_runs": [r["held_out_click_auc"] for r in rs]})
    by = {s["role"]: s for s in summary}
    one, same, many = by["one"], by["same"], by["many"]
    pairs = {"vs_1xb": ("many", "one"), "vs_1xNb": ("many", "same")}
    if "control" in by:
        pairs["control_vs_1xb"] = ("control", "one")
        pairs["vs_control"] = ("many", "control")
    per_round: dict[str, list[float]] = {k: [] for k in pairs}
    for rnd in range(args.repeat):
        got = {r["setting"]: r["examples_per_s"] for r in rows if r["round"] == rnd}
        for k, (a, c) in pairs.items():
            per_round[k].append(round(got[by[a]["setting"]] / got[by[c]["setting"]], 2))
    speedup = {k: by[a]["examples_per_s"] / by[c]["examples_per_s"] for k, (a, c) in pairs.items()}

    print(f"\nTraining throughput, {args.examples:,} simulated examples (seed {args.seed}), {args.held:,} held out; "
          f"{info['host']}, {info['cpus']} CPUs, device {args.device}, {started}; medians of {args.repeat} runs")
    print(f"{'setting':>16} {'thr':>4} | {'examples/s':>10} {'train s':>8} {'wall s':>7} | "
          f"{'held-out click AUC':>18} {'progressive':>11} | examples/s of each run")
    for s in summary:
        print(f"{s['setting']:>16} {s['threads_per_process']:>4} | {s['examples_per_s']:>10,.0f} {s['train_s']:>8.1f} "
              f"{s['wall_s']:>7.1f} | {s['held_out_click_auc']:>18.4f} {s['progressive_click_auc']:>11.4f} | "
              f"{', '.join(f'{x:,.0f}' for x in s['examples_per_s_runs'])}")
    print(f"\nspeed-up {many['setting']} over {one['setting']} (same rows per process and step): "
          f"{speedup['vs_1xb']:.2f}x (each round: {', '.join(map(str, per_round['vs_1xb']))})")
    print(f"speed-up {many['setting']} over {same['setting']} (the same model): "
          f"{speedup['vs_1xNb']:.2f}x (each round: {', '.join(map(str, per_round['vs_1xNb']))})")
    if "control" in by:
        print(f"control: {by['control']['setting']} over {one['setting']} on {one['threads_per_process']} threads: "
              f"{speedup['control_vs_1xb']:.2f}x (each round: {', '.join(map(str, per_round['control_vs_1xb']))})")
        print(f"speed-up {many['setting']} over {by['control']['setting']} (the same threads per process): "
              f"{speedup['vs_control']:.2f}x (each round: {', '.join(map(str, per_round['vs_control']))})")
    print(f"held-out click AUC, {many['setting']} - {same['setting']} (should be ~0): "
          f"{many['held_out_click_auc'] - same['held_out_click_auc']:+.4f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "started": started, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "runs": rows, "settings": summary, "speedup": {k: round(v, 3) for k, v in speedup.items()},
            "speedup_each_round": per_round}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
