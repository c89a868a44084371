"""The A/B report's chart: a PNG with one panel per metric (matplotlib, Agg backend: no display needed).

Apart from the rest of analysis/ so that the service, which serves reports as JSON and text, never
imports matplotlib (an import-linter contract checks it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def write_chart(series: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A PNG: one panel per metric, each arm's cumulative estimate over time with its interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(series["metrics"])
    cols = 2
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(11, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    t = np.asarray(series["ts"], np.float64)
    hours = (t - t[0]) / 3600.0 if len(t) else t
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        s = series["metrics"][name]
        for i, arm in enumerate(series["arms"]):
            est = np.array(s["estimate"][i], dtype=np.float64)
            lo, hi = np.array(s["lo"][i], dtype=np.float64), np.array(s["hi"][i], dtype=np.float64)
            (line,) = ax.plot(hours, est, label=arm, lw=1.6)
            ax.fill_between(hours, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(series.get("titles", {}).get(name, name), fontsize=10)
        ax.set_xlabel("hours since the first event")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
