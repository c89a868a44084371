"""The service's settings: validated once at start, passed to `create_app`; nothing is read at import time.

`Settings` is a pydantic-settings model, and each setting is one field of it, declared once: its type,
default, bounds, description, environment variable and command-line flag. A variable is `WATCHNEXT_` and
the field's name in capitals (`threads`: WATCHNEXT_THREADS) unless the field names another
(`config_path`: WATCHNEXT_CONFIG, `models_dir`: WATCHNEXT_MODELS, `redis_url`: REDIS_URL); `host`, `port`
and the flush, close and back-off intervals have none. `Settings.variables()` lists them, and the README's
Settings table documents each one (tests/test_readme.py holds them to each other).

Only `Settings.from_env` reads the environment, and the environment is its parameter, so tests never touch
`os.environ`; `Settings(...)` takes its arguments alone (tests, embedders, worker processes). The flags of
`watchnext serve` and `watchnext up` are passed to `from_env` as they were given and win over the
environment; Settings alone converts and checks them. A refused value is a `SettingsError`: one line naming
the setting, its variable and its flag, and why (`setting port (--port): must be in 0..65535, got 70000`).

With the triton backend, WATCHNEXT_DEVICE and WATCHNEXT_THREADS do not apply
(Triton's config decides); encoding, scoring and the impression log stay in the
service, which still reads the repository for versions and their metadata.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from watchnext.config import Config, load_config
from watchnext.errors import WatchnextError
from watchnext.repository import ModelRepository

ENV_PREFIX = "WATCHNEXT_"
MIN_TOKEN_CHARS = 16


class SettingsError(WatchnextError, ValueError):
    """A setting the service cannot start with: `field` names it with its variable and flag, `reason` says why."""


def _text_as(kind: Callable[[str], Any]) -> BeforeValidator:
    """A number from text as Python reads it (`int("1_000")`, `float("1e3")`; not `int("5.0")`), as the
    environment and the flags give it; what is not text goes on to the field's own validation."""
    return BeforeValidator(lambda v: kind(v) if isinstance(v, str) else v)


Int = Annotated[int, _text_as(int)]
Float = Annotated[float, _text_as(float)]


def setting(default: Any, description: str, *, env: bool | str = True, flag: str | None = None, **checks: Any) -> Any:
    """One setting. `env`: True reads WATCHNEXT_<NAME>, a string reads that variable, False none; `flag`: the
    command-line flag that sets it (`watchnext serve` and `up`); `checks`: pydantic's ge, gt, le, lt, min_length
    (and repr=False for a secret)."""
    return Field(default, description=description, validation_alias=env if isinstance(env, str) else None,
                 json_schema_extra={"env": env is not False, "flag": flag}, **checks)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid",
                                      populate_by_name=True)

    config_path: str | None = setting(None, "the config file (unset: the shipped watchnext.toml)",
                                      env="WATCHNEXT_CONFIG", flag="--config")
    models_dir: str = setting("models", "the model repository", env="WATCHNEXT_MODELS", flag="--models")
    redis_url: str | None = setting(None, "Redis (redis://, rediss:// or unix://); unset: `watchnext serve` starts "
                                    "an embedded redis-server", env="REDIS_URL")
    host: str = setting("127.0.0.1", "address to listen on", env=False, flag="--host")
    port: Int = setting(8000, "port to listen on", env=False, flag="--port", ge=0, le=65535)
    admin_token: str | None = setting(None, "bearer token for promote and rollback (unset: those endpoints answer "
                                      "401)", min_length=MIN_TOKEN_CHARS, repr=False)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "ONNX Runtime device (auto: CUDA when ONNX Runtime "
                                                     "has it)", flag="--device")
    threads: Int = setting(0, "ONNX Runtime threads: on the CPU a batch runs as this many parts at once (0: the "
                           "CPUs this process may use)", flag="--threads", ge=0)
    rank_workers: Int = setting(4, "worker threads for rank requests that wait on the network: a feature store "
                                "lookup, or the Triton backend (0: those too on the event loop); a request that "
                                "carries every feature is ranked on the event loop, without a thread hand-off", ge=0)
    workers: Int = setting(0, "worker processes sharing the port, each a whole service with its own model session "
                           "(0: `worker_count` picks)", flag="--workers", ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "log level", flag="--log-level")
    backend: Literal["onnxruntime", "triton"] = setting(
        "onnxruntime", "who runs the model: ONNX Runtime in this process, or a Triton Inference Server serving the "
        "same model repository at triton_url (needs `pip install 'watchnext[triton]'`)", flag="--backend")
    triton_url: str | None = setting(None, "host:port[/base-path] of Triton's HTTP endpoint, e.g. localhost:8000 "
                                     "(required with the triton backend)", flag="--triton-url")
    flush_interval_s: Float = setting(0.05, "how often buffered impressions are written to Redis", env=False, gt=0)
    impression_buffer_mb: Float = setting(64.0, "the impression buffer's bound in MB per worker process (while Redis "
                                          "is away the newest are kept; the oldest are shed and counted)",
                                          gt=0, lt=1 << 20)
    close_interval_s: Float = setting(0.0, "how often closed attribution windows are turned into training examples "
                                      "(0: from the window)", env=False, ge=0)
    feature_backoff_s: Float = setting(1.0, "after a failed Redis call, online features are skipped for this long "
                                       "(then tried again)", env=False, gt=0)
    body_timeout_s: Float = setting(10.0, "seconds a request body may take to arrive whole; a slower one is answered "
                                    "408 and what it had sent is let go (a stalled upload pins no memory)", gt=0)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _refusal(type(self), e) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """The arguments alone: `from_env` reads the environment (one given to it), no .env file, no secrets dir."""
        return (init_settings,)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise cls.refused("redis_url", f"expected redis://, rediss:// or unix://, got {v!r}")
        return v

    @model_validator(mode="after")
    def _triton_url_with_triton(self) -> Settings:
        if self.backend == "triton":
            url = self.triton_url
            if not url:
                raise self.refused("triton_url", "backend triton needs the host:port of Triton's HTTP endpoint, "
                                   "e.g. localhost:8000")
            host, sep, port = url.partition("/")[0].rpartition(":")  # host:port[/base-path]
            if "://" in url or not (sep and host and port.isdigit() and 0 < int(port) <= 65535):
                raise self.refused("triton_url", f"expected host:port without a scheme, e.g. localhost:8000, got {url!r}")
        return self

    # ------------------------------------------------------------ the model's own description

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field -> the environment variable it is read from, for the fields that have one."""
        out = {}
        for name, f in cls.model_fields.items():
            if _extra(f)["env"]:
                out[name] = f.validation_alias if isinstance(f.validation_alias, str) else ENV_PREFIX + name.upper()
        return out

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Field -> the flag of `watchnext serve` and `up` that sets it, for the fields that have one."""
        return {name: _extra(f)["flag"] for name, f in cls.model_fields.items() if _extra(f)["flag"]}

    @classmethod
    def refused(cls, name: str, reason: str) -> SettingsError:
        """The error for field `name`, named with its variable and flag: `setting threads (WATCHNEXT_THREADS,
        --threads): ...`."""
        ways = [w for w in (cls.variables().get(name), cls.flags().get(name)) if w]
        return SettingsError(f"setting {name} ({', '.join(ways)})" if ways else f"setting {name}", reason)

    # ------------------------------------------------------------ reading and passing on

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """The environment (`os.environ` unless given; an empty variable counts as unset), then `overrides`
        (command-line flags, by field name; None means 'not given')."""
        by_variable = {f.validation_alias: name for name, f in cls.model_fields.items() if f.validation_alias}
        read = _Environment(cls, os.environ if env is None else env)()
        values = {by_variable.get(k, k): v for k, v in read.items()}
        values.update((k, v) for k, v in overrides.items() if v is not None)
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        """A copy with `changes`, checked as at start."""
        return type(self)(**{**self.model_dump(), **changes})

    def worker_count(self) -> int:
        """`workers`, or for 0 one process per usable CPU (each has its own GIL: with one process on 2 cores,
        Python's share of each request left a fifth of the CPU idle at 8 clients; `up` asks for one). One where there is a
        CUDA driver and the device may be CUDA: the processes would each hold a CUDA context for one GPU."""
        if self.workers:
            return self.workers
        from watchnext.runtime import usable_cpus

        if self.device != "cpu" and self.backend == "onnxruntime":
            from watchnext.runtime import cuda_driver_present

            if cuda_driver_present():
                return 1
        return usable_cpus()

    def to_json(self) -> str:
        """For worker processes (see `from_json`)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


def _extra(f: FieldInfo) -> dict[str, Any]:
    return f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {"env": False, "flag": None}


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping, for the fields that have a variable.

    Names match exactly, as `os.environ` does on Linux: pydantic-settings compares them lower-cased, so only
    upper-case names (all of the service's) are passed on."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._given = env
        super().__init__(settings_cls, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._given.items() if k.isupper() and not (self.env_ignore_empty and v == "")}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if not _extra(field)["env"]:
            return None, field_name, False
        return super().get_field_value(field, field_name)


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _refusal(cls: type[Settings], e: ValidationError) -> SettingsError:
    """The first refused value as one SettingsError (pydantic lists them in field order)."""
    err = e.errors()[0]
    raised = (err.get("ctx") or {}).get("error")
    if isinstance(raised, SettingsError):  # from a validator of ours: already says it all
        return raised
    kind, value, where = err["type"], err["input"], str(err["loc"][0]) if err["loc"] else ""
    if kind == "extra_forbidden":
        return SettingsError("", f"unknown setting {where!r}")
    name = next(n for n, f in cls.model_fields.items() if where in (n, f.validation_alias))
    f = cls.model_fields[name]
    got: str | None = repr(value)
    if kind in _BOUNDS:
        reason, got = f"must be {_range(f)}", str(value)
    elif kind == "literal_error":
        reason = f"expected one of {', '.join(map(str, get_args(_plain(f.annotation))))}"
    elif kind == "string_too_short":
        reason, got = f"must be at least {err['ctx']['min_length']} characters", None
    else:  # not a number, not text
        reason = f"expected {getattr(_plain(f.annotation), '__name__', f.annotation)}"
    if got is not None and f.repr is not False:  # a secret's value is never repeated
        reason += f", got {got}"
    return cls.refused(name, reason)


def _plain(annotation: Any) -> Any:
    """`int` of Annotated[int, ...], `str` of str | None; a Literal stays itself."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def _range(f: FieldInfo) -> str:
    b = {k: getattr(m, k) for m in f.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    if "ge" in b and "le" in b:
        return f"in {b['ge']}..{b['le']}"
    parts = [f"{op} {b[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in b]
    return " and ".join(parts)


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
