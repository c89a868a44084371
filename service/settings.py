"""The service's settings: validated once at start, passed to `create_app`; nothing is read at import time.

Settings come from command-line flags and the environment (the environment is a
parameter, so tests never touch `os.environ`)::

    WATCHNEXT_CONFIG        config file (default: the shipped watchnext.toml)
    WATCHNEXT_MODELS        model repository (default: ./models)
    REDIS_URL               Redis; unset: `watchnext serve` starts an embedded redis-server
    WATCHNEXT_ADMIN_TOKEN   bearer token for promote / rollback (unset: those endpoints answer 401)
    WATCHNEXT_DEVICE        auto | cpu | cuda (default auto: CUDA when ONNX Runtime has it)
    WATCHNEXT_THREADS       ONNX Runtime threads: on the CPU a batch runs as this many parts at once (0: the CPUs this process may use)
    WATCHNEXT_LOG_LEVEL     debug | info | warning | error
    WATCHNEXT_RANK_WORKERS  worker threads for rank requests that wait on the network: a feature store lookup, or
                            the Triton backend (default 4; 0: those too on the event loop). A request that
                            carries every feature is ranked on the event loop, without a thread hand-off
    WATCHNEXT_WORKERS       worker processes sharing the port, each a whole service with its own model session
                            (default 0: for serve one per CPU this process may use, one when there is a CUDA
                            driver; for up one, as it shares the machine with the trainer)
    WATCHNEXT_BACKEND       onnxruntime | triton: who runs the model (default onnxruntime, in this process);
                            triton sends the model call to a Triton Inference Server serving the same
                            model repository (needs `pip install 'watchnext[triton]'`)
    WATCHNEXT_TRITON_URL    host:port of Triton's HTTP endpoint, e.g. localhost:8000 (required with triton)
    WATCHNEXT_BODY_TIMEOUT_S  seconds a request body may take to arrive whole (default 10); a slower one is
                            answered 408 and what it had sent is let go

With the triton backend, WATCHNEXT_DEVICE and WATCHNEXT_THREADS do not apply
(Triton's config decides); encoding, scoring and the impression log stay in the
service, which still reads the repository for versions and their metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from watchnext.config import Config, load_config
from watchnext.repository import ModelRepository

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("onnxruntime", "triton")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_TOKEN_CHARS = 16


class SettingsError(ValueError):
    """A setting the service cannot start with; the message names it."""


@dataclass(frozen=True)
class Settings:
    config_path: str | None = None
    models_dir: str = "models"
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = field(default=None, repr=False)
    device: str = "auto"
    threads: int = 0
    rank_workers: int = 4
    # worker processes (uvicorn's supervisor) sharing the port; 0: worker_count() picks
    workers: int = 0
    log_level: str = "info"
    # who runs the model: ONNX Runtime in this process, or a Triton Inference Server at triton_url (host:port)
    backend: str = "onnxruntime"
    triton_url: str | None = None
    # how often buffered impressions are written to Redis, and the buffer's bound in MB per worker process (while
    # Redis is away the newest are kept; the oldest are shed and counted)
    flush_interval_s: float = 0.05
    impression_buffer_mb: float = 64.0
    # how often closed attribution windows are turned into training examples (0: from the window)
    close_interval_s: float = 0.0
    # after a failed Redis call, online features are skipped for this long (then tried again)
    feature_backoff_s: float = 1.0
    # a request body must arrive whole within this, else 408 (a stalled upload pins no memory)
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> None:
            raise SettingsError(f"setting {name}: {reason}")

        if not 0 <= self.port <= 65535:
            bad("port", f"must be in 0..65535, got {self.port}")
        if self.device not in DEVICES:
            bad("device", f"expected one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.log_level not in LOG_LEVELS:
            bad("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.threads < 0:
            bad("threads", f"must be >= 0, got {self.threads}")
        if self.workers < 0:
            bad("workers (WATCHNEXT_WORKERS, --workers)", f"must be >= 0, got {self.workers}")
        if self.rank_workers < 0:
            bad("rank_workers", f"must be >= 0, got {self.rank_workers}")
        if self.admin_token is not None and len(self.admin_token) < MIN_TOKEN_CHARS:
            bad("admin_token (WATCHNEXT_ADMIN_TOKEN)", f"must be at least {MIN_TOKEN_CHARS} characters")
        for name in ("flush_interval_s", "feature_backoff_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                bad(name, f"must be > 0, got {getattr(self, name)}")
        if self.close_interval_s < 0:
            bad("close_interval_s", f"must be >= 0, got {self.close_interval_s}")
        if not 0 < self.impression_buffer_mb < 1 << 20:
            bad("impression_buffer_mb (WATCHNEXT_IMPRESSION_BUFFER_MB)", f"must be > 0 MB, got {self.impression_buffer_mb}")
        if self.backend not in BACKENDS:
            bad("backend (WATCHNEXT_BACKEND, --backend)", f"expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "triton":
            if not self.triton_url:
                bad("triton_url (WATCHNEXT_TRITON_URL, --triton-url)",
                    "backend triton needs the host:port of Triton's HTTP endpoint, e.g. localhost:8000")
            host, sep, port = self.triton_url.partition("/")[0].rpartition(":")  # host:port[/base-path]
            if "://" in self.triton_url or not (sep and host and port.isdigit() and 0 < int(port) <= 65535):
                bad("triton_url (WATCHNEXT_TRITON_URL, --triton-url)",
                    f"expected host:port without a scheme, e.g. localhost:8000, got {self.triton_url!r}")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            bad("redis_url (REDIS_URL)", f"expected redis://, rediss:// or unix://, got {self.redis_url!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then `overrides` (command-line flags; None means 'not given')."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        for name, key, conv in (
            ("config_path", "WATCHNEXT_CONFIG", str),
            ("models_dir", "WATCHNEXT_MODELS", str),
            ("redis_url", "REDIS_URL", str),
            ("admin_token", "WATCHNEXT_ADMIN_TOKEN", str),
            ("device", "WATCHNEXT_DEVICE", str),
            ("threads", "WATCHNEXT_THREADS", int),
            ("log_level", "WATCHNEXT_LOG_LEVEL", str),
            ("rank_workers", "WATCHNEXT_RANK_WORKERS", int),
            ("workers", "WATCHNEXT_WORKERS", int),
            ("backend", "WATCHNEXT_BACKEND", str),
            ("triton_url", "WATCHNEXT_TRITON_URL", str),
            ("body_timeout_s", "WATCHNEXT_BODY_TIMEOUT_S", float),
            ("impression_buffer_mb", "WATCHNEXT_IMPRESSION_BUFFER_MB", float),
        ):
            if env.get(key):
                try:
                    kw[name] = conv(env[key])
                except ValueError:
                    raise SettingsError(f"{key}: expected {conv.__name__}, got {env[key]!r}") from None
        names = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in names:
                raise SettingsError(f"unknown setting {k!r}")
            if v is not None:
                kw[k] = v
        return cls(**kw)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def worker_count(self) -> int:
        """`workers`, or for 0 one process per usable CPU (each has its own GIL: with one process on 2 cores,
        Python's share of each request left a fifth of the CPU idle at 8 clients; `up` asks for one). One where there is a
        CUDA driver and the device may be CUDA: the processes would each hold a CUDA context for one GPU."""
        if self.workers:
            return self.workers
        from watchnext.runtime import usable_cpus

        if self.device != "cpu" and self.backend == "onnxruntime":
            from .inference import cuda_driver_present

            if cuda_driver_present():
                return 1
        return usable_cpus()

    def to_json(self) -> str:
        """For worker processes (see `from_json`)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


@dataclass
class Deps:
    """What the app runs on: the config, the model repository, and where Redis is (None: no Redis).

    `metrics_dir`: set in each worker process when there are several; they share their metrics there."""

    config: Config
    repo: ModelRepository
    redis_url: str | None
    metrics_dir: str | None = None


def build_deps(settings: Settings, metrics_dir: str | None = None) -> Deps:
    """Load the config and open the repository; Redis must already be chosen (see cli.serve)."""
    config = load_config(settings.config_path)
    return Deps(config, ModelRepository(settings.models_dir, config.model.name), settings.redis_url, metrics_dir)
