"""`watchnext compare A B`: the paired request bootstrap, and the command on two trained versions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.compare import bootstrap_differences, weighted_auc
from analysis.evaluate import Scored
from cli.main import main
from tests.helpers import small_config_text
from watchnext.config import load_config
from watchnext.metrics import auc, ndcg_by_group, ndcg_per_group


def test_weighted_auc_with_unit_weights_is_the_auc_and_weights_are_copies():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.3
    s = np.round(rng.normal(size=2000) + y, 1)  # many ties
    assert weighted_auc(y, s, np.ones((1, 2000)))[0] == pytest.approx(auc(y, s), abs=1e-12)
    # integer weights are the same as repeating rows
    w = rng.poisson(1.0, 2000)
    rep = np.repeat(np.arange(2000), w)
    assert weighted_auc(y, s, w[None, :].astype(float))[0] == pytest.approx(auc(y[rep], s[rep]), abs=1e-12)


def test_ndcg_per_group_reproduces_the_evaluate_metric():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(300), 10)
    gains = (rng.random(3000) < 0.2) * rng.uniform(0.5, 3, 3000)
    scores = gains + rng.normal(0, 1, 3000)
    per = ndcg_per_group(g, scores, gains)
    assert np.nanmean(per) == pytest.approx(ndcg_by_group(g, scores, gains, 10), abs=1e-12)
    assert np.isnan(per).sum() == int((np.bincount(g, weights=gains) == 0).sum())


def _synthetic(config, rng, requests: int) -> tuple[Scored, Scored]:
    """Two scorers of the same impressions; requests share a per-request click level."""
    n, T = requests * 10, len(config.tasks)
    group = np.repeat(rng.integers(0, 2**63, requests, dtype=np.int64).astype(np.uint64), 10)
    level = np.repeat(rng.normal(0, 1.0, requests), 10)
    signal = rng.normal(size=n)
    labels = np.zeros((n, T))
    labels[:, 0] = rng.random(n) < 1 / (1 + np.exp(-(signal + level - 1.5)))  # click
    labels[:, 1:] = rng.normal(size=(n, T - 1)) + signal[:, None]
    mask = np.ones((n, T), bool)
    shared = rng.normal(size=(n, 1))
    heads_a = signal[:, None] + 1.0 * shared + rng.normal(size=(n, T)) * 1.0
    heads_b = signal[:, None] + 1.0 * shared + rng.normal(size=(n, T)) * 1.1
    return (Scored(heads_a, labels, mask, group, 0), Scored(heads_b, labels, mask, group, 0))


def test_bootstrap_interval_has_its_coverage(small_config):
    """Over repeated datasets, the paired interval on the AUC difference covers the true one ~95%."""
    rng = np.random.default_rng(2)
    big_a, big_b = _synthetic(small_config, rng, 40_000)  # the "population" difference
    truth = auc(big_b.labels[:, 0], big_b.heads[:, 0]) - auc(big_a.labels[:, 0], big_a.heads[:, 0])
    cover, diffs, ses = [], [], []
    for i in range(120):
        a, b = _synthetic(small_config, rng, 300)
        d = bootstrap_differences(small_config, a, b, replicates=200, seed=i)["click"]
        cover.append(d["ci"][0] <= truth <= d["ci"][1])
        diffs.append(d["diff"])
        ses.append(d["se"])
    assert np.mean(cover) >= 0.88, np.mean(cover)
    assert np.mean(ses) == pytest.approx(np.std(diffs), rel=0.2)  # the bootstrap SE is the real spread


@pytest.fixture(scope="module")
def trained(tmp_path_factory, history_file):
    """Two tiny versions: v1 trained on the first 1,000 examples, v2 on the first 3,000."""
    from training.trainer import train_files
    from watchnext.repository import ModelRepository

    d = tmp_path_factory.mktemp("compare")
    cfg = d / "watchnext.toml"
    cfg.write_text(small_config_text())
    config = load_config(cfg)
    repo = ModelRepository(d / "models", config.model.name)
    r1 = train_files(config, [history_file], d / "ck.pt", repo, fresh=True, max_examples=1_000)
    r2 = train_files(config, [history_file], d / "ck2.pt", repo, fresh=True, max_examples=3_000)
    assert (r1.version, r2.version) == (1, 2)
    return cfg, d / "models"


def _compare(capsys, cfg, models, *args) -> dict:
    capsys.readouterr()
    assert main(["compare", *args, "--config", str(cfg), "--models", str(models), "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_compare_command(trained, history_file, capsys):
    cfg, models = trained
    out = _compare(capsys, cfg, models, "1", "2", "--data", str(history_file), "--bootstrap", "200", "--seed", "3")
    assert out["a"]["version"] == 1 and out["b"]["version"] == 2 and out["direction"] == "b - a"
    assert out["examples"] == 6000 and out["requests"] == 600 and out["bootstrap"]["replicates"] == 200
    diffs = out["differences"]
    assert set(diffs) == {"click", "watch_time", "dismiss", "like", "rating", "ranking"}
    for name, d in diffs.items():
        assert d["replicates"] > 150, name
        lo, hi = d["ci"]
        assert lo <= d["diff"] <= hi, (name, d)
        assert d["diff"] == pytest.approx(d["b"] - d["a"], abs=2e-6)
    # the per-version figures are evaluate's
    assert diffs["click"]["a"] == pytest.approx(out["a"]["tasks"]["click"]["auc"], abs=1e-5)
    assert diffs["rating"]["metric"] == "rmse" and diffs["rating"]["b"] == pytest.approx(out["b"]["tasks"]["rating"]["rmse"], abs=1e-5)
    assert diffs["ranking"]["a"] == pytest.approx(out["a"]["ranking"]["ndcg@10"], abs=1e-5)
    assert diffs["click"]["ci"][1] - diffs["click"]["ci"][0] < 0.1  # 600 requests pin an AUC difference down
    # the same seed gives the same intervals
    again = _compare(capsys, cfg, models, "1", "2", "--data", str(history_file), "--bootstrap", "200", "--seed", "3")
    assert again["differences"] == diffs


def test_compare_a_version_with_itself_is_zero(trained, history_file, capsys):
    cfg, models = trained
    out = _compare(capsys, cfg, models, "2", "latest", "--data", str(history_file), "--bootstrap", "50")
    assert out["b"]["version"] == 2
    for d in out["differences"].values():
        assert d["diff"] == 0 and d["ci"] == [0, 0] and d["se"] == 0


def test_compare_refuses_bad_input(trained, history_file, tmp_path, capsys):
    cfg, models = trained
    base = ["--config", str(cfg), "--models", str(models)]
    assert main(["compare", "1", "9", "--data", str(history_file), *base]) == 2
    assert main(["compare", "1", "x", "--data", str(history_file), *base]) == 2
    assert main(["compare", "1", "2", "--data", str(tmp_path / "missing.jsonl"), *base]) == 2
    assert main(["compare", "1", "2", "--data", str(history_file), "--bootstrap", "3", *base]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such file" in err and "--bootstrap: expected at least 10" in err and "'x'" in err
