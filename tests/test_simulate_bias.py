"""The simulated world's position bias: a logging policy of known strength, a known examination
curve, an unbiased test set and randomised (explored) logging; and the `simulate history` flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from simulation.world import DAY, DEVICES, SLATE, World, WorldSpec, history, unbiased_history
from tests.helpers import SMALL_WORLD


def spec(**kw) -> WorldSpec:
    return WorldSpec(**{**vars(SMALL_WORLD), **kw})


def columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {
        "position": np.array([r["position"] for r in rows]),
        "click_nopos": np.array([r["truth"]["click_nopos"] for r in rows]),
        "click_p": np.array([r["truth"]["click"] for r in rows]),
        "exam": np.array([r["truth"]["exam"] for r in rows]),
        "click": np.array([r["labels"]["click"] for r in rows]),
        "device": np.array([r["context"]["device"] for r in rows]),
        "video": np.array([int(r["candidate"]["video_id"][1:]) for r in rows]),
        "request": np.array([r["request_id"] for r in rows]),
    }


def slate_order_corr(strength: float, n_req: int = 3_000, seed: int = 0) -> float:
    """Correlation of the slot with the policy's relevance, over many requests of one world."""
    w = World(spec(policy_strength=strength), seed)
    ts = np.full(n_req, w.spec.start_ts + DAY)
    req = w.requests(ts)
    rel = w.relevance(np.repeat(req["query"], SLATE), req["slate"].reshape(-1))
    return float(np.corrcoef(np.tile(np.arange(SLATE), n_req), rel)[0, 1])


def test_policy_strength_zero_is_a_random_order_and_strong_is_confounded():
    r0, r1, r4 = slate_order_corr(0.0), slate_order_corr(1.0), slate_order_corr(4.0)
    # 30,000 impressions: the sd of a null correlation is ~0.006
    assert abs(r0) < 0.02
    assert r1 < -0.15  # the default policy: relevant videos high (measured -0.21 and -0.19 on seeds 0, 1)
    assert r4 < -0.45 and r4 < r1 - 0.25  # stronger policy, stronger confounding (measured -0.56, -0.58)


def test_default_policy_strength_keeps_the_historical_order():
    # strength 1 ranks by relevance + Gumbel(1) noise: the same slates as a world without the knob's scaling
    a = World(spec(), 3).requests(np.full(500, SMALL_WORLD.start_ts + DAY))
    w = World(spec(policy_strength=1.0), 3)
    b = w.requests(np.full(500, SMALL_WORLD.start_ts + DAY))
    np.testing.assert_array_equal(a["slate"], b["slate"])
    assert WorldSpec().policy_strength == 1.0 and WorldSpec().explore_share == 0.0


def test_click_is_examination_times_attraction_with_the_declared_curve():
    w = World(spec(), 1)
    n = 400_000
    r = np.random.default_rng(5)
    users, videos = r.integers(0, w.spec.users, n), r.integers(0, w.spec.videos, n)
    pos, dev = r.integers(0, SLATE, n), r.integers(0, len(DEVICES), n)
    ts = np.full(n, w.spec.start_ts + DAY)
    labels, p = w.outcomes(users, videos, ts, pos, dev)
    eta = w.spec.position_bias * np.asarray(w.spec.exam_device)[dev]
    np.testing.assert_allclose(p["exam"], (1.0 / (1.0 + pos)) ** eta, rtol=1e-12)
    np.testing.assert_allclose(p["click"], p["exam"] * p["click_nopos"], rtol=1e-12)
    assert w.exam(np.array([-1, -1]), np.array([0, 2])).tolist() == [1.0, 1.0]  # unknown slot: examined
    # IPW with the true propensities is unbiased: mean(click / exam) = mean(click_nopos)
    ipw = labels["click"] / p["exam"]
    se = ipw.std() / np.sqrt(n)
    assert abs(ipw.mean() - p["click_nopos"].mean()) < 4 * se
    # the empirical click-rate ratio by slot, attraction divided out, follows the declared curve per device
    for d in range(len(DEVICES)):
        at = dev == d
        top = labels["click"][at & (pos == 0)].sum() / p["click_nopos"][at & (pos == 0)].sum()
        for k in (3, 9):
            m = at & (pos == k)
            ratio = labels["click"][m].sum() / p["click_nopos"][m].sum() / top
            want = (1.0 / (1.0 + k)) ** (w.spec.position_bias * w.spec.exam_device[d])
            assert ratio == pytest.approx(want, rel=0.12), (DEVICES[d], k)
    # and the devices differ as declared: tv falls fastest, desktop slowest
    assert w.exam(np.array([9, 9, 9]), np.array([2, 0, 1])).tolist() == sorted(w.exam(np.array([9, 9, 9]), np.array([2, 0, 1])).tolist())


def test_unbiased_history_positions_are_uniform_and_independent_of_attraction():
    c = columns(list(unbiased_history(World(spec(policy_strength=4.0), 2), 30_000, seed=2)))
    counts = np.bincount(c["position"], minlength=SLATE)
    assert counts.tolist() == [3_000] * SLATE  # each slate shown whole, each slot once
    assert abs(np.corrcoef(c["position"], c["click_nopos"])[0, 1]) < 0.02
    by_slot = np.array([c["click_nopos"][c["position"] == k].mean() for k in range(SLATE)])
    assert by_slot.max() - by_slot.min() < 0.02
    # labels sampled with the examination of the random slot
    np.testing.assert_allclose(c["click_p"], c["exam"] * c["click_nopos"], atol=2e-5)
    assert c["click"][c["position"] == 0].mean() > 1.5 * c["click"][c["position"] == 9].mean()
    # the logged history of the same world is confounded: the top slot holds the most attractive videos
    logged = columns(list(history(World(spec(policy_strength=4.0), 2), 30_000, seed=2)))
    assert np.corrcoef(logged["position"], logged["click_nopos"])[0, 1] < -0.15


def test_unbiased_history_shows_the_policys_slates_in_random_order():
    logged = columns(list(history(World(spec(policy_strength=2.0), 4), 5_000, seed=4)))
    shuffled = columns(list(unbiased_history(World(spec(policy_strength=2.0), 4), 5_000, seed=4)))
    # the first chunk of requests is drawn alike: same videos per request, other slots
    for c in (logged, shuffled):
        c["sets"] = np.sort(c["video"].reshape(-1, SLATE), axis=1)
    np.testing.assert_array_equal(logged["sets"][:50], shuffled["sets"][:50])
    assert (logged["video"][:500] != shuffled["video"][:500]).mean() > 0.5


def test_explore_share_logs_random_adjacent_swaps_with_propensities():
    rows = list(history(World(spec(explore_share=0.3), 6), 40_000, seed=6))
    explored = np.array(["explore" in r for r in rows]).reshape(-1, SLATE)
    assert (explored.all(axis=1) | ~explored.any(axis=1)).all()  # a whole request, or none of it
    share = explored[:, 0].mean()
    assert share == pytest.approx(0.3, abs=0.03)
    ex = [r for r in rows if "explore" in r]
    pos = np.array([r["position"] for r in ex])
    rank = np.array([r["explore"]["rank"] for r in ex])
    prop = np.array([r["propensity"] for r in ex])
    assert set(np.abs(pos - rank).tolist()) == {0, 1}  # moved by one slot at most
    assert set(prop.tolist()) == {0.5, 1.0}
    assert (prop[pos != rank] == 0.5).all()
    # every adjacent pair of slots gets swapped, about half the time it is paired
    for k in range(SLATE - 1):
        moved_down = ((rank == k) & (pos == k + 1)).sum()
        assert moved_down > 0.15 * (rank == k).sum(), k
    # the same seed without exploration: no line carries it, and the world draws the same requests
    plain = list(history(World(spec(), 6), 40_000, seed=6))
    assert not any("explore" in r or "propensity" in r for r in plain)
    sets = [sorted(r["candidate"]["video_id"] for r in rs) for rs in (plain[:SLATE], rows[:SLATE])]
    assert sets[0] == sets[1]


@pytest.mark.parametrize("field,value", [("policy_strength", -1.0), ("policy_strength", float("nan")),
                                         ("explore_share", 1.5), ("position_bias", float("inf")),
                                         ("exam_device", (1.0, 1.0)), ("policy_popularity", -0.1)])
def test_world_knobs_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        World(spec(**{field: value}), 0)


def run_cli(tmp_path, *flags) -> tuple[int, list[dict]]:
    out = tmp_path / "h.jsonl"
    rc = main(["simulate", "history", "--out", str(out), "--examples", "200", "--users", "100", "--videos", "200",
               *flags])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if rc == 0 else []
    return rc, rows


def test_cli_flags(tmp_path, capsys):
    rc, rows = run_cli(tmp_path, "--unbiased", "--policy-strength", "3")
    assert rc == 0 and len(rows) == 200
    assert all("exam" in r["truth"] and "explore" not in r for r in rows)
    rc, rows = run_cli(tmp_path, "--explore-share", "1")
    assert rc == 0 and all(r["propensity"] in (0.5, 1.0) and "rank" in r["explore"] for r in rows)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["explore_share"] == 1.0 and report["unbiased"] is False


@pytest.mark.parametrize("flags,named", [
    (["--policy-strength", "-0.5"], "--policy-strength"),
    (["--policy-strength", "nan"], "--policy-strength"),
    (["--explore-share", "1.5"], "--explore-share"),
    (["--explore-share", "-0.1"], "--explore-share"),
    (["--unbiased", "--explore-share", "0.2"], "--explore-share"),
    (["--users", "0"], "--users"),
])
def test_cli_refuses_bad_flags_naming_them(tmp_path, capsys, flags, named):
    rc, _ = run_cli(tmp_path, *flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"watchnext: {named}:") and "\n" not in err
    assert not (tmp_path / "h.jsonl").exists()
