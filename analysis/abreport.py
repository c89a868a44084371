"""The A/B report's inputs and outputs: event logs in, a terminal table out (the chart: analysis.chart).

An event log is JSON lines, one labelled impression each: the training example
of docs/examples.md plus the experiment, the arm and the version that served it::

    {"ts": 1767225600.5, "experiment": "sat", "arm": "satisfaction", "model_version": 7,
     "user": {"user_id": "u17"}, "labels": {"click": 1, "watch_time": 81.0, "like": null}}

(`user_id` may also sit at the top level.) Other keys are ignored. The service
builds the same arrays from its joined impressions with `events_from_records`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from analysis.abstats import METRICS, Events
from analysis.tables import table
from watchnext.examples import DataError
from watchnext.experiments import Experiment

LABELS = tuple(dict.fromkeys(m.label for m in METRICS))
_SCHEMA = pa.schema([
    ("ts", pa.float64()),
    ("experiment", pa.string()),
    ("arm", pa.string()),
    ("user_id", pa.string()),
    ("user", pa.struct([("user_id", pa.string())])),
    ("labels", pa.struct([(name, pa.float64()) for name in LABELS])),
])


def events_from_table(table: pa.Table, experiment: Experiment | None) -> tuple[Events, dict[str, int]]:
    """Columns ts, arm, experiment, user_id or user.user_id, labels.* -> Events, and counts of dropped rows.

    With `experiment`: its rows only, arms by name. Without (a pre-period): every row, arm 0.
    """
    n = table.num_rows
    cols = set(table.column_names)
    table = pa.table({c: table[c].combine_chunks() for c in table.column_names}) if n else table
    dropped = {"other_experiment": 0, "unknown_arm": 0, "no_user": 0, "no_ts": 0}
    user = table["user_id"] if "user_id" in cols else pa.nulls(n, pa.string())
    if "user" in cols:
        user = pc.coalesce(user, pc.struct_field(table["user"], "user_id"))
    keep = np.ones(n, bool)
    arm = np.zeros(n, np.int64)
    if experiment is not None:
        exp_col = table["experiment"] if "experiment" in cols else pa.nulls(n, pa.string())
        mine = pc.fill_null(pc.equal(exp_col, experiment.name), False).to_numpy(zero_copy_only=False)
        dropped["other_experiment"] = int((~mine).sum())
        idx = pc.index_in(table["arm"] if "arm" in cols else pa.nulls(n, pa.string()),
                          value_set=pa.array(experiment.arm_names()))
        known = pc.is_valid(idx).to_numpy(zero_copy_only=False)
        dropped["unknown_arm"] = int((mine & ~known).sum())
        keep &= mine & known
        arm = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    has_user = pc.is_valid(user).to_numpy(zero_copy_only=False)
    dropped["no_user"] = int((keep & ~has_user).sum())
    keep &= has_user
    ts = pc.fill_null(table["ts"], np.nan).to_numpy(zero_copy_only=False) if "ts" in cols else np.full(n, np.nan)
    dropped["no_ts"] = int((keep & ~np.isfinite(ts)).sum())
    keep &= np.isfinite(ts)
    labels = {}
    if "labels" in cols:
        lab = table["labels"].combine_chunks()
        for i in range(lab.type.num_fields):
            name = lab.type.field(i).name
            if name in LABELS:
                v = pc.struct_field(lab, name).cast(pa.float64())
                labels[name] = pc.fill_null(v, np.nan).to_numpy(zero_copy_only=False)
    users = np.asarray(user.to_numpy(zero_copy_only=False), dtype=object)
    ev = Events(users[keep].astype(str), arm[keep], ts[keep], {k: v[keep] for k, v in labels.items()})
    return ev, dropped


def events_from_records(records: Sequence[dict[str, Any]], experiment: Experiment | None) -> tuple[Events, dict[str, int]]:
    """The same from decoded event dicts (the service's joined impressions); unknown keys are ignored."""
    try:
        table = pa.Table.from_pylist(list(records), schema=_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError("events", str(e)) from None
    return events_from_table(table, experiment)


def read_events(paths: Sequence[str | Path], experiment: Experiment | None,
                before: float | None = None) -> tuple[Events, dict[str, int]]:
    """Events of `experiment` from JSON-lines logs (None: all of them, for a pre-period).

    `before` keeps only events earlier than this time (a pre-period ends where the experiment starts).
    """
    tables = []
    opts = pj.ParseOptions(explicit_schema=_SCHEMA, unexpected_field_behavior="ignore")
    for p in paths:
        data = Path(p).read_bytes()
        if not data.strip():
            continue
        try:
            tables.append(pj.read_json(pa.BufferReader(data), parse_options=opts,
                                       read_options=pj.ReadOptions(block_size=1 << 24)))
        except pa.ArrowInvalid as e:
            raise DataError(str(p), f"not a JSON-lines event log: {e}") from None
    table = pa.concat_tables(tables) if tables else _SCHEMA.empty_table()
    ev, dropped = events_from_table(table, experiment)
    if before is not None:
        late = ev.ts >= before
        dropped["after_start"] = int(late.sum())
        ev = ev.select(~late)
    return ev, dropped


# ---------------------------------------------------------------- terminal table


def _fmt(v: float | None, digits: int = 4, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    mag = abs(v)
    s = f"{v:+.{digits}g}" if sign else f"{v:.{digits}g}"
    return s if mag < 1e5 else (f"{v:+,.0f}" if sign else f"{v:,.0f}")


def render_table(rep: dict[str, Any]) -> str:
    """A plain-text report: header, SRM line, one row per metric with every arm and each difference."""
    conf = round(rep["confidence"] * 100)
    arms = rep["arms"]
    lines = [f"experiment {rep['experiment']}: {rep['users']:,} users, {rep['impressions']:,} impressions; "
             f"unit: user; {conf}% intervals" + ("; differences CUPED-adjusted" if rep.get("cuped") else "")]
    srm = rep["srm"]
    obs = " / ".join(f"{a['name']} {a['users']:,}" for a in arms)
    exp = " / ".join(f"{s:.1%}" for s in srm["expected_shares"])
    p = "-" if srm["p_value"] is None else f"{srm['p_value']:.3g}"
    verdict = "FLAGGED: the split is broken, do not trust the differences" if srm["flagged"] else "ok"
    lines.append(f"sample ratio: {obs} (expected {exp}), chi-square p = {p}: {verdict}")
    if rep.get("users_in_several_arms"):
        lines.append(f"warning: {rep['users_in_several_arms']:,} users appear in more than one arm")
    head = ["metric"] + [f"{a['name']}" + (f" (v{a['version']})" if a.get("version") else "") for a in arms]
    head += [f"{d['name']} - {arms[0]['name']}" for d in rep["differences"]]
    rows = [head]
    for key, title in rep["metrics"].items():
        row = [title]
        for a in arms:
            m = a["metrics"][key]
            half = None if m["ci"][0] is None else (m["ci"][1] - m["ci"][0]) / 2
            row.append(_fmt(m["estimate"]) + ("" if half is None else f" ±{_fmt(half, 2)}"))
        for d in rep["differences"]:
            m = d["metrics"][key]
            lo, hi = m["ci"]
            rel = "" if m["relative"] is None else f" {m['relative']:+.1%}"
            pv = "-" if m["p_value"] is None else f"{m['p_value']:.3g}"
            if m["diff"] is None:
                row.append("-")
                continue
            row.append(f"{_fmt(m['diff'], 3, True)} [{_fmt(lo, 3, True)}, {_fmt(hi, 3, True)}]{rel} p={pv}"
                       + (" *" if m["significant"] else ""))
        rows.append(row)
    lines.append(table(rows[0], rows[1:]))
    lines.append(f"* p < {1 - rep['confidence']:.2g} (two-sided)")
    lines.append(f"columns: each arm's estimate of the metric (per impression, per click or per answer, as named) "
                 f"± the half-width of its {conf}% interval, computed over users; then each arm's "
                 f"difference from {arms[0]['name']}: [{conf}% interval], relative change, p-value")
    return "\n".join(lines)
