"""The A/B report's chart: a PNG with one panel per metric (matplotlib, Agg backend: no display needed).

Apart from the rest of analysis/ so that the service, which serves reports as JSON and text, never
imports matplotlib (an import-linter contract checks it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def time_unit(span_s: float) -> tuple[float, str]:
    """Seconds for a demo, minutes for an afternoon, hours past that, days for a real experiment."""
    for limit, scale, unit in ((180, 1.0, "seconds"), (3 * 3600, 60.0, "minutes"), (3 * 86400, 3600.0, "hours")):
        if span_s <= limit:
            return scale, unit
    return 86400.0, "days"


def panels(series: dict[str, Any]) -> list[str]:
    """The metrics to draw: one no arm has an estimate of yet (no survey answer so far) gets no panel rather than
    an empty one."""
    return [n for n, s in series["metrics"].items() if any(x is not None for row in s["estimate"] for x in row)]


def write_chart(series: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A PNG: one panel per metric, each arm's cumulative estimate over time with its interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = panels(series)
    cols = 2 if len(names) > 1 else 1
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(11 if cols == 2 else 6, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    t = np.asarray(series["ts"], np.float64)
    since = t - series.get("start", t[0] if len(t) else 0.0)
    scale, unit = time_unit(float(since.max()) if len(since) else 0.0)
    level = f"{series.get('confidence', 0.95):.0%}"
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        s = series["metrics"][name]
        for i, arm in enumerate(series["arms"]):
            est = np.array(s["estimate"][i], dtype=np.float64)
            lo, hi = np.array(s["lo"][i], dtype=np.float64), np.array(s["hi"][i], dtype=np.float64)
            (line,) = ax.plot(since / scale, est, label=f"{arm}", lw=1.6)
            ax.fill_between(since / scale, lo, hi, color=line.get_color(), alpha=0.2, lw=0,
                            label=f"{arm}: {level} interval")
        ax.set_title(f"{series.get('titles', {}).get(name, name)} (cumulative)", fontsize=10)
        ax.set_xlabel(f"{unit} since the experiment's first event")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
