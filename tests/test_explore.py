"""Randomised logging (watchnext/explore.py), intervention harvesting and IPW (training/propensity.py), and the
trainer using them. Seeded; figures asserted."""

import json

import numpy as np
import pytest
import torch

from tests.helpers import small_config_text
from training.propensity import SwapCounts, estimate_examination, ipw_weights
from training.trainer import Trainer, click_task, read_checkpoint, train_files
from watchnext.config import load_config
from watchnext.explore import explore_draw, explore_order, explore_orders, original_ranks

# ------------------------------------------------------------------ explore_order


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("k", [7, 8])
def test_each_pair_swaps_half_the_time_and_nothing_else_moves(offset, k):
    rng = np.random.default_rng(7)
    scores = np.random.default_rng(1).normal(size=k)
    best_first = np.argsort(-scores, kind="stable")
    n = 4000
    swapped = np.zeros(k, int)
    for _ in range(n):  # a test loop over draws, not a hot path
        order, prop = explore_order(scores, rng, offset)
        ranks = original_ranks(order, scores)
        assert sorted(order.tolist()) == list(range(k))  # a permutation
        assert np.abs(ranks - np.arange(k)).max() <= 1  # adjacent swaps only
        swapped += ranks != np.arange(k)
        paired = np.zeros(k, bool)
        paired[offset:offset + (k - offset) // 2 * 2] = True
        np.testing.assert_array_equal(prop, np.where(paired, 0.5, 1.0))
        # a swapped pair is the pair (offset + 2j, offset + 2j + 1), both ways
        moved = np.flatnonzero(ranks != np.arange(k))
        assert all((m - offset) % 2 == 0 for m in moved[::2])
        assert (order[ranks == np.arange(k)] == best_first[ranks[ranks == np.arange(k)]]).all()
    freq = swapped / n
    expect = np.where(prop == 0.5, 0.5, 0.0)
    # 4000 draws: sd of a frequency 0.0079; 4 sd
    np.testing.assert_allclose(freq, expect, atol=0.032)


def test_batch_form_matches_and_rows_are_independent():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(20000, 6))
    offsets = rng.integers(0, 2, 20000)
    order, prop = explore_orders(scores, np.random.default_rng(5), offsets)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argsort(ranked, axis=1)  # the rank of each index
    shown_rank = np.take_along_axis(rank, order, axis=1)
    assert np.abs(shown_rank - np.arange(6)).max() == 1
    for o in (0, 1):  # swap frequency per pair of positions, per offset
        rows = offsets == o
        moved = (shown_rank[rows] != np.arange(6)).mean(0)
        want = np.array([0.5] * 6 if o == 0 else [0.0, 0.5, 0.5, 0.5, 0.5, 0.0])
        np.testing.assert_allclose(moved, want, atol=0.02)
        np.testing.assert_array_equal(prop[rows], np.broadcast_to(np.where(want > 0, 0.5, 1.0), prop[rows].shape))
    # one row alone draws the same as in the batch: explore_order is the batch of one
    o1, p1 = explore_order(scores[0], np.random.default_rng(9), int(offsets[0]))
    ob, pb = explore_orders(scores[:1], np.random.default_rng(9), offsets[:1])
    np.testing.assert_array_equal(o1, ob[0])
    np.testing.assert_array_equal(p1, pb[0])


def test_short_lists_and_bad_offsets():
    rng = np.random.default_rng(0)
    assert explore_order(np.array([]), rng, 0)[0].tolist() == []
    o, p = explore_order(np.array([3.0]), rng, 0)
    assert o.tolist() == [0] and p.tolist() == [1.0]
    o, p = explore_order(np.array([3.0, 1.0]), rng, 1)
    assert o.tolist() == [0, 1] and p.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="offset must be 0 or 1"):
        explore_order(np.array([1.0, 2.0]), rng, 2)


def test_the_draw_is_a_hash_of_the_request_id():
    draws = [explore_draw(f"req-{i}", 0.2) for i in range(50_000)]
    explored = np.array([d is not None for d in draws])
    assert abs(explored.mean() - 0.2) < 0.0072  # 4 sd of 50k draws
    offsets = np.array([d[1] for d in draws if d is not None])
    assert abs(offsets.mean() - 0.5) < 0.018  # 4 sd of ~10k
    rid = next(f"same-{i}" for i in range(100) if explore_draw(f"same-{i}", 0.5) is not None)
    a, b = explore_draw(rid, 0.5), explore_draw(rid, 0.5)  # a retry agrees, swaps included
    assert a[1] == b[1] and a[0].random() == b[0].random()
    assert explore_draw("anything", 0.0) is None
    # a larger share keeps every request of the smaller one
    small = {i for i in range(5000) if explore_draw(f"r{i}", 0.1) is not None}
    large = {i for i in range(5000) if explore_draw(f"r{i}", 0.3) is not None}
    assert small <= large


# ------------------------------------------------------------------ harvesting


def simulate_explored(n_lists, k, exam, seed, groups=None):
    """Explored lists: scores rank items by attraction (noisily); clicks = exam(position) * attraction."""
    rng = np.random.default_rng(seed)
    attraction = rng.beta(2, 3, (n_lists, k))
    scores = attraction + rng.normal(0, 0.1, (n_lists, k))
    order, prop = explore_orders(scores, rng, rng.integers(0, 2, n_lists))
    rank = np.take_along_axis(np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1), order, axis=1)
    a = np.take_along_axis(attraction, order, axis=1)
    position = np.broadcast_to(np.arange(k), (n_lists, k))
    g = None if groups is None else rng.integers(0, len(groups), n_lists)
    e = exam[None, :] if groups is None else np.stack(groups)[g]
    click = (rng.random((n_lists, k)) < e * a).astype(np.float64)
    return rank, position, click, prop, g


def test_harvesting_recovers_a_known_examination_curve():
    k = 10
    exam = 1.0 / (1.0 + np.arange(k)) ** 0.9
    rank, pos, click, prop, _ = simulate_explored(200_000, k, exam, seed=11)
    est = estimate_examination(rank.ravel(), pos.ravel(), click.ravel(), positions=k, min_count=200, floor=0.01)
    assert est.known.all()
    # chained ratios: the error grows down the list (sd over seeds 0.005 at k=1, 0.04 at k=9); ~4 sd
    err = np.abs(est.curve / exam - 1)
    assert (err <= 0.02 + 0.014 * np.arange(k)).all(), err
    assert err.mean() < 0.03
    # the naive curve (click rate by position, no randomisation used) confounds position with relevance
    naive = click.mean(0) / click.mean(0)[0]
    assert (naive[3:] < exam[3:] * 0.9).all()


def test_per_group_curves_and_thin_groups_fall_back():
    k = 6
    mobile = 1.0 / (1.0 + np.arange(k))
    desktop = 1.0 / (1.0 + 0.3 * np.arange(k))
    rank, pos, click, _, g = simulate_explored(60_000, k, None, seed=2, groups=[mobile, desktop])
    gg = np.repeat(g[:, None], k, axis=1).ravel()
    est = estimate_examination(rank.ravel(), pos.ravel(), click.ravel(), positions=k, group=gg, groups=3,
                               min_count=300, floor=0.01)
    np.testing.assert_allclose(est.by_group[0], mobile, rtol=0.1)
    np.testing.assert_allclose(est.by_group[1], desktop, rtol=0.1)
    np.testing.assert_array_equal(est.by_group[2], est.curve)  # no data: the pooled curve
    assert est.at(np.array([2, 2, -1]), np.array([0, 1, 0])).tolist() == [est.by_group[0][2], est.by_group[1][2], 1.0]


def test_too_few_impressions_leave_the_curve_flat_past_the_gap():
    k = 6
    exam = 0.8 ** np.arange(k)
    rank, pos, click, _, _ = simulate_explored(4000, k, exam, seed=4)
    keep = rank.ravel() < 3  # nothing explored at ranks 3+: pairs (2,3) onwards cannot be estimated
    est = estimate_examination(rank.ravel()[keep], pos.ravel()[keep], click.ravel()[keep], positions=k,
                               min_count=200, floor=0.01)
    assert est.known.tolist() == [True, True, True, False, False, False]  # p1/p0, p2/p1 estimated
    assert np.isfinite(est.ratios[:2]).all() and np.isnan(est.ratios[2:]).all()
    assert (est.curve[3:] == est.curve[2]).all()
    none = estimate_examination(np.full(5, -1), np.arange(5), np.ones(5), positions=k)  # not explored: ignored
    assert none.curve.tolist() == [1.0] * k and none.known.tolist() == [True] + [False] * (k - 1)


def test_counts_add_up_over_batches_and_survive_their_state():
    rank, pos, click, _, _ = simulate_explored(3000, 8, 0.9 ** np.arange(8), seed=5)
    r, p, c = rank.ravel(), pos.ravel(), click.ravel()
    c[::17] = np.nan  # unknown labels are not counted
    whole = SwapCounts(8)
    assert whole.add(r, p, c) == int(np.isfinite(c).sum())
    parts = SwapCounts(8)
    for lo in range(0, len(r), 1000):
        parts.add(r[lo:lo + 1000], p[lo:lo + 1000], c[lo:lo + 1000])
    back = SwapCounts.from_state(json.loads(json.dumps(parts.state())))
    np.testing.assert_array_equal(back.shown, whole.shown)
    np.testing.assert_array_equal(back.clicks, whole.clicks)
    assert whole.shown.sum() == np.isfinite(c).sum()


def test_ipw_weights_are_inverse_propensities_clipped_with_mean_one():
    exam = estimate_examination(*[a.ravel() for a in simulate_explored(60_000, 5, 0.5 ** np.arange(5), seed=6)[:3]],
                                positions=5, min_count=100, floor=0.01)
    pos = np.array([0, 1, 2, 3, 4, 9, -1, 2])
    raw = 1.0 / exam.at(pos)
    assert raw[6] == 1.0 and raw[5] == raw[4]  # unknown position: 1; past the curve: its last value
    w = ipw_weights(pos, exam, clip=6.0)
    want = np.minimum(raw, 6.0)
    np.testing.assert_allclose(w, want / want.mean())
    assert w.mean() == pytest.approx(1.0)
    assert w[4] / w[0] == pytest.approx(6.0)  # 1 / 0.5**4 = 16, clipped at 6
    rows = np.array([True, True, False, True, True, True, True, False])
    w2 = ipw_weights(pos, exam, clip=6.0, rows=rows)
    assert w2[rows].mean() == pytest.approx(1.0) and (w2[~rows] == 1.0).all()


# ------------------------------------------------------------------ the trainer


def explored_history(history_file, path, k=8, seed=0, every=1):
    """The simulated history with every `every`-th list of k consecutive lines explored: positions, ranks,
    propensities and clicks from a known examination curve (attraction: 0.6 / (1 + rank / 4))."""
    lines = history_file.read_text().splitlines()
    rng = np.random.default_rng(seed)
    n = len(lines) // k
    order, prop = explore_orders(-np.tile(np.arange(k, dtype=float), (n, 1)), rng, rng.integers(0, 2, n))
    exam = 0.85 ** np.arange(k)
    clicks = rng.random((n, k)) < exam[None, :] * (0.6 / (1 + order / 4))
    out = []
    for j in range(n * k):  # writes a test file
        ex = json.loads(lines[j])
        li, pos = divmod(j, k)
        ex["request_id"] = f"list-{li}"
        ex["position"] = pos
        ex["labels"]["click"] = float(clicks[li, pos])
        if li % every == 0:
            ex["propensity"] = float(prop[li, pos])
            ex["explore"] = {"rank": int(order[li, pos])}
        out.append(json.dumps(ex))
    path.write_text("\n".join(out) + "\n")
    rank = np.where((np.arange(n) % every == 0)[:, None], order, -1)
    return rank.ravel(), np.tile(np.arange(k), n), clicks.ravel().astype(float)


def test_click_task_is_the_first_binary_task_not_given_another(small_config):
    assert small_config.tasks[click_task(small_config)].name == "click"


def test_trainer_counts_explored_examples_and_keeps_them_across_a_restart(history_file, tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text(small_config_text(trainer={"ipw": "estimated", "ipw_min_count": 50, "ipw_clip": 5.0}))
    config = load_config(cfg)
    path = tmp_path / "explored.jsonl"
    rank, pos, click = explored_history(history_file, path, every=2)
    ck = tmp_path / "ck.pt"
    first = train_files(config, [path], ck, None, fresh=True, max_examples=2048)
    assert first.trained_now == 2048
    rest = train_files(config, [path], ck, None)
    assert rest.examples == len(rank)
    resumed = Trainer.load(ck, config)
    want = SwapCounts(config.bias.max_position + 1)
    want.add(rank, pos, click)
    np.testing.assert_array_equal(resumed.swaps.shown, want.shown)
    np.testing.assert_array_equal(resumed.swaps.clicks, want.clicks)
    assert read_checkpoint(ck)["state"]["explore_counts"]["shown"] == want.shown.tolist()
    exam = resumed.examination()
    assert exam.known[:8].all() and not exam.known[8:].any()
    ref = estimate_examination(rank, pos, click, positions=config.bias.max_position + 1, min_count=50, floor=0.2)
    np.testing.assert_array_equal(exam.curve, ref.curve)
    # (375 explored lists hold ~90 impressions per moved cell: too few for accuracy, tested above on 200k lists)


def test_ipw_weights_the_click_loss_and_leaves_tasks_given_the_click_unweighted(history_file, tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text(small_config_text(trainer={"ipw": "estimated", "ipw_method": "weight", "ipw_min_count": 50,
                                              "ipw_clip": 5.0}))
    config = load_config(cfg)
    path = tmp_path / "explored.jsonl"
    rank, pos, click = explored_history(history_file, path)
    t = Trainer(config, torch.device("cpu"))
    from watchnext.examples import Decoder, ExampleFiles
    chunk = next(iter(ExampleFiles([path], Decoder(config))))[0].take(slice(0, 512))
    assert (t.ipw(chunk) == 1.0).all()  # nothing counted yet: no weighting
    t.swaps.add(rank, pos, click)
    t._exam = None
    w = t.ipw(chunk)
    p = t.examination().at(chunk.position)
    np.testing.assert_allclose(w, (1 / p) / (1 / p).mean(), rtol=1e-12)
    assert w.max() / w.min() == pytest.approx(1 / p.min() / (1 / p.max()))
    inputs, labels, mask, position = t.tensors(chunk)
    weight, target = t.ipw_terms(chunk, labels)
    assert target is None
    t.net.eval()
    with torch.no_grad():
        _, plain = t.net(inputs, labels, mask, position, train=False)
        _, out = t.net(inputs, labels, mask, position, train=False, weight=weight)
    c = t.click
    np.testing.assert_allclose(weight.numpy()[:, c], w, rtol=1e-6)
    others = [i for i in range(len(config.tasks)) if i != c]
    assert (weight.numpy()[:, others] == 1).all()
    np.testing.assert_allclose(out["mask"].numpy(), plain["mask"].numpy())  # tasks given the click: same rows
    # the click loss is the weighted mean of the per-example cross-entropy
    q = out["full"].numpy()[:, c].astype(np.float64)
    y = chunk.labels.values[:, c]
    bce = -(y * np.log(q) + (1 - y) * np.log1p(-q))
    m = chunk.labels.mask[:, c] * w
    assert float(out["losses"][c]) == pytest.approx((bce * m).sum() / m.sum(), rel=2e-4)
    assert float(plain["losses"][c]) == pytest.approx((bce * chunk.labels.mask[:, c]).sum()
                                                      / chunk.labels.mask[:, c].sum(), rel=2e-4)
    assert w.max() / w.min() > 2.5  # the weights do differ (0.85**7 = 0.32)
    for i in others:
        assert float(out["losses"][i]) == pytest.approx(float(plain["losses"][i]), rel=1e-5)
