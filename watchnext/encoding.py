"""Feature encoding, shared by the trainer, the exporter and the service.

Everything here is vectorised over a batch: a column of ids is hashed with
numpy loops over *character positions*, never over examples, and values are
checked with array operations.

The encoded layout (the ONNX graph's inputs, in this order):

    <categorical>       int64   (B,)            hashed row, 0 = missing
    <categorical_list>  int64   (B, max_len)    hashed rows, 0 = padding / missing
    numeric             float32 (B, n_numeric)  transformed value (default when missing)
    numeric_mask        float32 (B, n_numeric)  1 where the value was present
    <vector>            float32 (B, size)       zeros when missing

Standardisation of numerics is learned in training and lives in the model, so
the encoder has no state and the service cannot drift from the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import SOURCES, Config, Feature

try:  # built by `pip install` where a C compiler is at hand (setup.py); the Arrow path works without it
    from . import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None
NATIVE = _native is not None  # whether Encoder.gather and Encoder.scan can work here


def has_repeats(values: np.ndarray) -> bool:
    """Whether a uint64 array holds some value twice (a hash set in C; np.unique sorts)."""
    if _native is not None:
        return _native.has_repeats(np.ascontiguousarray(values, np.uint64))
    return len(np.unique(values)) != len(values)


def count_byte(data: bytes, byte: int) -> int:
    """How many times `byte` occurs in `data`."""
    return _native.count_byte(data, byte) if _native is not None else data.count(bytes([byte]))


def _powers_of_ten() -> tuple[bytes, bytes]:
    """128-bit mantissas of 10**q, rounded down, q = -348..347, as (high, low) uint64 bytes: the table
    of the Eisel-Lemire number conversion in watchnext/_native.c."""
    hi, lo = [], []
    for q in range(-348, 348):
        if q >= 0:
            v = 10**q
        else:  # floor(2**k / 10**-q), k large enough for 128 exact leading bits
            d = 10**-q
            v = (1 << (d.bit_length() + 192)) // d
        shift = v.bit_length() - 128
        v = v >> shift if shift > 0 else v << -shift
        hi.append(v >> 64)
        lo.append(v & 0xFFFFFFFFFFFFFFFF)
    return np.array(hi, np.uint64).tobytes(), np.array(lo, np.uint64).tobytes()


if _native is not None:
    _native.set_powers(*_powers_of_ten())

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
SECTIONS = SOURCES  # request / example sections, one per feature source
F32_MAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------ hashing


def fnv1a_strings(arr: pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes; stable across machines and processes.

    Nulls hash like the empty string; callers mask them. Shape (n,) uint64. The bytes are
    gathered once into a (longest, n) matrix; the loop then runs over character positions,
    each step two in-place operations on a contiguous row.
    """
    arr = arr.cast(pa.large_string()) if not pa.types.is_large_string(arr.type) else arr
    n = len(arr)
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    bufs = arr.buffers()
    if n == 0 or bufs[2] is None or not len(bufs[2]):
        return h
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=arr.offset + n + 1)[arr.offset :]
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    longest, shortest = int(lengths.max()), int(lengths.min())
    pos = np.arange(longest)[:, None]
    chars = data[np.minimum(starts + pos, len(data) - 1)].astype(np.uint64)  # (longest, n)
    inside = pos < lengths  # past a string's end its hash stays as it is
    step = np.empty(n, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(longest):  # over character positions, not over examples
            if j < shortest:
                np.bitwise_xor(h, chars[j], out=h)
                np.multiply(h, FNV_PRIME, out=h)
            else:
                np.bitwise_xor(h, chars[j], out=step)
                np.multiply(step, FNV_PRIME, out=step)
                np.copyto(h, step, where=inside[j])
    return h


def fnv1a(s: str) -> int:
    """The scalar reference for fnv1a_strings (tests, docs)."""
    h = int(FNV_OFFSET)
    for b in s.encode():
        h = ((h ^ b) * int(FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    return h


def bucket_rows(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Embedding rows 1..buckets of FNV-1a hashes (row 0 is kept for missing ids). Same shape, int64."""
    return (hashes % np.uint64(buckets)).astype(np.int64) + 1


def hashed_rows(arr: pa.Array, buckets: int) -> np.ndarray:
    """Rows 1..buckets for present ids, 0 for null. Shape (n,) int64."""
    rows = bucket_rows(fnv1a_strings(arr), buckets)
    if arr.null_count:
        rows[np.asarray(arr.is_null())] = 0
    return rows


# ------------------------------------------------------------------ schema


def arrow_type(f: Feature) -> pa.DataType:
    return {
        "categorical": pa.string(),
        "categorical_list": pa.list_(pa.string()),
        "numeric": pa.float64(),
        "vector": pa.list_(pa.float64()),
    }[f.kind]


def section_type(config: Config, source: str) -> pa.StructType:
    return pa.struct([(f.name, arrow_type(f)) for f in config.features if f.source == source])


def example_schema(config: Config) -> pa.Schema:
    """The Arrow schema of one example line (CONTRACT §2)."""
    return pa.schema(
        [
            ("ts", pa.float64()),
            ("request_id", pa.string()),
            *[(s, section_type(config, s)) for s in SECTIONS],
            ("position", pa.int64()),
            ("labels", pa.struct([(t.name, pa.float64()) for t in config.tasks])),
        ]
    )


# ------------------------------------------------------------------ problems


@dataclass
class Problems:
    """Rows that failed a check, each with a reason naming the field."""

    n: int
    checks: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def add(self, rows: np.ndarray, reason: str) -> None:
        rows = np.asarray(rows, dtype=bool)
        if rows.any():
            self.checks.append((rows, reason))

    @property
    def bad(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=bool)
        for rows, _ in self.checks:
            out |= rows
        return out

    def reasons(self, row: int) -> list[str]:
        return [r for rows, r in self.checks if rows[row]]

    def first(self) -> tuple[int, str] | None:
        bad = self.bad
        if not bad.any():
            return None
        row = int(np.argmax(bad))
        return row, "; ".join(self.reasons(row))


# ------------------------------------------------------------------ encoder

KIND_CODES = {"categorical": 0, "categorical_list": 1, "numeric": 2, "vector": 3}  # watchnext/_native.c


@dataclass
class Gathered:
    """One section's raw values, gathered from dicts by the native module (see Encoder.gather)."""

    n: int
    present: dict[str, np.ndarray]  # (n,) bool: the row holds the feature (not absent, not null)
    values: dict[str, np.ndarray]  # uint64 FNV-1a hashes of ids, float64 numbers; (n,) or (n, width)
    counts: dict[str, np.ndarray]  # categorical_list: (n,) ids kept (at most max_len)
    unknown: int  # keys in the rows that name no feature of the section

    def rows(self, lo: int, hi: int) -> Gathered:
        """Rows lo..hi-1 (views; `unknown` stays the whole's)."""
        return Gathered(hi - lo, {k: v[lo:hi] for k, v in self.present.items()},
                        {k: v[lo:hi] for k, v in self.values.items()}, {k: v[lo:hi] for k, v in self.counts.items()},
                        self.unknown)

    def missing(self, skip: str | None = None) -> np.ndarray:
        """(n,) bool: rows that lack at least one feature (besides `skip`)."""
        out = np.zeros(self.n, bool)
        for name, p in self.present.items():
            if name != skip:
                out |= ~p
        return out


class Scan:
    """A native scan of a body's candidates (Encoder.scan_start), read so far: rows 0..n-1 of `full`."""

    def __init__(self, body: bytes, key: bytes, spec: tuple, g: Gathered, spans: np.ndarray):
        self.body, self.key, self.spec, self.spans = body, key, spec, spans
        self.full = g  # room for every row
        self.n, self.unknown, self.start, self.end, self.pos = 0, 0, -1, -1, 0

    @property
    def done(self) -> bool:
        return self.end >= 0

    def more(self, stop_after: int = -1) -> bool:
        """Reads on, to `stop_after` rows in all (-1: to the end); False when the body needs orjson after all."""
        if self.done:
            return True
        status, n, start, end, unknown, pos = _native.scan(self.body, self.key, self.spec, self.spans[0],
                                                           self.spans[1], stop_after, self.pos, self.start, self.n)
        if status not in (0, 2):
            return False
        self.n, self.start, self.end, self.pos = n, start, end if status == 0 else -1, pos
        self.unknown += unknown
        return True

    def rows(self, lo: int, hi: int) -> Gathered:
        return self.full.rows(lo, hi)

    def result(self) -> tuple[Gathered, np.ndarray, slice]:
        """What `Encoder.scan` returns, once done."""
        g = self.full.rows(0, self.n)
        g.unknown = self.unknown
        return g, self.spans[:, : self.n].T, slice(self.start, self.end)


@dataclass
class Labels:
    values: np.ndarray  # (B, T) float32, raw label units, 0 where missing
    mask: np.ndarray  # (B, T) float32, 1 where the label is known


class Encoder:
    """Turns Arrow sections into the model's input arrays. Stateless; one per config."""

    def __init__(self, config: Config):
        self.config = config
        self.numeric = config.features_of("numeric")
        self.numeric_col = {f.name: i for i, f in enumerate(self.numeric)}
        self.numeric_default = np.array(
            [_transform(np.array([f.default]), f.transform)[0] for f in self.numeric], dtype=np.float32
        )
        self.section_types = {s: section_type(config, s) for s in SECTIONS}
        self.section_features = {s: [f for f in config.features if f.source == s] for s in SECTIONS}
        self._specs = self.input_specs()  # for empty_inputs, once per request
        logs = [self.numeric_col[f.name] for f in self.numeric if f.transform == "log1p"]
        self._log1p_cols = np.array(logs) if logs else None

    # The ONNX input layout, in order: (name, dtype, trailing shape).
    def input_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        specs: list[tuple[str, str, tuple[int, ...]]] = []
        for f in self.config.features_of("categorical"):
            specs.append((f.name, "int64", ()))
        for f in self.config.features_of("categorical_list"):
            specs.append((f.name, "int64", (f.max_len,)))
        if self.numeric:
            specs.append(("numeric", "float32", (len(self.numeric),)))
            specs.append(("numeric_mask", "float32", (len(self.numeric),)))
        for f in self.config.features_of("vector"):
            specs.append((f.name, "float32", (f.size,)))
        return specs

    def empty_inputs(self, n: int) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype, shape in self._specs:
            out[name] = np.zeros((n, *shape), dtype=dtype)
        if self.numeric:
            out["numeric"][:] = self.numeric_default
        return out

    def encode_section(
        self, source: str, arr: pa.StructArray | None, n: int, out: dict[str, np.ndarray], problems: Problems
    ) -> None:
        """Write one section's features into `out` (rows 0..n-1). `arr` None: all missing."""
        if arr is None:
            return
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        present = ~np.asarray(arr.is_null()) if arr.null_count else None
        for f in self.config.features:
            if f.source != source or arr.type.get_field_index(f.name) < 0:
                continue
            col = arr.field(f.name)
            if present is not None:  # a null section makes every field null
                col = pc.if_else(pa.array(present), col, pa.nulls(len(col), col.type))
            where = f"{source}.{f.name}"
            if f.kind == "categorical":
                out[f.name][:] = hashed_rows(col, f.buckets)
            elif f.kind == "categorical_list":
                out[f.name][:] = _list_rows(col, f.buckets, f.max_len)
            elif f.kind == "numeric":
                self._numeric(f, col, out, problems, where)
            else:
                self._vector(f, col, out, problems, where)

    def _numeric(self, f: Feature, col: pa.Array, out: dict, problems: Problems, where: str) -> None:
        v = col.to_numpy(zero_copy_only=False).astype(np.float64)
        null = np.asarray(col.is_null()) if col.null_count else np.zeros(len(v), bool)
        self._numeric_values(f, v, null, out, problems, where)

    def _numeric_values(self, f: Feature, v: np.ndarray, null: np.ndarray, out: dict, problems: Problems,
                        where: str) -> None:
        """Check, transform and place one numeric feature's values (float64 (n,), NaN or anything where null)."""
        present = ~null
        finite = np.isfinite(v)
        with np.errstate(invalid="ignore"):
            fits = np.abs(v) <= F32_MAX  # False for NaN
            above = v > -1 if f.transform == "log1p" else None
        ok = present & fits
        if above is not None:
            ok &= above
        if not np.array_equal(ok, present):  # something to report (rare): each check names its rows
            problems.add(present & ~finite, f"{where}: must be a finite number")
            problems.add(present & finite & ~fits, f"{where}: outside the float32 range")
            if above is not None:
                problems.add(present & ~above & ~np.isnan(v), f"{where}: must be > -1 for transform log1p")
        j = self.numeric_col[f.name]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = _transform(np.where(ok, v, 0.0), f.transform)
        out["numeric"][:, j] = np.where(ok, t, self.numeric_default[j])
        out["numeric_mask"][:, j] = ok

    def _vector(self, f: Feature, col: pa.Array, out: dict, problems: Problems, where: str) -> None:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        null = np.asarray(col.is_null()) if col.null_count else np.zeros(len(col), bool)
        lengths = np.where(null, 0, lengths).astype(np.int64)
        wrong = ~null & (lengths != f.size)
        problems.add(wrong, f"{where}: expected {f.size} numbers")
        flat64 = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float64)
        if not wrong.any():
            rows = np.flatnonzero(~null)
            self._vector_values(f, flat64.reshape(len(rows), f.size), rows, out, problems, where)
        else:  # place the well-formed rows only
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            good = np.flatnonzero(~null & ~wrong)
            self._vector_values(f, flat64[starts[good, None] + np.arange(f.size)], good, out, problems, where)

    def _vector_values(self, f: Feature, values: np.ndarray, rows: np.ndarray, out: dict, problems: Problems,
                       where: str) -> None:
        """Check and place well-formed vectors: `values` (len(rows), size) float64 go to `rows`."""
        unfit = ~np.isfinite(values) | (np.abs(values) > F32_MAX)
        if unfit.any():
            badv = np.zeros(len(out[f.name]), bool)
            badv[rows[unfit.any(axis=1)]] = True
            problems.add(badv, f"{where}: must hold finite float32 numbers")
            values = np.where(unfit, 0.0, values)
        out[f.name][rows] = values

    def gather(self, source: str, rows: list) -> Gathered | None:
        """One section's values from a list of dicts (a request's JSON objects), without Arrow.

        The native module reads str ids (hashed with FNV-1a, as fnv1a_strings does) and int or float
        numbers into columns; `encode_gathered` then buckets, transforms and checks them with the
        same code as `encode_section`. None when the module was not built, or when a row holds
        anything else (a wrong type, a vector of the wrong length, a null inside a list): the caller
        then builds an Arrow array and uses `encode_section`, which accepts or names the field.
        """
        if _native is None:
            return None
        n = len(rows)
        spec, g = self._columns(source, n)
        status, _row, g.unknown = _native.gather(rows, spec)
        return g if not status else None

    def scan(self, source: str, body: bytes, key: str, limit: int) -> tuple[Gathered, np.ndarray, slice] | None:
        """`gather` for the objects of the array under the top-level `key` of the JSON object `body`, read
        from the bytes (no Python object per value), at most `limit` of them.

        Returns (gathered, spans (n, 2) of each object's bytes, the array's slice of the body). None when the
        module was not built, the array holds more than `limit` objects, or the body holds anything that
        `orjson.loads` + `gather` would not take as it is (see watchnext/_native.c): the caller then does that.
        """
        st = self.scan_start(source, body, key, limit)
        return st.result() if st is not None and st.done else None

    def scan_start(self, source: str, body: bytes, key: str, limit: int, stop_after: int = -1,
                   braces: int | None = None) -> Scan | None:
        """`scan`, in steps: it pauses after `stop_after` objects when more follow (`Scan.more` goes on), so that
        the rows read so far can be put to work while the rest are read. None where `scan` gives None.
        `braces`: count_byte(body, 0x7B), where the caller has it already."""
        if _native is None:
            return None
        # every object starts with "{": room enough
        rows = min(count_byte(body, 0x7B) if braces is None else braces, limit)
        spec, g = self._columns(source, rows)
        st = Scan(body, key.encode(), spec, g, np.zeros((2, rows), np.int64))
        return st if st.more(stop_after) else None

    def _columns(self, source: str, n: int) -> tuple[tuple, Gathered]:
        """The native module's field spec for n rows of `source`, and the Gathered whose arrays it fills."""
        fields = self.section_features[source]
        present = np.zeros((len(fields), n), np.uint8)
        values, counts, spec = {}, {}, []
        for j, f in enumerate(fields):
            width = f.max_len if f.kind == "categorical_list" else f.size if f.kind == "vector" else 1
            shape = (n, width) if f.kind in ("categorical_list", "vector") else (n,)
            values[f.name] = np.zeros(shape, np.float64 if f.kind in ("numeric", "vector") else np.uint64)
            if f.kind == "categorical_list":
                counts[f.name] = np.zeros(n, np.int64)
            spec.append((f.name, KIND_CODES[f.kind], width, present[j], values[f.name], counts.get(f.name)))
        return tuple(spec), Gathered(n, {f.name: present[j].view(bool) for j, f in enumerate(fields)}, values,
                                     counts, 0)

    def encode_gathered(self, source: str, g: Gathered, out: dict[str, np.ndarray], problems: Problems) -> None:
        """`encode_section` for values from `gather`: the same rows, values and problems."""
        for f in self.section_features[source]:
            where, present, v = f"{source}.{f.name}", g.present[f.name], g.values[f.name]
            if f.kind == "categorical":
                out[f.name][:] = np.where(present, bucket_rows(v, f.buckets), 0)
            elif f.kind == "categorical_list":
                kept = np.arange(f.max_len) < g.counts[f.name][:, None]
                out[f.name][:] = np.where(kept, bucket_rows(v, f.buckets), 0)
            elif f.kind == "numeric":
                self._numeric_values(f, v, ~present, out, problems, where)
            else:
                rows = np.flatnonzero(present)
                self._vector_values(f, v[rows], rows, out, problems, where)

    def encode_native(self, sections: dict[str, Gathered], n: int) -> dict[str, np.ndarray] | None:
        """`encode_gathered` for every section at once, in C: model inputs for n rows.

        `sections` holds each section's gathered values, of n rows or of one row (broadcast to all n,
        as a request's user, query and context are); a section left out is absent. The bucketing,
        padding, defaults and checks are those of `encode_gathered`, and the log1p is numpy's, as
        there. None when the module was not built or a value fails a check: `encode_gathered` then
        names the field.
        """
        if _native is None:
            return None
        out = {name: np.empty((n, *shape), dtype=dtype) for name, dtype, shape in self._specs}
        numeric = np.empty((n, len(self.numeric)), np.float64) if self.numeric else None
        columns = []
        for f in self.config.features:
            g = sections.get(f.source)
            if g is None:
                rows, present, values, count = 0, None, None, None
            else:
                rows, present, values, count = g.n, g.present[f.name], g.values[f.name], g.counts.get(f.name)
            code = KIND_CODES[f.kind]
            if f.kind == "numeric":
                columns.append((code, rows, present, values, count, 1, 1, self.numeric_col[f.name],
                                f.transform == "log1p", f.default, None))
            else:
                width = f.max_len if f.kind == "categorical_list" else f.size if f.kind == "vector" else 1
                columns.append((code, rows, present, values, count, f.buckets or 1, width, 0, False, 0.0, out[f.name]))
        if _native.encode(tuple(columns), n, numeric, out.get("numeric_mask")):
            return None
        if numeric is not None:
            if self._log1p_cols is not None:
                numeric[:, self._log1p_cols] = np.log1p(numeric[:, self._log1p_cols])
            out["numeric"][:] = numeric
        return out

    def encode_labels(self, arr: pa.StructArray | None, n: int, problems: Problems) -> Labels:
        T = len(self.config.tasks)
        values = np.zeros((n, T), np.float32)
        mask = np.zeros((n, T), np.float32)
        if arr is None:
            return Labels(values, mask)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        section_null = np.asarray(arr.is_null()) if arr.null_count else np.zeros(n, bool)
        for j, t in enumerate(self.config.tasks):
            if arr.type.get_field_index(t.name) < 0:
                continue
            col = arr.field(t.name)
            v = col.to_numpy(zero_copy_only=False).astype(np.float64)
            null = section_null | (np.asarray(col.is_null()) if col.null_count else False)
            where = f"labels.{t.name}"
            problems.add(~null & ~np.isfinite(v), f"{where}: must be a finite number")
            if t.kind == "binary":
                problems.add(~null & np.isfinite(v) & (v != 0) & (v != 1), f"{where}: a binary label must be 0 or 1")
            elif t.transform == "log1p":
                problems.add(~null & (v <= -1), f"{where}: must be > -1 for transform log1p")
            known = ~null & np.isfinite(v)
            values[:, j] = np.where(known, v, 0.0)
            mask[:, j] = known
        return Labels(values, mask)


def _transform(v: np.ndarray, transform: str) -> np.ndarray:
    return np.log1p(v) if transform == "log1p" else v


def _list_rows(col: pa.Array, buckets: int, max_len: int) -> np.ndarray:
    """(n, max_len) hashed rows of a list column, padded with 0, first max_len kept."""
    n = len(col)
    out = np.zeros((n, max_len), dtype=np.int64)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(col)
    if len(values) == 0:
        return out
    rows = hashed_rows(values, buckets)
    owner = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slot = np.arange(len(values)) - starts[owner]
    keep = slot < max_len
    out[owner[keep], slot[keep]] = rows[keep]
    return out
