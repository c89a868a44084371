"""Reading labelled examples (docs/examples.md) in time order, in bounded memory.

JSON lines are read in blocks of a few MB. A clean block is parsed by Arrow's
C++ JSON reader straight into columns; a block Arrow refuses (a malformed line,
a wrong type) is parsed line by line so that each bad line is named. Values are
then encoded and checked with array operations (`encoding.Encoder`).

Every row carries the position just after it (file, byte offset, line), so a
checkpoint can say exactly where to start again.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from .config import Config
from .encoding import SECTIONS, Encoder, Labels, Problems, example_schema, fnv1a_strings
from .errors import WatchnextError

BLOCK_BYTES = 4 << 20
PARQUET_ROWS = 65_536
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
MAX_REPORTED = 20  # bad lines kept with their reason; the rest are only counted


class DataError(WatchnextError, ValueError):
    """Input that cannot be used: `field` names the file and line ("history.jsonl:12"), the file, or the field
    of a record ("candidate.video_views", "labels.click"); `reason` says why. Also a ValueError: the line-by-line
    parser catches it for a bad line."""


@dataclass
class Position:
    """Where the next unread example starts: file index, byte offset (or row), 1-based line."""

    file_index: int = 0
    offset: int = 0
    line: int = 1

    def to_dict(self) -> dict[str, int]:
        return {"file_index": self.file_index, "offset": self.offset, "line": self.line}


@dataclass
class BadLines:
    """Skipped input, counted, with the first few reasons kept for the report.

    `pending` holds the (file index, line) of skips not yet settled by a
    checkpoint: lines read ahead of the training position are read again after
    a restart, and must not be counted twice.
    """

    count: int = 0
    first: list[str] = field(default_factory=list)
    pending: list[tuple[int, int]] = field(default_factory=list)
    # each kind of reason (its text with the numbers taken out): how many, and the first place it was met
    kinds: dict[str, list] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the reader thread adds

    def add(self, where: str, reason: str, at: tuple[int, int] | None = None) -> None:
        with self.lock:
            self.count += 1
            if at is not None:
                self.pending.append(at)
            if len(self.first) < MAX_REPORTED:
                self.first.append(f"{where}: {reason}")
            kind = _NUMBER.sub("#", reason)[:200]
            if kind in self.kinds:
                self.kinds[kind][0] += 1
            elif len(self.kinds) < 100:
                self.kinds[kind] = [1, f"{where}: {reason}"]

    def commonest(self) -> tuple[int, str] | None:
        """(how many, the first place with its reason) of the commonest kind of skip, or None."""
        with self.lock:
            return max(((n, first) for n, first in self.kinds.values()), default=None, key=lambda x: x[0])

    def settled(self, position: Position) -> int:
        """The count up to `position` (what a checkpoint there may record); forgets older skips."""
        with self.lock:
            self.pending = [p for p in self.pending if p >= (position.file_index, position.line)]
            return self.count - len(self.pending)


@dataclass
class Chunk:
    """Encoded, checked rows: the unit that flows from reading to training."""

    inputs: dict[str, np.ndarray]
    labels: Labels
    position: np.ndarray  # (n,) int64, -1 where unknown
    ts: np.ndarray  # (n,) float64
    line: np.ndarray  # (n,) int64 line (row) numbers, for reports and the exactly-once digest
    end_offset: np.ndarray  # (n,) int64 position just after each row
    end_line: np.ndarray  # (n,) int64
    file_index: np.ndarray  # (n,) int64
    group: np.ndarray  # (n,) uint64 hash of request_id: which rows were ranked together
    propensity: np.ndarray  # (n,) float64 probability of being shown at `position`; 1.0 where absent
    explore_rank: np.ndarray  # (n,) int64 rank before the exploration's swaps; -1: not explored

    _ROW_FIELDS = ("position", "ts", "line", "end_offset", "end_line", "file_index", "group", "propensity",
                   "explore_rank")

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, idx: np.ndarray | slice) -> Chunk:
        return Chunk(
            {k: v[idx] for k, v in self.inputs.items()},
            Labels(self.labels.values[idx], self.labels.mask[idx]),
            **{f: getattr(self, f)[idx] for f in self._ROW_FIELDS},
        )

    @staticmethod
    def concat(parts: Sequence[Chunk]) -> Chunk:
        if len(parts) == 1:
            return parts[0]
        cat = np.concatenate
        return Chunk(
            {k: cat([p.inputs[k] for p in parts]) for k in parts[0].inputs},
            Labels(cat([p.labels.values for p in parts]), cat([p.labels.mask for p in parts])),
            **{f: cat([getattr(p, f) for p in parts]) for f in Chunk._ROW_FIELDS},
        )

    def end(self) -> Position:
        """The position just after the last row."""
        return Position(int(self.file_index[-1]), int(self.end_offset[-1]), int(self.end_line[-1]))


class Decoder:
    """Parses, encodes and checks blocks of example lines for one config."""

    def __init__(self, config: Config, on_bad_line: str | None = None, check_order: bool = True):
        self.config = config
        self.check_order = check_order  # files must be in time order; a stream is only roughly
        self.line_names: list[str] | None = None  # e.g. stream entry ids, used in reports
        self.encoder = Encoder(config)
        self.schema = example_schema(config)
        self.on_bad_line = on_bad_line or config.trainer.on_bad_line
        self.bad = BadLines()
        self.last_ts = -math.inf
        self.file_index = 0  # of the file being read, for BadLines.pending

    # --- parsing ---------------------------------------------------------
    def parse_lines(self, buf: bytes, name: str, first_line: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """Parse a block of whole lines. Returns (table, line numbers, byte end of each row)."""
        arr = np.frombuffer(buf, dtype=np.uint8)
        nl = np.flatnonzero(arr == 10)
        starts = np.concatenate([[0], nl + 1])
        ends = np.concatenate([nl, [len(buf)]])
        if len(buf) and buf[-1:] == b"\n":
            starts, ends = starts[:-1], ends[:-1]
        length = ends - starts
        cr = (length == 1) & (arr[np.minimum(starts, max(len(arr) - 1, 0))] == 13) if len(arr) else length > 0
        nonempty = (length > 0) & ~cr
        lines = first_line + np.flatnonzero(nonempty)
        row_end = np.minimum(ends[nonempty] + 1, len(buf))
        if not nonempty.any():
            return self.schema.empty_table(), lines, row_end
        try:
            table = pj.read_json(
                pa.BufferReader(buf),  # Arrow's own reader: no Python file for its threads to call back into
                read_options=pj.ReadOptions(use_threads=True, block_size=1 << 20),
                parse_options=pj.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="ignore"),
            )
            if table.num_rows == len(lines):
                return table, lines, row_end
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        return self._parse_slowly(buf, starts[nonempty], ends[nonempty], lines, row_end, name)

    def _parse_slowly(self, buf, starts, ends, lines, row_end, name):
        rows, keep = [], []
        for i, (s, e, ln) in enumerate(zip(starts.tolist(), ends.tolist(), lines.tolist())):
            try:
                rows.append(clean_example(json.loads(buf[s:e]), self.config))
                keep.append(i)
            except json.JSONDecodeError as ex:
                self.reject(name, ln, f"not valid JSON ({ex.msg} at column {ex.colno})")
            except DataError as ex:
                self.reject(name, ln, str(ex))
        keep_idx = np.asarray(keep, dtype=np.int64)
        return pa.Table.from_pylist(rows, schema=self.schema), lines[keep_idx], row_end[keep_idx]

    def reject(self, name: str, line: int, reason: str) -> None:
        where = f"{name} entry {self.line_names[line - 1]}" if self.line_names else f"{name}:{line}"
        if self.on_bad_line == "stop":
            raise DataError(where, f"{reason} (set trainer.on_bad_line = \"skip\" to skip bad lines)")
        self.bad.add(where, reason, (self.file_index, line))

    # --- encoding --------------------------------------------------------
    def encode(
        self, table: pa.Table, lines: np.ndarray, row_end: np.ndarray, name: str, file_index: int = 0
    ) -> Chunk:
        """Encode and check rows; bad rows are rejected by the policy, the rest returned."""
        n = table.num_rows
        problems = Problems(n)
        inputs = self.encoder.empty_inputs(n)
        for s in SECTIONS:
            self.encoder.encode_section(s, _column(table, s), n, inputs, problems)
        labels = self.encoder.encode_labels(_column(table, "labels"), n, problems)
        ts_col = table.column("ts")
        ts = ts_col.to_numpy().astype(np.float64) if n else np.zeros(0)
        ts_null = np.asarray(ts_col.is_null()) if ts_col.null_count else np.zeros(n, bool)
        problems.add(ts_null, "ts", "is required (Unix seconds)")
        problems.add(~ts_null & ~np.isfinite(ts), "ts", "must be a finite number")
        pos_col = table.column("position")
        position = pos_col.fill_null(-1).to_numpy().astype(np.int64) if n else np.zeros(0, np.int64)
        problems.add(position < -1, "position", "must be >= 0")
        position[position < 0] = -1
        propensity, explore_rank = _exploration(table, n, problems)
        # time order, among rows that are otherwise fine
        if self.check_order:
            bad = problems.bad
            okts = np.where(bad, -np.inf, ts)
            before = np.maximum.accumulate(np.concatenate([[self.last_ts], okts]))[:-1]
            problems.add(~bad & (ts < before), "ts", "goes backwards (examples must be in time order)")
        bad = problems.bad
        if bad.any():
            for row in np.flatnonzero(bad).tolist():  # only bad rows: few, each needs its reason
                self.reject(name, int(lines[row]), "; ".join(problems.reasons(row)))
        good = np.flatnonzero(~bad)
        if len(good):
            self.last_ts = max(self.last_ts, float(ts[good].max()))
        chunk = Chunk(
            inputs,
            labels,
            position,
            ts,
            lines.astype(np.int64),
            row_end.astype(np.int64),
            lines.astype(np.int64) + 1,
            np.full(n, file_index, dtype=np.int64),
            fnv1a_strings(table.column("request_id").combine_chunks()) if n else np.zeros(0, np.uint64),
            propensity,
            explore_rank,
        )
        return chunk if not bad.any() else chunk.take(good)


def _column(table: pa.Table, name: str):
    return table.column(name) if name in table.column_names else None


def _exploration(table: pa.Table, n: int, problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """(propensity (n,) float64, 1.0 where absent; explore rank (n,) int64, -1 where absent), checked:
    a propensity must be finite and in (0, 1], a rank >= 0."""
    col = _column(table, "propensity")
    if col is None or not n:
        propensity = np.ones(n)
    else:
        propensity = col.fill_null(1.0).to_numpy().astype(np.float64)
        with np.errstate(invalid="ignore"):
            problems.add(~np.isfinite(propensity), "propensity", "must be a finite number")
            problems.add(np.isfinite(propensity) & ~((propensity > 0) & (propensity <= 1)),
                         "propensity", "must be in (0, 1] (the probability of being shown at this position)")
    col = _column(table, "explore")
    if col is None or not n or col.null_count == n:
        return propensity, np.full(n, -1, np.int64)
    rank = pc.struct_field(col, "rank").fill_null(-1).to_numpy().astype(np.int64)
    has = np.asarray(col.is_valid()) & np.asarray(pc.struct_field(col, "rank").is_valid())
    problems.add(np.asarray(col.is_valid()) & ~has, "explore.rank", "is required when explore is given")
    problems.add(has & (rank < 0), "explore.rank", "must be >= 0")
    rank[~has | (rank < 0)] = -1
    return propensity, rank


# ---------------------------------------------------------------- slow path


def clean_example(obj: Any, config: Config) -> dict:
    """Check types of one parsed example, coercing ids to strings. Raises DataError naming the field."""
    if not isinstance(obj, dict):
        raise DataError("", f"expected a JSON object, got {type(obj).__name__}")
    out: dict[str, Any] = {"ts": _number(obj.get("ts"), "ts"), "request_id": obj.get("request_id")}
    if out["request_id"] is not None:
        out["request_id"] = _ident(out["request_id"], "request_id")
    for s in SECTIONS:
        sec = obj.get(s)
        if sec is None:
            out[s] = None
            continue
        if not isinstance(sec, dict):
            raise DataError(s, f"expected an object, got {type(sec).__name__}")
        out[s] = clean_section(sec, config, s)
    pos = obj.get("position")
    if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int)):
        raise DataError("position", f"expected an integer, got {pos!r}")
    out["position"] = pos
    prop = obj.get("propensity")
    if prop is not None:
        prop = _number(prop, "propensity")
    out["propensity"] = prop
    out["explore"] = _explore(obj.get("explore"))
    labels = obj.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise DataError("labels", f"expected an object, got {type(labels).__name__}")
    out["labels"] = {t.name: _number((labels or {}).get(t.name), f"labels.{t.name}", allow_bool=True) for t in config.tasks}
    return out


def _explore(v: Any) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise DataError("explore", f"expected an object, got {type(v).__name__}")
    r = v.get("rank")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int)):
        raise DataError("explore.rank", f"expected an integer, got {r!r}")
    if r is not None and not 0 <= r < 2**63:
        raise DataError("explore.rank", f"must be >= 0, got {r}")
    return {"rank": r}


def clean_section(sec: dict, config: Config, source: str) -> dict:
    """One section's features, type-checked (ids as strings); DataError naming `source`.FEATURE."""
    out: dict[str, Any] = {}
    for f in config.features:
        if f.source != source or sec.get(f.name) is None:
            continue
        v, where = sec[f.name], f"{source}.{f.name}"
        if f.kind == "categorical":
            out[f.name] = _ident(v, where)
        elif f.kind == "categorical_list":
            if not isinstance(v, list):
                raise DataError(where, f"expected a list of ids, got {type(v).__name__}")
            # a list of strings (the usual one) is taken as it is; anything else is checked item by item
            out[f.name] = list(v) if all(isinstance(x, str) for x in v) else [_ident(x, where) for x in v]
        elif f.kind == "numeric":
            out[f.name] = _number(v, where)
        else:
            if not isinstance(v, list):
                raise DataError(where, f"expected a list of {f.size} numbers, got {type(v).__name__}")
            out[f.name] = list(v) if all(isinstance(x, float) for x in v) else [_number(x, where) for x in v]
    return out


def _ident(v: Any, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise DataError(where, f"expected a string or integer id, got {type(v).__name__} {v!r}")


def _number(v: Any, where: str, allow_bool: bool = False) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        if allow_bool:
            return float(v)
        raise DataError(where, f"expected a number, got {v!r}")
    if not isinstance(v, (int, float)):
        raise DataError(where, f"expected a number, got {type(v).__name__} {v!r}")
    try:
        return float(v)
    except OverflowError:  # an integer past float64
        raise DataError(where, "outside the float64 range") from None  # NaN / inf are caught by the encoder's checks, with the others


# ---------------------------------------------------------------- files


class ExampleFiles:
    """Streams Chunks from JSON-lines and Parquet files, in order, from a Position."""

    def __init__(self, paths: Sequence[str | os.PathLike], decoder: Decoder, start: Position | None = None,
                 block_bytes: int = BLOCK_BYTES):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise DataError(str(p), "no such file")
        self.decoder = decoder
        self.start = start or Position()
        self.block_bytes = block_bytes

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def __iter__(self) -> Iterator[tuple[Chunk, int]]:
        """Yields (chunk, bytes of all the files read so far, for progress bars)."""
        base = sum(p.stat().st_size for p in self.paths[: self.start.file_index])
        for i in range(self.start.file_index, len(self.paths)):
            p = self.paths[i]
            start = self.start if i == self.start.file_index else Position(i, 0, 1)
            self.decoder.file_index = i
            parts = self._parquet(p, i, start) if is_parquet(p) else self._jsonl(p, i, start)
            for chunk, done in parts:
                yield chunk, base + done
            base += p.stat().st_size

    def _jsonl(self, p: Path, i: int, start: Position):
        with open(p, "rb") as fh:
            fh.seek(start.offset)
            offset, line, carry = start.offset, start.line, b""
            while True:
                data = fh.read(self.block_bytes)
                buf = carry + data
                if not buf:
                    return
                cut = buf.rfind(b"\n") + 1 if data else len(buf)
                if cut == 0:  # one line longer than a block: read on
                    carry = buf
                    continue
                block, carry = buf[:cut], buf[cut:]
                table, lines, row_end = self.decoder.parse_lines(block, str(p), line)
                chunk = self.decoder.encode(table, lines, row_end + offset, str(p), i)
                offset += len(block)
                line += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
                yield chunk, offset

    def _parquet(self, p: Path, i: int, start: Position):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(str(p), f"not a readable Parquet file: {e}") from None
        size, total_rows = p.stat().st_size, max(pf.metadata.num_rows, 1)
        names = set(pf.schema_arrow.names)
        cols = [n for n in self.decoder.schema.names if n in names]
        row = 0
        for rb in pf.iter_batches(batch_size=PARQUET_ROWS, columns=cols):
            n = rb.num_rows
            if row + n <= start.offset:
                row += n
                continue
            skip = max(0, start.offset - row)
            table = _conform(pa.Table.from_batches([rb]).slice(skip), self.decoder.schema, p)
            first = row + skip
            rows = np.arange(first, row + n, dtype=np.int64)
            chunk = self.decoder.encode(table, rows + 1, rows + 1, str(p), i)
            row += n
            yield chunk, size * row // total_rows


def _conform(table: pa.Table, schema: pa.Schema, p: Path) -> pa.Table:
    cols = []
    for f in schema:
        if f.name in table.column_names:
            try:
                cols.append(table.column(f.name).cast(f.type, safe=True))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{p}: column {f.name!r}", f"cannot read as {f.type}: {e}") from None
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def first_ts(path: str | os.PathLike) -> float | None:
    """The `ts` of a file's first example (its first non-blank line, or row), without reading the rest; None
    when there is none or it is not a finite number (the reader then reports that line itself)."""
    p = Path(path)
    value: Any = None
    if is_parquet(p):
        import pyarrow.parquet as pq

        f = pq.ParquetFile(p)
        if f.metadata.num_rows and "ts" in f.schema_arrow.names:
            col = f.read_row_group(0, columns=["ts"]).column("ts")
            value = col[0].as_py() if len(col) else None
    else:
        with open(p, "rb") as fh:
            for line in fh:
                if line.strip():
                    try:
                        value = json.loads(line).get("ts")
                    except (ValueError, AttributeError):
                        return None
                    break
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def is_parquet(p: Path) -> bool:
    if p.suffix.lower() in (".parquet", ".pq"):
        return True
    with open(p, "rb") as fh:
        return fh.read(4) == b"PAR1"
