"""`watchnext models promote / rollback / list` trust nothing: a version must load and run before it is promoted,
and a damaged metadata.json or serving.json is named, never a bare JSON error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from watchnext.repository import ModelRepository


def cli(models: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watchnext", "models", *args, "--config", str(config),
                           "--models", str(models)], capture_output=True, text=True, timeout=120)


def add_version(models: Path, source: int, version: int) -> Path:
    dst = models / "ranker" / str(version)
    shutil.copytree(models / "ranker" / str(source), dst)
    meta = json.loads((dst / "metadata.json").read_text())
    meta["version"] = version
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def test_cli_refuses_to_promote_a_version_that_does_not_load(trained, models_dir):
    repo = ModelRepository(models_dir, "ranker")
    repo.promote(1)
    state = (repo.dir / "serving.json").read_bytes()
    # version 3: garbage bytes, with a checksum that matches them (written whole, but not a model)
    v3 = add_version(models_dir, 2, 3)
    (v3 / "model.onnx").write_bytes(b"\x00garbage, not an ONNX model" * 100)
    meta = json.loads((v3 / "metadata.json").read_text())
    del meta["onnx"]["sha256"]  # nothing recorded to compare with: only loading it tells
    (v3 / "metadata.json").write_text(json.dumps(meta))

    res = cli(models_dir, trained["config_path"], "promote", "3")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("watchnext: version 3 cannot serve: ")
    assert f"{v3 / 'model.onnx'}: ONNX Runtime cannot load it" in lines[0]
    assert (repo.dir / "serving.json").read_bytes() == state and repo.promoted() == 1

    # a checksum that no longer matches (half the file)
    v4 = add_version(models_dir, 2, 4)
    onnx = v4 / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    res = cli(models_dir, trained["config_path"], "promote", "4")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"version 4 cannot serve: {onnx}: checksum does not match metadata.json" in res.stderr

    # trained under another config
    v5 = add_version(models_dir, 2, 5)
    meta = json.loads((v5 / "metadata.json").read_text())
    meta["config_hash"] = "0123456789abcdef"
    (v5 / "metadata.json").write_text(json.dumps(meta))
    res = cli(models_dir, trained["config_path"], "promote", "5")
    assert res.returncode == 2
    assert f"version 5 cannot serve: {v5 / 'metadata.json'}: config hash 0123456789abcdef does not match" in res.stderr
    assert (repo.dir / "serving.json").read_bytes() == state

    # a good version, with or without the v prefix
    res = cli(models_dir, trained["config_path"], "promote", "v2")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"promoted": 2} and repo.promoted() == 2
    res = cli(models_dir, trained["config_path"], "promote", "two")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "watchnext: VERSION: expected a version number such as 3 (or v3), got 'two'"]
    assert repo.promoted() == 2


def test_cli_rollback_refuses_a_previous_version_that_no_longer_loads(trained, models_dir):
    repo = ModelRepository(models_dir, "ranker")
    repo.promote(1)
    repo.promote(2)
    state = (repo.dir / "serving.json").read_bytes()
    onnx = models_dir / "ranker" / "1" / "model.onnx"
    onnx.write_bytes(b"\x08\x07" * 5000)
    res = cli(models_dir, trained["config_path"], "rollback")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"version 1 cannot serve: {onnx}: checksum does not match metadata.json" in res.stderr
    assert (repo.dir / "serving.json").read_bytes() == state

    shutil.copy(trained["models"] / "ranker" / "1" / "model.onnx", onnx)  # repaired: the rollback goes ahead
    res = cli(models_dir, trained["config_path"], "rollback")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"promoted": 1} and repo.promoted() == 1


def test_models_list_names_a_damaged_metadata_or_state_file(trained, models_dir):
    meta = models_dir / "ranker" / "1" / "metadata.json"
    meta.write_text('{"version": 1, "config_hash": ')  # cut short
    res = cli(models_dir, trained["config_path"], "list")
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert [v["version"] for v in listing["versions"]] == [1, 2]
    bad, good = listing["versions"]
    assert bad["error"].startswith(f"{meta}: not valid JSON: ") and bad["serving"] is False
    assert good["examples"] == 6000 and good["serving"] is True and "error" not in good
    assert listing["serving"] == 2 and listing["promoted"] is None

    res = cli(models_dir, trained["config_path"], "promote", "1")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"version 1 cannot serve: {meta}: not valid JSON" in res.stderr

    state = models_dir / "ranker" / "serving.json"
    state.write_text("[1, 2")
    res = cli(models_dir, trained["config_path"], "list")
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert listing["promoted"] is None and listing["serving"] == 2
    assert listing["state_error"].startswith(f"{state}: not valid JSON: ")
    res = cli(models_dir, trained["config_path"], "promote", "2")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"{state}: not valid JSON" in res.stderr and "remove it" in res.stderr
    assert state.read_text() == "[1, 2"
