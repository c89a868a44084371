"""The MMoE ranker, the shallow tower and the masked loss."""

import dataclasses

import numpy as np
import pytest
import torch

from training.export import random_inputs
from training.model import RankerTrain, RunningNorm, _drop_experts


def batch(config, n, seed=0):
    torch.manual_seed(seed)
    net = RankerTrain(config)
    x = {k: torch.from_numpy(v) for k, v in random_inputs(net.ranker, n, seed).items()}
    T = len(config.tasks)
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy((rng.random((n, T)) < 0.5).astype(np.float32))
    mask = torch.ones(n, T)
    position = torch.from_numpy(rng.integers(-1, 10, n))
    return net, x, labels, mask, position


def test_batch_of_one_keeps_its_batch_axis(small_config):
    net, x, *_ = batch(small_config, 1)
    net.eval()
    outs = net.ranker(*[x[k] for k in net.ranker.input_names])
    assert len(outs) == len(small_config.tasks)
    assert all(o.shape == (1,) for o in outs)


def test_missing_labels_are_masked_not_zero(small_config):
    net, x, labels, mask, position = batch(small_config, 64)
    like = small_config.task_index("like")
    mask[:32, like] = 0
    torch.manual_seed(1)
    loss_a, out = net(x, labels, mask, position, train=False)
    labels_b = labels.clone()
    labels_b[:32, like] = 1 - labels_b[:32, like]  # change only labels that are missing
    torch.manual_seed(1)
    loss_b, _ = net(x, labels_b, mask, position, train=False)
    assert torch.equal(loss_a, loss_b)
    # and a known label does count
    labels_c = labels.clone()
    labels_c[40, like] = 1 - labels_c[40, like]
    loss_c, _ = net(x, labels_c, mask, position, train=False)
    assert not torch.equal(loss_a, loss_c)


def test_given_restricts_a_task_to_positive_given_rows(small_config):
    net, x, labels, mask, position = batch(small_config, 64)
    click, like = small_config.task_index("click"), small_config.task_index("like")
    tm = net.task_mask(labels, mask)
    assert torch.equal(tm[:, like], (labels[:, click] == 1).float())
    assert torch.equal(tm[:, click], torch.ones(64))


def test_expert_dropout_renormalises():
    torch.manual_seed(0)
    g = torch.softmax(torch.randn(1000, 3, 4), -1)
    d = _drop_experts(g, 0.3)
    assert torch.allclose(d.sum(-1), torch.ones(1000, 3), atol=1e-6)
    zero_share = (d == 0).float().mean().item()
    assert 0.25 < zero_share < 0.33
    assert torch.equal(_drop_experts(g, 0.0), g / g.sum(-1, keepdim=True))


def test_shared_bottom_has_no_gates(small_config):
    cfg = dataclasses.replace(small_config, model=dataclasses.replace(small_config.model, arch="shared_bottom"))
    net, x, labels, mask, position = batch(cfg, 8)
    assert net.ranker.gates is None
    _, out = net(x, labels, mask, position)
    assert out["gates"].shape == (8, len(cfg.tasks), 1)
    mmoe, *_ = batch(small_config, 8)
    assert mmoe.ranker.gates is not None and mmoe.ranker.n_experts == small_config.model.experts


def test_shallow_tower_moves_binary_logits_only_in_training(small_config):
    net, x, labels, mask, position = batch(small_config, 16)
    with torch.no_grad():
        net.bias.mlp[2].bias.fill_(2.0)  # a strong position effect
    _, out = net(x, labels, mask, position, train=False)
    binary = [i for i, t in enumerate(small_config.tasks) if t.kind == "binary"]
    assert (out["full"][:, binary] > out["heads"][:, binary]).all()
    regression = [i for i, t in enumerate(small_config.tasks) if t.kind == "regression"]
    assert torch.equal(out["full"][:, regression], out["heads"][:, regression])
    # the exported module has no position input at all
    assert "position" not in net.ranker.input_names


def test_running_norm_matches_numpy():
    rng = np.random.default_rng(0)
    norm = RunningNorm(3)
    xs, ms = [], []
    for _ in range(5):
        x = rng.normal(5, 2, (100, 3)).astype(np.float32)
        m = (rng.random((100, 3)) < 0.7).astype(np.float32)
        norm.update(torch.from_numpy(x), torch.from_numpy(m))
        xs.append(x)
        ms.append(m)
    x, m = np.concatenate(xs), np.concatenate(ms).astype(bool)
    for j in range(3):
        assert norm.mean[j].item() == pytest.approx(x[m[:, j], j].mean(), rel=1e-4)
        assert norm.var[j].item() == pytest.approx(x[m[:, j], j].var(), rel=1e-3)


def test_training_step_lowers_the_loss(small_config):
    net, x, labels, mask, position = batch(small_config, 256)
    opt = torch.optim.Adam([p for n, p in net.named_parameters() if "embeddings" not in n and "tables" not in n], lr=0.01)
    first = None
    for _ in range(30):
        loss, _ = net(x, labels, mask, position, train=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.9 * first
