"""The streaming trainer over files: learning, exact resumption after kill -9, Parquet, incremental runs."""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib

import numpy as np
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import dumps_toml, small_config_text, with_labels, write_small_history
from training.export import state_digest
from training.trainer import TRAILER, CheckpointError, Trainer, read_checkpoint, train_files
from watchnext.config import load_config
from watchnext.encoding import example_schema
from watchnext.repository import ModelRepository


def train_cmd(data, cfg, tmp, *extra):
    return [sys.executable, "-m", "watchnext", "train", "--data", str(data), "--config", str(cfg),
            "--checkpoint", str(tmp / "ck.pt"), "--models", str(tmp / "models"), *extra]


def load_ckpt(path):
    blob = read_checkpoint(path)
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
    before = (tmp_path / "ck.pt").read_bytes()
    with pytest.raises(CheckpointError, match="starts before it"):  # refused before a line is read
        train_files(small_config, [more], tmp_path / "ck.pt", None)
    assert (tmp_path / "ck.pt").read_bytes() == before
    fresh = train_files(small_config, [more], tmp_path / "ck.pt", None, fresh=True)
    assert fresh.examples == 2000 and fresh.bad_lines == 0


def test_cli_train_prints_json_and_writes_metrics(history_file, small_config_path, tmp_path):
    res = subprocess.run(train_cmd(history_file, small_config_path, tmp_path, "--promote"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

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


def test_max_examples_is_reached_exactly_and_the_rest_trains_next(history_file, small_config, tmp_path):
    # 1000 is not a whole number of batches (256): three whole batches and one of 232, then the reading stops
    first = train_files(small_config, [history_file], tmp_path / "ck.pt", None, fresh=True, max_examples=1000)
    assert (first.trained_now, first.examples) == (1000, 1000)
    rest = train_files(small_config, [history_file], tmp_path / "ck.pt", None)
    assert (rest.trained_now, rest.examples) == (5000, 6000)  # each example once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_the_gpu(history_file, small_config, tmp_path):
    res = train_files(small_config, [history_file], tmp_path / "ck.pt", ModelRepository(tmp_path / "m", "ranker"),
                      fresh=True, device=torch.device("cuda"))
    assert res.examples == 6000 and res.version == 1
    assert read_checkpoint(tmp_path / "ck.pt")["state"]["examples"] == 6000
    meta = ModelRepository(tmp_path / "m", "ranker").metadata(1)
    assert meta["trainer"]["device"].startswith("cuda")


# ---------------------------------------------------------------- labels, non-finite batches, checkpoints


def _all_finite(trainer: Trainer) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in trainer.net.state_dict().values() if t.is_floating_point())


def test_labels_out_of_range_are_skipped_and_the_rest_trained(history_file, small_config, tmp_path):
    # before ranges, five ratings of 1e20 made every weight NaN and the export was refused
    changes = {10 + 7 * k: {"click": 1, "rating": 1e20} for k in range(5)}
    changes |= {100: {"click": 1, "watch_time": -0.5}, 200: {"click": 1, "watch_time": 1e39}, 300: {"click": 1, "rating": -100}}
    path = with_labels(history_file, tmp_path / "h.jsonl", changes)
    repo = ModelRepository(tmp_path / "models", small_config.model.name)
    res = train_files(small_config, [path], tmp_path / "ck.pt", repo, fresh=True)
    assert res.examples == 6000 - 8 and res.bad_lines == 8 and res.skipped_batches == 0
    assert res.bad_samples[0] == f"{path}:10: labels.rating: must be in the task's range [1, 5]"
    assert res.bad_samples[5] == f"{path}:100: labels.watch_time: must be in the task's range [0, 1e+07]"
    assert res.version == 1 and _all_finite(Trainer.load(tmp_path / "ck.pt", small_config))


def test_a_batch_with_a_non_finite_loss_is_skipped_and_counted(history_file, tmp_path):
    # a range as wide as float32 lets 3e38 in: squared in the loss it is inf, so that batch must not train
    data = tomllib.loads(small_config_text())
    next(t for t in data["tasks"] if t["name"] == "rating")["range"] = [0, 3e38]
    cfg = tmp_path / "wide.toml"
    cfg.write_text(dumps_toml(data))
    config = load_config(cfg)
    bs = config.trainer.batch_size
    path = with_labels(history_file, tmp_path / "h.jsonl", {bs + k: {"click": 1, "rating": 3e38} for k in (1, 2, 3)})
    repo = ModelRepository(tmp_path / "models", config.model.name)
    res = train_files(config, [path], tmp_path / "ck.pt", repo, fresh=True)
    assert res.bad_lines == 0 and res.skipped_batches == 1  # the second batch: lines bs+1 .. 2*bs
    assert res.examples == 6000 - bs and res.trained_now == 6000 - bs
    assert res.report["skipped_batches"] == 1
    t = Trainer.load(tmp_path / "ck.pt", config)
    assert _all_finite(t) and t.state.skipped_batches == 1 and t.state.skipped_examples == bs
    assert res.version == 1  # the export was not refused
    # the same run without that batch has the same running statistics: the skipped batch's were put back
    skip = tmp_path / "s.jsonl"
    lines = history_file.read_text().splitlines()
    skip.write_text("\n".join(lines[:bs] + lines[2 * bs:]) + "\n")
    ref = train_files(config, [skip], tmp_path / "ref.pt", None, fresh=True)
    assert ref.examples == res.examples
    norms = [k for k in t.net.state_dict() if "_norm." in k]
    assert len(norms) == 6  # mean, var, count of the inputs' and of the targets' statistics
    mine, theirs = t.net.state_dict(), Trainer.load(tmp_path / "ref.pt", config).net.state_dict()
    for k in norms:
        assert torch.equal(mine[k], theirs[k]), k


def test_a_model_with_nan_is_never_saved_nor_exported(small_config, tmp_path):
    t = Trainer(small_config)
    t.save(tmp_path / "ok.pt")
    with torch.no_grad():
        next(t.net.ranker.parameters())[0].fill_(float("nan"))
    name = next(n for n, _ in t.net.named_parameters())
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'ok.pt'))}: writing the checkpoint: refused: the model holds "
                                              rf"NaN/Inf in {re.escape(name)}$"):
        t.save(tmp_path / "ok.pt")
    assert _all_finite(Trainer.load(tmp_path / "ok.pt", small_config))  # the last good checkpoint is kept
    repo = ModelRepository(tmp_path / "models", small_config.model.name)
    with pytest.raises(CheckpointError, match="exporting a version: refused: the model holds NaN/Inf"):
        t.export(repo)
    assert repo.versions() == []


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, history_file):
    d = tmp_path_factory.mktemp("ck")
    cfg = d / "c.toml"
    cfg.write_text(small_config_text())
    train_files(load_config(cfg), [history_file], d / "ck.pt", None, fresh=True, max_examples=512)
    return cfg, (d / "ck.pt").read_bytes()


def _cli_train(args, capsys):
    from cli.main import main

    code = main(["train", *map(str, args)])
    return code, capsys.readouterr().err


def _flip(data: bytes) -> bytes:
    rng = np.random.default_rng(0)
    b = bytearray(data)
    for i in rng.choice(len(data) - 200, 64, replace=False):  # inside the payload
        b[i] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b"", "the checkpoint is empty"),
    (lambda b: b[: len(b) // 2], "not a whole watchnext checkpoint (no checksum at its end"),
    (lambda b: np.random.default_rng(1).bytes(len(b)), "not a whole watchnext checkpoint (no checksum at its end"),
    (lambda b: b[: b.rindex(b"\nwatchnext-checkpoint")], "not a whole watchnext checkpoint"),  # an older version's
    (_flip, "the checkpoint is damaged (its sha256 does not match its content)"),
], ids=["empty", "truncated", "garbage", "no-checksum", "64-bytes-flipped"])
def test_a_damaged_checkpoint_is_refused_in_one_line(good_checkpoint, history_file, tmp_path, capsys, damage, needle):
    cfg, data = good_checkpoint
    ck = tmp_path / "ck.pt"
    ck.write_bytes(damage(data))
    models = ["--models", tmp_path / "models", "--no-export"]
    code, err = _cli_train(["--data", history_file, "--config", cfg, "--checkpoint", ck, *models], capsys)
    assert code == 2
    assert err.startswith(f"watchnext: {ck}: {needle}")  # the file named first, then why
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.rstrip().endswith("delete it or train with --fresh to start a new model")
    # --fresh starts over, and writes a good checkpoint in its place
    code, _ = _cli_train(["--data", history_file, "--config", cfg, "--checkpoint", ck, *models, "--fresh",
                          "--max-examples", "256"], capsys)
    assert code == 0 and read_checkpoint(ck)["state"]["examples"] == 256


def test_resuming_under_another_bias_table_is_refused_in_one_line(good_checkpoint, history_file, tmp_path):
    cfg, data = good_checkpoint
    ck = tmp_path / "ck.pt"
    ck.write_bytes(data)
    other = tmp_path / "other.toml"
    other.write_text(small_config_text(bias={"dim": 16}))
    assert load_config(other).hash == load_config(cfg).hash  # the served model is the same; the trainer's is not
    res = subprocess.run(train_cmd(history_file, other, tmp_path, "--no-export"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert res.stderr == (f"watchnext: {ck}: checkpoint was trained under another model shape (bias.dim 8 -> 16); "
                          "delete it or train with --fresh to start a new model, or point --checkpoint elsewhere\n")
    assert ck.read_bytes() == data  # left as it was


# The names of the tensors before the ranker was split into named parts (SharedInput, Interactions, Gates, Heads).
OLD_NAMES = (
    ("ranker.shared_input.embeddings.", "ranker.embeddings."),
    ("ranker.shared_input.numeric_norm.", "ranker.numeric_norm."),
    ("ranker.interactions.projections.", "ranker.projections."),
    ("ranker.gates.linear.", "ranker.gates."),
    ("ranker.heads.target_norm.", "ranker.target_norm."),
    ("ranker.heads.is_", "ranker.is_"),
)


def _old_name(key):
    return next((old + key[len(new):] for new, old in OLD_NAMES if key.startswith(new)), key)


def test_a_checkpoint_of_the_old_model_layout_resumes_exactly(history_file, small_config, tmp_path):
    train_files(small_config, [history_file], tmp_path / "new.pt", None, fresh=True, max_examples=1024)
    blob = read_checkpoint(tmp_path / "new.pt")
    blob["model"] = {_old_name(k): v for k, v in blob["model"].items()}
    assert {"ranker.embeddings.video_id.weight", "ranker.numeric_norm.mean", "ranker.projections.video_id.weight",
            "ranker.gates.weight", "ranker.target_norm.var", "ranker.is_binary"} <= set(blob["model"])
    buf = io.BytesIO()
    torch.save(blob, buf)
    payload = buf.getvalue()
    (tmp_path / "old.pt").write_bytes(payload + TRAILER + hashlib.sha256(payload).hexdigest().encode() + b"\n")
    old, new = Trainer.load(tmp_path / "old.pt", small_config), Trainer.load(tmp_path / "new.pt", small_config)
    assert state_digest(old.net.state_dict()) == state_digest(new.net.state_dict())
    # the optimisers' states follow the parameters: resuming either trains the rest identically
    a = train_files(small_config, [history_file], tmp_path / "old.pt", None)
    b = train_files(small_config, [history_file], tmp_path / "new.pt", None)
    assert a.trained_now == b.trained_now == 6000 - 1024
    assert load_ckpt(tmp_path / "old.pt") == load_ckpt(tmp_path / "new.pt")


# ---------------------------------------------------------------- runs that did not do what was asked


def _with_bad_ts(history, path, every: int):
    lines = history.read_text().splitlines()
    for i in range(0, len(lines), every):
        lines[i] = lines[i].replace('"ts":', '"ts":"x","was":', 1)  # ts not a number
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("every, code", [(20, 2), (400, 0)])  # 5% of the lines bad: refused; 0.25%: trained
def test_a_run_that_skips_more_than_its_share_of_lines_exits_non_zero(history_file, small_config_path, tmp_path,
                                                                       capsys, every, code):
    data = _with_bad_ts(history_file, tmp_path / "bad.jsonl", every)
    got, err = _cli_train(["--data", data, "--config", small_config_path, "--checkpoint", tmp_path / "ck.pt",
                           "--models", tmp_path / "models"], capsys)
    assert got == code, err
    bad = len(range(0, 6000, every))
    if code:
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"watchnext: skipped {bad:,} of the 6,000 lines read (")
        assert f"first at {data}:1: ts:" in last and "--fresh" in last and "--config" in last
    else:
        assert "skipped" not in err


def test_a_file_older_than_the_checkpoint_is_refused_before_it_is_read(history_file, small_config_path, tmp_path,
                                                                        capsys):
    lines = history_file.read_text().splitlines(keepends=True)
    early, late = tmp_path / "early.jsonl", tmp_path / "late.jsonl"
    early.write_text("".join(lines[:3000]))
    late.write_text("".join(lines[3000:]))
    base = ["--config", small_config_path, "--checkpoint", tmp_path / "ck.pt", "--models", tmp_path / "models"]
    assert _cli_train(["--data", late, *base], capsys)[0] == 0
    before = (tmp_path / "ck.pt").read_bytes()
    code, err = _cli_train(["--data", early, *base], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"watchnext: {tmp_path / 'ck.pt'}: its model has trained up to ts ")
    assert f"{early.resolve()} starts before it" in err and "--fresh" in err
    assert (tmp_path / "ck.pt").read_bytes() == before  # untouched
    assert _cli_train(["--data", early, *base, "--fresh"], capsys)[0] == 0


# ---------------------------------------------------------------- any valid config trains

SHAPES = {
    # Ma et al.'s synthetic benchmark: one 100-float vector, two regression tasks; no id, no [item], no [bias]
    "dense-only": """
[[features]]
name = "x"
source = "candidate"
kind = "vector"
size = 100
[[tasks]]
name = "y1"
kind = "regression"
group = "engagement"
[[tasks]]
name = "y2"
kind = "regression"
group = "satisfaction"
[model]
experts = 3
expert_layers = [32]
tower_layers = [16]
[trainer]
batch_size = 64
learning_rate = 0.01
""",
    # one binary task on one id and one number, no [item], no [bias]
    "one-task": """
[[features]]
name = "video_id"
source = "candidate"
kind = "categorical"
buckets = 1000
dim = 8
[[features]]
name = "x"
source = "candidate"
kind = "numeric"
[[tasks]]
name = "y1"
kind = "binary"
group = "engagement"
[model]
expert_layers = [16]
tower_layers = [8]
[trainer]
batch_size = 128
""",
}


def _shape_data(path, shape: str, n: int = 4000):
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        x = rng.normal(size=100)
        if shape == "dense-only":
            line = {"candidate": {"x": np.round(x, 4).tolist()},
                    "labels": {"y1": float(x[:10].sum()), "y2": float(np.sin(x[:5]).sum())}}
        else:
            vid = int(rng.integers(0, 50))
            line = {"candidate": {"video_id": f"v{vid}", "x": float(x[0])},
                    "labels": {"y1": float(rng.random() < (0.8 if vid < 25 else 0.2))}}
        rows.append(json.dumps({"ts": 1000.0 + i, "request_id": f"r{i}", **line}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_valid_config_shape_trains_exports_and_evaluates(shape, tmp_path):
    from analysis.evaluate import evaluate

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(SHAPES[shape])
    config = load_config(cfg_path)
    data = _shape_data(tmp_path / "d.jsonl", shape)
    repo = ModelRepository(tmp_path / "m", config.model.name)
    res = train_files(config, [data], tmp_path / "ck.pt", repo, fresh=True)
    assert (res.examples, res.bad_lines, res.version) == (4000, 0, 1)
    metrics = evaluate(config, repo, 1, [str(data)], device="cpu")["tasks"]
    if shape == "dense-only":  # learned: below the labels' own spread (y1's is sqrt(10), y2's about 1.5)
        assert metrics["y1"]["rmse"] < 1.0 and metrics["y2"]["rmse"] < 0.8, metrics
    else:
        assert metrics["y1"]["auc"] > 0.75, metrics
    again = train_files(config, [data], tmp_path / "ck.pt", None)  # resumes from its checkpoint
    assert again.trained_now == 0 and again.examples == 4000
