"""`watchnext up`: the whole local stack from an empty folder, the printed curl works, Ctrl-C or SIGTERM stops it all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import children_by_kind, running
from tests.service.fixtures import write_config
from tests.service.prom import sample
from watchnext.redis_embed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_up_bootstraps_serves_and_stops_cleanly(tmp_path, stop):
    cfg = write_config(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WATCHNEXT_ADMIN_TOKEN")}
    env["PYTHONPATH"] = ROOT
    log = open(tmp_path / "up.log", "w+")
    # its own process group, as a terminal would run it; Ctrl-C is SIGINT to the whole group
    up = subprocess.Popen([sys.executable, "-m", "watchnext", "up", "--config", str(cfg), "--models", "models",
                           "--port", str(port), "--bootstrap-examples", "3000"],
                          cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    kinds: dict[str, list[int]] = {}
    try:
        deadline = time.monotonic() + 150
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
                time.sleep(0.3)
            log.seek(0)
            text = log.read()
            assert f"service: http://127.0.0.1:{port}" in text and "admin token:" in text
            curl = re.search(r"curl -s (\S+) -H 'content-type: application/json' -d '(.*)'", text)
            assert curl is not None
            r = c.post(curl.group(1).replace(f"http://127.0.0.1:{port}", ""), content=curl.group(2))
            assert r.status_code == 200 and r.json()["model_version"] == "1" and len(r.json()["items"]) == 3
            assert json.loads(curl.group(2))["candidates"][0].keys() == {"video_id"}  # the store fills the rest
            assert sample(c.get("/metrics").text, "watchnext_feature_store_hits_total") == 7
        kinds = children_by_kind(up.pid)
        # the embedded redis-server and the continuous trainer; the service runs in `up` itself (one worker)
        assert {k: len(v) for k, v in kinds.items()} == {"redis": 1, "trainer": 1}
        if stop == "ctrl-c":  # SIGINT to the whole group, as a terminal sends it
            os.killpg(up.pid, signal.SIGINT)
            assert up.wait(90) == 0
        else:  # SIGTERM to `up` alone, as `kill` or a process manager sends it
            os.kill(up.pid, signal.SIGTERM)
            assert up.wait(90) == 128 + signal.SIGTERM
    finally:
        if up.poll() is None:  # the test failed: leave nothing behind (the trainer has its own session)
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
            for k in sum(kinds.values(), []):
                if running(k):
                    os.kill(k, signal.SIGKILL)
        log.close()
    deadline = time.monotonic() + 5
    while (alive := [(k, kind) for kind, ks in kinds.items() for k in ks if running(k)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == [], f"children left running after {stop}"
    text = (tmp_path / "up.log").read_text()
    assert '"event": "service_stopped", "unwritten_impressions": 0' in text and "[up] stopped" in text


@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_busy_port_stops_it_at_once_naming_the_port(tmp_path, command):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WATCHNEXT_ADMIN_TOKEN")}
        env["PYTHONPATH"] = ROOT
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "watchnext", command, "--port", str(port)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    assert r.returncode == 2 and took < 5, (took, r.stderr)
    assert r.stderr == (f"watchnext: --port: cannot listen on 127.0.0.1:{port} (Address already in use): another "
                        "program holds it; choose another port with --port N (make run PORT=N)\n")
    assert not (tmp_path / "data").exists()  # no Redis started, nothing bootstrapped


def test_a_command_without_redis_url_uses_the_embedded_redis_already_running(tmp_path, history_file):
    """`features load` beside a running `watchnext serve`/`up` writes to their Redis, never to one of its own."""
    import redis

    from watchnext.redis_embed import RedisStartError, start_embedded

    server = start_embedded(tmp_path / "data" / "redis")
    try:
        with pytest.raises(RedisStartError, match="already runs on this data"):
            start_embedded(tmp_path / "data" / "redis")  # two servers on one append-only file: refused
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["PYTHONPATH"] = ROOT
        cfg = write_config(tmp_path)
        r = subprocess.run([sys.executable, "-m", "watchnext", "features", "load", str(history_file),
                            "--config", str(cfg)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"using the embedded redis-server already running on data/redis/ at {server.url}" in r.stderr
        loaded = json.loads(r.stdout)
        client = redis.Redis.from_url(server.url)
        assert loaded["candidate"] > 0 and client.dbsize() > 0
        client.close()
    finally:
        server.stop()
    assert not (tmp_path / "data" / "redis" / "watchnext-redis.url").exists()  # the marker goes with the server
