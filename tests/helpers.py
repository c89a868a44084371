"""Helpers shared by the tests (import as tests.helpers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import tomli_w

from simulation.world import WorldSpec, write_history
from watchnext.config import default_config_path
from watchnext.redis_embed import free_port


def small_config_text(**sections) -> str:
    """The shipped config, shrunk so training takes seconds; `sections` override keys per table."""
    data = tomllib.loads(default_config_path().read_text())
    for f in data["features"]:
        if "buckets" in f:
            f["buckets"] = min(f["buckets"], 5_000)
        if "dim" in f:
            f["dim"] = min(f["dim"], 8)
    data["model"].update({"experts": 3, "expert_layers": [32, 16], "tower_layers": [8], "interaction_dim": 4, "interaction_heads": 2})
    data["trainer"].update({"batch_size": 256, "report_every_examples": 2_000, "eval_window": 5_000})
    for table, values in sections.items():
        data.setdefault(table, {}).update(values)
    return dumps_toml(data)


def dumps_toml(data: dict) -> str:
    """A config as TOML text (tomli-w)."""
    return tomli_w.dumps(data)


SMALL_WORLD = WorldSpec(users=300, videos=400, channels=40, tags=50)


def write_small_history(path: Path, n: int, seed: int = 0) -> Path:
    with open(path, "w") as fh:
        write_history(fh, n, seed, WorldSpec(**vars(SMALL_WORLD)))
    return path


# ---------------------------------------------------------------- waiting, the stream, real processes

ROOT = Path(__file__).resolve().parent.parent


def wait_for(pred, timeout: float = 10.0, what: str = "the condition", step: float = 0.05):
    """Poll `pred` until it returns something truthy (returned); fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def stream_id(i: bytes | str) -> tuple[int, int]:
    """A Redis stream entry id as a comparable pair."""
    a, b = (i.decode() if isinstance(i, bytes) else i).split("-")
    return int(a), int(b)


def stream_examples(url: str, key: str = "watchnext:training") -> list[dict]:
    """Every labelled example on the training stream, oldest first."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        return [json.loads(f[b"example"]) for _, f in r.xrange(key)]
    finally:
        r.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def children_by_kind(pid: int) -> dict[str, list[int]]:
    """`pid`'s child processes by what they run: redis (redis-server), trainer (`watchnext train`), worker
    (a `serve --workers` process), tracker (multiprocessing's resource tracker), other."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kinds: dict[str, list[int]] = {}
    for line in out.splitlines():
        child, _, args = line.strip().partition(" ")
        kind = ("redis" if "redis-server" in args else "trainer" if " train " in args else
                "worker" if "spawn_main" in args else "tracker" if "resource_tracker" in args else "other")
        kinds.setdefault(kind, []).append(int(child))
    return kinds


def expected_workers() -> int:
    """The worker processes `watchnext serve` starts by default here (none beside itself when it picks one)."""
    from service.settings import Settings

    n = Settings().worker_count()
    return n if n > 1 else 0


def running(pid: int) -> bool:
    return subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode == 0


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServeProcess:
    """`watchnext serve` as its own OS process (a real uvicorn) on a loopback port.

    `redis_url` None: REDIS_URL is unset, so serve starts an embedded redis-server (its data under `cwd`)."""

    def __init__(self, config_path: Path, models: Path, redis_url: str | None, admin_token: str | None,
                 log_path: Path, cwd: Path = ROOT, log_level: str = "warning", extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WATCHNEXT_ADMIN_TOKEN")}
        env.update({"PYTHONPATH": str(ROOT), "WATCHNEXT_CONFIG": str(config_path), "WATCHNEXT_MODELS": str(models),
                    "WATCHNEXT_THREADS": "1", "WATCHNEXT_LOG_LEVEL": log_level})
        if redis_url is not None:
            env["REDIS_URL"] = redis_url
        if admin_token is not None:
            env["WATCHNEXT_ADMIN_TOKEN"] = admin_token
        env.update(extra_env or {})
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "watchnext", "serve", "--port", str(self.port)], env=env,
                                     cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"watchnext serve exited:\n{_tail(self.log_path)}"
            try:
                return httpx.get(self.url + "/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, f"watchnext serve on port {self.port} to be ready", step=0.1)

    def events(self, event: str) -> list[dict]:
        """The JSON log records named `event` so far, each with the pid of the process that wrote it (one
        of the worker processes, with `--workers N`); needs log_level="info" for the service's own events."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                try:
                    record = json.loads(line)
                except ValueError:  # a line still being written
                    continue
                if record.get("event") == event:
                    out.append(record)
        return out

    def stop(self) -> int:
        code = _stop(self.proc, timeout=20)
        self._log.close()
        return code


@contextmanager
def serve_processes(n: int, config_path: Path, models: Path, redis_url: str, admin_token: str,
                    log_dir: Path) -> Iterator[list[str]]:
    """`n` `watchnext serve` processes on one Redis and one model repository, started side by side; yields their
    URLs once every one answers /readyz."""
    procs: list[ServeProcess] = []
    try:
        for k in range(n):
            procs.append(ServeProcess(config_path, models, redis_url, admin_token, Path(log_dir) / f"serve-{k}.log"))
        for p in procs:
            p.wait_ready()
        yield [p.url for p in procs]
    finally:
        for p in procs:
            p.stop()


@contextmanager
def serve_process(config_path: Path, models: Path, redis_url: str, admin_token: str, log_dir: Path) -> Iterator[str]:
    """One `watchnext serve` process; yields its URL once it is ready."""
    with serve_processes(1, config_path, models, redis_url, admin_token, log_dir) as (url,):
        yield url


class TrainerProcess:
    """`watchnext train --stream` as a child process; `stop()` sends SIGTERM (it checkpoints, acknowledges and
    exits 0) and returns the exit status."""

    def __init__(self, config_path: Path, models: Path, checkpoint: Path, redis_url: str, log_path: Path,
                 consumer: str, promote: bool = True, idle_exit_s: float = 60.0):
        self.log_path = log_path
        self._log = open(log_path, "w")
        argv = [sys.executable, "-m", "watchnext", "train", "--stream", "--idle-exit", f"{idle_exit_s:g}",
                "--config", str(config_path), "--models", str(models), "--checkpoint", str(checkpoint),
                "--consumer", consumer] + (["--promote"] if promote else [])
        self.proc = subprocess.Popen(argv, env={**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)},
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> int:
        code = _stop(self.proc)
        self._log.close()
        return code


def with_labels(history: Path, path: Path, changes: dict[int, dict], n: int | None = None) -> Path:
    """The first `n` lines of `history` (all: None) with `changes` ({line: labels}) merged into those lines'
    labels, written to `path`."""
    out = []
    for i, line in enumerate(history.read_text().splitlines()[:n], start=1):
        if i in changes:
            ex = json.loads(line)
            ex["labels"].update(changes[i])
            line = json.dumps(ex)
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path
