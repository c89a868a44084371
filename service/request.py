"""A rank request, from body bytes to one checked `RankInput`: one decoder per content type.

- `application/json` (the contract): msgspec decodes the body against types built
  from the config, in one C pass: each candidate is an object whose `[item] id`
  is required and whose features have their types (ids are strings or integers,
  numbers are numbers, lists hold no null). The user, query and context sections
  are small and are checked feature by feature (`clean_section`, as the trainer
  checks an example). The production request, whose candidates name only their
  ids, is tried first against a narrower type of the same decoder (structs, no
  dict per candidate); any body that type does not take is answered by the full
  type, so both give every body the same answer (tests/service/test_rank.py).
- `application/vnd.apache.arrow.stream`: an Arrow IPC stream with one row per
  candidate, a column per candidate feature, and the rest of the request (the
  JSON object without `candidates`) in the schema's metadata under `request`.
  For clients that hold their candidates' features as columns already.

The values then go through the trainer's own encoder (`Encoder.encode_columns`),
whose checks (finite, float32 range, log1p's domain, vector length) name the
field and the candidate. Each odd body has one answer, whatever else it holds:

    not JSON, not UTF-8, NaN / Infinity literals, a lone surrogate escape   400 body
    nested deeper than the decoder's recursion allows (about 900 levels)    400 body: nested too deeply
    a wrong type where a feature is read (a boolean for a number, null
    inside a list, a string for a vector), a number past float64 (1e400)    422 naming the field
    a number past float32, NaN or inf in an Arrow column, a wrong length    422 naming the field
    an integer id of any size                                               read as its decimal string
    an integer where a number is read                                       the nearest float64

Unknown keys are ignored (those of the user, query and context sections are
counted in `watchnext_unknown_features_total`).
"""

from __future__ import annotations

import operator
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Required, TypedDict

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from watchnext.config import Config, Feature
from watchnext.encoding import hash_ids, section_type, string_buffers
from watchnext.examples import DataError, clean_section

from .errors import BadRequest, PayloadTooLarge
from .features import pick

SHARED = ("user", "query", "context")
MAX_REQUEST_ID = 128
ARROW_STREAM = "application/vnd.apache.arrow.stream"
FEW_ROWS = 64  # `RankInput.ids_at` reads up to this many ids from an Arrow column's buffers itself
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")

Id = str | int
_HEAD = [  # the request's fields beside its candidates
    ("request_id", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID)] | int | None, None),
    ("user", dict[str, Any] | None, None),
    ("query", dict[str, Any] | None, None),
    ("context", dict[str, Any] | None, None),
    ("top_k", Annotated[int, msgspec.Meta(ge=1)] | None, None),
]


@dataclass
class RankInput:
    """A checked rank request."""

    request_id: str
    shared: dict[str, dict[str, Any]]  # cleaned user / query / context values
    top_k: int
    n: int  # candidates
    # the candidates' ids ([item] id; None when the config names none): a list from a JSON body; from an Arrow
    # body the column itself (its 500 strings as Python objects took 54-64 us after a 3 ms sleep and an ONNX
    # Runtime call, 2026-12-04, 22:50; `ids_at` takes the rows asked for)
    ids: list[str] | pa.StringArray | None
    candidates: pa.StructArray | None  # (n,) the features sent with the candidates; None: they name ids only
    unknown_features: int
    # an Arrow body's ids, hashed as they were checked for repeats: their embedding rows (the encoder's
    # `hashed`; None for a JSON body), and the column's (offsets, bytes) that `ids_at` reads
    id_rows: np.ndarray | None = None
    id_buffers: tuple[np.ndarray, Any] | None = None

    def ids_at(self, rows: np.ndarray) -> list[str]:
        """The ids of candidates `rows` (of a request with ids)."""
        assert self.ids is not None
        if isinstance(self.ids, list):
            return pick(self.ids, rows)
        if len(rows) > FEW_ROWS:
            return self.ids.take(rows).to_pylist()
        # the top k: each id read from the column's buffers, without Arrow's `take` (20 ids after a 3 ms sleep and
        # an ONNX Runtime call, its code and tables out of the caches: 0.18-0.20 ms by `take`, 0.05-0.06 ms this
        # way; 2026-12-04, 22:50)
        offsets, data = self.id_buffers or string_buffers(self.ids)
        view = memoryview(data)
        return [str(view[lo:hi], "utf-8") for lo, hi in zip(offsets[rows].tolist(), offsets[rows + 1].tolist())]


def _value_type(f: Feature) -> Any:
    if f.kind == "categorical":
        return Id | None
    if f.kind == "categorical_list":
        return list[Id] | None
    if f.kind == "numeric":
        return float | None
    return list[float] | None


def _request_type(config: Config) -> type:
    """The msgspec type of a JSON rank request for this config."""
    fields: dict[str, Any] = {}
    for f in config.features:
        if f.source == "candidate":
            t = _value_type(f)
            fields[f.name] = Required[Id] if f.name == config.item_id else t
    candidate = TypedDict("Candidate", fields, total=False)  # type: ignore[misc]
    return msgspec.defstruct("RankBody", [("candidates", list[candidate]), *_HEAD])


def _ids_type(config: Config) -> type | None:
    """The production request's type: candidates that name their id (a string) and nothing else. Structs without
    garbage-collector tracking: no dict per candidate (after ONNX Runtime has run, decoding 500 ids this way took
    0.09-0.14 ms against 0.3-0.5 ms for dicts). None without an [item] id."""
    if config.item_id is None:
        return None
    candidate = msgspec.defstruct("IdOnly", [(config.item_id, str)], forbid_unknown_fields=True, gc=False)
    # a struct built at run time: mypy takes `list[candidate]` for a type expression naming a variable
    return msgspec.defstruct("RankIds", [("candidates", list[candidate]), *_HEAD])  # type: ignore[valid-type]


def _head_type() -> type:
    """The Arrow body's `request` metadata: the JSON request without candidates."""
    return msgspec.defstruct("RankHead", _HEAD)


def _decode(decoder: msgspec.json.Decoder, body: bytes, prefix: str = "") -> Any:
    """msgspec's decode, its errors as BadRequest naming the field (msgspec says `$.candidates[3].x`)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        msg = str(e)
        reason, _, path = msg.partition(" - at `$")
        path = path.rstrip("`").lstrip(".")
        missing = re.match(r"Object missing required field `(.+)`", reason)
        if missing:
            path, reason = f"{path}.{missing[1]}".lstrip(".").replace(".[", "["), "is required"
        field = (prefix + path) if path else (prefix.rstrip(".") or "body")
        raise BadRequest(field, reason[:1].lower() + reason[1:]) from None
    except msgspec.DecodeError as e:
        reason = str(e)
        if _SURROGATE.search(body):  # msgspec says "truncated" for a lone one
            reason += " (a \\ud800-\\udfff escape must be half of a surrogate pair)"
        raise BadRequest(prefix.rstrip(".") or "body", f"not valid JSON: {reason}", status=400) from None
    except RecursionError:
        raise BadRequest(prefix.rstrip(".") or "body", "nested too deeply", status=400) from None


class RequestCodec:
    """Parses rank requests for one config into `RankInput`s."""

    def __init__(self, config: Config):
        self.config = config
        self.item_id = config.item_id
        svc = config.service
        self.max_candidates, self.default_top_k = svc.max_candidates, svc.default_top_k
        self.candidate_type = section_type(config, "candidate")
        self.schema = pa.schema(list(self.candidate_type))  # an Arrow body of exactly these columns and types
        self._list_columns = [i for i, f in enumerate(self.candidate_type) if pa.types.is_list(f.type)]
        # the item id feature's buckets (a categorical: the config says so): an Arrow body's ids are hashed once
        self._id_buckets = config.feature(config.item_id).buckets if config.item_id else 0
        self.candidate_features = [f for f in config.features if f.source == "candidate"]
        self.known = {s: frozenset(f.name for f in config.features if f.source == s) for s in (*SHARED, "candidate")}
        # the request types are built from the config at run time: what they decode is Any to the type checker
        self.json_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_request_type(config))
        ids_type = _ids_type(config)
        self.ids_decoder: msgspec.json.Decoder[Any] | None = (
            msgspec.json.Decoder(ids_type) if ids_type is not None else None)
        self.head_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_head_type())
        self._id_of = operator.itemgetter(self.item_id) if self.item_id else None
        self._id_attr = operator.attrgetter(self.item_id) if self.item_id else None

    def parse(self, body: bytes, content_type: str | None = None) -> RankInput:
        """Check a rank request; raises BadRequest naming the field."""
        if content_type and content_type.split(";")[0].strip().lower() == ARROW_STREAM:
            return self.parse_arrow(body)
        return self.parse_json(body)

    # ------------------------------------------------------------ JSON
    def parse_json(self, body: bytes) -> RankInput:
        req = self._ids_only(body)
        only_ids = req is not None
        if only_ids:
            assert self._id_attr is not None  # ids_decoder, and so a request of ids only, needs an [item] id
            cands, ids = req.candidates, list(map(self._id_attr, req.candidates))
        else:
            req = _decode(self.json_decoder, body)
            cands, ids = req.candidates, None
            if self._id_of is not None:
                ids = list(map(self._id_of, cands))
                if int in set(map(type, ids)):
                    ids = list(map(str, ids))
        n = len(cands)
        self._check_count(n)
        head, unknown = self._head(req)
        if ids is not None and n:
            self._check_repeats(ids)
        else:
            ids = None
        if ids is not None and (only_ids or sum(map(len, cands)) == n):
            return RankInput(*head, n, ids, None, unknown)  # each candidate names its id and nothing else
        return RankInput(*head, n, ids, self._arrow_of(cands), unknown)

    def _ids_only(self, body: bytes) -> Any:
        """The body in the production request's narrower type, or None where that type does not take it (features,
        unknown keys, integer ids, anything wrong): the full type then decodes it, and its answer is the one given."""
        if self.ids_decoder is None:
            return None
        try:
            return self.ids_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return None

    def _arrow_of(self, cands: list[dict]) -> pa.StructArray:
        """The candidates as one Arrow array (C++). Integer ids are read as their decimal strings."""
        try:
            return pa.array(cands, type=self.candidate_type)
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # integer ids (decoded already: nothing else is left)
            ids = [f.name for f in self.candidate_features if f.kind in ("categorical", "categorical_list")]
            fixed = [_stringify(c, ids) for c in cands]
            return pa.array(fixed, type=self.candidate_type)

    # ------------------------------------------------------------ Arrow
    def parse_arrow(self, body: bytes) -> RankInput:
        try:
            reader = pa.ipc.open_stream(body)
            batches = list(reader)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
            raise BadRequest("body", f"not a valid Arrow IPC stream: {e}", status=400) from None
        schema = reader.schema
        n = sum(b.num_rows for b in batches)
        self._check_count(n)
        meta = (schema.metadata or {}).get(b"request", b"{}")
        head, unknown = self._head(_decode(self.head_decoder, meta, "request."))
        if len(batches) == 1 and schema.equals(self.schema) and self._clean(batches[0]):
            cols, present = batches[0].columns, self.schema.names  # the config's own columns, checked at once
        else:
            cols, present = self._columns(pa.Table.from_batches(batches, schema))
        arr = pa.StructArray.from_arrays(cols, fields=list(self.candidate_type))
        ids = rows = buffers = None
        if self.item_id is not None and n:
            col = arr.field(self.item_id)
            if col.null_count:
                i = int(np.argmax(np.asarray(col.is_null())))
                raise BadRequest(f"candidates[{i}].{self.item_id}", "is required (it names the item)")
            ids, buffers = col, string_buffers(col)
            rows, repeated = hash_ids(*buffers, self._id_buckets)
            if repeated:  # a repeat, or two ids whose 64-bit hashes are equal: the ids are looked at
                self._check_repeats(col.to_pylist())
        only_ids = present == ([self.item_id] if self.item_id else [])
        return RankInput(*head, n, ids, None if only_ids and ids is not None else arr, unknown, rows, buffers)

    def _clean(self, batch: pa.RecordBatch) -> bool:
        """Whether a batch of the config's own columns holds valid data (UTF-8 strings, offsets in range) and no
        null inside a list: two calls for all columns, where `_columns` makes several per column. False sends
        the batch through `_columns`, whose answer names the column and the row."""
        try:
            batch.validate(full=True)
        except pa.ArrowInvalid:
            return False
        return not any(batch.column(i).values.null_count for i in self._list_columns)

    def _columns(self, table: pa.Table) -> tuple[list[pa.Array], list[str]]:
        """Each candidate feature's column as the type JSON values would have (a null column where the table
        has none), and the features the table sent."""
        sent = {name: c.chunk(0) if c.num_chunks == 1 else c.combine_chunks()
                for name, c in zip(table.column_names, table.columns)}
        cols, present = [], []
        for f in self.candidate_features:
            if f.name in sent:
                cols.append(self._arrow_column(f, sent[f.name]))
                present.append(f.name)
            else:
                cols.append(pa.nulls(table.num_rows, self.candidate_type.field(f.name).type))
        return cols, present

    def _arrow_column(self, f: Feature, col: pa.Array) -> pa.Array:
        """A column sent for feature f, as the type JSON values would have; 422 for another type or a null
        inside a list."""
        want = self.candidate_type.field(f.name).type
        t = col.type
        where = f"candidates.{f.name}"
        if f.kind == "categorical":
            ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            expect = "strings or integers"
        elif f.kind == "numeric":
            ok = pa.types.is_integer(t) or pa.types.is_floating(t)
            expect = "numbers"
        else:
            inner = t.value_type if (pa.types.is_list(t) or pa.types.is_large_list(t)
                                     or pa.types.is_fixed_size_list(t)) else None
            if f.kind == "categorical_list":
                ok = inner is not None and (pa.types.is_string(inner) or pa.types.is_large_string(inner))
                expect = "lists of strings"
            else:
                ok = inner is not None and (pa.types.is_integer(inner) or pa.types.is_floating(inner))
                expect = "lists of numbers"
            if ok and col.values.null_count:  # some null among the values: is one inside a row that is not null?
                flat = pc.list_flatten(col)
                if flat.null_count:
                    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
                    owner = np.repeat(np.arange(len(col)), lengths)
                    i = int(owner[np.argmax(np.asarray(flat.is_null()))])
                    raise BadRequest(f"candidates[{i}].{f.name}", "null inside the list")
        if not ok:
            raise BadRequest(where, f"expected {expect}, got Arrow type {t}")
        try:  # Arrow does not check the UTF-8 of strings it reads from a stream: an id must be text
            col.validate(full=True)
        except pa.ArrowInvalid as e:
            raise BadRequest(where, f"not valid: {e}") from None
        if t == want:
            return col
        try:
            return col.cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise BadRequest(where, f"cannot be read as {want}: {e}") from None

    # ------------------------------------------------------------ shared parts
    def _check_count(self, n: int) -> None:
        if n > self.max_candidates:
            raise PayloadTooLarge("candidates", f"at most {self.max_candidates} candidates per request, got {n}")

    def _head(self, req: Any) -> tuple[tuple[str, dict[str, dict[str, Any]], int], int]:
        """(request_id, cleaned shared sections, top_k), and how many unknown keys the sections hold."""
        rid = req.request_id
        request_id = str(rid) if rid is not None else uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID:
            raise BadRequest("request_id", f"must be 1 to {MAX_REQUEST_ID} characters, got {len(request_id)}")
        shared: dict[str, dict[str, Any]] = {}
        unknown = 0
        for s in SHARED:
            sec = getattr(req, s)
            if sec is None:
                shared[s] = {}
                continue
            unknown += len(sec.keys() - self.known[s])
            try:
                shared[s] = clean_section(sec, self.config, s)
            except DataError as e:
                raise BadRequest(e.field or "body", e.reason) from None
        return (request_id, shared, req.top_k or self.default_top_k), unknown

    def _check_repeats(self, ids: list[str]) -> None:
        """Feedback names items by id: each candidate must be a different item."""
        if len(set(ids)) == len(ids):
            return
        first: dict[str, int] = {}
        for i, x in enumerate(ids):  # only for a request that is refused
            if x in first:
                raise BadRequest(f"candidates[{i}].{self.item_id}", f"repeats candidates[{first[x]}] ({x!r}): "
                                 "each item may appear once, since feedback names items by id")
            first[x] = i


def _stringify(c: dict, names: list[str]) -> dict:
    out = dict(c)
    for k in names:
        v = out.get(k)
        if isinstance(v, int):
            out[k] = str(v)
        elif isinstance(v, list):
            out[k] = [str(x) if isinstance(x, int) else x for x in v]
    return out
