"""A/B experiments: their definition, validation, JSON form and user assignment (numpy only).

An experiment splits users between arms. Each arm serves a model version (None:
whatever version is promoted) with optional score weights; the first arm is the
control that every other arm is compared with.

Assignment hashes ``"{salt}:{user_id}"`` into one of ``BUCKETS`` buckets and maps
buckets to arms by the cumulative shares::

    bucket = fmix64(fnv1a64(f"{salt}:{user_id}")) % BUCKETS
    arm    = first i with bucket < round(BUCKETS * (share_0 + ... + share_i))

so a user keeps their arm across requests, restarts and service processes, and
nothing is stored per user. FNV-1a alone is not enough: its low bits depend only
on the low bits of the state, so the buckets of two salts would be correlated.
The MurmurHash3 finaliser (fmix64) mixes every bit into every other, which makes
experiments with different salts independent (tested with a chi-square test).

A definition is checked whole before anything stores or serves it: names match
in full, every string is valid Unicode (a lone surrogate cannot be hashed or
written as UTF-8), weights are finite and bounded (`MAX_WEIGHT`; with the
multiplicative score, also such that no head in its range overflows the
score), and `meta` is small (`META_MAX_BYTES`, `META_MAX_DEPTH`).

    >>> exp = Experiment.from_dict({"name": "sat", "arms": [
    ...     {"name": "control", "share": 0.5},
    ...     {"name": "satisfaction", "share": 0.5, "weights": {"like": 4.0}}]})
    >>> exp.assign(np.array(["u1", "u2", "u3"])).tolist()   # arm index per user
    [1, 0, 0]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import ArrayLike

from .encoding import fnv1a, fnv1a_strings
from .errors import WatchnextError

if TYPE_CHECKING:
    from .config import Config

BUCKETS = 10_000  # share resolution 0.01 %
SHARE_TOLERANCE = 1e-6  # shares must sum to 1 within this
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"  # experiment and arm names, matched in full
_NAME = re.compile(NAME_PATTERN)
MAX_SALT_CHARS = 256
# |weight| bound: with heads inside float32 (|y| < 3.4e38), a linear score stays below T * 3.4e44, far inside float64
MAX_WEIGHT = 1e6
META_MAX_BYTES = 4096  # `meta` as compact UTF-8 JSON
META_MAX_DEPTH = 4  # objects and lists inside `meta`, counting meta itself
_META_MAX_INT = 2**53  # integers beyond lose precision as doubles (JavaScript, Redis's cjson)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_LOG_FLOAT64_MAX = math.log(float(np.finfo(np.float64).max))
_M64 = 0xFFFFFFFFFFFFFFFF


class ExperimentError(WatchnextError):
    """An experiment definition that cannot be used; `field` names the offending key (e.g. arms[1].share)."""


# ---------------------------------------------------------------- hashing


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, vectorised: (n,) uint64 -> (n,) uint64."""
    h = np.array(h, dtype=np.uint64, copy=True, ndmin=1)
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


def _fmix64_int(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _as_strings(user_ids: Any) -> pa.Array:
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks()
    if not isinstance(user_ids, pa.Array):
        arr = np.asarray(user_ids)
        if arr.ndim != 1:
            raise ValueError(f"user_ids: expected a 1-d array, got shape {arr.shape}")
        user_ids = pa.array(arr.tolist() if arr.dtype == object else arr)
    if user_ids.null_count:
        raise ValueError(f"user_ids: {user_ids.null_count} missing (null) ids")
    if pa.types.is_integer(user_ids.type):
        user_ids = user_ids.cast(pa.string())
    if not (pa.types.is_string(user_ids.type) or pa.types.is_large_string(user_ids.type)):
        raise ValueError(f"user_ids: expected strings or integers, got {user_ids.type}")
    return user_ids


def buckets(salt: str, user_ids: Any) -> np.ndarray:
    """Bucket in [0, BUCKETS) of each user under `salt`. (n,) ids (str or int) -> (n,) int64.

    Integer ids hash as their decimal string, so 17 and "17" share a bucket.
    """
    ids = _as_strings(user_ids)
    keys = pc.binary_join_element_wise(pa.scalar(f"{salt}:"), ids, "")
    return (fmix64(fnv1a_strings(keys)) % np.uint64(BUCKETS)).astype(np.int64)


def bucket_of(salt: str, user_id: str | int) -> int:
    """The scalar form of `buckets`, for one request."""
    return _fmix64_int(fnv1a(f"{salt}:{user_id}")) % BUCKETS


def bucket_edges(shares: ArrayLike) -> np.ndarray:
    """Exclusive upper bucket of each arm: (A,) int64, the last one is BUCKETS."""
    edges = np.round(np.cumsum(np.asarray(shares, np.float64)) * BUCKETS).astype(np.int64)
    edges[-1] = BUCKETS
    return edges


def assign(salt: str, user_ids: Any, shares: ArrayLike) -> np.ndarray:
    """Arm index of each user: (n,) ids -> (n,) int64 in [0, len(shares))."""
    return np.searchsorted(bucket_edges(shares), buckets(salt, user_ids), side="right").astype(np.int64)


# ---------------------------------------------------------------- the definition


@dataclass(frozen=True)
class Arm:
    name: str
    share: float  # of the experiment's users
    version: int | None = None  # None: the promoted version at the time of the request
    weights: Mapping[str, float] | None = None  # None: the config's [score] weights

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "share": self.share, "version": self.version,
                "weights": None if self.weights is None else dict(self.weights)}


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    salt: str
    created_at: float | None = None  # Unix seconds; the report's pre-period ends here
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form (owner, description)

    @property
    def control(self) -> Arm:
        return self.arms[0]

    @property
    def shares(self) -> np.ndarray:
        """Declared shares, (A,)."""
        return np.array([a.share for a in self.arms])

    @property
    def bucket_shares(self) -> np.ndarray:
        """The shares the buckets realise (declared shares rounded to 1/BUCKETS), (A,)."""
        return np.diff(bucket_edges(self.shares), prepend=0) / BUCKETS

    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    def arm_index(self, name: str) -> int:
        for i, a in enumerate(self.arms):
            if a.name == name:
                return i
        raise KeyError(name)

    def assign(self, user_ids: Any) -> np.ndarray:
        """Arm index of each user, (n,) -> (n,) int64."""
        return assign(self.salt, user_ids, self.shares)

    def arm_for(self, user_id: str | int) -> Arm:
        """The arm of one user (the service's per-request path; same answer as `assign`)."""
        b = bucket_of(self.salt, user_id)
        return self.arms[int(np.searchsorted(bucket_edges(self.shares), b, side="right"))]

    def check_versions(self, available: Collection[int]) -> None:
        """Refuse arms whose model version is not in the repository."""
        for i, a in enumerate(self.arms):
            if a.version is not None and a.version not in available:
                have = ", ".join(map(str, sorted(available))) or "none"
                raise ExperimentError(f"arms[{i}].version", f"version {a.version} is not in the model repository (have: {have})")

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "salt": self.salt, "created_at": self.created_at,
                "arms": [a.to_dict() for a in self.arms], "meta": dict(self.meta)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, config: Config | None = None) -> Experiment:
        return cls.from_dict(parse_json(text), config)

    @classmethod
    def from_dict(cls, data: Any, config: Config | None = None, name: str | None = None) -> Experiment:
        """Validate a definition (a request body, or stored JSON).

        `name` (the URL's) is used when the body has none, and must agree when it has one.
        With `config`, arm weights are checked against its tasks. The salt defaults to
        the name, so a re-created experiment keeps its split; change the salt to reshuffle.
        """
        if not isinstance(data, Mapping):
            raise ExperimentError("<body>", f"expected an object, got {type(data).__name__}")
        unknown = set(data) - {"name", "salt", "arms", "created_at", "meta"}
        if unknown:
            raise ExperimentError(sorted(unknown)[0], "unknown field (expected name, salt, arms, created_at, meta)")
        body_name = data.get("name", name)
        if name is not None and body_name != name:
            raise ExperimentError("name", f"{body_name!r} does not match the experiment in the URL, {name!r}")
        exp_name = _name("name", body_name)
        salt = data.get("salt", exp_name)
        if not isinstance(salt, str) or not salt or len(salt) > MAX_SALT_CHARS:
            raise ExperimentError("salt", f"expected a non-empty string of at most {MAX_SALT_CHARS} characters, "
                                          f"got {_shown(salt)}")
        _unicode("salt", salt)
        created = data.get("created_at")
        if created is not None and (isinstance(created, bool) or not isinstance(created, (int, float))
                                    or not math.isfinite(created)):
            raise ExperimentError("created_at", f"expected Unix seconds, got {created!r}")
        meta = _meta({} if data.get("meta") is None else data["meta"])
        raw_arms = data.get("arms")
        if not isinstance(raw_arms, list) or len(raw_arms) < 2:
            raise ExperimentError("arms", "expected a list of at least two arms (the first is the control)")
        arms = tuple(_arm(i, a, config) for i, a in enumerate(raw_arms))
        seen: dict[str, int] = {}
        for i, a in enumerate(arms):
            if a.name in seen:
                raise ExperimentError(f"arms[{i}].name", f"{a.name!r} is also the name of arms[{seen[a.name]}]")
            seen[a.name] = i
        total = sum(a.share for a in arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ExperimentError("arms", f"shares must sum to 1, got {total:.6g}")
        return cls(exp_name, arms, salt, None if created is None else float(created), meta)


def parse_json(text: str | bytes) -> Any:
    """json.loads whose every failure is an ExperimentError: not JSON, not UTF-8, or nested past Python's
    recursion limit (json.loads raises RecursionError there)."""
    try:
        return json.loads(text)
    except ValueError as e:  # UnicodeDecodeError too
        raise ExperimentError("<body>", f"not valid JSON: {e}") from None
    except RecursionError:
        raise ExperimentError("<body>", "not valid JSON: nested too deeply") from None


def _unicode(where: str, v: str, what: str = "") -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate: JSON lets "\\ud800" through)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ExperimentError(where, f"{what}not valid Unicode: {v[e.start:e.end]!r} at character {e.start} "
                                     "(a \\ud800-\\udfff escape must be half of a surrogate pair)") from None


def _meta(meta: Any) -> dict[str, Any]:
    """Free-form, but storable and servable: valid Unicode, finite numbers, small and shallow."""
    if not isinstance(meta, Mapping):
        raise ExperimentError("meta", f"expected an object, got {type(meta).__name__}")

    def check(where: str, v: Any, depth: int) -> None:
        if isinstance(v, (Mapping, list)):
            if depth > META_MAX_DEPTH:
                raise ExperimentError(where, f"nested too deeply (meta holds at most {META_MAX_DEPTH} levels)")
            items = v.items() if isinstance(v, Mapping) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    _unicode(where, k, f"key {k!r}: ")
                check(f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]", x, depth + 1)
        elif isinstance(v, str):
            _unicode(where, v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ExperimentError(where, f"expected a finite number, got {v!r}")
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > _META_MAX_INT:
            raise ExperimentError(where, f"integers are limited to +-2**53, got {v}")
        elif v is not None and not isinstance(v, (bool, int, float)):
            raise ExperimentError(where, f"expected JSON values, got {type(v).__name__}")

    check("meta", meta, 1)
    size = len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode())
    if size > META_MAX_BYTES:
        raise ExperimentError("meta", f"at most {META_MAX_BYTES} bytes as JSON, got {size}")
    return dict(meta)


def _name(where: str, v: Any) -> str:
    if not isinstance(v, str) or not _NAME.fullmatch(v):
        raise ExperimentError(where, f"use 1-64 letters, digits, '_', '-' or '.', starting with a letter, digit or '_'; "
                                     f"got {_shown(v)}")
    return v


def _shown(v: Any, limit: int = 80) -> str:
    """repr(v), cut short: an error message never echoes a whole body."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} characters)"


def _arm(i: int, raw: Any, config: Config | None) -> Arm:
    where = f"arms[{i}]"
    if not isinstance(raw, Mapping):
        raise ExperimentError(where, f"expected an object, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "share", "version", "weights"}
    if unknown:
        raise ExperimentError(f"{where}.{sorted(unknown)[0]}", "unknown field (expected name, share, version, weights)")
    name = _name(f"{where}.name", raw.get("name"))
    share = raw.get("share")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
        raise ExperimentError(f"{where}.share", f"expected a number, got {share!r}")
    if not 1.0 / BUCKETS <= share <= 1.0:
        raise ExperimentError(f"{where}.share", f"must be between {1.0 / BUCKETS:g} and 1, got {share!r}")
    version = raw.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ExperimentError(f"{where}.version", f"expected a version number >= 1, or null for the promoted version; got {version!r}")
    weights = raw.get("weights")
    if weights is not None:
        if not isinstance(weights, Mapping) or not weights:
            raise ExperimentError(f"{where}.weights", "expected a non-empty object of task: weight")
        weights = _weights(f"{where}.weights", weights, config)
    return Arm(name, float(share), version, weights)


def _weights(where: str, weights: Mapping[str, Any], config: Config | None) -> dict[str, float]:
    """Finite, |w| <= MAX_WEIGHT; with `config`, keys are its tasks and the score combination cannot overflow."""
    out = {}
    for k, v in weights.items():
        if not isinstance(k, str) or not k or len(k) > 64 or not all(c.isalnum() or c == "_" for c in k):
            raise ExperimentError(f"{where}.{k}", "a task name is 1-64 letters, digits and '_'")
        _unicode(f"{where}.{k}", k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ExperimentError(f"{where}.{k}", f"expected a finite number, got {v!r}")
        if abs(v) > MAX_WEIGHT:
            raise ExperimentError(f"{where}.{k}", f"must lie within +-{MAX_WEIGHT:g}, got {v!r}")
        out[k] = float(v)
    if config is None:
        return out
    from .config import ConfigError, parse_weights

    try:
        out = parse_weights(out, config, where)
    except ConfigError as e:  # its field is `where`.TASK: the request's
        raise ExperimentError(e.field, e.reason) from None
    if config.score.combine == "multiplicative":
        _product_bound(where, out, config)
    return out


def _product_bound(where: str, weights: Mapping[str, float], config: Config) -> None:
    """The multiplicative score is exp(sum_t w_t log max(y_t, FLOOR)): refuse weights for which some heads in
    their range (binary [0, 1], regression up to float32's max) make that exponent overflow float64."""
    from .scoring import FLOOR

    kind = {t.name: t.kind for t in config.tasks}
    worst = sum(max(w * math.log(FLOOR), w * math.log(1.0 if kind[k] == "binary" else _FLOAT32_MAX))
                for k, w in weights.items())
    if worst > _LOG_FLOAT64_MAX:
        raise ExperimentError(where, f"with [score] combine = multiplicative these weights can overflow the score: "
                                     f"heads in their range reach exp({worst:.4g}), past float64's exp({_LOG_FLOAT64_MAX:.4g})")
