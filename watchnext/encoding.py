"""Feature encoding, shared by the trainer, the exporter and the service.

Everything here works on a whole batch at once, never a Python loop per
example: ids are hashed, and values checked and transformed, by loops numba
compiles (watchnext/kernels.py), one pass over an Arrow column's own buffers
each; the rest is numpy and Arrow calls per column.

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
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import SOURCES, Config, Feature
from .label_checks import label_problems

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
SECTIONS = SOURCES  # request / example sections, one per feature source
F32_MAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------ compiled loops


_kernels: ModuleType | None = None


def kernels() -> ModuleType:
    """The compiled loops (watchnext/kernels.py), loaded on first use: numba and the loops' machine code take
    about a second to load, which a command that encodes nothing should not pay. The service loads them as it
    starts, so no request does. Kept once loaded: an `import` statement per call ran the import system's code,
    which costs a request far more than its few microseconds when it is out of the CPU's caches."""
    global _kernels
    if _kernels is None:
        from . import kernels as k

        _kernels = k
    return _kernels


# ------------------------------------------------------------------ hashing


def fnv1a_strings(arr: pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes; stable across machines and processes.

    Nulls hash like the empty string; callers mask them. Shape (n,) uint64. One compiled pass over the
    array's offsets and bytes (`kernels.fnv1a`).
    """
    h = np.empty(len(arr), dtype=np.uint64)
    if len(arr):
        kernels().fnv1a(*_strings(arr), h)
    return h


def hash_ids(offsets: np.ndarray, data: pa.Buffer | bytes, buckets: int) -> tuple[np.ndarray, bool]:
    """(rows, repeated) for the strings of a string array's buffers (`string_buffers`): each one's embedding row
    1..buckets (`bucket_rows` of its FNV-1a), and whether two have the same 64-bit FNV-1a hash: a string that
    repeats, or (about once in 2^64 pairs) two whose hashes are equal. One compiled pass (`kernels.id_rows`)."""
    rows = np.empty(len(offsets) - 1, np.int64)
    if not len(rows):
        return rows, False
    return rows, bool(kernels().id_rows(offsets, _bytes(data), buckets, rows))


def fnv1a(s: str) -> int:
    """The scalar reference for fnv1a_strings (tests, docs)."""
    h = int(FNV_OFFSET)
    for b in s.encode():
        h = ((h ^ b) * int(FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    return h


def bucket_rows(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Embedding rows 1..buckets of FNV-1a hashes (row 0 is kept for missing ids). Same shape, int64. The
    reference for what `hashed_rows` computes in one pass (tests)."""
    return (hashes % np.uint64(buckets)).astype(np.int64) + 1


def hashed_rows(arr: pa.Array, buckets: int, null: np.ndarray | None = None) -> np.ndarray:
    """Rows 1..buckets for present ids (`bucket_rows` of their FNV-1a), 0 for null. Shape (n,) int64. One
    compiled pass over the array's offsets and bytes (`kernels.hash_rows`); `null`: the rows' null flags
    when the caller has them."""
    out = np.empty(len(arr), np.int64)
    if len(arr):
        if null is None:
            null = np.asarray(arr.is_null()) if arr.null_count else np.zeros(len(arr), bool)
        kernels().hash_rows(*_strings(arr), null, buckets, out)
    return out


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
    """The Arrow schema of one example line (docs/examples.md)."""
    return pa.schema(
        [
            ("ts", pa.float64()),
            ("request_id", pa.string()),
            *[(s, section_type(config, s)) for s in SECTIONS],
            ("position", pa.int64()),
            ("labels", pa.struct([(t.name, pa.float64()) for t in config.tasks])),
            # randomised logging (watchnext/explore.py): the probability of being shown at `position`, and the
            # rank the item had before the swaps; both absent on requests that were not explored
            ("propensity", pa.float64()),
            ("explore", pa.struct([("rank", pa.int64())])),
        ]
    )


# ------------------------------------------------------------------ problems


@dataclass
class Problems:
    """Rows that failed a check, each check with the field it names ("candidate.video_views") and why."""

    n: int
    checks: list[tuple[np.ndarray, str, str]] = field(default_factory=list)

    def add(self, rows: np.ndarray, field: str, reason: str) -> None:
        rows = np.asarray(rows, dtype=bool)
        if rows.any():
            self.checks.append((rows, field, reason))

    @property
    def bad(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=bool)
        for rows, _, _ in self.checks:
            out |= rows
        return out

    def reasons(self, row: int) -> list[str]:
        """Every check `row` failed, as "field: reason"."""
        return [f"{f}: {r}" for rows, f, r in self.checks if rows[row]]

    def first(self) -> tuple[int, str, str] | None:
        """(row, field, reason): the first bad row and the first check it failed; None when every row is good."""
        if not self.checks:
            return None
        bad = self.bad
        if not bad.any():
            return None
        row = int(np.argmax(bad))
        return next((row, f, r) for rows, f, r in self.checks if rows[row])


# ------------------------------------------------------------------ encoder

@dataclass
class Labels:
    values: np.ndarray  # (B, T) float32, raw label units, 0 where missing
    mask: np.ndarray  # (B, T) float32, 1 where the label is known


@dataclass
class Columns:
    """One section's features, encoded: the model's values and where each was present.

    `values[name]`: categorical int64 (n,) hashed row, 0 when absent; categorical_list int64
    (n, max_len), 0-padded; numeric float32 (n,) transformed, the feature's default when absent;
    vector float32 (n, size), zeros when absent. `present[name]`: (n,) bool. A section of one row
    (a request's user, query or context) is broadcast to every candidate by `Encoder.assemble`.
    Absent rows already hold the model's "missing" value, so two Columns merge with `overlay`.
    """

    n: int
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    def take(self, rows: np.ndarray) -> Columns:
        return Columns(len(rows), {k: v[rows] for k, v in self.values.items()},
                       {k: p[rows] for k, p in self.present.items()})


def overlay(front: Columns, back: Columns) -> Columns:
    """`front`'s values where present, `back`'s elsewhere (request values win over stored ones)."""
    values, present = {}, {}
    for name, fv in front.values.items():
        fp = front.present[name]
        if fp.all():
            values[name], present[name] = fv, fp
            continue
        where = fp.reshape(-1, *([1] * (fv.ndim - 1)))
        values[name] = np.where(where, fv, back.values[name])
        present[name] = fp | back.present[name]
    return Columns(front.n, values, present)


class Encoder:
    """Turns Arrow sections into the model's input arrays. Stateless; one per config.

    One path for the trainer and the service: `encode_columns` checks, hashes and transforms a
    section into `Columns`; `assemble` lays several sections out as the ONNX inputs.
    """

    def __init__(self, config: Config):
        self.config = config
        self.numeric = config.features_of("numeric")
        self.numeric_col = {f.name: i for i, f in enumerate(self.numeric)}
        self.numeric_default = np.array(
            [_transform(np.array([f.default]), f.transform)[0] for f in self.numeric], dtype=np.float32
        )
        self.section_types = {s: section_type(config, s) for s in SECTIONS}
        self.section_features = {s: [f for f in config.features if f.source == s] for s in SECTIONS}
        self._specs = self.input_specs()

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

    def value_spec(self, f: Feature) -> tuple[str, tuple[int, ...]]:
        """(dtype, trailing shape) of one feature's encoded value in `Columns`."""
        if f.kind == "categorical":
            return "int64", ()
        if f.kind == "categorical_list":
            return "int64", (f.max_len,)
        if f.kind == "numeric":
            return "float32", ()
        return "float32", (f.size,)

    def empty_inputs(self, n: int) -> dict[str, np.ndarray]:
        """Model inputs for n rows with every feature absent."""
        return self.assemble({}, n)

    def absent(self, source: str, n: int) -> Columns:
        """n rows of `source` with every feature absent."""
        out = Columns(n, {}, {})
        for f in self.section_features[source]:
            self._absent(f, n, out)
        return out

    def _absent(self, f: Feature, n: int, out: Columns) -> None:
        """Feature f absent from all n rows of `out`."""
        dtype, shape = self.value_spec(f)
        if f.kind == "numeric":
            out.values[f.name] = np.full(n, self.numeric_default[self.numeric_col[f.name]], np.float32)
        else:
            out.values[f.name] = np.zeros((n, *shape), dtype)
        out.present[f.name] = np.zeros(n, bool)

    def encode_columns(self, source: str, arr: pa.StructArray | None, n: int, problems: Problems,
                       hashed: dict[str, np.ndarray] | None = None) -> Columns:
        """Check, hash and transform one section's n rows (`arr` None: all absent). A value that fails a check
        is reported in `problems` (naming `source.feature`) and left absent. `hashed`: the rows of categorical
        features the caller has hashed already, with no null among them (the service's Arrow parse hashes the
        item ids as it checks them for repeats)."""
        if arr is None:
            return self.absent(source, n)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        row_present = ~np.asarray(arr.is_null()) if arr.null_count else None
        out = Columns(n, {}, {})
        for f in self.section_features[source]:
            if arr.type.get_field_index(f.name) < 0:
                self._absent(f, n, out)
                continue
            col = arr.field(f.name)
            if row_present is not None:  # a null section makes every field null
                col = pc.if_else(pa.array(row_present), col, pa.nulls(len(col), col.type))
            where = f"{source}.{f.name}"
            null = np.asarray(col.is_null()) if col.null_count else np.zeros(n, bool)
            if f.kind == "categorical":
                given = hashed.get(f.name) if hashed else None
                out.values[f.name] = given if given is not None else hashed_rows(col, f.buckets, null)
                out.present[f.name] = ~null
            elif f.kind == "categorical_list":
                out.values[f.name] = _list_rows(col, f.buckets, f.max_len, null)
                out.present[f.name] = ~null
            elif f.kind == "numeric":  # float64 as sent (no copy); a null reads as NaN
                v = np.asarray(col.to_numpy(zero_copy_only=False), np.float64)
                self._numeric_values(f, v, null, out, problems, where)
            else:
                self._vector(f, col, null, out, problems, where)
        return out

    def _numeric_values(self, f: Feature, v: np.ndarray, null: np.ndarray, out: Columns, problems: Problems,
                        where: str) -> None:
        """Check and transform one numeric feature's values (float64 (n,), anything where null)."""
        j = self.numeric_col[f.name]
        present = ~null
        values, ok = np.empty(len(v), np.float32), np.empty(len(v), bool)
        if kernels().numeric(v, present, f.transform == "log1p", self.numeric_default[j], values, ok):
            # something to report (rare): each check names its rows
            finite = np.isfinite(v)
            fits = np.abs(v) <= F32_MAX  # False for NaN
            problems.add(present & ~finite, where, "must be a finite number")
            problems.add(present & finite & ~fits, where, "outside the float32 range")
            if f.transform == "log1p":
                problems.add(present & ~(v > -1) & ~np.isnan(v), where, "must be > -1 for transform log1p")
        out.values[f.name] = values
        out.present[f.name] = ok

    def _vector(self, f: Feature, col: pa.Array, null: np.ndarray, out: Columns, problems: Problems,
                where: str) -> None:
        self._absent(f, len(col), out)  # the rows that pass are written over it
        values = col.values
        if not pa.types.is_float64(values.type):
            values = values.cast(pa.float64())
        # a null number reads as NaN, so its row is refused as not finite
        flat = values.to_numpy(zero_copy_only=False)
        status = kernels().vectors(_offsets(col), null, flat, out.values[f.name], out.present[f.name])
        if status.any():
            problems.add(status == 1, where, f"expected {f.size} numbers")
            problems.add(status == 2, where, "must hold finite float32 numbers")

    def assemble(self, sections: dict[str, Columns], n: int) -> dict[str, np.ndarray]:
        """The model's inputs for n rows from encoded sections (n rows each, or one row broadcast to all n);
        a section left out is absent."""
        out: dict[str, np.ndarray] = {}
        for f in self.config.features:
            if f.kind == "numeric":
                continue
            dtype, shape = self.value_spec(f)
            c = sections.get(f.source)
            if c is None:
                out[f.name] = np.zeros((n, *shape), dtype)
            elif c.n == n:
                out[f.name] = np.ascontiguousarray(c.values[f.name], dtype)
            else:  # one shared row for every candidate
                out[f.name] = np.empty((n, *shape), dtype)
                out[f.name][:] = c.values[f.name][0]
        if self.numeric:
            numeric = np.empty((n, len(self.numeric)), np.float32)
            mask = np.empty((n, len(self.numeric)), np.float32)
            for j, f in enumerate(self.numeric):
                c = sections.get(f.source)
                if c is None:
                    numeric[:, j], mask[:, j] = self.numeric_default[j], 0.0
                else:
                    numeric[:, j], mask[:, j] = c.values[f.name], c.present[f.name]
            out["numeric"], out["numeric_mask"] = numeric, mask
        return {name: out[name] for name, _, _ in self._specs}

    def encode_section(
        self, source: str, arr: pa.StructArray | None, n: int, out: dict[str, np.ndarray], problems: Problems
    ) -> None:
        """Write one section's features into model inputs `out` (rows 0..n-1), as `assemble` would."""
        if arr is None:
            return
        c = self.encode_columns(source, arr, n, problems)
        for f in self.section_features[source]:
            if f.kind == "numeric":
                j = self.numeric_col[f.name]
                out["numeric"][:, j] = c.values[f.name]
                out["numeric_mask"][:, j] = c.present[f.name]
            else:
                out[f.name][:] = c.values[f.name]

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
            known = ~null
            for rows, reason in label_problems(t, v, known):
                problems.add(rows, f"labels.{t.name}", reason)
                known = known & ~rows  # a refused row is dropped; never cast to float32
            values[:, j] = np.where(known, v, 0.0)
            mask[:, j] = known
        return Labels(values, mask)


def _transform(v: np.ndarray, transform: str) -> np.ndarray:
    return np.log1p(v) if transform == "log1p" else v


def _list_rows(col: pa.Array, buckets: int, max_len: int, null: np.ndarray | None = None) -> np.ndarray:
    """(n, max_len) hashed rows of a list column, padded with 0, first max_len kept (`null`: the rows' null
    flags when the caller has them)."""
    out = np.empty((len(col), max_len), dtype=np.int64)
    strings = col.values
    if null is None:
        null = np.asarray(col.is_null()) if col.null_count else np.zeros(len(col), bool)
    value_null = np.asarray(strings.is_null()) if strings.null_count else np.zeros(len(strings), bool)
    kernels().list_rows(_offsets(col), null, *_strings(strings), value_null, buckets, out)
    return out


_NO_BYTES = np.zeros(0, np.uint8)


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, pa.Buffer | bytes]:
    """(offsets (len + 1,) int64, the bytes they index) of a string or large_string array, without a copy."""
    return _offsets(arr), arr.buffers()[2] or b""


def _strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (len + 1,) int64, bytes uint8) of a string array, as the kernels read it; any other type is cast
    to large_string first."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    offsets, data = string_buffers(arr)
    return offsets, _bytes(data)


def _bytes(data: pa.Buffer | bytes) -> np.ndarray:
    """A string array's bytes (`string_buffers`) as the kernels read them: uint8, without a copy."""
    return np.frombuffer(data, np.uint8) if len(data) else _NO_BYTES


def _offsets(arr: pa.Array) -> np.ndarray:
    """(len + 1,) int64: where each row of a list or string array starts in its values (and the last ends)."""
    width = np.int64 if pa.types.is_large_list(arr.type) or pa.types.is_large_string(arr.type) else np.int32
    return np.frombuffer(arr.buffers()[1], dtype=width, count=arr.offset + len(arr) + 1)[arr.offset:].astype(np.int64)


def list_lengths(col: pa.Array) -> np.ndarray:
    """(n,) int64: the length of each row of a list column, 0 where null (`pc.list_flatten` leaves a null row's
    values out, even where its offsets span some). Read from the offsets: one numpy step instead of three
    Arrow calls."""
    lengths = np.diff(col.offsets.to_numpy()).astype(np.int64)
    if col.null_count:
        lengths[np.asarray(col.is_null())] = 0
    return lengths
