"""The encoder's loops over values, compiled by numba: one pass each, no Python per value.

What numpy did in several passes (ten to twenty calls per feature, each of which
costs far more than its arithmetic on a few hundred values), each of these does
in one loop over the batch:

- `fnv1a`: the 64-bit FNV-1a hash of each string of an Arrow string array, read
  from its offsets and bytes;
- `id_rows`: the embedding row of each string of an Arrow string array, and
  whether two of them have the same FNV-1a hash (the service's check for a
  repeated candidate id, in the same pass);
- `hash_rows`: the embedding row of each string of an Arrow string array (FNV-1a,
  its bucket, 0 for a null);
- `list_rows`: the embedding rows of each list row's first strings (FNV-1a);
- `numeric`: a numeric feature's checks (finite, within float32, within log1p's
  domain) and its transform;
- `vectors`: a vector feature's checks (length, finite float32 numbers) and its
  rows;
- `top_rows`: the heads' weighted combination (watchnext/scoring.py's one
  implementation), and the service's answer: the rows of the k best scores,
  rows with a non-finite output left out.

Compiled for the exact argument types below when this module is imported (numba
keeps the machine code under `__pycache__`, or NUMBA_CACHE_DIR, so later imports
only load it: about a second with numba itself); a call with other types fails
loudly instead of compiling again. `watchnext.encoding.kernels()` imports it on
first use.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

from .encoding import F32_MAX, FNV_OFFSET, FNV_PRIME  # loaded already: encoding imports this module on first use
from .scoring import FLOOR


def _in(dtype, dims: int = 1) -> types.Array:
    """A C-contiguous input array; read-only ones too (numpy views of Arrow buffers are)."""
    return types.Array(dtype, dims, "C", readonly=True)


def _out(dtype, dims: int = 1) -> types.Array:
    return types.Array(dtype, dims, "C")


I64, U8, F64, BOOL = _in(types.int64), _in(types.uint8), _in(types.float64), _in(types.boolean)


@numba.njit(cache=True, nogil=True, inline="always")
def _fnv1a(data, lo, hi):  # pragma: no cover - compiled
    """FNV-1a of data[lo:hi] (the one hash loop: `fnv1a` and `list_rows` call it)."""
    h = FNV_OFFSET
    for j in range(lo, hi):
        h = (h ^ np.uint64(data[j])) * FNV_PRIME
    return h


@numba.njit(cache=True, nogil=True, inline="always")
def _row(h, buckets):  # pragma: no cover - compiled
    """The embedding row 1..buckets of FNV-1a hash h (row 0 is kept for missing ids; `encoding.bucket_rows`)."""
    return np.int64(h % np.uint64(buckets)) + 1


@numba.njit(types.void(I64, U8, _out(types.uint64)), cache=True, nogil=True)
def fnv1a(offsets, data, out):  # pragma: no cover - numba runs the compiled loop, not this Python
    """out[i] = FNV-1a of data[offsets[i]:offsets[i + 1]]; len(offsets) == len(out) + 1."""
    for i in range(out.shape[0]):
        out[i] = _fnv1a(data, offsets[i], offsets[i + 1])


@numba.njit(types.boolean(I64, U8, types.int64, _out(types.int64)), cache=True, nogil=True)
def id_rows(offsets, data, buckets, out):  # pragma: no cover - compiled
    """out[i]: the embedding row 1..buckets of the FNV-1a of data[offsets[i]:offsets[i + 1]], as `hash_rows`.
    Returns whether two of the strings have the same FNV-1a hash (sorted, then each next to the one after it)."""
    n = out.shape[0]
    h = np.empty(n, np.uint64)
    for i in range(n):
        h[i] = _fnv1a(data, offsets[i], offsets[i + 1])
        out[i] = _row(h[i], buckets)
    h.sort()
    for i in range(1, n):
        if h[i] == h[i - 1]:
            return True
    return False


@numba.njit(types.void(I64, U8, BOOL, types.int64, _out(types.int64)), cache=True, nogil=True)
def hash_rows(offsets, data, null, buckets, out):  # pragma: no cover - compiled
    """out[i]: the embedding row 1..buckets of the FNV-1a of data[offsets[i]:offsets[i + 1]], 0 where null[i]."""
    for i in range(out.shape[0]):
        if null[i]:
            out[i] = 0
        else:
            out[i] = _row(_fnv1a(data, offsets[i], offsets[i + 1]), buckets)


@numba.njit(types.int64(F64, BOOL, types.boolean, types.float32, _out(types.float32), _out(types.boolean)), cache=True,
            nogil=True)
def numeric(v, present, log1p, default, values, ok):  # pragma: no cover - compiled
    """ok[i]: present, finite, within float32 (and > -1 for log1p); values[i]: the transformed value where ok,
    else `default`. Returns how many present values were refused."""
    refused = 0
    for i in range(v.shape[0]):
        x = v[i]
        good = present[i] and abs(x) <= F32_MAX and (not log1p or x > -1.0)  # False for NaN
        ok[i] = good
        if good:
            values[i] = np.float32(np.log1p(x) if log1p else x)
        else:
            values[i] = default
            refused += present[i]
    return refused


@numba.njit(types.void(I64, BOOL, I64, U8, BOOL, types.int64, _out(types.int64, 2)), cache=True, nogil=True)
def list_rows(lists, null, strings, data, value_null, buckets, out):  # pragma: no cover - compiled
    """out[i, k]: embedding row 1..buckets of the k-th string of list row i (FNV-1a), for its first out.shape[1]
    strings; 0 past its end, for a null row and for a null string. lists: the list offsets into the strings
    (len(out) + 1); strings: the strings' offsets into data."""
    width = out.shape[1]
    for i in range(out.shape[0]):
        lo = lists[i]
        k = 0
        if not null[i]:
            k = min(lists[i + 1] - lo, width)
        for s in range(k):
            v = lo + s
            if value_null[v]:
                out[i, s] = 0
                continue
            out[i, s] = _row(_fnv1a(data, strings[v], strings[v + 1]), buckets)
        for s in range(k, width):
            out[i, s] = 0


@numba.njit(_out(types.int8)(I64, BOOL, F64, _out(types.float32, 2), _out(types.boolean)), cache=True, nogil=True)
def vectors(lists, null, values, out, present):  # pragma: no cover - compiled
    """Each non-null row of a list column whose length is out.shape[1] and whose numbers are finite float32s
    goes to out[i] (present[i] = True); other rows are left as they are. Returns each row's status: 0 taken or
    null, 1 the wrong length, 2 a number not a finite float32."""
    size = out.shape[1]
    status = np.zeros(out.shape[0], np.int8)
    for i in range(out.shape[0]):
        if null[i]:
            continue
        lo = lists[i]
        if lists[i + 1] - lo != size:
            status[i] = 1
            continue
        fit = True
        for k in range(size):
            if not abs(values[lo + k]) <= F32_MAX:  # NaN too
                fit = False
                break
        if not fit:
            status[i] = 2
            continue
        for k in range(size):
            out[i, k] = values[lo + k]
        present[i] = True
    return status


@numba.njit(types.int64(_in(types.float32, 2), F64, types.boolean, _out(types.float64), _out(types.int64)), cache=True,
            nogil=True)
def top_rows(heads, w, multiplicative, scores, top):  # pragma: no cover - compiled
    """scores[i]: row i's weighted combination of heads[i] (`scoring.combine`: linear, or multiplicative with each
    head floored at FLOOR); top: the rows of the len(top) best scores, best first, ties in row order, of the rows
    whose heads and score are all finite (-1 past the last when fewer are). Returns how many rows were not."""
    n, tasks = heads.shape
    finite = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        s = 0.0
        ok = True
        for t in range(tasks):
            h = np.float64(heads[i, t])
            if not np.isfinite(h):
                ok = False
            if multiplicative:  # floored at FLOOR; NaN stays NaN (as np.maximum)
                s += np.log(FLOOR if h < FLOOR else h) * w[t]
            else:
                s += h * w[t]
        if multiplicative:
            s = np.exp(s)
        scores[i] = s
        if ok and np.isfinite(s):
            finite[m] = i
            m += 1
    if top.shape[0]:  # `combine` asks for the scores alone
        rows = finite[:m]
        best = rows[np.argsort(-scores[rows], kind="mergesort")]  # a stable sort: ties keep row order
        k = min(top.shape[0], m)
        top[:k] = best[:k]
        top[k:] = -1
    return n - m
