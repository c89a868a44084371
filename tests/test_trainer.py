"""The streaming trainer over files: learning, exact resumption after kill -9, Parquet, incremental runs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import small_config_text, write_small_history
from training.export import state_digest
from training.trainer import train_files
from watchnext.config import load_config
from watchnext.encoding import example_schema
from watchnext.repository import ModelRepository


def train_cmd(data, cfg, tmp, *extra):
    return [sys.executable, "-m", "watchnext", "train", "--data", str(data), "--config", str(cfg),
            "--checkpoint", str(tmp / "ck.pt"), "--models", str(tmp / "models"), *extra]


def load_ckpt(path):
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return blob["state"], state_digest(blob["model"])


@pytest.fixture(scope="module")
def big_history(tmp_path_factory):
    return write_small_history(tmp_path_factory.mktemp("big") / "history.jsonl", 30_000, seed=3)


@pytest.fixture
def kill_config(tmp_path):
    p = tmp_path / "kill.toml"
    p.write_text(small_config_text(trainer={"checkpoint_every_examples": 1024, "checkpoint_interval_s": 1000.0}))
    return p


def test_learns_on_simulated_history(big_history, small_config, tmp_path):
    repo = ModelRepository(tmp_path / "models", small_config.model.name)
    res = train_files(small_config, [big_history], tmp_path / "ck.pt", repo, fresh=True)
    assert res.examples == 30_000 and res.bad_lines == 0 and res.version == 1
    tasks = res.report["tasks"]
    # progressive AUC on the newest 5,000 of 30,000 examples (measured: 0.676, 0.719, 0.598)
    assert tasks["click"]["auc_with_bias"] > 0.64
    assert tasks["click"]["auc_with_bias"] > tasks["click"]["auc"]  # the shallow tower explains position
    assert tasks["like"]["auc"] > 0.68
    assert tasks["dismiss"]["auc"] > 0.57
    assert tasks["watch_time"]["rmse"] < 250 and tasks["rating"]["rmse"] < 1.1
    gates = np.array(tasks["click"]["gate"])
    assert gates.shape == (small_config.model.experts,) and gates.sum() == pytest.approx(1.0, abs=1e-3)
    # running it again finds nothing new; --fresh would start over
    again = train_files(small_config, [big_history], tmp_path / "ck.pt", repo)
    assert again.trained_now == 0 and again.examples == 30_000 and again.version is None


def test_killed_and_resumed_trains_every_example_exactly_once(big_history, kill_config, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    subprocess.run(train_cmd(big_history, kill_config, ref_dir, "--no-export"), check=True, capture_output=True, timeout=300)
    ref_state, ref_model = load_ckpt(ref_dir / "ck.pt")
    assert ref_state["examples"] == 30_000

    ckpt = run_dir / "ck.pt"
    kills = 0
    for _ in range(2):  # kill -9 twice, each time right after a new checkpoint lands
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        proc = subprocess.Popen(train_cmd(big_history, kill_config, run_dir, "--no-export"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                time.sleep(0.05)
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    mid_state, _ = load_ckpt(ckpt)
    assert kills == 2 and 0 < mid_state["examples"] < 30_000  # really killed mid-run
    subprocess.run(train_cmd(big_history, kill_config, run_dir, "--no-export"), check=True, capture_output=True, timeout=300)
    state, model = load_ckpt(ckpt)
    assert state["examples"] == 30_000
    assert state["digest"] == ref_state["digest"]  # the same examples, in the same batches, once each
    assert model == ref_model  # bit-identical parameters and statistics


def test_parquet_trains_like_jsonl(history_file, small_config, tmp_path):
    table = pj.read_json(history_file, parse_options=pj.ParseOptions(explicit_schema=example_schema(small_config),
                                                                        unexpected_field_behavior="ignore"))
    pq_path = tmp_path / "history.parquet"
    pq.write_table(table, pq_path, row_group_size=1000)
    a = train_files(small_config, [history_file], tmp_path / "a.pt", None, fresh=True)
    b = train_files(small_config, [pq_path], tmp_path / "b.pt", None, fresh=True)
    sa, ma = load_ckpt(tmp_path / "a.pt")
    sb, mb = load_ckpt(tmp_path / "b.pt")
    assert sa["examples"] == sb["examples"] == 6000
    assert sa["digest"] == sb["digest"] and ma == mb
    assert a.report["tasks"] == b.report["tasks"]


def test_new_files_continue_the_model_and_fresh_starts_over(history_file, small_config, tmp_path):
    more = write_small_history(tmp_path / "more.jsonl", 2000, seed=9)
    # history written by another seed starts at the same time: a later file must not go backwards
    train_files(small_config, [history_file], tmp_path / "ck.pt", None, fresh=True)
    res = train_files(small_config, [more], tmp_path / "ck.pt", None)
    assert res.bad_lines > 0  # its timestamps go backwards against what was trained: skipped, counted
    assert "ts: goes backwards" in res.bad_samples[0]
    fresh = train_files(small_config, [more], tmp_path / "ck.pt", None, fresh=True)
    assert fresh.examples == 2000 and fresh.bad_lines == 0


def test_cli_train_prints_json_and_writes_metrics(history_file, small_config_path, tmp_path):
    res = subprocess.run(train_cmd(history_file, small_config_path, tmp_path, "--promote"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert out["examples"] == 6000 and out["version"] == 1
    lines = (tmp_path / "ck.metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and json.loads(lines[-1])["final"] is True
    assert ModelRepository(tmp_path / "models", "ranker").promoted() == 1
    cfg = load_config(small_config_path)
    assert set(out["metrics"]["tasks"]) == {t.name for t in cfg.tasks}


def test_bad_lines_are_counted_once_across_a_restart(history_file, tmp_path):
    from tests.test_examples import BAD, make_bad_file

    cfg = tmp_path / "c.toml"
    cfg.write_text(small_config_text(trainer={"checkpoint_every_examples": 256}))
    config = load_config(cfg)
    lines = history_file.read_text().splitlines()
    bad_head = make_bad_file(history_file, tmp_path / "head.jsonl", n=40).read_text().splitlines()
    # the 40 lines with 6 bad ones (and a blank line), then the rest, then the bad block again near the end
    body = bad_head + lines[40:3000] + ['{"broken": '] + lines[3000:]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(body) + "\n")
    first = train_files(config, [path], tmp_path / "ck.pt", None, fresh=True, max_examples=1024)
    assert first.trained_now == 1024
    rest = train_files(config, [path], tmp_path / "ck.pt", None)
    assert rest.examples == 6000 - len(BAD)
    assert rest.bad_lines == len(BAD) + 1  # each bad line once, though the first run read past some


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_the_gpu(history_file, small_config, tmp_path):
    res = train_files(small_config, [history_file], tmp_path / "ck.pt", ModelRepository(tmp_path / "m", "ranker"),
                      fresh=True, device=torch.device("cuda"))
    assert res.examples == 6000 and res.version == 1
    blob = torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=False)
    assert blob["state"]["examples"] == 6000
    meta = ModelRepository(tmp_path / "m", "ranker").metadata(1)
    assert meta["trainer"]["device"].startswith("cuda")
