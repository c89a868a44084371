"""The README's five-minute tour, command by command, as a new user runs it: `watchnext up` in an empty folder,
the `export` line it prints pasted into a second shell, then every command of the tour's code blocks in order."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import wait_for
from watchnext.redis_embed import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent


def tour_commands() -> list[str]:
    """The shell commands of the README's tour, in order (continuation lines joined, comments dropped), after the
    block of `export` lines a user pastes from the banner."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A five-minute tour"):text.index("## The flow")]
    blocks = re.findall(r"```sh\n(.*?)```", tour, re.S)
    assert blocks[0].lstrip().startswith("export WATCHNEXT_URL="), "the tour opens with the banner's exports"
    commands = []
    for block in blocks[1:]:
        pending = ""
        for line in block.replace("\\\n", " ").split("\n"):
            pending += ("\n" if pending else "") + line
            if pending.count("'") % 2:  # inside a quoted argument that goes on below
                continue
            cmd = pending.split(" # ")[0].strip()
            pending = ""
            if cmd and not cmd.startswith("#"):
                commands.append(cmd)
    return commands


def test_the_readme_tour_runs_command_by_command(tmp_path):
    commands = tour_commands()
    assert [" ".join(c.split()[:3]) for c in commands] == [
        "curl -s $WATCHNEXT_URL/v1/rank", "curl -s $WATCHNEXT_URL/v1/feedback", "watchnext simulate history",
        "watchnext train --data", "watchnext evaluate --models", "watchnext models list", "watchnext ab create",
        "watchnext simulate traffic", "watchnext ab report", "watchnext ab stop"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WATCHNEXT_ADMIN_TOKEN", "WATCHNEXT_URL")}
    env.update(PYTHONPATH=str(ROOT), PATH=f"{BIN}:{env.get('PATH', '')}", WATCHNEXT_CONFIG=str(ROOT / "watchnext.toml"))
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen([str(BIN / "watchnext"), "up", "--port", str(port), "--bootstrap-examples", "30000"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        def banner() -> bool:
            assert up.poll() is None, log_path.read_text()[-3000:]
            return re.search(r"^  export WATCHNEXT_URL=.*$", log_path.read_text(), re.M) is not None

        def ready() -> bool:
            assert up.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(banner, 240, "watchnext up to print its banner", step=0.3)
        exports = re.search(r"^  export (WATCHNEXT_URL=.*)$", log_path.read_text(), re.M).group(1)
        shell = {**env, **dict(kv.split("=", 1) for kv in shlex.split(exports))}  # the second shell
        url = shell["WATCHNEXT_URL"]
        assert url == f"http://127.0.0.1:{port}" and shell["WATCHNEXT_ADMIN_TOKEN"] and shell["REDIS_URL"]
        wait_for(ready, 120, "the service to be ready", step=0.3)
        out = []
        for cmd in commands:
            r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=shell, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{cmd}\nexit {r.returncode}\n{r.stderr[-3000:]}"
            out.append(r.stdout)
        ranked = json.loads(out[0])
        assert ranked["request_id"] == "tour-1" and ranked["model_version"] == "1" and len(ranked["items"]) == 3
        assert {"click", "watch_time", "dismiss", "like", "rating"} == set(ranked["items"][0]["heads"])
        assert json.loads(out[1]) == {"accepted": 1, "dropped": []}
        assert (tmp_path / "data" / "mine-models" / "ranker" / "1" / "model.onnx").is_file()
        report = out[8]
        assert "control" in report and "likes" in report
    finally:
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(90) in (0, 130), log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()
