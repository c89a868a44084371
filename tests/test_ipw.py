"""The unbiased pointwise estimator (click / p as the cross-entropy's target), `[trainer] ipw = "curve"`, and the
trainer's click loss under them. Seeded; figures asserted."""

import numpy as np
import pytest
import torch

from tests.helpers import small_config_text
from training.propensity import curve_examination, unbiased_target
from training.trainer import Trainer, train_files
from watchnext.config import ConfigError, load_config, parse_config
from watchnext.examples import Decoder, ExampleFiles


def _bce(y, q):
    return -(y * np.log(q) + (1 - y) * np.log1p(-q))


# ------------------------------------------------------------------ the estimator


def test_click_over_p_has_the_cross_entropy_of_the_attraction_in_expectation():
    rng = np.random.default_rng(0)
    n = 400_000
    attraction = rng.uniform(0.05, 0.9, n)
    position = rng.integers(0, 10, n)
    p = (1.0 / (1.0 + np.arange(10))) ** 0.9  # p_9 = 0.126 > 1 / clip: no clipping
    click = (rng.random(n) < p[position] * attraction).astype(float)
    q = 1 / (1 + np.exp(-rng.normal(-0.5, 1.0, n)))  # any model's prediction
    want = _bce(attraction, q).mean()  # the cross-entropy against the attraction
    y = unbiased_target(click, p[position], clip=10.0)
    assert y.max() == pytest.approx(1 / p[9])
    unbiased = _bce(y, q).mean()
    naive = _bce(click, q).mean()
    se = _bce(y, q).std() / np.sqrt(n)
    assert abs(unbiased - want) < 4 * se, (unbiased, want, se)
    assert abs(naive - want) > 50 * se  # the clicks themselves are far off
    # weighting the whole row by 1 / p (the previous IPW), normalised, is not the attraction's cross-entropy
    w = 1 / p[position]
    weighted = (w * _bce(click, q)).sum() / w.sum()
    assert abs(weighted - want) > 50 * se


def test_clipping_bounds_the_target():
    y = unbiased_target(np.array([1.0, 1.0, 0.0, 1.0, np.nan]), np.array([1.0, 0.01, 0.01, 0.5, 0.5]), clip=5.0)
    np.testing.assert_allclose(y[:4], [1.0, 5.0, 0.0, 2.0])
    assert np.isnan(y[4])


def test_curve_examination_reads_past_its_end_and_unknown_positions():
    e = curve_examination([1.0, 0.5, 0.8, 0.02], floor=0.1)  # need not be non-increasing; clipped at the floor
    np.testing.assert_allclose(e.at(np.array([0, 1, 2, 3, 7, -1])), [1.0, 0.5, 0.8, 0.1, 0.1, 1.0])
    assert e.known.all()
    with pytest.raises(ValueError):
        curve_examination([1.0, 0.0])


# ------------------------------------------------------------------ config


def _config(**trainer):
    import tomllib
    data = tomllib.loads(small_config_text(trainer=trainer))
    return parse_config(data, "w.toml")


def test_ipw_curve_config():
    c = _config(ipw="curve", ipw_curve=[1, 0.5, 0.6, 0.25])
    assert c.trainer.ipw_curve == (1.0, 0.5, 0.6, 0.25) and c.trainer.ipw_method == "target"
    assert _config(ipw="estimated").trainer.ipw_curve == ()
    bad = [
        ({"ipw": "curve"}, "trainer.ipw_curve: is required"),
        ({"ipw": "curve", "ipw_curve": [0.9, 0.5]}, "trainer.ipw_curve: must start with 1.0"),
        ({"ipw": "curve", "ipw_curve": [1.0, 0.0]}, "trainer.ipw_curve: every value must be a finite number in (0, 1]"),
        ({"ipw": "curve", "ipw_curve": [1.0, 1.5]}, "trainer.ipw_curve: every value must be a finite number in (0, 1]"),
        ({"ipw": "curve", "ipw_curve": [1.0, float("nan")]}, "trainer.ipw_curve: every value must be a finite"),
        ({"ipw": "curve", "ipw_curve": [1.0, "0.5"]}, "trainer.ipw_curve: expected a list of numbers"),
        ({"ipw": "curve", "ipw_curve": 0.5}, "trainer.ipw_curve: expected list"),
        ({"ipw": "true"}, "trainer.ipw: expected one of none, estimated, curve"),
        ({"ipw": "estimated", "ipw_method": "clip"}, "trainer.ipw_method: expected one of target, weight"),
    ]
    for over, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            _config(**over)


def test_a_config_with_a_curve_survives_the_checkpoint_round_trip(tmp_path):
    from watchnext.config import config_from_dict
    c = _config(ipw="curve", ipw_curve=[1.0, 0.5, 0.25])
    assert config_from_dict(c.to_dict()).trainer == c.trainer


# ------------------------------------------------------------------ the trainer


def _curve_trainer(tmp_path, history_file, **bias):
    cfg = tmp_path / "w.toml"
    curve = [1.0, 0.7, 0.5, 0.3, 0.2]
    cfg.write_text(small_config_text(trainer={"ipw": "curve", "ipw_curve": curve, "ipw_clip": 4.0},
                                     bias={"dropout": 0.0, **bias}))
    config = load_config(cfg)
    t = Trainer(config, torch.device("cpu"))
    chunk = next(iter(ExampleFiles([history_file], Decoder(config))))[0].take(slice(0, 512))
    return t, chunk, np.array(curve)


def _with_target(t, chunk, inputs, labels, mask, position):
    """The trainer's forward pass with its IPW cross-entropy targets."""
    weight, target = t.ipw_terms(chunk, labels)
    assert weight is None and target is not None
    return t.net(inputs, labels, mask, position, train=True, bce_target=target)


@pytest.mark.parametrize("bias", [{}, {"features": []}])
def test_the_click_loss_is_the_cross_entropy_against_click_over_p_and_other_tasks_are_unchanged(
        tmp_path, history_file, bias):
    t, chunk, curve = _curve_trainer(tmp_path, history_file, **bias)
    c = t.click
    y = t.click_target(chunk)
    p = np.maximum(curve[np.clip(chunk.position, 0, len(curve) - 1)], 0.25)
    p = np.where(chunk.position < 0, 1.0, p)
    clicks = chunk.labels.values[:, c]
    known = chunk.labels.mask[:, c] > 0
    np.testing.assert_allclose(y[known], clicks[known] / p[known], rtol=1e-12)
    assert (y > 1).sum() > 5  # clicks shown low: targets above 1
    inputs, labels, mask, position = t.tensors(chunk)
    torch.manual_seed(3)
    loss_plain, plain = t.net(inputs, labels, mask, position, train=True)
    torch.manual_seed(3)
    loss, out = _with_target(t, chunk, inputs, labels, mask, position)
    # against the logit the loss saw (full = sigmoid of raw + tower logit; no dropout here), unclamped targets
    q = out["full"].detach().numpy()[:, c].astype(np.float64)
    m = out["mask"].numpy()[:, c]
    want = (_bce(y, q) * m).sum() / m.sum()
    assert float(out["losses"][c].detach()) == pytest.approx(want, rel=1e-4)
    assert float(plain["losses"][c].detach()) == pytest.approx((_bce(clicks, q) * m).sum() / m.sum(), rel=1e-4)
    others = [i for i in range(len(t.config.tasks)) if i != c]
    np.testing.assert_allclose(out["losses"].detach().numpy()[others], plain["losses"].detach().numpy()[others],
                               rtol=1e-6)
    np.testing.assert_allclose(out["mask"].numpy(), plain["mask"].numpy())  # tasks given the click: same rows
    lw = t.net.loss_weight.numpy()
    assert float(loss.detach()) == pytest.approx(float(loss_plain.detach()) + lw[c] * (
        want - float(plain["losses"][c].detach())), rel=1e-5)
    # the gradient reaching the ranker's click logit is loss_weight * (sigmoid(f) - c / p) / (counted rows)
    raw = []

    def keep(_module, _args, output):
        output.retain_grad()
        raw.append(output)

    handle = t.net.ranker.towers.register_forward_hook(keep)
    try:
        torch.manual_seed(3)
        loss, out = _with_target(t, chunk, inputs, labels, mask, position)
    finally:
        handle.remove()
    loss.backward()
    got = raw[0].grad[:, c].numpy()
    np.testing.assert_allclose(got, lw[c] * (q - y) * m / m.sum(), atol=1e-7)
    assert np.abs(got[y > 1]).min() > 1e-4  # clicks shown low pull harder than a click at the top could


def test_training_with_ipw_curve_runs_and_reports_the_curve(tmp_path, history_file):
    cfg = tmp_path / "w.toml"
    cfg.write_text(small_config_text(trainer={"ipw": "curve", "ipw_curve": [1.0, 0.6, 0.4]}, bias={"features": []}))
    config = load_config(cfg)
    from watchnext.repository import ModelRepository
    repo = ModelRepository(tmp_path / "repo", config.model.name)
    res = train_files(config, [history_file], tmp_path / "ck.pt", repo, fresh=True)
    assert res.trained_now == 6000 and res.skipped_batches == 0
    meta = repo.metadata(res.version)
    assert meta["trainer"]["ipw"] == "curve" and meta["trainer"]["ipw_method"] == "target"
    assert meta["examination"]["curve"][:3] == [1.0, 0.6, 0.4] and meta["examination"]["source"] == "ipw_curve"
