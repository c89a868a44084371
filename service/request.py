"""A rank request, from JSON bytes to the model's input arrays.

A well-formed body is parsed by Arrow's C++ JSON reader straight into columns:
the candidates become one struct array without a Python loop per candidate, and
are encoded by the same `watchnext.encoding.Encoder` the trainer uses; the
shared sections (user, query, context) are encoded once as a one-row batch and
broadcast. A body Arrow refuses (a wrong type somewhere) or one holding a
boolean is parsed by `json` and checked value by value, to name the field and
the index::

    candidates[3].video_age_days: expected a number, got str '3 days'
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from watchnext.config import Config
from watchnext.encoding import Encoder, Problems, section_type
from watchnext.examples import clean_section

from .errors import BadRequest, split_reason

SHARED = ("user", "query", "context")
MAX_REQUEST_ID = 128
F32_MAX = float(np.finfo(np.float32).max)  # the model reads float32: larger numbers would become inf


@dataclass
class RankInput:
    request_id: str
    shared: dict[str, dict[str, Any]]  # cleaned user / query / context values
    candidates: pa.StructArray  # (B,) one struct per candidate
    top_k: int
    unknown_features: int


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


class RequestCodec:
    """Parses rank requests and encodes them for one config."""

    def __init__(self, config: Config):
        self.config = config
        self.encoder = Encoder(config)
        # large strings: the id hashing reads them without a cast
        self.types = {s: _large(section_type(config, s)) for s in (*SHARED, "candidate")}
        request_schema = pa.schema([
            ("request_id", pa.large_string()),
            *[(s, self.types[s]) for s in SHARED],
            ("candidates", pa.list_(self.types["candidate"])),
            ("top_k", pa.int64()),
        ])
        self.json_options = pj.ParseOptions(explicit_schema=request_schema, unexpected_field_behavior="infer",
                                            newlines_in_values=True)
        self.known = {s: frozenset(self.types[s].names) for s in self.types}
        self.item_id = config.item_id
        svc = config.service
        self.max_candidates, self.default_top_k = svc.max_candidates, svc.default_top_k
        # columns of the numeric matrix that each source owns (shared sources are broadcast)
        self.numeric_cols = {
            s: [self.encoder.numeric_col[f.name] for f in self.encoder.numeric if f.source == s] for s in SHARED
        }
        self.shared_inputs = [f.name for f in config.features if f.source in SHARED and f.kind != "numeric"]
        # values read as float32 as they are (log1p shrinks the rest into range)
        self.float32_fields = {
            s: [f for f in config.features if f.source == s and (f.kind == "vector" or f.kind == "numeric" and f.transform == "none")]
            for s in (*SHARED, "candidate")
        }

    # ------------------------------------------------------------ parsing
    def parse(self, body: bytes) -> RankInput:
        """Check a rank request; raises BadRequest naming the field.

        Arrow's C++ JSON reader parses a well-formed body straight into columns. Anything it
        refuses, and any body with a boolean (Arrow would read true as 1.0 where a number is
        expected), takes the checking path, which names the field at fault.
        """
        if b"true" not in body and b"false" not in body:
            fast = self._parse_arrow(body)
            if fast is not None:
                return fast
        return self._parse_checked(body)

    def _parse_arrow(self, body: bytes) -> RankInput | None:
        """The fast path; None whenever the body needs the checking path (which then explains why)."""
        try:
            body.decode("utf-8")
            return self._from_arrow(body)
        except (pa.ArrowException, UnicodeDecodeError):
            # anything Arrow trips on (odd keys it had to infer, for one) is left to the checking path
            return None

    def _from_arrow(self, body: bytes) -> RankInput | None:
        table = pj.read_json(io.BytesIO(body), read_options=pj.ReadOptions(use_threads=False, block_size=len(body) + 64),
                             parse_options=self.json_options)
        if table.num_rows != 1:
            return None
        lists = table.column("candidates").combine_chunks()
        if lists.null_count:
            return None
        flat = pc.list_flatten(lists)
        if flat.null_count:
            return None
        n = len(flat)
        if n > self.max_candidates:
            raise BadRequest("candidates", f"at most {self.max_candidates} candidates per request, got {n}", status=413)
        top_k = self._top_k(table.column("top_k")[0].as_py())
        request_id = ident(table.column("request_id")[0].as_py(), "request_id", required=False) or uuid.uuid4().hex
        children = dict(zip([f.name for f in flat.type], flat.flatten()))
        known = self.known["candidate"]
        unknown = sum(n - a.null_count for name, a in children.items() if name not in known)
        arr = pa.StructArray.from_arrays([children[f.name] for f in self.types["candidate"]],
                                         fields=list(self.types["candidate"]))
        shared = {}
        for s in SHARED:
            sec = table.column(s)[0].as_py() or {}
            unknown += sum(1 for k, v in sec.items() if k not in self.known[s] and v is not None)
            shared[s] = {k: v for k, v in sec.items() if v is not None and k in self.known[s]}
        self._check_ids(arr)
        return RankInput(request_id, shared, arr, top_k, unknown)

    def _parse_checked(self, body: bytes) -> RankInput:
        obj = parse_json(body)
        if not isinstance(obj, dict):
            raise BadRequest("body", f"expected a JSON object, got {type(obj).__name__}")
        request_id = ident(obj.get("request_id"), "request_id", required=False) or uuid.uuid4().hex
        unknown = 0
        shared = {}
        for s in SHARED:
            sec = obj.get(s)
            if sec is None:
                shared[s] = {}
                continue
            if not isinstance(sec, dict):
                raise BadRequest(s, f"expected an object, got {type(sec).__name__}")
            unknown += len(sec.keys() - self.known[s])
            shared[s] = self._clean(sec, s, s)
        cands = obj.get("candidates")
        if cands is None:
            raise BadRequest("candidates", "is required (a list of candidate objects)")
        if not isinstance(cands, list):
            raise BadRequest("candidates", f"expected a list of objects, got {type(cands).__name__}")
        if len(cands) > self.max_candidates:
            raise BadRequest("candidates", f"at most {self.max_candidates} candidates per request, got {len(cands)}", status=413)
        known = self.known["candidate"]
        for i, c in enumerate(cands):
            if type(c) is not dict:
                raise BadRequest(f"candidates[{i}]", f"expected an object, got {type(c).__name__}")
            if not c.keys() <= known:
                unknown += len(c.keys() - known)
        top_k = self._top_k(obj.get("top_k"))
        # Arrow reads true/false as 1.0/0.0 for numbers: a body with booleans is checked value by value
        careful = b"true" in body or b"false" in body
        arr = self._candidates(cands, careful)
        self._check_ids(arr)
        return RankInput(request_id, shared, arr, top_k, unknown)

    def _top_k(self, top_k: Any) -> int:
        if top_k is None:
            return self.default_top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise BadRequest("top_k", f"expected an integer >= 1, got {top_k!r}")
        return top_k

    def _check_ids(self, arr: pa.StructArray) -> None:
        if self.item_id is not None and len(arr):
            ids = arr.field(self.item_id)
            if ids.null_count:
                i = int(np.argmax(np.asarray(ids.is_null())))
                raise BadRequest(f"candidates[{i}].{self.item_id}", "is required (it names the item)")

    def _clean(self, sec: dict, source: str, where: str) -> dict[str, Any]:
        try:
            return clean_section(sec, self.config, source)
        except ValueError as e:
            field, reason = split_reason(str(e))
            raise BadRequest(where + field[len(source):], reason) from None

    def _candidates(self, cands: list, careful: bool) -> pa.StructArray:
        typ = self.types["candidate"]
        if not careful:
            try:
                return pa.array(cands, type=typ)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                pass
        cleaned = [self._clean(c, "candidate", f"candidates[{i}]") for i, c in enumerate(cands)]
        return pa.array(cleaned, type=typ)

    # ------------------------------------------------------------ filling from the store
    def missing_candidate_rows(self, arr: pa.StructArray) -> np.ndarray:
        """Rows that lack at least one candidate feature (besides the id). (B,) bool."""
        missing = np.zeros(len(arr), bool)
        for f in self.types["candidate"]:
            if f.name != self.item_id:
                col = arr.field(f.name)
                if col.null_count:
                    missing |= np.asarray(col.is_null())
        return missing

    def fill_candidates(self, arr: pa.StructArray, rows: np.ndarray, stored: list[dict | None]) -> pa.StructArray:
        """Fill absent candidate values from stored entries (request values win)."""
        full: list[dict | None] = [None] * len(arr)
        for r, d in zip(rows.tolist(), stored):
            full[r] = d
        extra = pa.array(full, type=self.types["candidate"])
        # flatten(), not field(): it applies the struct's own nulls (and offset) to the children; a
        # null row's children are otherwise "" and [], which would pass for stored values
        cols = [pc.coalesce(a, b) for a, b in zip(arr.flatten(), extra.flatten(), strict=True)]
        return pa.StructArray.from_arrays(cols, fields=list(arr.type))

    def clean_stored(self, source: str, d: Any) -> dict[str, Any] | None:
        """A stored entry checked like a request section; None when it is unusable."""
        if not isinstance(d, dict):
            return None
        try:
            return clean_section(d, self.config, source)
        except ValueError:
            return None

    # ------------------------------------------------------------ encoding
    def check_range(self, source: str, arr: pa.StructArray, where: str) -> None:
        """Refuse numbers a float32 cannot hold (vectorised; `where` is formatted with the row)."""
        for f in self.float32_fields[source]:
            col = arr.field(f.name)
            values = pc.list_flatten(col) if f.kind == "vector" else col
            if not len(values):
                continue
            big = pc.greater(pc.abs(values), F32_MAX)
            if pc.any(big).as_py():
                i = int(np.argmax(big.fill_null(False).to_numpy(zero_copy_only=False)))
                row = int(pc.list_parent_indices(col)[i].as_py()) if f.kind == "vector" else i
                raise BadRequest(f"{where.format(row=row)}.{f.name}", "must be a finite number within the float32 range")

    def encode(self, inp: RankInput) -> dict[str, np.ndarray]:
        """Model inputs for every candidate; raises BadRequest naming the first bad field."""
        n = len(inp.candidates)
        one = self.encoder.empty_inputs(1)
        problems = Problems(1)
        for s in SHARED:
            if inp.shared[s]:
                arr = pa.array([inp.shared[s]], type=self.types[s])
                self.check_range(s, arr, s)
                self.encoder.encode_section(s, arr, 1, one, problems)
        bad = problems.first()
        if bad is not None:
            raise BadRequest(*split_reason(bad[1].split("; ")[0]))
        out = self.encoder.empty_inputs(n)
        problems = Problems(n)
        self.check_range("candidate", inp.candidates, "candidates[{row}]")
        self.encoder.encode_section("candidate", inp.candidates, n, out, problems)
        bad = problems.first()
        if bad is not None:
            field, reason = split_reason(bad[1].split("; ")[0])
            raise BadRequest(f"candidates[{bad[0]}]{field[len('candidate'):]}", reason)
        for name in self.shared_inputs:  # broadcast the shared sections' columns
            out[name][:] = one[name][0]
        for s in SHARED:
            cols = self.numeric_cols[s]
            if cols:
                out["numeric"][:, cols] = one["numeric"][0, cols]
                out["numeric_mask"][:, cols] = one["numeric_mask"][0, cols]
        return out


def _large(t: pa.DataType) -> pa.DataType:
    """The same type with large_string in place of string, at any depth."""
    if pa.types.is_string(t):
        return pa.large_string()
    if pa.types.is_list(t):
        return pa.list_(_large(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _large(f.type)) for f in t])
    return t
