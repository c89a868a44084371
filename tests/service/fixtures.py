"""Service fixtures (registered for the whole suite by tests/conftest.py): a small config, two trained versions,
a real uvicorn on a loopback port.

Nothing is mocked: the versions are trained by the real trainer and exported to
ONNX, Redis is the real server from tests/conftest.py, and requests go over TCP.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.helpers import small_config_text
from watchnext.config import load_config
from watchnext.redis_embed import free_port
from watchnext.repository import ModelRepository

ADMIN = "test-admin-token-0123456789"
FAST_SERVICE = {"attribution_window_s": 1.0, "model_poll_s": 0.2, "feature_timeout_ms": 50.0}


def write_config(folder: Path, **sections) -> Path:
    p = folder / "watchnext.toml"
    sections.setdefault("service", FAST_SERVICE)
    p.write_text(small_config_text(**sections))
    return p


@pytest.fixture(scope="session")
def trained(tmp_path_factory, history_file) -> dict:
    """A repository with versions 1 and 2 (2 continues 1 on newer examples), trained once per session."""
    from training.trainer import train_files

    root = tmp_path_factory.mktemp("trained")
    cfg_path = write_config(root)
    config = load_config(cfg_path)
    repo = ModelRepository(root / "models", config.model.name)
    ckpt = root / "ckpt.pt"
    lines = history_file.read_text().splitlines(keepends=True)
    first, second = root / "first.jsonl", root / "second.jsonl"
    first.write_text("".join(lines[:4_000]))
    second.write_text("".join(lines[4_000:]))
    train_files(config, [first], ckpt, repo, fresh=True)
    train_files(config, [second], ckpt, repo)
    assert repo.versions() == [1, 2]
    return {"root": root, "models": root / "models", "config_path": cfg_path, "history": history_file}


@pytest.fixture
def models_dir(trained, tmp_path) -> Path:
    """A private copy of the trained repository (tests promote, corrupt and add versions)."""
    dst = tmp_path / "models"
    shutil.copytree(trained["models"], dst)
    return dst


class LiveServer:
    """A real uvicorn serving `app` on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def service(self):
        return self.app.state.service


@contextmanager
def live_service(config_path: Path, models: Path, redis_url: str | None, **settings) -> Iterator[LiveServer]:
    from service.app import create_app
    from service.settings import Deps, Settings

    s = Settings(config_path=str(config_path), models_dir=str(models), redis_url=redis_url,
                 admin_token=ADMIN, threads=1, log_level="warning", **settings)
    config = load_config(config_path)
    deps = Deps(config, ModelRepository(models, config.model.name), redis_url)
    with LiveServer(create_app(s, deps)) as srv:
        yield srv


@pytest.fixture
def server(trained, models_dir, redis_url) -> Iterator[LiveServer]:
    with live_service(trained["config_path"], models_dir, redis_url) as srv:
        yield srv


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
