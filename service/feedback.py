"""POST /v1/feedback bodies: one event or a list, each checked field by field."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from watchnext.config import Config
from watchnext.label_checks import label_problems

from .errors import BadRequest
from .request import MAX_REQUEST_ID

MAX_EVENTS = 1000


def parse_json(body: bytes) -> Any:
    """JSON bytes -> Python; NaN/Infinity literals parse here and are refused where they are used."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise BadRequest("body", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", status=400) from None
    except UnicodeDecodeError:
        raise BadRequest("body", "not valid UTF-8", status=400) from None
    except RecursionError:
        raise BadRequest("body", "nested too deeply", status=400) from None


def ident(v: Any, field: str, required: bool = True) -> str | None:
    """A request or item id: a non-empty string (integers are accepted and read as strings)."""
    if v is None:
        if required:
            raise BadRequest(field, "is required")
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise BadRequest(field, f"expected a string id, got {type(v).__name__}")
    if not 0 < len(v) <= MAX_REQUEST_ID:
        raise BadRequest(field, f"must be 1 to {MAX_REQUEST_ID} characters, got {len(v)}")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escape decodes to a lone surrogate
            raise BadRequest(field, f"not valid Unicode (a lone surrogate at character {e.start})") from None
    return v


def parse_feedback(body: bytes, config: Config, max_events: int = MAX_EVENTS) -> list[dict[str, Any]]:
    """[{request_id, item_id, labels}] with labels checked against the config's tasks."""
    obj = parse_json(body)
    single = isinstance(obj, dict)
    events = [obj] if single else obj
    if not isinstance(events, list):
        raise BadRequest("body", f"expected an object or a list of objects, got {type(obj).__name__}")
    if not events:
        raise BadRequest("body", "expected at least one feedback event")
    if len(events) > max_events:
        raise BadRequest("body", f"at most {max_events} feedback events per request, got {len(events)}", status=413)
    tasks = {t.name: t for t in config.tasks}
    out = []
    found: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in tasks}  # event index, value
    for i, ev in enumerate(events):
        at = "" if single else f"[{i}]."
        if not isinstance(ev, dict):
            raise BadRequest(f"[{i}]", f"expected an object, got {type(ev).__name__}")
        rid = ident(ev.get("request_id"), f"{at}request_id")
        item = ident(ev.get("item_id"), f"{at}item_id")
        labels = ev.get("labels")
        if not isinstance(labels, dict):
            raise BadRequest(f"{at}labels", "is required: an object of task name -> label")
        clean: dict[str, float] = {}
        for name, v in labels.items():
            where = f"{at}labels.{name}"
            t = tasks.get(name)
            if t is None:
                raise BadRequest(where, f"not a task (tasks: {', '.join(tasks)})")
            if v is None:
                continue
            if isinstance(v, bool) and t.kind == "binary":
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadRequest(where, f"expected a number, got {type(v).__name__}")
            try:
                clean[name] = float(v)
            except OverflowError:  # an integer past float64
                raise BadRequest(where, "must be a finite number") from None
            found[name][0].append(i)
            found[name][1].append(clean[name])
        out.append({"request_id": rid, "item_id": item, "labels": clean})
    _check_values(config, found, single)
    return out


def _check_values(config: Config, found: dict[str, tuple[list[int], list[float]]], single: bool) -> None:
    """Label values against their task's range, one array per task; the first refused (by event) is named."""
    first: tuple[int, str, str] | None = None
    for t in config.tasks:
        index, values = found[t.name]
        for rows, reason in label_problems(t, np.array(values, dtype=np.float64)):
            k = int(np.argmax(rows))
            if first is None or index[k] < first[0]:
                first = (index[k], t.name, f"{reason}, got {values[k]!r}")
    if first is not None:
        i, name, reason = first
        raise BadRequest(f"{'' if single else f'[{i}].'}labels.{name}", reason)
