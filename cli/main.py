"""The `watchnext` command (docs/configuration.md). Every subcommand has --help.

Torch is imported only by the subcommands that train, so `watchnext serve`
runs on onnxruntime alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from watchnext.config import load_config
from watchnext.errors import WatchnextError
from watchnext.repository import ModelRepository, models_summary

EPILOG = "Shared settings: --config PATH (or WATCHNEXT_CONFIG), --models DIR (or WATCHNEXT_MODELS), REDIS_URL."
EX_USER = 2  # a user error (bad flags, config, data or repository): as argparse exits on a bad flag
EX_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error, i.e. a bug in watchnext
BUG = ("watchnext: internal error: this is a bug in watchnext, not a problem with your input or config; "
       "please report it with the traceback above and the command you ran")


class CliError(WatchnextError):
    """A user error on the command line (`field`: the flag or argument at fault): printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    """Run one command. A WatchnextError (the user can act on it) is one line `watchnext: field: reason` and exit
    status 2; anything else escaping a command is a bug: its traceback, a line saying so, and exit status 70."""
    try:  # from the first import on: a Ctrl-C at any moment is one line, never a traceback
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EX_USER
        return int(args.func(args) or 0)
    except WatchnextError as e:
        print(f"watchnext: {e.field}: {e.reason}" if e.field else f"watchnext: {e.reason}", file=sys.stderr)
        return EX_USER
    except KeyboardInterrupt:
        print("watchnext: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug like any other
            traceback.print_exc(file=sys.stderr)
            print(BUG, file=sys.stderr)
            return EX_SOFTWARE
        print(f"watchnext: {e.filename}: {e.strerror or e}", file=sys.stderr)  # missing, not allowed, a folder...
        return EX_USER
    except Exception:
        traceback.print_exc(file=sys.stderr)
        print(BUG, file=sys.stderr)
        return EX_SOFTWARE


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("watchnext")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watchnext",
        description="Multitask (MMoE) ranking for 'what video to watch next': train, export, serve, compare.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"watchnext {package_version()}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    _train(sub)
    _evaluate(sub)
    _models(sub)
    _simulate(sub)
    from cli import ab, serve  # they import this module's helpers (common, CliError, EPILOG)

    serve.register(sub)
    ab.register(sub)
    return p


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="config file (default: $WATCHNEXT_CONFIG or the shipped watchnext.toml)")
    p.add_argument("--models", metavar="DIR", help="model repository (default: $WATCHNEXT_MODELS or ./models)")


def config_of(args):
    return load_config(args.config)


def repo_of(args, config) -> ModelRepository:
    root = args.models or os.environ.get("WATCHNEXT_MODELS") or "models"
    return ModelRepository(root, config.model.name)


def progress_bar(total: int, desc: str, unit: str = "B"):
    """A tqdm bar on a terminal; None when stderr is not one (logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------- train


def _train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the ranker on example files, or continuously on the Redis stream",
        description=(
            "Train in time order. With --data: one streaming pass over JSON-lines or Parquet files, resuming "
            "from the checkpoint if a run over the same files was interrupted, then export a version. "
            "With --stream: the continuous worker on the Redis training stream."
        ),
        epilog=EPILOG,
    )
    common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="FILE", help="example files, in time order")
    src.add_argument("--stream", action="store_true", help="consume the Redis training stream (REDIS_URL; embedded Redis if unset)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: checkpoints/<model>.pt)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start a new model")
    p.add_argument("--no-export", action="store_true", help="do not export a version (files: at the end; the stream: as it goes)")
    p.add_argument("--promote", action="store_true", help="promote each exported version")
    p.add_argument("--metrics-file", metavar="PATH", help="append progress reports as JSON lines (default: next to the checkpoint)")
    p.add_argument("--device", metavar="DEV", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--arch", choices=["mmoe", "shared_bottom"], help="override [model] arch")
    p.add_argument("--max-examples", type=int, metavar="N", help="stop after N examples (files)")
    p.add_argument("--max-bad-share", type=float, default=0.01, metavar="F",
                   help="files: exit with an error when more than this share of the lines read were skipped as "
                   "bad (default 0.01); the model still keeps what it trained")
    p.add_argument("--consumer", metavar="NAME", help="stream consumer name (default: host name)")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stream: exit after S seconds without entries")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import dataclasses

    config = config_of(args)
    if args.arch:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, arch=args.arch))
    repo = repo_of(args, config)
    ckpt = Path(args.checkpoint or Path("checkpoints") / f"{config.model.name}.pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    metrics_file = Path(args.metrics_file) if args.metrics_file else ckpt.with_suffix(".metrics.jsonl")
    if args.stream:
        from training.stream_worker import run_stream_cli

        return run_stream_cli(config, repo, ckpt, args, metrics_file)

    from training import distributed
    from training.trainer import pick_device

    for f in args.data:
        if not Path(f).is_file():
            raise CliError(f, f"no such file (make one with: watchnext simulate history --out {f})")
    device = pick_device(args.device)
    if distributed.world_size_from_env() > 1:  # under torchrun: one model over all the ranks (docs/distributed.md)
        device = distributed.init_from_env(device)
        try:
            return _train_files_cli(args, config, repo, ckpt, metrics_file, device)
        finally:
            distributed.shutdown()
    return _train_files_cli(args, config, repo, ckpt, metrics_file, device)


def _train_files_cli(args, config, repo, ckpt, metrics_file, device) -> int:
    from training import distributed
    from training.trainer import train_files

    lead = not distributed.active() or distributed.dist.get_rank() == 0  # data-parallel: rank 0 reports
    total = sum(Path(f).stat().st_size for f in args.data)
    bar = progress_bar(total, f"train {config.model.arch} on {device}") if lead else None
    shown = [0]

    def on_progress(done: int, total: int, rep: dict) -> None:
        if bar is not None:
            bar.update(max(0, done - shown[0]))
            shown[0] = max(shown[0], done)
            if rep:
                bar.set_postfix_str(_short(rep))
        elif rep:
            print(f"[train] {rep['examples']:,} examples  {_short(rep)}", file=sys.stderr, flush=True)

    res = train_files(
        config,
        args.data,
        ckpt,
        None if args.no_export else repo,
        fresh=args.fresh,
        promote=args.promote,
        metrics_file=metrics_file,
        on_progress=on_progress,
        device=device,
        max_examples=args.max_examples,
    )
    if bar is not None:
        bar.close()
    if not lead:
        return 0
    out = {
        "examples": res.examples,
        "trained_this_run": res.trained_now,
        "seconds": round(res.seconds, 2),
        "examples_per_s": round(res.trained_now / max(res.seconds, 1e-9), 1),
        "bad_lines": res.bad_lines,
        "bad_line_samples": res.bad_samples,
        "skipped_batches": res.skipped_batches,
        "version": res.version,
        "checkpoint": str(ckpt),
        "metrics": res.report,
    }
    print(json.dumps(out, indent=2))
    read = res.trained_now + res.bad_now
    if res.bad_now and res.bad_now > args.max_bad_share * read and res.commonest_bad is not None:
        n, where = res.commonest_bad
        raise CliError("", f"skipped {res.bad_now:,} of the {read:,} lines read ({res.bad_now / read:.1%}; "
                       f"--max-bad-share {args.max_bad_share:g}); the commonest reason ({n:,} lines), first at {where}. "
                       "Fix the file, or check that it was made for this config (--config); --fresh starts a new "
                       "model, --checkpoint PATH continues another")
    if res.trained_now == 0:
        print("watchnext: nothing new to train on in these files (already trained; --fresh starts over)", file=sys.stderr)
    return 0


def _short(rep: dict) -> str:
    parts = []
    for name, t in rep.get("tasks", {}).items():
        if t.get("auc") is not None:
            parts.append(f"{name} auc {t['auc']:.3f}")
        elif t.get("rmse") is not None:
            parts.append(f"{name} rmse {t['rmse']:.3g}")
    return ", ".join(parts)


# ---------------------------------------------------------------- evaluate


def _evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-task metrics of an exported version on example files (JSON)",
        description="Score example files with an exported ONNX version; print per-task AUC / RMSE, the number "
        "of labelled examples, and the combined score's ranking quality (NDCG@10 per request) as JSON.",
        epilog=EPILOG,
    )
    common(p)
    p.add_argument("--model", required=True, metavar="VERSION", help="version number (3 or v3), 'serving' or 'latest'")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    json_flag(p)
    p.set_defaults(func=cmd_evaluate)


def version_arg(repo: ModelRepository, v: str, name: str = "--model") -> int:
    """A version as evaluate and compare take it (`name`: the flag or argument): a number, 'serving' or 'latest'."""
    if v in ("serving", "latest"):
        s = repo.serving() if v == "serving" else (repo.versions() or [None])[-1]
        if s is None:
            raise CliError(str(repo.dir), "the model repository is empty: train one with `watchnext train --data FILE`")
        return s
    digits = v[1:] if v[:1] in ("v", "V") else v  # 3 or v3, as the service and `models list` write it
    if not digits.isdigit():
        raise CliError(name, f"expected a version number (3 or v3), 'serving' or 'latest', got {v!r}")
    return int(digits)


def cmd_evaluate(args) -> int:
    from analysis.evaluate import evaluate

    config = config_of(args)
    repo = repo_of(args, config)
    version = version_arg(repo, args.model)
    show(evaluate(config, repo, version, args.data, args.device), args, "evaluation_table")
    return 0


def show(rep: dict, args, table: str) -> None:
    """A table on a terminal (analysis.tables.<table>), JSON with --json or when the output is not a terminal."""
    if getattr(args, "json", False) or not sys.stdout.isatty():
        print(json.dumps(rep, indent=2))
    else:
        from analysis import tables

        print(getattr(tables, table)(rep))


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="JSON (the default when the output is not a terminal)")


# ---------------------------------------------------------------- models


def _models(sub) -> None:
    p = sub.add_parser("models", help="list, promote and roll back versions in the model repository", epilog=EPILOG)
    msub = p.add_subparsers(title="actions", metavar="ACTION")
    ls = msub.add_parser("list", help="versions with their metrics; which one serves")
    common(ls)
    json_flag(ls)
    ls.set_defaults(func=cmd_models_list)
    pr = msub.add_parser("promote", help="make VERSION the one the service serves, once it loads and runs",
                         description="Load VERSION with ONNX Runtime (CPU) and run it on batches of absent features, "
                         "as a service does before serving it: its metadata must carry this config's hash, model.onnx "
                         "its recorded checksum, and its outputs be finite and of the config's tasks. Only then is "
                         "it promoted.", epilog=EPILOG)
    common(pr)
    pr.add_argument("version", metavar="VERSION", help="a version number: 3 (or v3)")
    pr.set_defaults(func=cmd_models_promote)
    rb = msub.add_parser("rollback", help="promote the previously promoted version again, once it loads and runs")
    common(rb)
    rb.set_defaults(func=cmd_models_rollback)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def cmd_models_list(args) -> int:
    config = config_of(args)
    show(models_summary(repo_of(args, config)), args, "models_table")
    return 0


def version_number(v: str) -> int:
    """A version as `models promote` takes it: 3, or v3."""
    digits = v[1:] if v[:1] in ("v", "V") else v
    if not digits.isdigit() or int(digits) == 0:
        raise CliError("VERSION", f"expected a version number such as 3 (or v3), got {v!r}")
    return int(digits)


def check_promotable(config, repo: ModelRepository, version: int) -> None:
    """Load `version` and run it on the CPU, as a service would before serving it; CliError naming the version,
    the file and the reason when it cannot serve."""
    # torch-free (ONNX Runtime); the service imports only models_summary from this module
    from service.models import VersionRefused, load_version

    try:
        load_version(config, repo, version, device="cpu", threads=1)
    except VersionRefused as e:
        raise CliError("", f"version {version} cannot serve: {e}") from None  # VersionRefused names the file


def cmd_models_promote(args) -> int:
    config = config_of(args)
    repo = repo_of(args, config)
    version = version_number(args.version)
    if version not in repo.versions():
        raise CliError("VERSION", f"model {repo.name!r} has no version {version} (have: {repo.versions()})")
    check_promotable(config, repo, version)
    st = repo.promote(version)
    print(json.dumps({"promoted": st["promoted"]}))
    return 0


def cmd_models_rollback(args) -> int:
    config = config_of(args)
    repo = repo_of(args, config)
    target = repo.rollback_target()
    check_promotable(config, repo, target)
    st = repo.rollback()
    print(json.dumps({"promoted": st["promoted"]}))
    return 0


# ---------------------------------------------------------------- simulate


def _simulate(sub) -> None:
    p = sub.add_parser("simulate", help="a synthetic world: write history, or drive live traffic", epilog=EPILOG)
    ssub = p.add_subparsers(title="actions", metavar="ACTION")
    h = ssub.add_parser(
        "history",
        help="write time-ordered labelled examples from the synthetic world",
        description="Write N examples (JSON lines) from a world with latent tastes, position bias (a known "
        "examination probability by slot and device), clickbait (clicked but not liked) and drift. Slates are "
        "ordered by a noisy logging policy, so slot and relevance are confounded. Each line also carries `truth`: "
        "the world's probabilities (click_nopos: attraction; exam: examination of the slot shown).",
        epilog="See docs/position-bias.md.",
    )
    h.add_argument("--out", required=True, metavar="FILE")
    h.add_argument("--examples", type=int, default=100_000, metavar="N")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--users", type=int, help="number of users in the world")
    h.add_argument("--videos", type=int, help="number of videos in the world")
    h.add_argument("--policy-strength", type=float, default=1.0, metavar="S",
                   help="how strongly the logging policy orders slates by relevance (against Gumbel noise of scale "
                   "1): 0 = uniformly random slates, 1 = the default policy, larger = more confounded")
    h.add_argument("--explore-share", type=float, default=0.0, metavar="F",
                   help="share of requests logged with adjacent pairs swapped at random (lines carry propensity "
                   "and explore.rank), for estimating propensities; default 0")
    h.add_argument("--unbiased", action="store_true",
                   help="show every slate in uniformly random order: an unbiased test set")
    h.set_defaults(func=cmd_simulate_history)
    t = ssub.add_parser(
        "traffic",
        help="drive live traffic at a running service and send its feedback; print each arm's true outcomes",
        description="Users of the same world as `simulate history` (same --seed, --world-users, --world-videos) ask "
        "the service at --url for rankings, act by the world's truth with the position bias of the slots they were "
        "shown (dismiss, click, watch, like, survey rating) and send that feedback. At the end, per arm and model "
        "version the service reported: the world's expected click-through rate, watch time per impression, likes "
        "per click, dismiss rate and mean rating of what it showed, next to the realised values.",
        epilog="Only loopback URLs are accepted: simulated feedback becomes training data.",
    )
    t.add_argument("--url", default=os.environ.get("WATCHNEXT_URL"), required=not os.environ.get("WATCHNEXT_URL"),
                   help="the service, e.g. http://127.0.0.1:8000 (default $WATCHNEXT_URL)")
    t.add_argument("--users", type=int, default=100, metavar="N", help="users of the world who send requests (default 100)")
    t.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of traffic (default 60)")
    t.add_argument("--concurrency", type=int, default=4, metavar="C", help="clients sending at once (default 4)")
    t.add_argument("--seed", type=int, default=0, help="the world's seed (as for `simulate history`) and the users' draws")
    t.add_argument("--out", metavar="EVENTS.jsonl", help="write every impression's outcome (for `watchnext ab report --events`)")
    t.add_argument("--candidates", type=int, default=20, metavar="K", help="candidates per request (default 20)")
    t.add_argument("--top-k", type=int, default=10, metavar="K", help="items shown per request (default 10)")
    t.add_argument("--experiment", default="live", metavar="NAME",
                   help="experiment name written into events when the service's answer names none (default live)")
    t.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per-request timeout (default 10)")
    t.add_argument("--world-users", type=int, metavar="N", help="users in the world (as `simulate history --users`)")
    t.add_argument("--world-videos", type=int, metavar="N", help="videos in the world (as `simulate history --videos`)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    t.set_defaults(func=cmd_simulate_traffic)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def cmd_simulate_history(args) -> int:
    import math

    from simulation.world import WorldSpec, write_history

    if args.examples <= 0:
        raise CliError("--examples", f"must be > 0, got {args.examples}")
    for flag, v in (("--users", args.users), ("--videos", args.videos)):
        if v is not None and v <= 0:
            raise CliError(flag, f"must be > 0, got {v}")
    if not (math.isfinite(args.policy_strength) and args.policy_strength >= 0):
        raise CliError("--policy-strength", f"must be a finite number >= 0, got {args.policy_strength}")
    if not 0.0 <= args.explore_share <= 1.0:
        raise CliError("--explore-share", f"must be in [0, 1], got {args.explore_share}")
    if args.unbiased and args.explore_share > 0:
        raise CliError("--explore-share", "cannot be used with --unbiased (every slate is already in random order)")
    spec = WorldSpec(policy_strength=args.policy_strength, explore_share=args.explore_share)
    if args.users:
        spec.users = args.users
    if args.videos:
        spec.videos = args.videos
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(args.examples, "simulate history", unit="ex")
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w") as fh:
        n = write_history(fh, args.examples, args.seed, spec, progress=bar.update if bar else None,
                          unbiased=args.unbiased)
    os.replace(tmp, out)
    if bar:
        bar.close()
    print(json.dumps({"out": str(out), "examples": n, "seed": args.seed, "policy_strength": args.policy_strength,
                      "explore_share": args.explore_share, "unbiased": args.unbiased}))
    return 0


def cmd_simulate_traffic(args) -> int:
    import contextlib

    from simulation.traffic import Traffic, check_url, render_summary
    from simulation.world import World, WorldSpec

    check_url(args.url)  # before building the world (seconds); TrafficError names the flag
    for flag, v in (("--world-users", args.world_users), ("--world-videos", args.world_videos)):
        if v is not None and v <= 0:
            raise CliError(flag, f"must be > 0, got {v}")
    spec = WorldSpec()
    spec.users, spec.videos = args.world_users or spec.users, args.world_videos or spec.videos
    bar = progress_bar(args.duration, "simulate traffic", unit="s")
    if bar is not None:
        bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}"

    def on_progress(elapsed: float, st: dict) -> None:
        if bar is not None:
            bar.n = round(elapsed, 1)
            bar.set_postfix_str(f"{st['requests']:,} requests, {st['failed']:,} failed, {st['impressions']:,} impressions")

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(args.out, "w") if args.out else contextlib.nullcontext() as out:
            traffic = Traffic(World(spec, args.seed), args.url, args.users, args.duration, args.concurrency,
                              args.candidates, args.top_k, args.seed, args.timeout, args.experiment, out, on_progress)
            summary = traffic.run()
    finally:
        if bar is not None:
            bar.close()
    if args.out:
        summary["events"] = args.out
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary))
    if not summary["succeeded"]:
        print("watchnext: no ranking request succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
