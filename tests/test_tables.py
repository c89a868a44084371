"""The tables `evaluate`, `compare` and `models list` print on a terminal: each metric with the way it is better,
and which version wins a comparison only where its interval excludes no difference."""

from __future__ import annotations

import pytest

from analysis.tables import compare_table, evaluation_table, models_table


def _compare(metric: str, a: float, b: float, lo: float, hi: float) -> dict:
    return {"model": "m", "a": {"version": 1}, "b": {"version": 2}, "examples": 100, "requests": 10,
            "bootstrap": {"confidence": 0.95, "replicates": 200},
            "differences": {"t": {"metric": metric, "a": a, "b": b, "diff": b - a, "ci": [lo, hi]}}}


@pytest.mark.parametrize("metric, lo, hi, wins", [
    ("auc", 0.01, 0.03, "B"),        # B's AUC higher, the interval above 0
    ("auc", -0.03, -0.01, "A"),
    ("auc", -0.01, 0.02, "neither"),  # the interval holds 0
    ("rmse", -0.3, -0.1, "B"),       # B's error lower
    ("rmse", 0.1, 0.3, "A"),
    ("ndcg@10", 0.002, 0.004, "B"),
])
def test_compare_names_the_winner_by_the_metrics_direction(metric, lo, hi, wins):
    row = compare_table(_compare(metric, 0.7, 0.7 + (lo + hi) / 2, lo, hi)).splitlines()[4]
    assert row.split()[-1] == wins
    assert ("higher" if metric != "rmse" else "lower") in row


def test_evaluation_and_models_tables_say_which_way_is_better():
    rep = {"model": "m", "version": 3, "examples": 1200, "bad_lines": 2,
           "tasks": {"click": {"n": 1200, "auc": 0.71234}, "watch_time": {"n": 300, "rmse": 1.5}},
           "ranking": {"ndcg@10": 0.8, "requests": 120}}
    text = evaluation_table(rep)
    assert text.splitlines()[0] == "model m version 3: 1,200 examples, 2 bad lines skipped"
    rows = {line.split()[0]: line for line in text.splitlines()[4:]}
    assert "0.7123" in rows["click"] and "higher (0.5: chance)" in rows["click"]
    assert rows["watch_time"].split()[1:3] == ["RMSE", "1.5000"] and rows["watch_time"].endswith("lower")
    assert rows["ranking"].split()[1] == "NDCG@10"
    summary = {"model": "m", "promoted": 2, "serving": 2, "versions": [
        {"version": 1, "created_at": "t1", "examples": 10, "parent": None, "metrics": {"click": 0.6}, "serving": False},
        {"version": 2, "created_at": "t2", "examples": 20, "parent": 1, "metrics": {"click": 0.7}, "serving": True},
        {"version": 3, "error": "metadata.json: not valid JSON", "serving": False}]}
    text = models_table(summary)
    assert text.splitlines()[0] == "model m: promoted 2, serving 2"
    assert text.splitlines()[5].split() == ["2", "t2", "20", "1", "0.7000", "serving"]
    assert "damaged: metadata.json" in text and "higher is better" in text
