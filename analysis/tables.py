"""Tables for people: `evaluate`, `compare` and `models list` on a terminal (`--json` keeps the machine form).

Each metric is shown with the way it is better: AUC and NDCG higher (0.5 is a coin's AUC), RMSE lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BETTER = {"auc": "higher (0.5: chance)", "rmse": "lower", "ndcg": "higher"}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns, a rule under the headers."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _metric(task: dict[str, Any]) -> tuple[str, Any]:
    return ("auc", task.get("auc")) if "auc" in task else ("rmse", task.get("rmse"))


def evaluation_table(rep: dict[str, Any]) -> str:
    rows = []
    for name, t in rep["tasks"].items():
        metric, value = _metric(t)
        rows.append([name, metric.upper(), _fmt(value), t.get("n"), BETTER[metric]])
    r = rep.get("ranking") or {}
    ndcg = next((k for k in r if k.startswith("ndcg")), None)
    if ndcg:
        rows.append(["ranking", ndcg.upper(), _fmt(r[ndcg]), r.get("requests"), BETTER["ndcg"]])
    head = f"model {rep['model']} version {rep['version']}: {rep['examples']:,} examples"
    if rep.get("bad_lines"):
        head += f", {rep['bad_lines']:,} bad lines skipped"
    return head + "\n\n" + table(["task", "metric", "value", "n", "better"], rows)


def compare_table(rep: dict[str, Any]) -> str:
    conf = rep["bootstrap"]["confidence"]
    rows = []
    for name, d in rep["differences"].items():
        metric = d["metric"].split("@")[0]
        lo, hi = d["ci"]
        better = BETTER[metric].split(" ")[0]
        wins = None
        if lo is not None and hi is not None:
            up = lo > 0  # B - A above zero: B's metric is larger
            down = hi < 0
            wins = ("B" if (up and better == "higher") or (down and better == "lower") else
                    "A" if (down and better == "higher") or (up and better == "lower") else "neither")
        rows.append([name, d["metric"].upper(), _fmt(d["a"]), _fmt(d["b"]), _fmt(d["diff"]),
                     f"[{_fmt(lo)}, {_fmt(hi)}]", better, wins])
    head = (f"model {rep['model']}: A = version {rep['a']['version']}, B = version {rep['b']['version']} on "
            f"{rep['examples']:,} examples ({rep['requests']:,} requests); {conf:.0%} intervals from "
            f"{rep['bootstrap']['replicates']:,} bootstrap replicates over requests")
    return head + "\n\n" + table(["task", "metric", "A", "B", "B - A", f"{conf:.0%} interval", "better", "wins"],
                                 rows) + "\n\nwins: the interval excludes no difference in that direction"


def models_table(summary: dict[str, Any]) -> str:
    tasks: list[str] = []
    for v in summary["versions"]:
        for t in v.get("metrics") or {}:
            if t not in tasks:
                tasks.append(t)
    rows = []
    for v in summary["versions"]:
        if "error" in v:
            rows.append([v["version"], "damaged: " + v["error"]] + [""] * (len(tasks) + 3))
            continue
        mark = "serving" if v["serving"] else ""
        rows.append([v["version"], v.get("created_at") or "-", v.get("examples"), v.get("parent")]
                    + [_fmt((v.get("metrics") or {}).get(t)) for t in tasks] + [mark])
    head = f"model {summary['model']}: promoted {summary['promoted'] or '-'}, serving {summary['serving'] or '-'}"
    if summary.get("state_error"):
        head += f" ({summary['state_error']})"
    note = ("\n\neach task's progressive metric at export: AUC (higher is better, 0.5 is chance) for binary "
            "tasks, RMSE (lower is better) for the others")
    return head + "\n\n" + table(["version", "created", "examples", "parent", *tasks, ""], rows) + note
