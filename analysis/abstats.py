"""The A/B report: per-arm metrics with user-level confidence intervals (numpy, and scipy.stats for the distributions).

The user is the unit of randomisation, so the user is the unit of analysis: a
user's impressions are correlated (one heavy user can move a click-through rate
on their own), and a test that treats impressions as independent declares far
more "significant" differences than it should. Every metric here is a ratio of
per-user sums,

    R = sum_u x_u / sum_u y_u        (x: e.g. clicks, y: impressions of user u)

and its variance comes from the delta method over users (Deng et al., "Applying
the Delta Method in Metric Analytics", KDD 2018):

    Var(R) ~= Var_u(x_u - R y_u) / (n * ybar^2)

Arms are independent samples, so a difference's variance is the sum of the
arms'. Where a pre-period exists, CUPED (Deng et al., WSDM 2013) subtracts
theta * (the user's linearised pre-period value of the same metric), with theta
fitted on all arms pooled; the estimate is unbiased because the pre-period
cannot depend on the arm, and its variance shrinks by the squared correlation.

The sample-ratio-mismatch check is a chi-square test of users per arm against
the shares the buckets realise; a flag (p < 0.001) means the split itself is
broken (a logging or assignment bug) and no difference should be trusted.

The normal and chi-square distributions are scipy.stats's, imported where they are
first used: the service imports this module at start, and scipy.stats would add
about a second and tens of MB to every worker process that never makes a report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from watchnext.experiments import Experiment

CONFIDENCE = 0.95
SRM_ALPHA = 0.001


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # the outcome column (a task name)
    per: str  # "impression": sum(label) / impressions;  "known": mean of the label where it is known
    title: str


METRICS: tuple[Metric, ...] = (
    Metric("ctr", "click", "known", "click-through rate"),
    Metric("watch_time", "watch_time", "impression", "watch time per impression (s)"),
    Metric("like_rate", "like", "known", "likes per click"),
    Metric("dismiss_rate", "dismiss", "known", "dismiss rate"),
    Metric("rating", "rating", "known", "mean survey rating"),
)


@dataclass
class Events:
    """Logged impressions of one experiment, one row each. All arrays (N,).

    user: any ids (str or int); arm: arm index (ignored in a pre-period);
    ts: Unix seconds; labels: outcome name -> float64 with NaN where unknown
    (watch_time is NaN without a click and counts as 0 watch time).
    """

    user: np.ndarray
    arm: np.ndarray
    ts: np.ndarray
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user)
        n = len(self.user)
        self.arm = np.asarray(self.arm, dtype=np.int64) if self.arm is not None else np.zeros(n, np.int64)
        self.ts = np.asarray(self.ts, dtype=np.float64)
        self.labels = {k: np.asarray(v, dtype=np.float64) for k, v in self.labels.items()}
        for name, a in [("arm", self.arm), ("ts", self.ts), *((f"labels.{k}", v) for k, v in self.labels.items())]:
            if a.shape != (n,):
                raise ValueError(f"events.{name}: expected shape ({n},) like events.user, got {a.shape}")

    def __len__(self) -> int:
        return len(self.user)

    def select(self, keep: np.ndarray) -> Events:
        return Events(self.user[keep], self.arm[keep], self.ts[keep], {k: v[keep] for k, v in self.labels.items()})


# ---------------------------------------------------------------- per-user sums


@dataclass
class Units:
    """(arm, user) pairs and their per-metric sums. U units."""

    arm: np.ndarray  # (U,) arm index
    user: np.ndarray  # (U,) user id
    impressions: np.ndarray  # (U,)
    x: dict[str, np.ndarray]  # metric -> (U,) numerator sums
    y: dict[str, np.ndarray]  # metric -> (U,) denominator sums


def _event_columns(events: Events, metrics: Sequence[Metric]) -> tuple[dict, dict]:
    xs, ys = {}, {}
    for m in metrics:
        v = events.labels.get(m.label)
        if v is None:
            continue
        known = ~np.isnan(v)
        if len(v) and not known.any():  # a label nobody logged: no metric rather than an empty one
            continue
        xs[m.name] = np.where(known, v, 0.0)
        ys[m.name] = np.ones(len(v)) if m.per == "impression" else known.astype(np.float64)
    return xs, ys


def units(events: Events, n_arms: int, metrics: Sequence[Metric] = METRICS, keep: np.ndarray | None = None) -> Units:
    """Sum every metric's numerator and denominator per (arm, user); `keep` masks events."""
    users, uidx = np.unique(events.user, return_inverse=True)
    key = uidx.astype(np.int64) * n_arms + events.arm
    ukey, inv = np.unique(key, return_inverse=True)
    w = np.ones(len(events)) if keep is None else keep.astype(np.float64)
    imps = np.bincount(inv, weights=w, minlength=len(ukey))
    xs, ys = _event_columns(events, metrics)
    x = {k: np.bincount(inv, weights=v * w, minlength=len(ukey)) for k, v in xs.items()}
    y = {k: np.bincount(inv, weights=v * w, minlength=len(ukey)) for k, v in ys.items()}
    live = imps > 0
    return Units(ukey[live] % n_arms, users[ukey[live] // n_arms], imps[live],
                 {k: v[live] for k, v in x.items()}, {k: v[live] for k, v in y.items()})


def _pre_sums(u: Units, pre: Events, metrics: Sequence[Metric]) -> tuple[dict, dict]:
    """Each unit's pre-period sums of the same metric, matched by user (0 without history)."""
    p = units(Events(pre.user, np.zeros(len(pre), np.int64), pre.ts, pre.labels), 1, metrics)  # p.user is sorted
    pos = np.minimum(np.searchsorted(p.user, u.user), len(p.user) - 1)
    found = p.user[pos] == u.user
    a = {k: np.where(found, v[pos], 0.0) for k, v in p.x.items()}
    b = {k: np.where(found, v[pos], 0.0) for k, v in p.y.items()}
    return a, b


# ---------------------------------------------------------------- estimates


def ratio_by_arm(arm: np.ndarray, x: np.ndarray, y: np.ndarray, n_arms: int,
                 kx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-arm ratio sum(x)/sum(y) with its delta-method variance over units, (A,) each.

    With a covariate `kx` (U,) (a linearised pre-period value), also the CUPED
    estimate and variance with theta pooled over arms.
    """
    n = np.bincount(arm, minlength=n_arms).astype(np.float64)
    sx = np.bincount(arm, weights=x, minlength=n_arms)
    sy = np.bincount(arm, weights=y, minlength=n_arms)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sx / sy
        ybar = sy / n
        lin = (x - r[arm] * y) / ybar[arm]  # (U,) linearised: mean 0 within each arm
        var = np.bincount(arm, weights=lin**2, minlength=n_arms) / (n - 1) / n
    out = {"n": n, "estimate": r, "var": np.where((n > 1) & (sy > 0), var, np.nan)}
    if kx is None:
        return out
    with np.errstate(invalid="ignore", divide="ignore"):
        kbar = np.bincount(arm, weights=kx, minlength=n_arms) / n
        kc = kx - kbar[arm]
        ok = np.isfinite(lin)
        den = float(np.sum(kc[ok] ** 2))
        theta = float(np.sum(lin[ok] * kc[ok]) / den) if den > 0 else 0.0
        resid = lin - theta * kc
        var_cv = np.bincount(arm, weights=resid**2, minlength=n_arms) / (n - 1) / n
    out.update(theta=theta, estimate_cv=r - theta * kbar, var_cv=np.where(np.isfinite(out["var"]), var_cv, np.nan))
    return out


def _linear_covariate(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Linearised pre-period ratio per unit: (a_u - P b_u) / bbar, P pooled. None without pre data."""
    if b.sum() <= 0:
        return None
    p = a.sum() / b.sum()
    return (a - p * b) / b.mean()


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _ci(est: float, var: float, z: float) -> list[float | None]:
    if not (math.isfinite(est) and math.isfinite(var)):
        return [None, None]
    se = math.sqrt(var)
    return [est - z * se, est + z * se]


def _z(confidence: float) -> float:
    """The two-sided normal critical value: P(|Z| <= z) = confidence."""
    from scipy.stats import norm

    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def _diff(et: float, vt: float, ec: float, vc: float, z: float) -> dict[str, Any]:
    from scipy.stats import norm

    d, v = et - ec, vt + vc
    ok = math.isfinite(d) and math.isfinite(v)
    p = 2 * float(norm.sf(abs(d) / math.sqrt(v))) if ok and v > 0 else (None if not ok else (1.0 if d == 0 else 0.0))
    rel = et / ec - 1 if ok and ec != 0 else float("nan")
    rel_var = vt / ec**2 + et**2 * vc / ec**4 if ok and ec != 0 else float("nan")
    return {"diff": _num(d), "ci": _ci(d, v, z), "se": _num(math.sqrt(v)) if ok else None, "p_value": _num(p),
            "relative": _num(rel), "relative_ci": _ci(rel, rel_var, z)}


def srm(users_per_arm: Sequence[float], shares: Sequence[float]) -> dict[str, Any]:
    """Chi-square test of users per arm against the expected shares."""
    from scipy.stats import chi2 as chi_square

    obs = np.asarray(users_per_arm, np.float64)
    exp = np.asarray(shares, np.float64) * obs.sum()
    if obs.sum() == 0:
        return {"chi2": None, "df": len(obs) - 1, "p_value": None, "flagged": False, "observed": obs.astype(int).tolist(),
                "expected_shares": list(map(float, shares)), "threshold": SRM_ALPHA}
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    p = float(chi_square.sf(chi2, len(obs) - 1))
    return {"chi2": chi2, "df": len(obs) - 1, "p_value": p, "flagged": p < SRM_ALPHA,
            "observed": obs.astype(int).tolist(), "expected_shares": [float(s) for s in shares], "threshold": SRM_ALPHA}


def report(experiment: Experiment, events: Events, pre: Events | None = None, confidence: float = CONFIDENCE,
           metrics: Sequence[Metric] = METRICS) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (see README "Experiments" for the fields).

    Differences are arm minus control. With `pre`, a metric's differences use CUPED
    (`raw` keeps the unadjusted ones); per-arm estimates are always the raw ratios.
    """
    A = len(experiment.arms)
    if len(events) and (events.arm.min() < 0 or events.arm.max() >= A):
        raise ValueError(f"events.arm: expected arm indices in [0, {A}), got {events.arm.min()}..{events.arm.max()}")
    z = _z(confidence)
    u = units(events, A, metrics)
    n_users = np.bincount(u.arm, minlength=A)
    pre_a, pre_b = _pre_sums(u, pre, metrics) if pre is not None and len(pre) else ({}, {})
    arms = [{"name": a.name, "version": a.version, "share": a.share, "weights": None if a.weights is None else dict(a.weights),
             "users": int(n_users[i]), "impressions": int(np.bincount(u.arm, weights=u.impressions, minlength=A)[i]),
             "metrics": {}} for i, a in enumerate(experiment.arms)]
    diffs = [{"name": a.name, "metrics": {}} for a in experiment.arms[1:]]
    for m in metrics:
        if m.name not in u.x:
            continue
        k = _linear_covariate(pre_a[m.name], pre_b[m.name]) if m.name in pre_a else None
        st = ratio_by_arm(u.arm, u.x[m.name], u.y[m.name], A, k)
        for i in range(A):
            arms[i]["metrics"][m.name] = {"estimate": _num(st["estimate"][i]), "ci": _ci(st["estimate"][i], st["var"][i], z),
                                          "se": _num(math.sqrt(st["var"][i])) if math.isfinite(st["var"][i]) else None,
                                          "denominator": float(np.bincount(u.arm, weights=u.y[m.name], minlength=A)[i])}
        for i in range(1, A):
            raw = _diff(st["estimate"][i], st["var"][i], st["estimate"][0], st["var"][0], z)
            if k is None:
                entry = {**raw, "method": "delta"}
            else:
                entry = {**_diff(st["estimate_cv"][i], st["var_cv"][i], st["estimate_cv"][0], st["var_cv"][0], z),
                         "method": "cuped", "theta": st["theta"], "raw": raw}
                if raw["se"] and entry["se"] is not None:
                    entry["variance_reduction"] = 1 - (entry["se"] / raw["se"]) ** 2
            entry["significant"] = entry["p_value"] is not None and entry["p_value"] < 1 - confidence
            diffs[i - 1]["metrics"][m.name] = entry
    several = int(len(u.user) - len(np.unique(u.user)))
    return {
        "experiment": experiment.name,
        "unit": "user",
        "confidence": confidence,
        "users": int(len(np.unique(u.user))),
        "impressions": int(len(events)),
        "first_ts": _num(float(events.ts.min())) if len(events) else None,
        "last_ts": _num(float(events.ts.max())) if len(events) else None,
        "users_in_several_arms": several,
        "cuped": bool(pre_a),
        "metrics": {m.name: m.title for m in metrics if m.name in u.x},
        "arms": arms,
        "differences": diffs,
        "srm": srm(n_users, experiment.bucket_shares),
    }


def timeseries(experiment: Experiment, events: Events, points: int = 24, confidence: float = CONFIDENCE,
               metrics: Sequence[Metric] = METRICS) -> dict[str, Any]:
    """Cumulative estimate and interval of each metric per arm at `points` times (for the chart).

    One pass of per-user sums per point, over all events up to that time.
    """
    A = len(experiment.arms)
    z = _z(confidence)
    if not len(events):
        return {"ts": [], "metrics": {}, "arms": experiment.arm_names()}
    t = np.linspace(events.ts.min(), events.ts.max(), points + 1)[1:]
    out: dict[str, Any] = {"ts": t.tolist(), "start": float(events.ts.min()), "confidence": confidence,
                           "arms": experiment.arm_names(), "titles": {}, "metrics": {}}
    series = {m.name: {"estimate": np.full((A, points), np.nan), "lo": np.full((A, points), np.nan),
                       "hi": np.full((A, points), np.nan)}
              for m in metrics if m.label in events.labels and not np.isnan(events.labels[m.label]).all()}
    for j, cut in enumerate(t):
        u = units(events, A, metrics, keep=events.ts <= cut)
        for name, s in series.items():
            st = ratio_by_arm(u.arm, u.x[name], u.y[name], A)
            se = np.sqrt(st["var"])
            s["estimate"][:, j], s["lo"][:, j], s["hi"][:, j] = st["estimate"], st["estimate"] - z * se, st["estimate"] + z * se
    for m in metrics:
        if m.name in series:
            out["titles"][m.name] = m.title
            out["metrics"][m.name] = {k: [[_num(x) for x in row] for row in v.tolist()] for k, v in series[m.name].items()}
    return out
