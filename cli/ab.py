"""`watchnext compare` and `watchnext ab ...` (docs/configuration.md), registered into cli.main.

`ab report` works offline from an event log. Actions that talk to a running
service (`ab create`, `ab stop`, ...) are added by appending a function to
`AB_ACTIONS`; each is called with the `ab` subparsers when the parser is built.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AB_ACTIONS: list[Callable[[Any], None]] = []


def register(sub) -> None:
    _compare(sub)
    _ab(sub)


# ---------------------------------------------------------------- compare


def _compare(sub) -> None:
    from cli.main import EPILOG, common, json_flag

    p = sub.add_parser(
        "compare",
        help="two versions side by side on the same examples, with confidence intervals on the differences",
        description="Score example files with versions A and B; print per-task AUC (binary) / RMSE (regression) "
        "and NDCG@10 of the combined score for each, and B - A with a paired bootstrap interval that resamples "
        "requests, as JSON.",
        epilog=EPILOG,
    )
    common(p)
    p.add_argument("a", metavar="A", help="version number, 'serving' or 'latest' (the baseline)")
    p.add_argument("b", metavar="B", help="version number, 'serving' or 'latest' (the candidate)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="example files (JSON lines or Parquet)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="bootstrap seed (default 0)")
    p.add_argument("--confidence", type=float, default=0.95, metavar="C", help="interval level (default 0.95)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    json_flag(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from analysis.compare import compare
    from cli.main import CliError, config_of, repo_of, show, version_arg

    for f in args.data:
        if not Path(f).is_file():
            raise CliError(f"--data {f}", "no such file")
    if args.bootstrap < 10:
        raise CliError("--bootstrap", f"expected at least 10 replicates, got {args.bootstrap}")
    if not 0 < args.confidence < 1:
        raise CliError("--confidence", f"expected a number in (0, 1), got {args.confidence}")
    config = config_of(args)
    repo = repo_of(args, config)
    a, b = version_arg(repo, args.a, "A"), version_arg(repo, args.b, "B")
    out = compare(config, repo, a, b, args.data, args.bootstrap, args.seed, args.confidence, args.device)
    show(out, args, "compare_table")
    return 0


# ---------------------------------------------------------------- ab


def _ab(sub) -> None:
    from cli.main import EPILOG

    p = sub.add_parser("ab", help="A/B experiments: reports (and, with a running service, create and stop)",
                       epilog=EPILOG)
    asub = p.add_subparsers(title="actions", metavar="ACTION")
    r = asub.add_parser(
        "report",
        help="per-arm metrics with user-level 95%% intervals, differences from the control, SRM check",
        description="Report an experiment from a JSON-lines event log (labelled impressions carrying "
        "`experiment` and `arm`): per arm users, impressions, click-through rate, watch time per impression, "
        "like rate, dismiss rate and mean survey rating with intervals that treat the user as the unit; each "
        "arm's difference from the control (the first arm) with its interval and p-value; a sample-ratio-mismatch "
        "check; CUPED when --pre gives a pre-period log.",
    )
    r.add_argument("name", metavar="NAME", help="the experiment (events of other experiments are skipped)")
    r.add_argument("--events", nargs="+", metavar="FILE",
                   help="event logs (JSON lines); or --url to ask a running service")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--experiment", metavar="FILE", help="the experiment's definition (JSON: name, salt, arms)")
    src.add_argument("--arms", metavar="NAME=SHARE,...", help="arms and shares instead, the control first")
    r.add_argument("--pre", nargs="+", metavar="FILE", help="pre-period logs of the same users (for CUPED)")
    r.add_argument("--confidence", type=float, default=0.95, metavar="C", help="interval level (default 0.95)")
    r.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    r.add_argument("--chart", metavar="PNG", help="write each metric's cumulative estimate over time per arm")
    r.add_argument("--points", type=int, default=24, metavar="N", help="time points in the chart (default 24)")
    r.set_defaults(func=cmd_ab_report)
    for action in AB_ACTIONS:
        action(asub)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def experiment_of(args) -> Any:
    from cli.main import CliError
    from watchnext.experiments import Experiment, ExperimentError

    src = f"--experiment {args.experiment}" if args.experiment else "--arms"
    try:
        if args.experiment:
            try:
                text = Path(args.experiment).read_text()
            except OSError as e:
                raise CliError(src, f"cannot be read: {e.strerror or e}") from None
            exp = Experiment.from_json(text)
            if exp.name != args.name:
                raise CliError(src, f"defines {exp.name!r}, not {args.name!r}")
            return exp
        if args.arms:
            arms = []
            for i, part in enumerate(args.arms.split(",")):
                name, eq, share = part.partition("=")
                try:
                    arms.append({"name": name.strip(), "share": float(share)})
                except ValueError:
                    raise CliError("--arms", f"item {i + 1} ({part!r}): expected NAME=SHARE") from None
                if not eq:
                    raise CliError("--arms", f"item {i + 1} ({part!r}): expected NAME=SHARE")
            return Experiment.from_dict({"name": args.name, "arms": arms})
    except ExperimentError as e:  # the definition's field, inside the flag's file or list
        raise CliError(f"{src}: {e.field}", e.reason) from None
    raise CliError("", "ab report: give the experiment's arms with --experiment FILE (its JSON definition) "
                   "or --arms NAME=SHARE,... (the control first)")


def cmd_ab_report(args) -> int:
    from analysis.abreport import read_events
    from analysis.abstats import report, timeseries
    from analysis.chart import write_chart
    from cli.main import CliError

    if not args.events:
        raise CliError("", "ab report: give --events FILE... (an event log) or --url URL (a running service)")
    exp = experiment_of(args)
    for f in args.events + (args.pre or []):
        if not Path(f).is_file():
            raise CliError(f, "no such file")
    if not 0 < args.confidence < 1:
        raise CliError("--confidence", f"expected a number in (0, 1), got {args.confidence}")
    events, dropped = read_events(args.events, exp)
    if not len(events):
        raise CliError(", ".join(args.events), f"no events of experiment {exp.name!r} "
                       f"(skipped: {', '.join(f'{k} {v}' for k, v in dropped.items() if v) or 'none'})")
    pre = None
    if args.pre:
        pre, _ = read_events(args.pre, None, before=exp.created_at if exp.created_at else float(events.ts.min()))
    rep = report(exp, events, pre, args.confidence)
    rep["skipped_events"] = dropped
    if args.chart:
        path = write_chart(timeseries(exp, events, args.points, args.confidence), args.chart, f"experiment {exp.name}")
        rep["chart"] = str(path)
    print_report(rep, args.json)
    skipped = {k: v for k, v in dropped.items() if v and k != "other_experiment"}
    if skipped:
        print(f"watchnext: skipped events: {', '.join(f'{k} {v:,}' for k, v in skipped.items())}", file=sys.stderr)
    if rep["srm"]["flagged"]:
        print("watchnext: warning: sample ratio mismatch (p < 0.001): the split is broken; "
              "do not trust the differences", file=sys.stderr)
    return 0


def print_report(rep: dict, as_json: bool) -> None:
    """A report on stdout: JSON, or the table (and where its chart was written)."""
    from analysis.abreport import render_table

    if as_json:
        print(json.dumps(rep, indent=2))
    else:
        print(render_table(rep))
        if rep.get("chart"):
            print(f"chart: {rep['chart']}")
