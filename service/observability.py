"""Prometheus metrics (text format 0.0.4) and structured JSON logs, without extra dependencies.

The metric objects are thread-safe: the rank worker threads, the impression
flusher and the event loop all update them. With several worker processes
(`watchnext serve --workers N`), `SharedMetrics` adds the other processes'
figures to the ones `/metrics` answers with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    """`merge`: how the values of several worker processes combine (sum, min, or info: every label set seen)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), merge: str = "sum"):
        super().__init__(name, help, labels)
        self.merge = merge

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self.values[labels] = float(value)

    def replace(self, labels: tuple[str, ...], value: float = 1.0) -> None:
        """An info-style gauge: keep only this label set."""
        with self._lock:
            self.values = {labels: float(value)}


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        super().__init__(name, help)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((j for j, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        out, acc = self.header(), 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            acc += c
            le = "+Inf" if b == math.inf else f"{b:g}"
            out.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
        out += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {acc}"]
        return out


class Metrics:
    """Every metric the service exports; one instance per app."""

    def __init__(self) -> None:
        self.rank_latency = Histogram("watchnext_rank_latency_seconds", "Time to answer POST /v1/rank.", LATENCY_BUCKETS)
        self.rank_candidates = Histogram("watchnext_rank_candidates", "Candidates per rank request.", CANDIDATE_BUCKETS)
        self.requests = Counter("watchnext_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status"))
        self.model_version = Gauge("watchnext_model_version", "The version serving now (0: none; with several worker "
                                   "processes, the oldest any of them serves).", merge="min")
        self.model_info = Gauge("watchnext_model_info", "The version serving now and its ONNX Runtime provider "
                                "(with several worker processes, each pair one of them serves).",
                                ("version", "provider"), merge="info")
        self.model_swaps = Counter("watchnext_model_swaps_total", "Versions swapped in.")
        self.model_refused = Counter("watchnext_model_refused_total", "Versions refused (config hash, corrupt file, bad outputs).")
        self.feature_misses = Counter("watchnext_feature_store_misses_total",
                                      "Online-feature lookups without a value, by reason (absent: no entry; outage: Redis "
                                      "unreachable or slower than the timeout; corrupt: an entry that fails its checks; "
                                      "disabled: no Redis).", ("reason",))
        self.feature_hits = Counter("watchnext_feature_store_hits_total",
                                    "Online-feature entries read from Redis (a process's cache misses that the store had).")
        self.feature_cache_hits = Counter("watchnext_feature_cache_hits_total",
                                          "Online-feature entries answered by the process's cache.")
        self.unknown_features = Counter("watchnext_unknown_features_total",
                                        "Keys of a rank request's user, query and context sections that name no feature "
                                        "in the config (ignored; candidates' unknown keys are ignored uncounted).")
        self.explored = Counter("watchnext_explored_requests_total",
                                "Rank requests shown in the randomised order (adjacent pairs swapped at random; the "
                                "explore_share setting).")
        self.nonfinite = Counter("watchnext_nonfinite_outputs_total", "Candidates dropped because the model's output was not finite.")
        self.impressions_logged = Counter("watchnext_impressions_logged_total", "Impressions written to Redis.")
        self.impressions_dropped = Counter("watchnext_impressions_dropped_total",
                                           "Impressions not logged, by reason: buffer_full (the byte bound was reached "
                                           "while Redis was away; the oldest are shed) or invalid (could not be stored).",
                                           ("reason",))
        self.log_backlog = Gauge("watchnext_impression_backlog", "Impressions buffered, not yet written to Redis.")
        self.log_backlog_bytes = Gauge("watchnext_impression_backlog_bytes",
                                       "Bytes the impression buffer holds (bounded by the impression_buffer_mb setting).")
        self.examples_refused = Counter("watchnext_examples_refused_total",
                                        "Closed impressions whose examples could not be built (each counted, the "
                                        "rest of its batch still sent).")
        self.feedback = Counter("watchnext_feedback_total", "Feedback events by outcome.", ("result",))
        self.examples = Counter("watchnext_examples_emitted_total", "Labelled examples sent to the training stream.")
        self.redis_up = Gauge("watchnext_redis_up", "1 when the last Redis call succeeded (in every worker process).",
                              merge="min")
        self.workers = Gauge("watchnext_worker_processes", "Worker processes serving the port.")
        self.workers.set(1)

    def render(self) -> str:
        lines: list[str] = []
        for m in self._all():
            lines += m.render()
        return "\n".join(lines) + "\n"

    def _all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def snapshot(self) -> dict[str, Any]:
        """Every value, as JSON: {name: [[labels, value], ...]} for counters and gauges, {name: [counts, sum]}
        for histograms."""
        out: dict[str, Any] = {}
        for m in self._all():
            with m._lock:
                if isinstance(m, Histogram):
                    out[m.name] = [list(m.counts), m.sum]
                else:
                    out[m.name] = [[list(k), v] for k, v in m.values.items()]
        return out

    def merged(self, others: list[tuple[dict[str, Any], bool]]) -> Metrics:
        """A copy holding these values plus `others` ((snapshot, alive) of the other worker processes): counters
        and histograms add up, every process's counts included (a counter must never fall); gauges combine
        by their `merge`, over the processes alive."""
        out = Metrics()
        mine = self.snapshot()
        every = [mine] + [snap for snap, _ in others]
        alive = [mine] + [snap for snap, live in others if live]
        out.workers.set(len(alive))
        for m in out._all():
            if m is out.workers:
                continue
            if isinstance(m, Histogram):
                for snap in every:
                    counts, total = snap.get(m.name, [[0] * len(m.counts), 0.0])
                    if len(counts) == len(m.counts):
                        m.counts = [a + b for a, b in zip(m.counts, counts)]
                        m.sum += total
                continue
            snaps = alive if isinstance(m, Gauge) else every
            values: dict[tuple[str, ...], list[float]] = {}
            for snap in snaps:
                for labels, v in snap.get(m.name, []):
                    values.setdefault(tuple(labels), []).append(v)
            merge = m.merge if isinstance(m, Gauge) else "sum"
            m.values = {k: (min(v) if merge == "min" else 1.0 if merge == "info" else sum(v)) for k, v in values.items()}
        return out


class SharedMetrics:
    """The metrics of one worker process among several that share a directory (`watchnext serve --workers N`).

    A thread writes this process's snapshot to DIR/<pid>.json (write, then rename) every `interval_s` when
    it has changed; `render` adds the other files to this process's own figures. A file stays after its
    process ends (a worker restarted by the supervisor), so its counts stay in the sums; its gauges do not.
    """

    def __init__(self, metrics: Metrics, directory: str | os.PathLike, refresh: Callable[[], None] = lambda: None,
                 interval_s: float = 0.05):
        """`refresh()` brings the gauges that are read rather than kept (the impression backlog) up to date."""
        self.metrics, self.dir, self.refresh, self.interval_s = metrics, str(directory), refresh, interval_s
        self.path = os.path.join(self.dir, f"{os.getpid()}.json")
        self._last = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def settle_s(self) -> float:
        """How long until every change made before now is in the other processes' files."""
        return 2.5 * self.interval_s

    def write(self) -> None:
        self.refresh()
        data = json.dumps(self.metrics.snapshot()).encode()
        if data != self._last:
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
            self._last = data

    def others(self) -> list[tuple[dict[str, Any], bool]]:
        out = []
        for name in os.listdir(self.dir):
            stem, ext = os.path.splitext(name)
            if ext != ".json" or not stem.isdigit() or int(stem) == os.getpid():
                continue
            try:
                with open(os.path.join(self.dir, name), "rb") as fh:
                    snap = json.loads(fh.read())
            except (OSError, ValueError):  # gone, or not written yet
                continue
            out.append((snap, _alive(int(stem))))
        return out

    def render(self) -> str:
        self.refresh()
        return self.metrics.merged(self.others()).render()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.write()
                except OSError:  # the directory is gone: the supervisor is shutting down
                    pass

        self.write()
        self._thread = threading.Thread(target=loop, name="watchnext-metrics-share", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.write()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, under another user
        pass
    return True


# ---------------------------------------------------------------- logs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which worker process, when there are several
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it), not the one at set-up."""

    @property
    def stream(self):  # type: ignore[override]
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
    logger.log(level, event, extra={"fields": fields})


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
