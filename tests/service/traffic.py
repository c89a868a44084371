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


def arrow_body(req: dict, config=None) -> bytes:
    """A request as an Arrow IPC stream: one row per candidate, the rest in the schema's metadata. With `config`
    every candidate feature is a column of its type (null where a candidate lacks it); without, the columns are
    the first candidate's keys, of the types Arrow infers."""
    import pyarrow as pa

    from watchnext.encoding import section_type

    if config is not None:
        table = pa.Table.from_struct_array(pa.array(req["candidates"], type=section_type(config, "candidate")))
    else:
        table = pa.Table.from_pylist(req["candidates"])
    head = {k: v for k, v in req.items() if k != "candidates"}
    table = table.replace_schema_metadata({"request": json.dumps(head)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()
