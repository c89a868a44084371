"""Experiment definitions and user assignment: deterministic, sticky, independent, on share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from watchnext.abstats import chi2_sf
from watchnext.experiments import BUCKETS, Experiment, ExperimentError, assign, bucket_of, buckets

ROOT = Path(__file__).resolve().parent.parent

TWO_ARMS = {"name": "sat", "salt": "s1", "arms": [
    {"name": "control", "share": 0.5},
    {"name": "satisfaction", "share": 0.5, "version": 3, "weights": {"like": 4.0, "click": 1.0}}]}


def _ids(n: int) -> list[str]:
    return [f"u{i}" for i in range(n)]


# Fixed expected buckets: a change of hash or key format silently reshuffles every
# running experiment, so it must fail here first.
def test_buckets_are_pinned_values():
    assert buckets("s1", np.array(["u0", "u1", "u2", "alice"])).tolist() == [
        bucket_of("s1", "u0"), bucket_of("s1", "u1"), bucket_of("s1", "u2"), bucket_of("s1", "alice")]
    assert [bucket_of("s1", u) for u in ("u0", "u1", "u2", "alice")] == [184, 1324, 2762, 8538]


def test_vectorised_matches_scalar_and_ints_hash_as_strings():
    ids = np.arange(0, 50_000, 7)
    b = buckets("salt", ids)
    assert b.dtype == np.int64 and b.min() >= 0 and b.max() < BUCKETS
    assert b.tolist() == [bucket_of("salt", int(i)) for i in ids]
    assert np.array_equal(b, buckets("salt", np.array([str(i) for i in ids], dtype=object)))
    exp = Experiment.from_dict(TWO_ARMS)
    users = _ids(2000)
    assert exp.assign(np.array(users)).tolist() == [exp.arm_index(exp.arm_for(u).name) for u in users]


def test_assignment_identical_in_two_separate_processes():
    code = ("import json,sys,numpy as np; from watchnext.experiments import Experiment; "
            "e=Experiment.from_json(sys.stdin.read()); "
            "print(json.dumps(e.assign(np.array([f'u{i}' for i in range(20000)])).tolist()))")
    exp = Experiment.from_dict(TWO_ARMS)
    outs = []
    for seed in ("0", "12345"):  # different hash randomisation: Python's str hash must play no part
        r = subprocess.run([sys.executable, "-c", code], input=exp.to_json(), capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}, check=True, timeout=60)
        outs.append(json.loads(r.stdout))
    here = exp.assign(np.array(_ids(20000))).tolist()
    assert outs[0] == outs[1] == here
    assert 0.45 < np.mean(here) < 0.55


def test_stable_when_arms_are_added_at_the_end_or_reloaded():
    exp = Experiment.from_dict(TWO_ARMS)
    again = Experiment.from_json(exp.to_json())
    assert again == exp
    users = np.array(_ids(30000))
    a = exp.assign(users)
    assert np.array_equal(a, again.assign(users))
    # growing the last arm from a 50/50 into a 50/25/25 split moves nobody out of the control
    three = Experiment.from_dict({**TWO_ARMS, "arms": [
        {"name": "control", "share": 0.5}, {"name": "satisfaction", "share": 0.25}, {"name": "third", "share": 0.25}]})
    b = three.assign(users)
    assert np.array_equal(a == 0, b == 0)


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.1, 0.9), (0.2, 0.3, 0.5), (0.01, 0.99)])
def test_realised_shares_match_declared(shares):
    n = 200_000
    arms = assign("share-test", np.arange(n), shares)
    observed = np.bincount(arms, minlength=len(shares))
    expected = np.array(shares) * n
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2_sf(chi2, len(shares) - 1) > 0.001, (observed, expected)
    assert np.all(np.abs(observed / n - shares) < 0.005)


def test_independent_between_salts():
    """Arms under two salts are independent: the 2x2 (and 10x10 bucket-decile) tables pass chi-square."""
    users = np.arange(100_000)
    a, b = assign("exp-a", users, (0.5, 0.5)), assign("exp-b", users, (0.5, 0.5))
    table = np.bincount(a * 2 + b, minlength=4).reshape(2, 2).astype(float)
    exp = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert chi2_sf(float(((table - exp) ** 2 / exp).sum()), 1) > 0.001
    da, db = buckets("exp-a", users) * 10 // BUCKETS, buckets("exp-b", users) * 10 // BUCKETS
    t10 = np.bincount(da * 10 + db, minlength=100).reshape(10, 10).astype(float)
    e10 = t10.sum(1, keepdims=True) * t10.sum(0, keepdims=True) / t10.sum()
    assert chi2_sf(float(((t10 - e10) ** 2 / e10).sum()), 81) > 0.001
    # salts that differ in one character (FNV-1a alone fails this: its low bits barely change)
    c, d = buckets("x1", users) % 16, buckets("x2", users) % 16
    t16 = np.bincount(c * 16 + d, minlength=256).reshape(16, 16).astype(float)
    e16 = t16.sum(1, keepdims=True) * t16.sum(0, keepdims=True) / t16.sum()
    assert chi2_sf(float(((t16 - e16) ** 2 / e16).sum()), 225) > 0.001


def test_json_round_trip_and_defaults():
    exp = Experiment.from_dict({"name": "w", "arms": [{"name": "a", "share": 0.3}, {"name": "b", "share": 0.7}]})
    assert exp.salt == "w" and exp.control.name == "a" and exp.arms[1].version is None and exp.arms[1].weights is None
    d = json.loads(exp.to_json())
    assert d["arms"][0] == {"name": "a", "share": 0.3, "version": None, "weights": None}
    assert Experiment.from_json(exp.to_json()) == exp
    assert exp.bucket_shares.tolist() == [0.3, 0.7]


@pytest.mark.parametrize("change, field", [
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.6}]}, "arms"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}, "arms[1].name"),
    ({"arms": [{"name": "a", "share": 1.0}]}, "arms"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": "half"}]}, "arms[1].share"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": float("nan")}]}, "arms[1].share"),
    ({"arms": [{"name": "a", "share": 1.5}, {"name": "b", "share": -0.5}]}, "arms[0].share"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "version": 0}]}, "arms[1].version"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "version": True}]}, "arms[1].version"),
    ({"arms": [{"name": "a b", "share": 0.5}, {"name": "b", "share": 0.5}]}, "arms[0].name"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "colour": 1}]}, "arms[1].colour"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"like": "x"}}]}, "arms[1].weights.like"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": []}]}, "arms[1].weights"),
    ({"name": "bad/name"}, "name"),
    ({"salt": ""}, "salt"),
    ({"created_at": "yesterday"}, "created_at"),
    ({"owner": "me"}, "owner"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ExperimentError) as e:
        Experiment.from_dict({**TWO_ARMS, **change})
    assert e.value.field == field, str(e.value)
    assert str(e.value).startswith(f"{field}: ")


def test_weights_checked_against_the_config_tasks(small_config):
    bad = {**TWO_ARMS, "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"joy": 1.0}}]}
    with pytest.raises(ExperimentError) as e:
        Experiment.from_dict(bad, small_config)
    assert e.value.field == "arms[1].weights.joy" and "not a task" in e.value.reason
    ok = Experiment.from_dict(TWO_ARMS, small_config)
    assert ok.arms[1].weights == {"like": 4.0, "click": 1.0}


def test_url_name_must_match_and_versions_must_exist():
    with pytest.raises(ExperimentError, match="name: 'sat' does not match"):
        Experiment.from_dict(TWO_ARMS, name="other")
    exp = Experiment.from_dict({k: v for k, v in TWO_ARMS.items() if k != "name"}, name="from_url")
    assert exp.name == "from_url"
    exp.check_versions({1, 2, 3})
    with pytest.raises(ExperimentError) as e:
        exp.check_versions({1, 2})
    assert e.value.field == "arms[1].version"
    with pytest.raises(ExperimentError, match="<body>: not valid JSON"):
        Experiment.from_json("{")
