"""The OpenAPI description of the request and response bodies, derived from the config.

The rank request's schema lists every feature with its type (ids, id lists,
numbers, fixed-length vectors), so clients and schemathesis see exactly what
the model reads. Sections also accept unknown keys: they are ignored and counted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from watchnext.config import Config, Feature
from watchnext.entities import key_feature

from .request import MAX_REQUEST_ID

ID = {"type": "string", "minLength": 1, "maxLength": MAX_REQUEST_ID}


def feature_schema(f: Feature) -> dict[str, Any]:
    if f.kind == "categorical":
        return {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}
    if f.kind == "categorical_list":
        return {"type": ["array", "null"], "items": {"type": "string"}}
    if f.kind == "numeric":
        s: dict[str, Any] = {"type": ["number", "null"]}
        if f.transform == "log1p":
            s["exclusiveMinimum"] = -1
        return s
    return {"type": ["array", "null"], "items": {"type": "number"}, "minItems": f.size, "maxItems": f.size}


def section_schema(config: Config, source: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    s: dict[str, Any] = {
        "type": "object",
        "properties": {f.name: feature_schema(f) for f in config.features if f.source == source},
        "additionalProperties": True,
    }
    if required:
        s["required"] = list(required)
        for r in required:
            s["properties"][r] = {"anyOf": [ID, {"type": "integer"}]}
    return s


def rank_request_schema(config: Config) -> dict[str, Any]:
    item = (config.item_id,) if config.item_id else ()
    return {
        "type": "object",
        "required": ["candidates"],
        "properties": {
            "request_id": ID,
            "user": section_schema(config, "user"),
            "query": section_schema(config, "query"),
            "context": section_schema(config, "context"),
            "candidates": {"type": "array", "items": section_schema(config, "candidate", item),
                           "maxItems": config.service.max_candidates},
            "top_k": {"type": "integer", "minimum": 1},
        },
    }


def feedback_event_schema(config: Config) -> dict[str, Any]:
    labels: dict[str, dict[str, Any]] = {}  # each task's JSON Schema
    for t in config.tasks:
        if t.kind == "binary":
            labels[t.name] = {"anyOf": [{"enum": [0, 1]}, {"type": "boolean"}, {"type": "null"}]}
        else:
            labels[t.name] = {"type": ["number", "null"], "minimum": t.range[0], "maximum": t.range[1]}
    return {
        "type": "object",
        "required": ["request_id", "item_id", "labels"],
        "properties": {
            "request_id": ID,
            "item_id": {"anyOf": [ID, {"type": "integer"}]},
            "labels": {"type": "object", "properties": labels, "additionalProperties": False},
        },
    }


def feedback_request_schema(config: Config, max_events: int) -> dict[str, Any]:
    ev = feedback_event_schema(config)
    return {"anyOf": [ev, {"type": "array", "items": ev, "minItems": 1, "maxItems": max_events}]}


def json_body(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def rank_example(config: Config) -> dict[str, Any]:
    """The production request: the user, the query video and the candidates by id (features from the store)."""
    ids = {s: key_feature(config, s) for s in ("user", "query", "candidate")}
    body: dict[str, Any] = {"request_id": "r-81"}
    if ids["user"]:
        body["user"] = {ids["user"]: "u17"}
    if ids["query"]:
        body["query"] = {ids["query"]: "v9"}
    body["candidates"] = [{ids["candidate"]: v} for v in ("v3", "v12", "v40")] if ids["candidate"] else []
    body["top_k"] = 2
    return body


def feedback_example(config: Config) -> dict[str, Any]:
    binary = [t.name for t in config.tasks if t.kind == "binary"]
    return {"request_id": "r-81", "item_id": "v12", "labels": {binary[0]: 1} if binary else {}}


def rank_body(config: Config) -> dict[str, Any]:
    """The rank request: JSON, or an Arrow IPC stream (one row per candidate, the rest as JSON in the schema's
    metadata under `request`; see docs/online-features.md)."""
    body = json_body(rank_request_schema(config), rank_example(config))
    body["requestBody"]["content"]["application/vnd.apache.arrow.stream"] = {
        "schema": {"type": "string", "format": "binary",
                   "description": "an Arrow IPC stream: a column per candidate feature, a row per candidate; "
                                  "request_id, user, query, context and top_k as a JSON object in the schema "
                                  "metadata under `request`"}}
    return body


# ---------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    field: str = Field(description="the part of the request at fault, e.g. candidates[3].video_age_days")
    reason: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class RankedItem(BaseModel):
    id: str
    score: float
    heads: dict[str, float] = Field(description="each task's prediction in its label's units")


class RankResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "r-81", "model_version": "3", "arm": "control", "experiment": None,
        "items": [{"id": "v12", "score": 0.93, "heads": {"click": 0.41, "watch_time": 95.2, "like": 0.52}},
                  {"id": "v3", "score": 0.71, "heads": {"click": 0.33, "watch_time": 60.1, "like": 0.40}}]}]})
    request_id: str
    model_version: str
    arm: str
    experiment: str | None = Field(None, description="the live experiment that assigned `arm` (null outside one)")
    items: list[RankedItem]


class Dropped(BaseModel):
    index: int
    request_id: str
    item_id: str
    reason: str


class FeedbackResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "accepted": 1, "dropped": [{"index": 1, "request_id": "r-80", "item_id": "v5", "reason": "unknown request"}]}]})
    accepted: int
    dropped: list[Dropped]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}
