"""Prometheus metrics (prometheus_client) and structured JSON logs (python-json-logger).

Every metric lives in the app's own CollectorRegistry (tests build many apps in one process). With several
worker processes (`watchnext serve --workers N`) prometheus_client's multiprocess mode shares them: the
parent (cli.serve.run_server) points PROMETHEUS_MULTIPROC_DIR at a fresh directory before it spawns the
workers, each worker's values live in files there, and `/metrics` in any worker answers from
`multiprocess.MultiProcessCollector` over them: counters and histograms add up over every process that ever
served (a counter never falls when a worker is replaced), gauges combine over the workers serving as their
`multiprocess_mode` says (livesum, livemin, livemax). The parent calls `retire_workers` for the workers that
ended, which takes their gauges out (`multiprocess.mark_process_dead`).

The metric objects are thread-safe: the rank worker threads, the impression flusher and the event loop all
update them.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
MISS_REASONS = ("absent", "outage", "corrupt", "disabled")
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format generate_latest writes
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
INFO_METRIC = "watchnext_model_info"
WORKERS_METRIC = "watchnext_worker_processes"

# counters and histograms as before: no `<name>_created` series beside them
disable_created_metrics()


class Metrics:
    """Every metric the service exports; one instance per app (per process with `multiprocess_dir`).

    Counters are given their exposed names (prometheus_client strips `_total` and writes it back).
    `multiprocess_dir`: this process is one worker among several sharing that directory (see the module's
    docstring); prometheus_client must have been imported with PROMETHEUS_MULTIPROC_DIR set to it.
    """

    def __init__(self, multiprocess_dir: str | os.PathLike | None = None) -> None:
        self.multiprocess_dir = os.fspath(multiprocess_dir) if multiprocess_dir is not None else None
        if self.multiprocess_dir is not None and not getattr(prometheus_values.ValueClass, "_multiprocess", False):
            raise RuntimeError(f"metrics shared through {self.multiprocess_dir}, but prometheus_client was imported "
                               f"without {MULTIPROC_ENV} set: this process's figures would not be shared")
        self.registry = r = CollectorRegistry()

        def counter(name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, help, labels, registry=r)

        def gauge(name: str, help: str, mode: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, help, labels, registry=r, multiprocess_mode=mode)  # type: ignore[arg-type]

        self.rank_latency = Histogram("watchnext_rank_latency_seconds", "Time to answer POST /v1/rank.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.rank_candidates = Histogram("watchnext_rank_candidates", "Candidates per rank request.",
                                         buckets=CANDIDATE_BUCKETS, registry=r)
        self.requests = counter("watchnext_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status"))
        self.model_version = gauge("watchnext_model_version", "The version serving now (0: none; with several worker "
                                   "processes, the oldest any of them serves).", "livemin")
        self.model_info = gauge("watchnext_model_info", "The version serving now and its ONNX Runtime provider "
                                "(with several worker processes, each pair one of them serves).", "livemax",
                                ("version", "provider"))
        self.model_swaps = counter("watchnext_model_swaps_total", "Versions swapped in.")
        self.model_refused = counter("watchnext_model_refused_total", "Versions refused (config hash, corrupt file, bad outputs).")
        self.feature_misses = counter("watchnext_feature_store_misses_total",
                                      "Online-feature lookups without a value, by reason (absent: no entry; outage: Redis "
                                      "unreachable or slower than the timeout; corrupt: an entry that fails its checks; "
                                      "disabled: no Redis).", ("reason",))
        self.feature_hits = counter("watchnext_feature_store_hits_total",
                                    "Online-feature entries read from Redis (a process's cache misses that the store had).")
        self.feature_cache_hits = counter("watchnext_feature_cache_hits_total",
                                          "Online-feature entries answered by the process's cache.")
        self.feature_json_lost = counter("watchnext_feature_json_lost_total",
                                         "Shown candidates logged without their stored features: their cache entry "
                                         "was replaced or evicted between the look-up and the answer, and its JSON "
                                         "was no longer kept (a cache cleared or much smaller than what requests use).")
        self.unknown_features = counter("watchnext_unknown_features_total",
                                        "Keys of a rank request's user, query and context sections that name no feature "
                                        "in the config (ignored; candidates' unknown keys are ignored uncounted).")
        self.explored = counter("watchnext_explored_requests_total",
                                "Rank requests shown in the randomised order (adjacent pairs swapped at random; the "
                                "explore_share setting).")
        self.nonfinite = counter("watchnext_nonfinite_outputs_total", "Candidates dropped because the model's output was not finite.")
        self.impressions_logged = counter("watchnext_impressions_logged_total", "Impressions written to Redis.")
        self.impressions_dropped = counter("watchnext_impressions_dropped_total",
                                           "Impressions not logged, by reason: buffer_full (the byte bound was reached "
                                           "while Redis was away; the oldest are shed) or invalid (could not be stored).",
                                           ("reason",))
        self.log_backlog = gauge("watchnext_impression_backlog", "Impressions buffered, not yet written to Redis.", "livesum")
        self.log_backlog_bytes = gauge("watchnext_impression_backlog_bytes",
                                       "Bytes the impression buffer holds (bounded by the impression_buffer_mb setting).",
                                       "livesum")
        self.examples_refused = counter("watchnext_examples_refused_total",
                                        "Closed impressions whose examples could not be built (each counted, the "
                                        "rest of its batch still sent).")
        self.feedback = counter("watchnext_feedback_total", "Feedback events by outcome.", ("result",))
        self.examples = counter("watchnext_examples_emitted_total", "Labelled examples sent to the training stream.")
        self.redis_up = gauge("watchnext_redis_up", "1 when the last Redis call succeeded (in every worker process).",
                              "livemin")
        self.workers = gauge(WORKERS_METRIC, "Worker processes serving the port.", "livesum")
        # the children the hot paths update, bound once (their series are there from the start, at 0)
        self.rank_ok = self.requests.labels("/v1/rank", "200")
        self.feedback_ok = self.requests.labels("/v1/feedback", "200")
        self.feature_miss = {reason: self.feature_misses.labels(reason) for reason in MISS_REASONS}
        self._info: tuple[str, str] | None = None
        self._info_lock = threading.Lock()
        # Service.start sets `workers` to 1 (this process serving), Service.stop back to 0
        if self.multiprocess_dir is None:
            self.exported: CollectorRegistry = self.registry
        else:
            self.exported = CollectorRegistry(auto_describe=False)
            self.exported.register(_SharedCollector(self.multiprocess_dir))

    def serving(self, version: int, provider: str) -> None:
        """The version serving now: watchnext_model_version, and watchnext_model_info with only this pair."""
        self.model_version.set(version)
        labels = (str(version), provider)
        with self._info_lock:
            old, self._info = self._info, labels
            if old is not None and old != labels:
                if self.multiprocess_dir is None:
                    self.model_info.remove(*old)
                else:  # series cannot be removed from the shared files: 0, left out of /metrics (_SharedCollector)
                    self.model_info.labels(*old).set(0)
            self.model_info.labels(*labels).set(1)

    def exposition(self) -> bytes:
        """The text /metrics answers with (Prometheus text format 0.0.4): this app's figures, or with several
        worker processes every process's, combined."""
        return generate_latest(self.exported)

    def value(self, name: str, **labels: str) -> float:
        """One sample of this process's own figures, by its exposed name (0 when it has none): for tests."""
        return self.registry.get_sample_value(name, labels) or 0.0


class _SharedCollector(MultiProcessCollector):
    """prometheus_client's MultiProcessCollector over the workers' files, with the gauges of the processes
    serving only: a worker counts itself in watchnext_worker_processes from the end of its start-up to its stop
    (Service), so one still loading its model does not pull watchnext_redis_up or watchnext_model_version down
    to 0 meanwhile. Less the model-info pairs no process serves any more (kept in the files at 0; see
    Metrics.serving)."""

    def __init__(self, directory: str):
        super().__init__(None, directory)  # registered by Metrics
        self.dir = directory

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self.dir, "*.db"))
        live = [f for f in files if _live_gauge_pid(f) is not None]
        serving = {_live_gauge_pid(f) for f in live if os.path.basename(f).startswith("gauge_livesum_")
                   and _counts_itself(f)}
        chosen = [f for f in files if f not in live or _live_gauge_pid(f) in serving]
        for m in self.merge(chosen, accumulate=True):
            if m.name == INFO_METRIC:
                m.samples = [s for s in m.samples if s.value]
            yield m


def _live_gauge_pid(path: str) -> int | None:
    """The pid of a live gauge's file (gauge_live<mode>_<pid>.db), else None."""
    name = os.path.basename(path)
    stem = name[: -len(".db")].rsplit("_", 1)[-1]
    return int(stem) if name.startswith("gauge_live") and stem.isdigit() else None


def _counts_itself(path: str) -> bool:
    """Whether this livesum-gauge file holds watchnext_worker_processes at 1: its process is serving."""
    try:
        families = MultiProcessCollector.merge([path], accumulate=False)
    except FileNotFoundError:  # removed by retire_workers since the listing
        return False
    return any(s.name == WORKERS_METRIC and s.value for m in families for s in m.samples)


def retire_workers(directory: str | os.PathLike, serving: Iterable[int]) -> list[int]:
    """Take the worker processes that have files in the shared metrics `directory` but are not in `serving`
    (ended, killed, replaced) out of the live gauges (`multiprocess.mark_process_dead`); their counters and
    histograms stay in the sums. Returns their pids. Called by the supervisor (cli.serve.run_server)."""
    found = {_live_gauge_pid(f) for f in glob.glob(os.path.join(os.fspath(directory), "gauge_live*_*.db"))}
    gone = sorted(pid for pid in found - set(serving) if pid is not None)
    for pid in gone:
        mark_process_dead(pid, os.fspath(directory))
    return gone


# ---------------------------------------------------------------- logs


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: ts, level, logger, pid, event, then the record's `fields` (see `log`) and,
    with an exception, exc."""

    def __init__(self) -> None:
        super().__init__(
            ["created", "levelname", "name", "process", "message"],
            rename_fields={"created": "ts", "levelname": "level", "name": "logger",
                           "process": "pid",  # which worker process, when there are several
                           "message": "event", "exc_info": "exc"},
            reserved_attrs=[*RESERVED_ATTRS, "fields"],
            json_default=str,
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, {**getattr(record, "fields", {}), **message_dict})  # exc last
        log_data["ts"] = round(record.created, 3)
        log_data["level"] = record.levelname.lower()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it), not the one at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger("watchnext")
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        h = StderrHandler()
        h.setFormatter(JsonFormatter())
        root.addHandler(h)
    root.setLevel(level.upper())
    root.propagate = False


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """One event: `fields` become keys of its JSON line (beside ts, level, logger, pid and event)."""
    logger.log(level, event, extra={"fields": fields})


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
