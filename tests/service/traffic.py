"""Rank requests built from simulated history (the slates the simulated world served)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path


def rank_requests(history: Path, n: int, top_k: int | None = None) -> list[dict]:
    """The first `n` slates of a history file as rank requests (docs/api.md)."""
    out: list[dict] = []
    with open(history) as fh:
        rows = (json.loads(line) for line in fh)
        for rid, group in itertools.groupby(rows, key=lambda r: r["request_id"]):
            g = list(group)
            req = {"request_id": rid, "user": g[0]["user"], "query": g[0]["query"], "context": g[0]["context"],
                   "candidates": [r["candidate"] for r in g]}
            if top_k is not None:
                req["top_k"] = top_k
            out.append(req)
            if len(out) == n:
                break
    return out


def candidates_pool(history: Path, n: int) -> list[dict]:
    """`n` distinct candidates from a history file."""
    seen: dict[str, dict] = {}
    with open(history) as fh:
        for line in fh:
            c = json.loads(line)["candidate"]
            seen.setdefault(c["video_id"], c)
            if len(seen) == n:
                break
    return list(seen.values())
