"""Experiment definitions and user assignment: deterministic, sticky, independent, on share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2 as chi_square

from tests.helpers import small_config_text
from watchnext.config import load_config
from watchnext.experiments import (
    BUCKETS,
    MAX_WEIGHT,
    Experiment,
    ExperimentError,
    assign,
    bucket_of,
    buckets,
    parse_json,
)
from watchnext.scoring import combine

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
    assert chi_square.sf(chi2, len(shares) - 1) > 0.001, (observed, expected)
    assert np.all(np.abs(observed / n - shares) < 0.005)


def test_independent_between_salts():
    """Arms under two salts are independent: the 2x2 (and 10x10 bucket-decile) tables pass chi-square."""
    users = np.arange(100_000)
    a, b = assign("exp-a", users, (0.5, 0.5)), assign("exp-b", users, (0.5, 0.5))
    table = np.bincount(a * 2 + b, minlength=4).reshape(2, 2).astype(float)
    exp = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert chi_square.sf(float(((table - exp) ** 2 / exp).sum()), 1) > 0.001
    da, db = buckets("exp-a", users) * 10 // BUCKETS, buckets("exp-b", users) * 10 // BUCKETS
    t10 = np.bincount(da * 10 + db, minlength=100).reshape(10, 10).astype(float)
    e10 = t10.sum(1, keepdims=True) * t10.sum(0, keepdims=True) / t10.sum()
    assert chi_square.sf(float(((t10 - e10) ** 2 / e10).sum()), 81) > 0.001
    # salts that differ in one character (FNV-1a alone fails this: its low bits barely change)
    c, d = buckets("x1", users) % 16, buckets("x2", users) % 16
    t16 = np.bincount(c * 16 + d, minlength=256).reshape(16, 16).astype(float)
    e16 = t16.sum(1, keepdims=True) * t16.sum(0, keepdims=True) / t16.sum()
    assert chi_square.sf(float(((t16 - e16) ** 2 / e16).sum()), 225) > 0.001


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
    # names in full: re.match with `$` took a trailing newline
    ({"name": "sat\n"}, "name"),
    ({"arms": [{"name": "a\n", "share": 0.5}, {"name": "b", "share": 0.5}]}, "arms[0].name"),
    # valid Unicode: a lone surrogate can be neither hashed nor written as UTF-8
    ({"salt": "s\ud800"}, "salt"),
    ({"meta": {"note": "\udc00"}}, "meta.note"),
    ({"meta": {"tags": ["ok", "\ud83d"]}}, "meta.tags[1]"),
    ({"meta": {"\ud800": "key"}}, "meta"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"\ud800": 1.0}}]},
     "arms[1].weights.\ud800"),
    # weights finite and bounded; meta small, shallow and finite
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"like": 1e308}}]},
     "arms[1].weights.like"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"like": -1.000001e6}}]},
     "arms[1].weights.like"),
    ({"meta": {"x": float("inf")}}, "meta.x"),
    ({"meta": {"x": 2**53 + 1}}, "meta.x"),
    ({"meta": {"a": [[[{}]]]}}, "meta.a[0][0][0]"),
    ({"meta": {"note": "x" * 4100}}, "meta"),
    ({"meta": []}, "meta"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ExperimentError) as e:
        Experiment.from_dict({**TWO_ARMS, **change})
    assert e.value.field == field, str(e.value)
    assert str(e.value).startswith(f"{field}: ")


def test_bounds_are_inclusive_and_what_passes_round_trips():
    ok = Experiment.from_dict({**TWO_ARMS, "meta": {"note": "\u00e9" * 100, "a": [[{"b": 1}]], "n": 2**53},
                               "arms": [{"name": "a", "share": 0.5},
                                        {"name": "b", "share": 0.5, "weights": {"like": MAX_WEIGHT, "click": -MAX_WEIGHT}}]})
    assert Experiment.from_json(ok.to_json()) == ok
    with pytest.raises(ExperimentError) as e:
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    assert (e.value.field, e.value.reason) == ("<body>", "not valid JSON: nested too deeply")
    with pytest.raises(ExperimentError, match="<body>: not valid JSON"):
        parse_json(b'{"salt": "\xff"}')  # not UTF-8


def test_bounded_weights_keep_linear_scores_finite():
    """|w| <= MAX_WEIGHT on every task, heads anywhere in float32: the linear score stays finite (float64)."""
    f32 = float(np.finfo(np.float32).max)
    heads = np.array([[f32] * 5, [-f32] * 5, [f32, -f32, f32, -f32, f32]], np.float32)
    for w in (np.full(5, MAX_WEIGHT), np.full(5, -MAX_WEIGHT), np.array([1, -1, 1, -1, 1]) * MAX_WEIGHT):
        s = combine(heads, w)
        assert np.isfinite(s).all() and np.abs(s).max() == pytest.approx(5 * MAX_WEIGHT * f32)


def test_multiplicative_weights_cannot_overflow_the_score(tmp_path):
    """prod y**w: a binary head lies in [FLOOR, 1], a regression head up to float32's max; weights for which
    some heads make the score overflow are refused, and the bound is tight (just inside: finite; outside: inf)."""
    p = tmp_path / "mult.toml"
    p.write_text(small_config_text(score={"combine": "multiplicative", "weights": {"click": 1.0}}))
    config = load_config(p)
    names = [t.name for t in config.tasks]
    f32 = float(np.finfo(np.float32).max)

    def arm(weights):
        return {**TWO_ARMS, "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": weights}]}

    # watch_time (regression) up to f32: w * log(f32) = w * 88.72 must stay under log(float64 max) = 709.78
    # like (binary) at the floor 1e-6: -w * 13.82 likewise
    for weights, worst in [({"watch_time": 7.99}, [f32 if n == "watch_time" else 1.0 for n in names]),
                           ({"like": -51.0}, [0.0 if n == "like" else 1.0 for n in names])]:
        exp = Experiment.from_dict(arm(weights), config)
        w = np.array([exp.arms[1].weights.get(n, 0.0) for n in names])
        assert np.isfinite(combine(np.array([worst], np.float32), w, "multiplicative")).all()
        over = {k: v * 1.02 for k, v in weights.items()}
        with pytest.raises(ExperimentError) as e:
            Experiment.from_dict(arm(over), config)
        assert e.value.field == "arms[1].weights" and "can overflow the score" in e.value.reason
        w_over = np.array([over.get(n, 0.0) for n in names])
        with np.errstate(over="ignore"):
            assert np.isinf(combine(np.array([worst], np.float32), w_over, "multiplicative")).all()
    # the linear combination has no such bound (MAX_WEIGHT keeps it finite)
    (tmp_path / "lin.toml").write_text(small_config_text())
    assert Experiment.from_dict(arm({"watch_time": 100.0}), load_config(tmp_path / "lin.toml")).arms[1].weights == {
        "watch_time": 100.0}


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
