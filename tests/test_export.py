"""ONNX export, the model repository, evaluate."""

import json
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.trainer import Trainer, train_files
from watchnext.config import load_config
from watchnext.examples import Decoder, ExampleFiles
from watchnext.repository import ModelRepository, RepositoryError


@pytest.fixture(scope="module")
def trained(history_file, tmp_path_factory):
    from tests.helpers import small_config_text

    tmp = tmp_path_factory.mktemp("export")
    cfg_path = tmp / "watchnext.toml"
    cfg_path.write_text(small_config_text())
    config = load_config(cfg_path)
    repo = ModelRepository(tmp / "models", config.model.name)
    res = train_files(config, [history_file], tmp / "ck.pt", repo, fresh=True)
    return config, cfg_path, repo, res.version, tmp / "ck.pt"


def test_onnx_matches_pytorch_on_real_batches(trained, history_file):
    config, _, repo, version, ckpt = trained
    ranker = Trainer.load(ckpt, config, torch.device("cpu")).net.ranker.eval()
    sess = ort.InferenceSession(str(repo.path(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    chunk, _ = next(iter(ExampleFiles([history_file], Decoder(config))))
    for n in (1, 2, 513):
        x = {k: v[:n] for k, v in chunk.inputs.items()}
        got = sess.run(ranker.task_names, {k: x[k] for k in ranker.input_names})
        with torch.no_grad():
            want = ranker(*[torch.from_numpy(x[k]) for k in ranker.input_names])
        for name, g, w in zip(ranker.task_names, got, want, strict=True):
            assert g.shape == (n,)
            w = w.numpy()
            task = config.tasks[config.task_index(name)]
            if task.kind == "binary":
                assert np.max(np.abs(g - w)) <= 1e-5, name
                assert ((g >= 0) & (g <= 1)).all()
            else:  # seconds and ratings: fp32 agreement relative to the value
                assert np.max(np.abs(g - w) / np.maximum(1, np.abs(w))) <= 1e-5, name
    # the graph's inputs are the encoded features only: no position, no bias tower
    names = [i.name for i in sess.get_inputs()]
    assert names == ranker.input_names and "position" not in names
    assert all(i.shape[0] == "batch" for i in sess.get_inputs())


def test_repository_layout_and_metadata(trained):
    config, _, repo, version, _ = trained
    d = repo.dir
    assert (d / "config.pbtxt").is_file()
    assert (d / str(version) / "model.onnx").is_file()
    meta = json.loads((d / str(version) / "metadata.json").read_text())
    for key in ("config_hash", "tasks", "inputs", "outputs", "metrics", "watermark", "created_at", "parent", "version"):
        assert key in meta, key
    assert meta["config_hash"] == config.hash and meta["version"] == version
    assert meta["watermark"]["examples"] == 6000 and meta["watermark"]["last_example_ts"] > 1.7e9
    assert meta["watermark"]["source"]["position"]["line"] == 6001
    assert meta["onnx"]["max_abs_diff_vs_torch"] <= 1e-5
    assert set(meta["metrics"]["tasks"]) == {t.name for t in config.tasks}
    pbtxt = (d / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in pbtxt and 'name: "numeric"' in pbtxt and "TYPE_INT64" in pbtxt
    assert not any((repo.root / ".staging").iterdir())  # nothing half-built left behind


def test_concurrent_publishes_get_distinct_whole_versions(tmp_path):
    repo = ModelRepository(tmp_path, "m")
    meta = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}], "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]}

    def build(folder):
        (folder / "model.onnx").write_bytes(b"onnx")
        return dict(meta)

    got = []
    threads = [threading.Thread(target=lambda: got.append(repo.publish(build))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9)) and repo.versions() == list(range(1, 9))


def test_promote_and_rollback(tmp_path):
    repo = ModelRepository(tmp_path, "m")
    meta = {"inputs": [], "outputs": []}
    for _ in range(3):
        repo.publish(lambda f: ((f / "model.onnx").write_bytes(b"x"), dict(meta))[1])
    assert repo.serving() == 3 and repo.promoted() is None
    repo.promote(1)
    assert repo.serving() == 1 and "versions: [ 1 ]" in (repo.dir / "config.pbtxt").read_text()
    repo.promote(2)  # Triton keeps the previous promoted version loaded beside the new one
    assert "versions: [ 1, 2 ]" in (repo.dir / "config.pbtxt").read_text()
    repo.promote(3)
    assert repo.triton_versions() == [2, 3]
    assert repo.rollback()["promoted"] == 2
    assert repo.serving() == 2 and repo.triton_versions() == [2, 3]
    assert repo.rollback()["promoted"] == 1  # rollbacks walk back through the promotions, never toggle
    with pytest.raises(RepositoryError, match="no earlier promoted version"):
        repo.rollback()
    repo.promote(3)  # a promotion after rollbacks: the next rollback returns to 1
    assert repo.rollback()["promoted"] == 1
    with pytest.raises(RepositoryError, match="no version 9"):
        repo.promote(9)
    repo2 = ModelRepository(tmp_path, "other")
    with pytest.raises(RepositoryError, match="no earlier promoted version"):
        repo2.rollback()


def test_cli_evaluate_and_models(trained, history_file):
    _, cfg_path, repo, version, _ = trained
    base = [sys.executable, "-m", "watchnext"]
    common = ["--config", str(cfg_path), "--models", str(repo.root)]
    res = subprocess.run(base + ["evaluate", "--model", str(version), "--data", str(history_file), *common],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["examples"] == 6000 and out["version"] == version
    assert out["tasks"]["click"]["n"] == 6000 and 0.5 < out["tasks"]["click"]["auc"] < 1
    assert out["tasks"]["like"]["n"] < 3000  # only clicked impressions carry a like label
    assert "rmse" in out["tasks"]["watch_time"]
    assert 0 < out["ranking"]["ndcg@10"] <= 1 and out["ranking"]["requests"] == 600
    res = subprocess.run(base + ["models", "list", *common], capture_output=True, text=True, timeout=60)
    listing = json.loads(res.stdout)
    assert listing["serving"] == version and listing["versions"][0]["examples"] == 6000
    res = subprocess.run(base + ["evaluate", "--model", "7", "--data", str(history_file), *common],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "has no version 7" in res.stderr


def test_publish_cleans_what_a_killed_export_left(tmp_path):
    import os
    import time

    repo = ModelRepository(tmp_path, "m")
    stale = tmp_path / ".staging" / "m-dead"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    live = tmp_path / ".staging" / "m-live"
    live.mkdir()
    repo.publish(lambda f: ((f / "model.onnx").write_bytes(b"x"), {"inputs": [], "outputs": []})[1])
    assert not stale.exists() and live.exists() and repo.versions() == [1]
