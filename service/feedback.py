"""POST /v1/feedback bodies: one event or a list, each checked field by field."""

from __future__ import annotations

import json
import math
from typing import Any

from watchnext.config import Config

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
            if t.kind == "binary":
                if v not in (0, 1) or isinstance(v, float) and not v.is_integer():
                    raise BadRequest(where, f"a binary label must be 0, 1, true or false, got {v!r}")
                clean[name] = float(v)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadRequest(where, f"expected a number, got {type(v).__name__}")
            if not math.isfinite(v):
                raise BadRequest(where, "must be a finite number")
            if t.transform == "log1p" and v <= -1:
                raise BadRequest(where, f"must be > -1 (transform log1p), got {v}")
            clean[name] = float(v)
        out.append({"request_id": rid, "item_id": item, "labels": clean})
    return out
