"""The one config file (docs/configuration.md), parsed into typed, validated objects.

The trainer, the exporter and the service all read the same file, so training
and serving cannot disagree about a feature. A bad file fails at start with
the file, the key and the reason::

    watchnext.toml: features[3].kind: expected one of categorical, ..., got 'numbr'
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import tomllib
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import WatchnextError

MAX_SHARDS = 1024  # [stream] shards: keys per write script stay few
SOURCES = ("user", "query", "context", "candidate")


class FeatureKind(enum.StrEnum):
    """What a feature's value is; a member equals its plain string ("categorical")."""

    CATEGORICAL = "categorical"  # one hashed id -> one embedding row
    CATEGORICAL_LIST = "categorical_list"  # up to max_len hashed ids -> their mean embedding
    NUMERIC = "numeric"  # one float, transformed and standardised
    VECTOR = "vector"  # `size` floats (a precomputed embedding)


class TaskKind(enum.StrEnum):
    """What a task's label is; a member equals its plain string ("binary")."""

    BINARY = "binary"
    REGRESSION = "regression"


FEATURE_KINDS = tuple(FeatureKind)
TASK_KINDS = tuple(TaskKind)
TASK_GROUPS = ("engagement", "satisfaction")
TRANSFORMS = ("none", "log1p")
ARCHS = ("mmoe", "shared_bottom")
COMBINES = ("linear", "multiplicative")
BIAS_MODES = ("tower", "feature")
MAX_CROSS_ROWS = 1_000_000  # a [bias] cross table's rows (the product of its features' rows)
BAD_LINE_POLICIES = ("skip", "stop")
IPW_MODES = ("none", "estimated", "curve")  # [trainer] ipw: where p(position) comes from
IPW_METHODS = ("target", "weight")  # [trainer] ipw_method: how the click loss uses it
MAX_EXPLORE_SHARE = 0.5  # of requests shown in the randomised order
POSITION = "position"  # the bias feature read from the example's top level
FLOAT32_MAX = 3.4028234663852886e38  # labels are trained as float32: a range must lie inside it
REGRESSION_LIMIT = 1e7  # default bound of a regression label (seconds, counts, scores...)

DEFAULT_CONFIG_NAME = "watchnext.toml"


class ConfigError(WatchnextError):
    """A config file that cannot be used: `field` names the file and the key ("watchnext.toml: features[3].kind"),
    `reason` why."""


@dataclass(frozen=True)
class Feature:
    name: str
    source: str
    kind: FeatureKind
    buckets: int = 0  # categorical, categorical_list: hashed rows (row 0 is "missing")
    table: str | None = None  # share the embedding table of this categorical feature (same ids)
    dim: int = 0  # categorical, categorical_list: embedding width
    max_len: int = 0  # categorical_list: longer lists keep their first max_len ids
    transform: str = "none"  # numeric
    default: float = 0.0  # numeric: value the model sees when missing (before scaling)
    size: int = 0  # vector


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    group: str
    loss_weight: float = 1.0
    transform: str = "none"  # regression only
    given: str | None = None  # label counts only where this binary task is 1
    # the label an impression gets when no feedback arrived in its attribution
    # window (click -> 0); None keeps it missing (satisfaction labels)
    default: float | None = None
    # the values a label may take, inclusive; a value outside is refused (API 422,
    # a bad line for the trainer). Not part of any hash: it shapes no parameter.
    range: tuple[float, float] = (0.0, 1.0)
    # whether the shallow tower's logit is added to this task's logit in training
    # (binary tasks only; default: binary tasks without `given`)
    bias: bool = False


def default_range(kind: str, transform: str) -> tuple[float, float]:
    """binary [0, 1]; regression [0, 1e7] with transform log1p, else [-1e7, 1e7]."""
    if kind == "binary":
        return (0.0, 1.0)
    return (0.0 if transform == "log1p" else -REGRESSION_LIMIT, REGRESSION_LIMIT)


@dataclass(frozen=True)
class Bias:
    features: tuple[str, ...] = ()
    dropout: float = 0.1  # share of training examples whose position input is hidden
    max_position: int = 32  # positions past this share one row
    dim: int = 8
    hidden: int = 16
    mode: str = "tower"  # tower: position feeds the shallow tower; feature: the main model (missing at serving)
    cross: tuple[str, ...] = ()  # bias features that get one joint embedding, e.g. (position, device)
    observation_dropout: float = 0.0  # share of training examples whose whole bias logit is dropped
    gradient_reversal: float = 0.0  # strength of the reversed adversary gradient into the tower; 0: no adversary

    @property
    def tower_features(self) -> tuple[str, ...]:
        """The shallow tower's inputs: all features, less position in mode `feature`."""
        return tuple(n for n in self.features if not (self.mode == "feature" and n == POSITION))

    def shape_dict(self) -> dict[str, Any]:
        """The keys that shape parameters (the dropouts and the reversal's strength do not)."""
        d = asdict(self)
        for k in ("dropout", "observation_dropout", "gradient_reversal"):
            d.pop(k)
        d["adversary"] = self.gradient_reversal > 0
        return d


@dataclass(frozen=True)
class Model:
    name: str = "ranker"
    arch: str = "mmoe"
    experts: int = 4
    expert_layers: tuple[int, ...] = (128, 64)
    tower_layers: tuple[int, ...] = (32,)
    expert_dropout: float = 0.1
    interactions: bool = True  # pairwise dot products between feature fields in the shared input
    interaction_dim: int = 8
    interaction_heads: int = 4


@dataclass(frozen=True)
class Score:
    weights: Mapping[str, float] = field(default_factory=dict)
    combine: str = "linear"  # linear: sum w*y ; multiplicative: prod y**w


@dataclass(frozen=True)
class Trainer:
    batch_size: int = 512
    learning_rate: float = 0.001
    embedding_learning_rate: float = 0.01
    weight_decay: float = 0.0
    export_every_examples: int = 200_000
    export_interval_s: float = 300.0
    checkpoint_every_examples: int = 100_000
    checkpoint_interval_s: float = 60.0
    eval_window: int = 100_000  # progressive metrics cover the newest this many examples
    report_every_examples: int = 50_000
    on_bad_line: str = "skip"  # skip (count, report line numbers) | stop
    seed: int = 0
    threads: int = 0  # 0: the CPUs this process may use (cgroup/affinity aware)
    # inverse propensity scoring of the click task (the first binary task without `given`), p = the examination
    # probability of the position relative to position 0 (docs/exploration.md): none | estimated (from the
    # explored examples seen so far, training/propensity.py) | curve (`ipw_curve`, e.g. from an offline
    # randomisation experiment)
    ipw: str = "none"
    ipw_method: str = "target"  # target: BCE against click / p (unbiased) | weight: click loss weighted by 1 / p
    ipw_clip: float = 10.0  # p is taken as at least 1 / ipw_clip (largest 1 / p)
    ipw_min_count: int = 200  # explored impressions a (rank, position) cell needs before its ratio is used
    ipw_curve: tuple[float, ...] = ()  # p by position (p_0 = 1; past its end: the last value), for ipw = "curve"


@dataclass(frozen=True)
class Stream:
    key: str = "watchnext:training"
    group: str = "trainer"
    claim_idle_ms: int = 60_000  # entries pending longer than this on a dead worker are taken over
    maxlen: int = 1_000_000  # approximate cap on the stream's length (each shard's, when sharded)
    shards: int = 1  # > 1: the stream is `shards` keys `<key>:<i>`; an example goes to shard_of(its user id)

    def keys(self) -> list[str]:
        """The training stream's keys: `key` itself, or `<key>:0` ... `<key>:<shards - 1>`."""
        return [self.key] if self.shards == 1 else [f"{self.key}:{i}" for i in range(self.shards)]

    def shard_of(self, user_id: str) -> int:
        """The shard of an example by its user's id: crc32 of the id's UTF-8 bytes modulo `shards` (stable across
        processes, machines and Python versions, unlike hash()), so one user's examples stay in order on one key."""
        return zlib.crc32(user_id.encode()) % self.shards if self.shards > 1 else 0


@dataclass(frozen=True)
class Service:
    max_candidates: int = 2000
    max_body_bytes: int = 8 * 1024 * 1024
    default_top_k: int = 20
    attribution_window_s: float = 1800.0
    feature_timeout_ms: float = 20.0
    feature_cache_mb: float = 256.0  # each service process's cache of encoded store entries
    model_poll_s: float = 2.0
    explore_share: float = 0.0  # requests (by a hash of request_id) shown in RandPair order (watchnext/explore.py)


@dataclass(frozen=True)
class Config:
    features: tuple[Feature, ...]
    tasks: tuple[Task, ...]
    item_id: str | None = None
    bias: Bias = Bias()
    model: Model = Model()
    score: Score = Score()
    trainer: Trainer = Trainer()
    stream: Stream = Stream()
    service: Service = Service()
    path: str = "<config>"

    # --- derived views -------------------------------------------------
    def features_of(self, kind: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind == kind)

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def task_index(self, name: str) -> int:
        return [t.name for t in self.tasks].index(name)

    @property
    def binary_tasks(self) -> tuple[Task, ...]:
        return tuple(t for t in self.tasks if t.kind == "binary")

    def model_dict(self) -> dict[str, Any]:
        """The parts that define the exported graph's inputs and outputs (a task's label range does not)."""
        return {
            "item_id": self.item_id,
            "features": [asdict(f) for f in self.features],
            "tasks": [{k: v for k, v in asdict(t).items() if k not in ("range", "bias")} for t in self.tasks],
            "model": asdict(self.model),
        }

    def checkpoint_dict(self) -> dict[str, Any]:
        """Everything that shapes the trained parameters: the exported model and the shallow tower."""
        tasks = [{k: v for k, v in asdict(t).items() if k != "range"} for t in self.tasks]  # with each task's bias flag
        return {**self.model_dict(), "tasks": tasks, "bias": self.bias.shape_dict()}

    @property
    def hash(self) -> str:
        """Identifies the model's interface: a version trained under another hash is refused.

        Score weights, trainer and service settings are left out on purpose: they
        can change without retraining.
        """
        return _hash(self.model_dict())

    @property
    def checkpoint_hash(self) -> str:
        """Identifies the parameters' shapes (`hash` plus `[bias]` and the tasks' `bias` flags): a checkpoint
        saved under another is refused. The dropouts and the reversal's strength are left out: they shape nothing."""
        return _hash(self.checkpoint_dict())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["score"]["weights"] = dict(self.score.weights)
        return d


def _hash(d: dict[str, Any]) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- parsing


class _Section:
    """Reads typed values out of one TOML table, naming the key on error."""

    def __init__(self, path: str, where: str, table: Any):
        self.path, self.where = path, where
        if not isinstance(table, dict):
            self.fail(f"expected a table, got {type(table).__name__}")
        self.table = dict(table)
        self.used: set[str] = set()

    def fail(self, reason: str, key: str | None = None) -> None:
        loc = f"{self.where}.{key}" if key and self.where else (key or self.where or "<top>")
        raise ConfigError(f"{self.path}: {loc}", reason)

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ..., choices: tuple | None = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                self.fail("is required", key)
            return default
        v = self.table[key]
        ok = isinstance(v, typ) and not (isinstance(v, bool) and bool not in _as_tuple(typ))
        if typ is float or (isinstance(typ, tuple) and float in typ):
            ok = ok or (isinstance(v, int) and not isinstance(v, bool))
            if ok:
                v = float(v)
                if not math.isfinite(v):
                    self.fail(f"must be a finite number, got {v}", key)
        if not ok:
            names = "/".join(t.__name__ for t in _as_tuple(typ))
            self.fail(f"expected {names}, got {type(v).__name__} {v!r}", key)
        if choices is not None and v not in choices:
            self.fail(f"expected one of {', '.join(map(str, choices))}, got {v!r}", key)
        return v

    def positive(self, key: str, default: Any = ..., typ: type = int, zero_ok: bool = False) -> Any:
        v = self.get(key, typ, default)
        if v is not None and (v < 0 or (v == 0 and not zero_ok)):
            self.fail(f"must be {'>= 0' if zero_ok else '> 0'}, got {v}", key)
        return v

    def fraction(self, key: str, default: float) -> float:
        v = self.get(key, float, default)
        if not 0.0 <= v < 1.0:
            self.fail(f"must be in [0, 1), got {v}", key)
        return v

    def int_list(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        v = self.get(key, list, list(default))
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
            self.fail(f"expected a list of positive integers, got {v!r}", key)
        return tuple(v)

    def done(self) -> None:
        extra = sorted(set(self.table) - self.used)
        if extra:
            self.fail(f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}")


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _parse_feature(path: str, i: int, raw: Any) -> Feature:
    s = _Section(path, f"features[{i}]", raw)
    name = s.get("name", str)
    s.where = f"features[{i}] ({name})"
    source = s.get("source", str, choices=SOURCES)
    kind = FeatureKind(s.get("kind", str, choices=FEATURE_KINDS))
    kw: dict[str, Any] = {}
    if kind in ("categorical", "categorical_list"):
        kw["table"] = s.get("table", str, None)
        shared = kw["table"] is not None  # buckets and dim come from the table's feature
        kw["buckets"] = s.positive("buckets", None if shared else ...) or 0
        kw["dim"] = s.positive("dim", None if shared else 16) or 0
        if kind == "categorical_list":
            kw["max_len"] = s.positive("max_len", 20)
    elif kind == "numeric":
        kw["transform"] = s.get("transform", str, "none", TRANSFORMS)
        kw["default"] = s.get("default", float, 0.0)
    else:
        kw["size"] = s.positive("size")
    s.done()
    return Feature(name=name, source=source, kind=kind, **kw)


def _parse_task(path: str, i: int, raw: Any) -> Task:
    s = _Section(path, f"tasks[{i}]", raw)
    name = s.get("name", str)
    s.where = f"tasks[{i}] ({name})"
    kind = TaskKind(s.get("kind", str, choices=TASK_KINDS))
    group = s.get("group", str, choices=TASK_GROUPS)
    loss_weight = s.positive("loss_weight", 1.0, float, zero_ok=True)
    transform = s.get("transform", str, "none", TRANSFORMS)
    if kind == "binary" and transform != "none":
        s.fail("a binary task takes no transform", "transform")
    given = s.get("given", str, None)
    default = s.get("default", float, None)
    if kind == "binary" and default not in (None, 0.0, 1.0):
        s.fail(f"a binary task's default must be 0 or 1, got {default}", "default")
    lo, hi = _parse_range(s, kind, transform)
    if default is not None and not lo <= default <= hi:
        s.fail(f"must lie in the task's range [{lo:g}, {hi:g}], got {default:g}", "default")
    bias = s.get("bias", bool, kind == "binary" and given is None)
    if bias and kind != "binary":
        s.fail("only a binary task takes the shallow tower's logit", "bias")
    s.done()
    return Task(name, kind, group, loss_weight, transform, given, default, (lo, hi), bias)


def _parse_range(s: _Section, kind: str, transform: str) -> tuple[float, float]:
    """`range = [lo, hi]`: inclusive, lo < hi, inside float32; binary tasks only [0, 1]; log1p needs lo > -1."""
    if "range" not in s.table:
        s.used.add("range")
        return default_range(kind, transform)
    v = s.get("range", list)
    if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        s.fail(f"expected [lo, hi], two numbers, got {v!r}", "range")
    lo, hi = float(v[0]), float(v[1])
    if not all(math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in (lo, hi)):
        s.fail(f"bounds must be finite numbers within float32 (|x| <= {FLOAT32_MAX:.4g}), got {v!r}", "range")
    if not lo < hi:
        s.fail(f"lo must be < hi, got [{lo:g}, {hi:g}]", "range")
    if kind == "binary" and (lo, hi) != (0.0, 1.0):
        s.fail(f"a binary task's labels are 0 or 1: its range can only be [0, 1], got [{lo:g}, {hi:g}]", "range")
    if transform == "log1p" and lo <= -1:
        s.fail(f"transform log1p needs lo > -1, got {lo:g}", "range")
    return lo, hi


def parse_config(data: Mapping[str, Any], path: str = "<config>") -> Config:
    """Validate a parsed TOML document; raises ConfigError naming the key."""
    top = _Section(path, "", data)
    item = _Section(path, "item", top.get("item", dict, {}))
    item_id = item.get("id", str, None)
    item.done()

    raw_features = top.get("features", list)
    if not raw_features:
        top.fail("needs at least one [[features]] entry", "features")
    features = tuple(_parse_feature(path, i, f) for i, f in enumerate(raw_features))
    raw_tasks = top.get("tasks", list)
    if not raw_tasks:
        top.fail("needs at least one [[tasks]] entry", "tasks")
    tasks = tuple(_parse_task(path, i, t) for i, t in enumerate(raw_tasks))

    _check_names(path, "features", [f.name for f in features])
    features = _resolve_tables(path, features)
    _check_names(path, "tasks", [t.name for t in tasks])
    if item_id is not None:
        cand = {f.name: f for f in features if f.source == "candidate"}
        if item_id not in cand:
            top.fail(f"{item_id!r} is not a candidate feature", "item.id")
        if cand[item_id].kind != "categorical":  # an id is a string: responses, feedback and the store name items by it
            top.fail(f"{item_id!r} is a {cand[item_id].kind} feature; an item id must be categorical", "item.id")
    binary = {t.name for t in tasks if t.kind == "binary"}
    for i, t in enumerate(tasks):
        if t.given is not None and (t.given not in binary or t.given == t.name):
            top.fail(f"given={t.given!r} must name another binary task", f"tasks[{i}].given")

    b = _Section(path, "bias", top.get("bias", dict, {}))
    bias_features = b.get("features", list, [])
    by_name = {f.name: f for f in features}
    for name in bias_features:
        if name != POSITION and (name not in by_name or by_name[name].kind != "categorical"):
            b.fail(f"{name!r} must be 'position' or a categorical feature", "features")
    if len(set(bias_features)) != len(bias_features):
        b.fail(f"names a feature twice: {bias_features!r}", "features")
    bias = Bias(
        features=tuple(bias_features),
        dropout=b.fraction("dropout", 0.1),
        max_position=b.positive("max_position", 32),
        dim=b.positive("dim", 8),
        hidden=b.positive("hidden", 16),
        mode=b.get("mode", str, "tower", BIAS_MODES),
        cross=tuple(b.get("cross", list, [])),
        observation_dropout=b.fraction("observation_dropout", 0.0),
        gradient_reversal=b.positive("gradient_reversal", 0.0, float, zero_ok=True),
    )
    _check_bias(b, bias, by_name)
    b.done()

    m = _Section(path, "model", top.get("model", dict, {}))
    model = Model(
        name=m.get("name", str, "ranker"),
        arch=m.get("arch", str, "mmoe", ARCHS),
        experts=m.positive("experts", 4),
        expert_layers=m.int_list("expert_layers", (128, 64)),
        tower_layers=m.int_list("tower_layers", (32,)),
        expert_dropout=m.fraction("expert_dropout", 0.1),
        interactions=m.get("interactions", bool, True),
        interaction_dim=m.positive("interaction_dim", 8),
        interaction_heads=m.positive("interaction_heads", 4),
    )
    if not model.name.replace("_", "").replace("-", "").isalnum():
        m.fail(f"must be letters, digits, '-' or '_' (it names a folder), got {model.name!r}", "name")
    if not model.expert_layers:
        m.fail("needs at least one layer", "expert_layers")
    m.done()

    sc = _Section(path, "score", top.get("score", dict, {}))
    weights = sc.get("weights", dict, {t.name: 1.0 for t in tasks if t.kind == "binary"})
    score = Score(weights=_parse_weights(path, "score.weights", weights, tasks), combine=sc.get("combine", str, "linear", COMBINES))
    sc.done()

    tr = _Section(path, "trainer", top.get("trainer", dict, {}))
    trainer = Trainer(
        batch_size=tr.positive("batch_size", 512),
        learning_rate=tr.positive("learning_rate", 0.001, float),
        embedding_learning_rate=tr.positive("embedding_learning_rate", 0.01, float),
        weight_decay=tr.positive("weight_decay", 0.0, float, zero_ok=True),
        export_every_examples=tr.positive("export_every_examples", 200_000),
        export_interval_s=tr.positive("export_interval_s", 300.0, float),
        checkpoint_every_examples=tr.positive("checkpoint_every_examples", 100_000),
        checkpoint_interval_s=tr.positive("checkpoint_interval_s", 60.0, float),
        eval_window=tr.positive("eval_window", 100_000),
        report_every_examples=tr.positive("report_every_examples", 50_000),
        on_bad_line=tr.get("on_bad_line", str, "skip", BAD_LINE_POLICIES),
        seed=tr.get("seed", int, 0),
        threads=tr.positive("threads", 0, int, zero_ok=True),
        ipw=tr.get("ipw", str, "none", IPW_MODES),
        ipw_clip=tr.positive("ipw_clip", 10.0, float),
        ipw_min_count=tr.positive("ipw_min_count", 200),
        ipw_method=tr.get("ipw_method", str, "target", IPW_METHODS),
        ipw_curve=_ipw_curve(tr),
    )
    if trainer.ipw_clip < 1.0:
        tr.fail(f"must be >= 1 (weights are 1 / p with p <= 1), got {trainer.ipw_clip:g}", "ipw_clip")
    if trainer.ipw == "curve" and not trainer.ipw_curve:
        tr.fail('is required with ipw = "curve": the examination probability by position, [1.0, p_1, ...]',
                "ipw_curve")
    tr.done()

    st = _Section(path, "stream", top.get("stream", dict, {}))
    stream = Stream(
        key=st.get("key", str, "watchnext:training"),
        group=st.get("group", str, "trainer"),
        claim_idle_ms=st.positive("claim_idle_ms", 60_000),
        maxlen=st.positive("maxlen", 1_000_000),
        shards=st.positive("shards", 1),
    )
    if stream.shards > MAX_SHARDS:
        st.fail(f"must be at most {MAX_SHARDS}, got {stream.shards}", "shards")
    st.done()

    sv = _Section(path, "service", top.get("service", dict, {}))
    service = Service(
        max_candidates=sv.positive("max_candidates", 2000),
        max_body_bytes=sv.positive("max_body_bytes", 8 * 1024 * 1024),
        default_top_k=sv.positive("default_top_k", 20),
        attribution_window_s=sv.positive("attribution_window_s", 1800.0, float),
        feature_timeout_ms=sv.positive("feature_timeout_ms", 20.0, float),
        feature_cache_mb=sv.positive("feature_cache_mb", 256.0, float),
        model_poll_s=sv.positive("model_poll_s", 2.0, float),
        explore_share=sv.get("explore_share", float, 0.0),
    )
    if not 0.0 <= service.explore_share <= MAX_EXPLORE_SHARE:
        sv.fail(f"must be in [0, {MAX_EXPLORE_SHARE}], got {service.explore_share:g}", "explore_share")
    sv.done()
    top.done()
    return Config(features, tasks, item_id, bias, model, score, trainer, stream, service, path)


def _check_bias(b: _Section, bias: Bias, by_name: dict[str, Feature]) -> None:
    """What each `[bias]` key needs of the others (the keys are named on error)."""
    if bias.mode == "feature" and POSITION not in bias.features:
        b.fail("mode 'feature' feeds the position to the model: add 'position' to bias.features", "mode")
    tower = bias.tower_features
    for key in ("observation_dropout", "gradient_reversal"):
        if getattr(bias, key) > 0 and not tower:
            b.fail(f"acts on the shallow tower, which has no input (bias.features {list(bias.features)!r}, "
                   f"mode {bias.mode!r})", key)
    if not bias.cross:
        return
    if not all(isinstance(n, str) for n in bias.cross):
        b.fail(f"expected a list of feature names, got {list(bias.cross)!r}", "cross")
    if len(bias.cross) < 2 or len(set(bias.cross)) != len(bias.cross):
        b.fail(f"needs two or more different features, got {list(bias.cross)!r}", "cross")
    for n in bias.cross:
        if n not in tower:
            b.fail(f"{n!r} is not an input of the shallow tower ({list(tower)!r})", "cross")
    rows = math.prod(bias.max_position + 2 if n == POSITION else by_name[n].buckets + 1 for n in bias.cross)
    if rows > MAX_CROSS_ROWS:
        b.fail(f"the joint table would have {rows:,} rows (more than {MAX_CROSS_ROWS:,}): cross fewer or "
               "smaller features", "cross")


def _parse_weights(path: str, where: str, weights: dict, tasks: tuple[Task, ...]) -> dict[str, float]:
    """`path` "": weights that are not from a config file, named by `where` alone."""
    names = {t.name for t in tasks}
    out = {}
    for k, v in weights.items():
        key = f"{path}: {where}.{k}" if path else f"{where}.{k}"
        if k not in names:
            raise ConfigError(key, f"not a task (tasks: {', '.join(sorted(names))})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(key, f"expected a finite number, got {v!r}")
        out[k] = float(v)
    return out


def parse_weights(weights: Mapping[str, Any], config: Config, where: str = "weights") -> dict[str, float]:
    """Validate score weights given at run time (an experiment arm): a ConfigError's field is `where`.KEY (they
    are not the config file's)."""
    return _parse_weights("", where, dict(weights), config.tasks)


def _resolve_tables(path: str, features: tuple[Feature, ...]) -> tuple[Feature, ...]:
    by_name = {f.name: f for f in features}
    out = []
    for i, f in enumerate(features):
        if f.table is not None:
            owner = by_name.get(f.table)
            where = f"{path}: features[{i}] ({f.name}).table"
            if owner is None or owner.kind != "categorical" or owner.table is not None:
                raise ConfigError(where, f"{f.table!r} must be a categorical feature with a table of its own")
            for key in ("buckets", "dim"):
                mine = getattr(f, key)
                if mine and mine != getattr(owner, key):
                    raise ConfigError(where, f"shares {f.table!r}, whose {key} is {getattr(owner, key)}, not {mine}")
            f = replace(f, buckets=owner.buckets, dim=owner.dim)
        out.append(f)
    return tuple(out)


def _check_names(path: str, where: str, names: list[str]) -> None:
    seen = set()
    for i, n in enumerate(names):
        if not n or not all(c.isalnum() or c == "_" for c in n):
            raise ConfigError(f"{path}: {where}[{i}].name", f"use letters, digits and '_', got {n!r}")
        if n in seen:
            raise ConfigError(f"{path}: {where}[{i}].name", f"{n!r} appears twice")
        seen.add(n)


def default_config_path() -> Path:
    """The shipped watchnext.toml (repository root, beside the packages)."""
    return Path(__file__).resolve().parent.parent / DEFAULT_CONFIG_NAME


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load `path`, else $WATCHNEXT_CONFIG, else the shipped default."""
    env = os.environ if env is None else env
    p = Path(path or env.get("WATCHNEXT_CONFIG") or default_config_path())
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read config: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"not valid TOML: {e}") from None
    return parse_config(data, str(p))


def _ipw_curve(tr: _Section) -> tuple[float, ...]:
    """[trainer] ipw_curve: finite numbers in (0, 1], the first 1.0 (p is relative to position 0); any shape."""
    v = tr.get("ipw_curve", list, [])
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        tr.fail(f"expected a list of numbers, got {v!r}", "ipw_curve")
    curve = tuple(float(x) for x in v)
    bad = [x for x in curve if not (math.isfinite(x) and 0.0 < x <= 1.0)]
    if bad:
        tr.fail(f"every value must be a finite number in (0, 1], got {bad[0]!r}", "ipw_curve")
    if curve and curve[0] != 1.0:
        tr.fail(f"must start with 1.0 (examination relative to position 0), got {curve[0]!r}", "ipw_curve")
    return curve


def config_from_dict(d: Mapping[str, Any], path: str = "<checkpoint>") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (checkpoints, metadata)."""
    c: dict[str, Any] = json.loads(json.dumps(d))  # deep copy (the caller's mapping is left alone), lists for tuples
    c["features"] = [{k: v for k, v in f.items() if _keep(f, k) and v is not None} for f in c["features"]]
    c["tasks"] = [{k: v for k, v in t.items() if v is not None} for t in c["tasks"]]
    if c.get("item_id") is not None:
        c["item"] = {"id": c.pop("item_id")}
    else:
        c.pop("item_id", None)
    return parse_config(c, path)


_FEATURE_FIELDS = {
    "categorical": {"buckets", "dim", "table"},
    "categorical_list": {"buckets", "dim", "max_len", "table"},
    "numeric": {"transform", "default"},
    "vector": {"size"},
}


def _keep(f: dict, k: str) -> bool:
    return k in ("name", "source", "kind") or k in _FEATURE_FIELDS[f["kind"]]
