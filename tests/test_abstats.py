"""The A/B report: exact small cases, then thousands of simulated A/A and A/B experiments.

The simulated experiments come from the synthetic world (tests/absim.py): users
with heavy-tailed activity and lasting tastes, several impressions each, so a
test that ignored user-level clustering would fail the A/A checks below.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import chi2 as chi_square
from scipy.stats import norm

from analysis.abreport import events_from_records, read_events, render_table
from analysis.abstats import Events, ratio_by_arm, report, srm, timeseries
from analysis.chart import write_chart
from cli.main import main
from tests.absim import Effect, Population
from watchnext.experiments import Experiment

N_AA = 1000  # A/A experiments: the false-positive share's standard error is 0.007
N_AB = 400  # A/B experiments for coverage: its standard error is 0.011


@pytest.fixture(scope="module")
def population() -> Population:
    return Population(users=20_000, seed=0)


@pytest.fixture(scope="module")
def aa(population):
    """Every A/A experiment's report (raw delta-method and CUPED differences)."""
    batch = population.experiments(N_AA, 400, seed=1, salt="aa")
    reports = [report(batch.experiments[e], *batch.events(e)) for e in range(N_AA)]
    return batch, reports


def _exp(shares=(0.5, 0.5)) -> Experiment:
    return Experiment.from_dict({"name": "t", "arms": [{"name": f"a{i}", "share": s} for i, s in enumerate(shares)]})


# ---------------------------------------------------------------- distributions (scipy.stats), through the report's figures


@pytest.mark.parametrize("x, df, p", [(3.841459, 1, 0.05), (5.991465, 2, 0.05), (7.814728, 3, 0.05),
                                      (10.827566, 1, 0.001), (13.815511, 2, 0.001), (16.266236, 3, 0.001),
                                      (124.342113, 100, 0.05), (0.454936, 1, 0.5), (1.0, 4, 0.909796)])
def test_srm_p_value_matches_tables(x, df, p):
    """Users per arm whose chi-square statistic is x (df + 1 equal arms, two of them off by c each way)."""
    k, n = df + 1, 1_000_000
    c = math.sqrt(x * n / (2 * k))
    users = [n / k + c, n / k - c] + [n / k] * (k - 2)
    out = srm(users, [1 / k] * k)
    assert out["df"] == df and out["chi2"] == pytest.approx(x, rel=1e-9)
    assert out["p_value"] == pytest.approx(p, rel=1e-5)


def _two_arm_events(seed=0, users=400):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), 3)
    return Events(user, user % 2, np.arange(len(user), dtype=float),
                  {"click": (rng.random(len(user)) < 0.3 + 0.05 * (user % 2)).astype(float)})


@pytest.mark.parametrize("confidence, z", [(0.95, 1.959963985), (0.99, 2.575829304), (0.5, 0.674489750)])
def test_intervals_use_the_normal_quantile(confidence, z):
    r = report(_exp(), _two_arm_events(), confidence=confidence)
    for arm in r["arms"]:
        m = arm["metrics"]["ctr"]
        assert (m["ci"][1] - m["estimate"]) / m["se"] == pytest.approx(z, abs=1e-8)
    d = r["differences"][0]["metrics"]["ctr"]
    assert (d["ci"][1] - d["diff"]) / d["se"] == pytest.approx(z, abs=1e-8)
    # the two-sided p-value of the normal test: 2 P(Z > |d| / se) = erfc(|d| / (se sqrt 2))
    assert d["p_value"] == pytest.approx(math.erfc(abs(d["diff"]) / d["se"] / math.sqrt(2)), rel=1e-12)
    assert d["significant"] == (d["p_value"] < 1 - confidence)
    with pytest.raises(ValueError, match="confidence"):
        report(_exp(), _two_arm_events(), confidence=1.0)


# ---------------------------------------------------------------- exact small cases


def test_delta_method_equals_plain_variance_with_one_impression_per_user():
    rng = np.random.default_rng(0)
    x = rng.random(501) < 0.3
    st = ratio_by_arm(np.zeros(501, np.int64), x.astype(float), np.ones(501), 1)
    assert st["estimate"][0] == pytest.approx(x.mean())
    assert st["var"][0] == pytest.approx(x.var(ddof=1) / 501)


def test_delta_method_variance_matches_a_brute_force_simulation():
    """Var of sum(x)/sum(y) over 4,000 simulated samples of users against the formula's average."""
    rng = np.random.default_rng(1)
    n = 300
    y = 1 + rng.poisson(rng.gamma(0.5, 6.0, (4000, n)))  # impressions per user: mean 4, sd 4.6
    p = rng.beta(2, 8, (4000, n))  # each user's own click rate
    x = rng.binomial(y, p).astype(float)
    true_var = np.var(x.sum(1) / y.sum(1))
    est = [ratio_by_arm(np.zeros(n, np.int64), x[i], y[i].astype(float), 1)["var"][0] for i in range(4000)]
    assert np.mean(est) == pytest.approx(true_var, rel=0.06)
    # ignoring users (every impression a unit) understates it
    naive = np.mean(x.sum(1) / y.sum(1) * (1 - x.sum(1) / y.sum(1)) / y.sum(1))
    assert naive < 0.8 * true_var


def test_report_small_exact_case():
    # users 1, 2 in arm 0; users 3, 4 in arm 1
    ev = Events(user=np.array([1, 1, 1, 2, 3, 3, 4, 4]), arm=np.array([0, 0, 0, 0, 1, 1, 1, 1]), ts=np.arange(8.0),
                labels={"click": np.array([1, 0, 0, 1, 1, 1, 0, 0.0]),
                        "watch_time": np.array([10, np.nan, np.nan, 30, 5, 5, np.nan, np.nan]),
                        "like": np.array([1, np.nan, np.nan, 0, 1, 1, np.nan, np.nan])})
    r = report(_exp(), ev)
    a0, a1 = r["arms"]
    assert (a0["users"], a0["impressions"], a1["users"], a1["impressions"]) == (2, 4, 2, 4)
    assert a0["metrics"]["ctr"]["estimate"] == 0.5 and a1["metrics"]["ctr"]["estimate"] == 0.5
    assert a0["metrics"]["watch_time"]["estimate"] == 10.0 and a1["metrics"]["watch_time"]["estimate"] == 2.5
    assert a0["metrics"]["like_rate"]["estimate"] == 0.5 and a1["metrics"]["like_rate"]["estimate"] == 1.0
    # arm 0 ctr: x=(1,1), y=(3,1), R=.5, ybar=2, lin=(1-1.5, 1-.5)/2=(-.25,.25): var = .125/1/2
    assert a0["metrics"]["ctr"]["se"] == pytest.approx(math.sqrt(0.0625))
    d = r["differences"][0]["metrics"]["watch_time"]
    assert d["diff"] == -7.5 and d["method"] == "delta" and d["ci"][0] < -7.5 < d["ci"][1]
    assert "rating" not in r["metrics"] and "dismiss_rate" not in r["metrics"]
    assert r["srm"]["observed"] == [2, 2] and not r["srm"]["flagged"]
    json.dumps(r, allow_nan=False)  # JSON-ready: no NaN anywhere


# ---------------------------------------------------------------- A/A


def test_aa_false_positive_share_per_metric(aa):
    batch, reports = aa
    metrics = list(reports[0]["metrics"])
    assert metrics == ["ctr", "watch_time", "like_rate", "dismiss_rate", "rating"]
    for m in metrics:
        raw = np.mean([r["differences"][0]["metrics"][m]["raw"]["p_value"] < 0.05 for r in reports])
        cuped = np.mean([r["differences"][0]["metrics"][m]["significant"] for r in reports])
        assert 0.02 <= raw <= 0.08, (m, raw)
        assert 0.02 <= cuped <= 0.08, (m, cuped)


def test_aa_p_values_are_uniform(aa):
    _, reports = aa
    p = np.array([r["differences"][0]["metrics"]["ctr"]["raw"]["p_value"] for r in reports])
    deciles = np.bincount(np.minimum((p * 10).astype(int), 9), minlength=10).astype(float)
    chi2 = float(((deciles - N_AA / 10) ** 2 / (N_AA / 10)).sum())
    assert chi_square.sf(chi2, 9) > 0.001, deciles


def test_impression_level_analysis_would_fail_the_aa_test(aa):
    """The same A/A data analysed per impression (ignoring users) declares far too many wins."""
    batch, _ = aa
    z = norm.ppf(0.975)  # 1.96: a 5% two-sided test
    wrong = []
    for e in range(N_AA):
        ev, _ = batch.events(e)
        st = ratio_by_arm(ev.arm, ev.labels["click"], np.ones(len(ev)), 2)
        wrong.append(abs(st["estimate"][1] - st["estimate"][0]) / math.sqrt(st["var"].sum()) > z)
    assert np.mean(wrong) > 0.10


def test_cuped_reduces_variance(aa):
    _, reports = aa
    red = {m: np.mean([r["differences"][0]["metrics"][m]["variance_reduction"] for r in reports])
           for m in ("ctr", "like_rate")}
    assert red["ctr"] > 0.15 and red["like_rate"] > 0.0, red


def test_srm_not_flagged_more_than_expected(aa):
    _, reports = aa
    p = np.array([r["srm"]["p_value"] for r in reports])
    assert sum(r["srm"]["flagged"] for r in reports) <= 5  # expected 1 of 1000 at p < 0.001
    assert 0.02 <= np.mean(p < 0.05) <= 0.08


def test_skewed_split_is_flagged(population):
    batch = population.experiments(1, 20_000, seed=2, salt="skew")
    ev, _ = batch.events(0)
    exp = batch.experiments[0]
    assert not report(exp, ev)["srm"]["flagged"]
    # a logging bug drops 5% of arm 1's users
    lost = np.isin(ev.user, np.unique(ev.user[ev.arm == 1])[::20])
    assert report(exp, ev.select(~lost))["srm"]["flagged"]
    # the split was really 45/55 though 50/50 was configured
    declared = Experiment.from_dict({**exp.to_dict(), "arms": [{"name": "arm0", "share": 0.45},
                                                                {"name": "arm1", "share": 0.55}]})
    ev2 = Events(ev.user, declared.assign(ev.user), ev.ts, ev.labels)
    assert report(exp, ev2)["srm"]["flagged"] and not report(declared, ev2)["srm"]["flagged"]


# ---------------------------------------------------------------- A/B with a known effect


def test_ab_intervals_cover_the_true_difference(population):
    effect = Effect(click_mult=1.2, like_add=0.03)
    truth = population.truth(effect)
    assert truth["ctr"] > 0.005 and truth["like_rate"] > 0.02 and truth["dismiss_rate"] == 0.0
    batch = population.experiments(N_AB, 1000, seed=3, effect=effect, salt="ab")
    cover = {m: [] for m in truth}
    cover_cuped = {m: [] for m in truth}
    found, found_cuped = [], []
    for e in range(N_AB):
        r = report(batch.experiments[e], *batch.events(e))
        for m, t in truth.items():
            d = r["differences"][0]["metrics"][m]
            cover[m].append(d["raw"]["ci"][0] <= t <= d["raw"]["ci"][1])
            cover_cuped[m].append(d["ci"][0] <= t <= d["ci"][1])
        ctr = r["differences"][0]["metrics"]["ctr"]
        found.append(ctr["raw"]["p_value"] < 0.05 and ctr["raw"]["diff"] > 0)
        found_cuped.append(ctr["significant"] and ctr["diff"] > 0)
    for m in truth:
        assert 0.90 <= np.mean(cover[m]) <= 0.99, (m, np.mean(cover[m]))
        assert 0.90 <= np.mean(cover_cuped[m]) <= 0.99, (m, np.mean(cover_cuped[m]))
    # the effect is found, more often with CUPED (measured: 0.46 raw, 0.59 CUPED)
    assert 0.3 < np.mean(found) < np.mean(found_cuped) - 0.05


# ---------------------------------------------------------------- outputs


def _write_log(path, exp: Experiment, ev: Events, extra: bool = True):
    """The event log the service writes: labelled impressions with experiment and arm."""
    names = exp.arm_names()
    with open(path, "w") as fh:
        for i in range(len(ev)):
            labels = {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in ev.labels.items()}
            fh.write(json.dumps({"ts": ev.ts[i], "experiment": exp.name, "arm": names[ev.arm[i]], "model_version": 1,
                                 "user": {"user_id": f"u{ev.user[i]}"}, "labels": labels}) + "\n")
        if extra:
            fh.write(json.dumps({"ts": 1.0, "experiment": "other", "arm": "arm0", "user_id": "u1", "labels": {}}) + "\n")
            fh.write(json.dumps({"ts": 1.0, "experiment": exp.name, "arm": "arm9", "user_id": "u1", "labels": {}}) + "\n")
    return path


def test_event_log_table_json_and_chart(population, tmp_path):
    batch = population.experiments(1, 3000, seed=4, effect=Effect(click_mult=1.3), salt="io")
    exp = batch.experiments[0]
    ev, pre = batch.events(0)
    log = _write_log(tmp_path / "events.jsonl", exp, ev)
    read, dropped = read_events([log], exp)
    assert dropped == {"other_experiment": 1, "unknown_arm": 1, "no_user": 0, "no_ts": 0}
    assert len(read) == len(ev) and np.array_equal(read.arm, ev.arm)
    direct, from_file = report(exp, ev), report(exp, read)
    for a, b in zip(direct["arms"], from_file["arms"]):
        assert a["users"] == b["users"]
        for m in direct["metrics"]:
            assert a["metrics"][m]["estimate"] == pytest.approx(b["metrics"][m]["estimate"], rel=1e-12)
    text = render_table(from_file)
    assert "click-through rate" in text and "arm1 - arm0" in text and "sample ratio" in text and ": ok" in text
    assert "*" in text.splitlines()[4]  # a 30% click lift on 3,000 users is significant
    series = timeseries(exp, read, points=12)
    assert len(series["ts"]) == 12
    for i in range(2):  # the last cumulative point is the whole experiment
        assert series["metrics"]["ctr"]["estimate"][i][-1] == pytest.approx(from_file["arms"][i]["metrics"]["ctr"]["estimate"])
    png = write_chart(series, tmp_path / "chart.png", exp.name)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_events_from_service_records():
    exp = _exp()
    records = [
        {"ts": 2.0, "experiment": "t", "arm": "a1", "user_id": "u1", "labels": {"click": 1, "watch_time": 30.0, "extra": 1}},
        {"ts": 1.0, "experiment": "t", "arm": "a0", "user": {"user_id": "u2", "user_country": "NL"},
         "candidate": {"video_id": "v1"}, "labels": {"click": 0}},
        {"ts": 3.0, "experiment": "t", "arm": "a0", "labels": {"click": 0}},
        {"ts": 3.0, "experiment": "t", "arm": "a7", "user_id": "u3", "labels": {"click": 0}},
    ]
    ev, dropped = events_from_records(records, exp)
    assert ev.user.tolist() == ["u1", "u2"] and ev.arm.tolist() == [1, 0] and ev.ts.tolist() == [2.0, 1.0]
    assert dropped == {"other_experiment": 0, "unknown_arm": 1, "no_user": 1, "no_ts": 0}
    r = report(exp, ev)
    assert list(r["metrics"]) == ["ctr", "watch_time"]  # labels nobody logged give no metric
    with pytest.raises(ValueError, match="events: "):
        events_from_records([{"ts": "noon"}], exp)


def test_ab_report_command(population, tmp_path, capsys):
    batch = population.experiments(1, 2000, seed=5, effect=Effect(click_mult=1.3), salt="cli")
    exp = batch.experiments[0]
    ev, pre = batch.events(0)
    log = _write_log(tmp_path / "events.jsonl", exp, ev)
    pre_log = _write_log(tmp_path / "pre.jsonl", Experiment.from_dict({**exp.to_dict(), "name": "before"}), pre, extra=False)
    (tmp_path / "exp.json").write_text(exp.to_json())
    chart = tmp_path / "out" / "chart.png"
    args = ["ab", "report", exp.name, "--events", str(log)]
    assert main([*args, "--experiment", str(tmp_path / "exp.json"), "--pre", str(pre_log), "--json", "--chart", str(chart)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cuped"] and out["users"] == 2000 and out["skipped_events"]["unknown_arm"] == 1
    assert out["differences"][0]["metrics"]["ctr"]["method"] == "cuped" and chart.stat().st_size > 10_000
    expected = report(exp, ev, pre)
    assert out["differences"][0]["metrics"]["ctr"]["diff"] == pytest.approx(expected["differences"][0]["metrics"]["ctr"]["diff"])
    assert main([*args, "--arms", "arm0=0.5,arm1=0.5"]) == 0
    captured = capsys.readouterr()
    assert "click-through rate" in captured.out and "unknown_arm 1" in captured.err
    assert main([*args, "--arms", "arm0=0.2,arm1=0.8"]) == 0  # the wrong shares: a mismatch
    assert "sample ratio mismatch" in capsys.readouterr().err
    for bad, msg in [([], "--experiment FILE"), (["--arms", "arm0=0.5,arm1"], "--arms: item 2"),
                     (["--arms", "arm0=0.5,arm1=0.6"], "--arms: arms: shares must sum to 1")]:
        assert main([*args, *bad]) == 2
        assert msg in capsys.readouterr().err
    assert main(["ab", "report", "nothing", "--events", str(log), "--arms", "a=0.5,b=0.5"]) == 2
    assert "no events of experiment 'nothing'" in capsys.readouterr().err


def test_the_chart_reads_in_the_experiments_own_time_unit_and_draws_no_empty_panel():
    from analysis.chart import panels, time_unit

    assert [time_unit(s)[1] for s in (60, 3600, 86400, 30 * 86400)] == ["seconds", "minutes", "hours", "days"]
    series = {"metrics": {"ctr": {"estimate": [[None, 0.1], [None, 0.2]]},
                          "rating": {"estimate": [[None, None], [None, None]]}}}
    assert panels(series) == ["ctr"]
