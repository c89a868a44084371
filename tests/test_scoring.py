import numpy as np
import pytest

from watchnext.scoring import FLOOR, combine, top_k


def reference(heads, w, mode):
    """The [score] forms written out in numpy (docs/configuration.md)."""
    h = heads.astype(np.float64)
    return h @ w if mode == "linear" else np.exp(np.log(np.maximum(h, FLOOR)) @ w)


@pytest.mark.parametrize("mode", ["linear", "multiplicative"])
def test_top_k_is_the_best_of_combine_in_a_stable_order(mode):
    """The service's answer (one compiled pass) against the reference: the forms in numpy, then a stable sort."""
    rng = np.random.default_rng(21)
    heads = rng.uniform(0, 3, size=(500, 5)).astype(np.float32)
    heads[:, 0] = rng.integers(0, 2, size=500)  # a binary head: 0 meets the multiplicative form's floor
    heads[100:110] = heads[5]  # ties: rows equal to row 5 rank after it, in row order
    w = np.array([1.0, 0.5, -0.25, 2.0, 0.0])
    want_scores = reference(heads, w, mode)
    np.testing.assert_allclose(combine(heads, w, mode), want_scores, rtol=1e-12)
    want = np.argsort(-want_scores, kind="stable")
    for k in (1, 20, 499, 500, 800):
        rows, scores, dropped = top_k(heads, w, mode, k)
        assert dropped == 0 and rows.tolist() == want[:k].tolist(), k
        np.testing.assert_allclose(scores, want_scores[rows], rtol=1e-12)
    rows, _, _ = top_k(heads, w, mode, 500)
    at5 = rows.tolist().index(5)
    assert rows[at5: at5 + 11].tolist() == [5, *range(100, 110)]
    assert FLOOR > 0 and heads[:, 0].min() == 0


def test_top_k_leaves_out_rows_whose_output_is_not_finite():
    heads = np.ones((6, 3), np.float32)
    heads[:, 1] = [5, 4, 3, 2, 1, 0]
    heads[0, 2] = np.nan  # the best row by its other heads
    heads[2, 0] = np.inf
    heads[4, 1] = -np.inf
    w = np.array([1.0, 1.0, 0.0])  # a head weighted 0 that is NaN still makes the row's output not finite
    rows, scores, dropped = top_k(heads, w, "linear", 10)
    assert dropped == 3 and rows.tolist() == [1, 3, 5] and scores.tolist() == [5.0, 3.0, 1.0]
    rows, _, dropped = top_k(heads, w, "linear", 2)
    assert dropped == 3 and rows.tolist() == [1, 3]
    # a finite head whose weighted sum overflows float64 is left out too
    big = np.full((2, 2), np.finfo(np.float32).max, np.float32)
    rows, _, dropped = top_k(big, np.array([1e300, 1e300]), "linear", 5)
    assert dropped == 2 and rows.tolist() == []
    # no candidates
    rows, scores, dropped = top_k(np.zeros((0, 3), np.float32), w, "linear", 5)
    assert rows.tolist() == [] and scores.tolist() == [] and dropped == 0
    with pytest.raises(ValueError, match="linear or multiplicative"):
        top_k(heads, w, "max", 3)


@pytest.mark.parametrize("mode", ["linear", "multiplicative"])
def test_combine_gives_every_row_a_score_and_a_non_finite_head_a_non_finite_one(mode):
    heads = np.array([[0.5, 2.0], [np.nan, 1.0], [np.inf, 1.0], [0.0, 3.0]], np.float32)
    w = np.array([1.0, 0.5])
    got = combine(heads, w, mode)
    want = reference(heads, w, mode)
    assert got.shape == (4,) and got.dtype == np.float64
    np.testing.assert_allclose(got[[0, 3]], want[[0, 3]], rtol=1e-12)
    assert np.isnan(got[1]) and np.isnan(want[1]) and got[2] == want[2] == np.inf
    with pytest.raises(ValueError, match="do not match"):
        combine(heads, np.ones(3), mode)
