"""The MMoE ranker, the shallow tower and the masked loss."""

import dataclasses

import numpy as np
import pytest
import torch

from training.export import random_inputs
from training.model import RankerTrain, RunningNorm, _drop_experts, upgrade_state_dict
from watchnext.config import FeatureKind


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


def test_the_parts_have_their_documented_shapes(small_config):
    net, x, *_ = batch(small_config, 8)
    r = net.ranker
    m = small_config.model
    T, E, H = len(small_config.tasks), m.experts, m.expert_layers[-1]
    with torch.no_grad():
        x0, field = r.shared_input(x)  # SharedInput: (B, D0) and each field's vector
        assert x0.shape == (8, r.shared_input.out_dim)
        assert list(field) != [] and set(field) == {f.name for f in small_config.features if f.kind != FeatureKind.NUMERIC}
        n = len(field)
        pairs = r.interactions(field)  # Interactions: (B, heads * F(F-1)/2)
        assert pairs.shape == (8, m.interaction_heads * n * (n - 1) // 2)
        shared = r.shared(x)  # the shared input: both, concatenated
        assert shared.shape == (8, r.d_in) and torch.equal(shared, torch.cat([x0, pairs], 1))
        experts = r.experts(shared)  # ExpertBank: (E, B, H)
        assert experts.shape == (E, 8, H)
        gates = r.gates(shared)  # Gates: (B, T, E), a softmax per task
        assert gates.shape == (8, T, E) and torch.allclose(gates.sum(-1), torch.ones(8, T))
        raw = r.towers(torch.bmm(gates, experts.transpose(0, 1)).transpose(0, 1))  # TowerBank: (T, B, H) -> (B, T)
        assert raw.shape == (8, T)
        assert torch.equal(raw, r.raw(x)[0])
        assert r.heads(raw).shape == (8, T)  # Heads: label units


def test_without_interactions_the_shared_input_is_the_features_alone(small_config):
    cfg = dataclasses.replace(small_config, model=dataclasses.replace(small_config.model, interactions=False))
    net, x, *_ = batch(cfg, 4)
    assert net.ranker.interactions is None and net.ranker.d_in == net.ranker.shared_input.out_dim
    assert not any("projections" in k for k in net.state_dict())
    assert torch.equal(net.ranker.shared(x), net.ranker.shared_input(x)[0])


def test_the_old_layouts_keys_are_renamed_and_the_new_ones_kept(small_config):
    net, *_ = batch(small_config, 4)
    state = net.state_dict()
    assert list(upgrade_state_dict(state)) == list(state)  # nothing to rename in the new layout
    old = {"ranker.embeddings.video_id.weight": 1, "ranker.numeric_norm.count": 2, "ranker.projections.hour.weight": 3,
           "ranker.gates.weight": 4, "ranker.gates.bias": 5, "ranker.target_norm.mean": 6, "ranker.is_binary": 7,
           "ranker.is_log1p": 8, "ranker.experts.first.weight": 9, "is_binary": 10, "bias.mlp.0.weight": 11}
    assert upgrade_state_dict(old) == {
        "ranker.shared_input.embeddings.video_id.weight": 1, "ranker.shared_input.numeric_norm.count": 2,
        "ranker.interactions.projections.hour.weight": 3, "ranker.gates.linear.weight": 4, "ranker.gates.linear.bias": 5,
        "ranker.heads.target_norm.mean": 6, "ranker.heads.is_binary": 7, "ranker.heads.is_log1p": 8,
        "ranker.experts.first.weight": 9, "is_binary": 10, "bias.mlp.0.weight": 11}


def test_shallow_tower_moves_binary_logits_only_in_training(small_config):
    net, x, labels, mask, position = batch(small_config, 16)
    with torch.no_grad():
        net.bias.mlp[2].bias.fill_(2.0)  # a strong position effect
    _, out = net(x, labels, mask, position, train=False)
    biased = [small_config.task_index(n) for n in ("click", "dismiss")]  # binary, no `given`: bias = true
    assert [t.name for t in small_config.tasks if t.bias] == ["click", "dismiss"]
    assert (out["full"][:, biased] > out["heads"][:, biased]).all()
    unbiased = [i for i, t in enumerate(small_config.tasks) if i not in biased]  # like (given click), regression
    assert torch.equal(out["full"][:, unbiased], out["heads"][:, unbiased])
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


# ---------------------------------------------------------------- the shallow tower's variants


def _bias_config(small_config, tasks=None, **bias):
    cfg = dataclasses.replace(small_config, bias=dataclasses.replace(small_config.bias, **bias))
    if tasks:
        cfg = dataclasses.replace(cfg, tasks=tuple(dataclasses.replace(t, bias=tasks.get(t.name, t.bias)) for t in cfg.tasks))
    return cfg


def test_observation_dropout_drops_the_whole_bias_logit_for_its_share(small_config):
    cfg = _bias_config(small_config, observation_dropout=0.3, dropout=0.0)
    net, x, labels, mask, position = batch(cfg, 4000)
    with torch.no_grad():
        net.bias.mlp[2].bias.fill_(2.0)  # every example's bias logit is 2 until dropped
    torch.manual_seed(5)
    _, out = net(x, labels, mask, position, train=True)
    b = out["bias_logits"]  # (B, 2): click, dismiss
    dropped = (b == 0).all(1)
    assert ((b == 0) | (b == 2.0)).all() and torch.equal(dropped, (b == 0).any(1))  # per example, all tasks at once
    assert 0.28 < dropped.float().mean().item() < 0.32  # 0.3 of 4000: sd 0.007
    click = cfg.task_index("click")
    assert (out["full"][:, click] > out["heads"][:, click]).all()  # `full` reports the tower as trained, undropped
    _, out = net(x, labels, mask, position, train=False)
    assert (out["bias_logits"] == 2.0).all()  # only in training
    # the position-input dropout is a different thing: it hides the slot, the logit stays
    cfg = _bias_config(small_config, observation_dropout=0.0, dropout=0.3)
    net, x, labels, mask, position = batch(cfg, 4000)
    with torch.no_grad():
        net.bias.mlp[2].bias.fill_(2.0)
    _, out = net(x, labels, mask, position, train=True)
    assert (out["bias_logits"] == 2.0).all()


def test_gradient_reversal_flips_the_adversarys_gradient_into_the_tower(small_config):
    strength = 0.7
    cfg = _bias_config(small_config, gradient_reversal=strength)
    net, x, labels, mask, position = batch(cfg, 256)
    assert net.adversary is not None and net.adversary.out_features == 2
    loss, out = net(x, labels, mask, position, train=False)
    plain_loss, _ = batch(small_config, 256)[0](x, labels, mask, position, train=False)
    assert loss.item() == pytest.approx(plain_loss.item() + out["adversary_loss"].item(), rel=1e-5)
    loss.backward()
    # the tower's output layer starts at zero, so its first layer's gradient is the adversary's alone
    reversed_tower = net.bias.mlp[0].weight.grad.clone()
    reversed_head = net.adversary.weight.grad.clone()
    net.zero_grad()
    # the same adversary without the reversal layer
    rows = net.position_rows(position, train=False)
    _, hidden = net.bias(rows, x)
    relevance = net.ranker.raw(x)[0][:, net.bias_idx].detach()
    ((net.adversary(hidden) - relevance) ** 2).mean().backward()
    plain_tower, plain_head = net.bias.mlp[0].weight.grad, net.adversary.weight.grad
    assert plain_tower.abs().sum() > 0
    torch.testing.assert_close(reversed_tower, -strength * plain_tower)  # the tower ascends the adversary's loss
    torch.testing.assert_close(reversed_head, plain_head)  # the adversary itself descends it


def test_gradient_reversal_takes_relevance_out_of_the_tower():
    """A logging policy placed relevant items high, so the slot tells relevance: the plain tower's position
    effect absorbs some of it. With the reversal, the tower's effect shrinks and the relevance model takes
    more of the clicks (measured over seeds 0-4: spread ratio 0.11-0.55, relevance weight +0.22 to +0.55)."""
    from training.model import reverse_grad

    def fit(strength):
        torch.manual_seed(0)
        rel = torch.randn(2048)
        pos = torch.clamp((-rel * 2 + 5 + torch.randn(2048)).round(), 0, 9).long()  # relevant items placed high
        click = (torch.rand(2048) < torch.sigmoid(rel - 0.3 * pos.float())).float()
        emb, hidden, out, adv = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
        relevance = torch.nn.Parameter(torch.zeros(1))  # a relevance model that sees `rel` through one weight
        params = [*emb.parameters(), *hidden.parameters(), *out.parameters(), *adv.parameters(), relevance]
        opt = torch.optim.Adam(params, lr=0.03)
        for _ in range(300):
            h = torch.relu(hidden(emb(pos)))
            r = relevance * rel
            loss = torch.nn.functional.binary_cross_entropy_with_logits(r + out(h).squeeze(1), click)
            if strength:
                loss = loss + ((adv(reverse_grad(h, strength)).squeeze(1) - r.detach()) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            spread = out(torch.relu(hidden(emb(torch.arange(10))))).std().item()  # the tower's logit over slots
        return spread, relevance.item()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only cost here
    try:
        spread_plain, w_plain = fit(0.0)
        spread_rev, w_rev = fit(3.0)
    finally:
        torch.set_num_threads(threads)
    assert spread_rev < 0.6 * spread_plain
    assert w_rev > w_plain + 0.15


def test_the_bias_flag_chooses_the_tasks_that_get_the_bias_logit(small_config):
    click, dismiss, like = (small_config.task_index(n) for n in ("click", "dismiss", "like"))
    cfg = _bias_config(small_config, tasks={"click": False, "like": True})
    net, x, labels, mask, position = batch(cfg, 16)
    assert net.bias_idx == [dismiss, like] and net.bias.mlp[2].out_features == 2
    with torch.no_grad():
        net.bias.mlp[2].bias.copy_(torch.tensor([1.0, 2.0]))
    _, out = net(x, labels, mask, position, train=False)
    assert torch.equal(out["full"][:, click], out["heads"][:, click])
    logit = torch.logit(out["full"].double()) - torch.logit(out["heads"].double())
    torch.testing.assert_close(logit[:, dismiss], torch.full((16,), 1.0, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(logit[:, like], torch.full((16,), 2.0, dtype=torch.float64), atol=1e-4, rtol=0)
    none = _bias_config(small_config, tasks={"click": False, "dismiss": False})
    assert batch(none, 4)[0].bias is None  # no task takes it: no tower


def test_crossing_gives_each_position_device_pair_its_own_row(small_config):
    cfg = _bias_config(small_config, cross=("position", "device"), dropout=0.0)
    net, x, labels, mask, position = batch(cfg, 64)
    devices = cfg.feature("device").buckets + 1
    assert net.bias.cross_table.num_embeddings == (cfg.bias.max_position + 2) * devices
    seen = []
    net.bias.cross_table.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    grid_pos = torch.arange(-1, cfg.bias.max_position + 1).repeat_interleave(devices)  # every slot (and unknown) ...
    grid_dev = torch.arange(devices).repeat(cfg.bias.max_position + 2)  # ... with every device row
    x_grid = {k: v[:1].expand(len(grid_pos), *v.shape[1:]).clone() for k, v in x.items()}
    x_grid["device"] = grid_dev
    n = len(grid_pos)
    net(x_grid, torch.zeros(n, labels.shape[1]), torch.ones(n, labels.shape[1]), grid_pos, train=False)
    assert sorted(seen[0].tolist()) == list(range(n))  # one row per pair, none shared
    # moving one pair's row moves the logits of exactly the examples with that pair
    with torch.no_grad():
        net.bias.mlp[2].weight.fill_(0.1)
    _, before = net(x, labels, mask, position, train=False)
    pair = (position == 3) & (x["device"] == x["device"][(position == 3).nonzero()[0, 0]])
    row = seen[-1][pair.nonzero()[0, 0]]
    with torch.no_grad():
        net.bias.cross_table.weight[row] += 3.0
    _, after = net(x, labels, mask, position, train=False)
    moved = (after["bias_logits"] != before["bias_logits"]).any(1)
    assert pair.any() and torch.equal(moved, pair)


def test_position_as_a_feature_is_missing_in_the_exported_model(small_config):
    cfg = _bias_config(small_config, mode="feature", features=("position", "device"), dropout=0.0)
    net, x, labels, mask, position = batch(cfg, 64)
    default, *_ = batch(small_config, 64)
    assert net.position_feature is not None
    assert net.bias is not None and not net.bias.use_position and net.bias.features == ["device"]  # device: tower
    assert net.ranker.state_dict().keys() == default.ranker.state_dict().keys()  # the same exported graph
    assert "position" not in net.ranker.input_names
    with torch.no_grad():
        net.bias.mlp[2].bias.zero_()
    _, out = net(x, labels, mask, position, train=False)
    served = torch.stack(net.ranker(*[x[k] for k in net.ranker.input_names]), 1)
    torch.testing.assert_close(out["heads"], served)  # heads: the position missing, as at serving
    known = position >= 0
    assert (out["full"][known] != out["heads"][known]).any(1).all()  # a known slot moves the scores
    torch.testing.assert_close(out["full"][~known], out["heads"][~known])  # an unknown one (row 0) does not


def test_example_weights_scale_each_examples_loss(small_config):
    net, x, labels, mask, position = batch(small_config, 64)
    base, out = net(x, labels, mask, position, train=False)
    twice, out2 = net(x, labels, mask, position, train=False, weight=torch.full((64,), 2.0))
    torch.testing.assert_close(out2["losses"], 2 * out["losses"])
    half = torch.cat([torch.ones(32), torch.zeros(32)])
    _, out3 = net(x, labels, mask, position, train=False, weight=half)
    click = small_config.task_index("click")
    _, first = net({k: v[:32] for k, v in x.items()}, labels[:32], mask[:32], position[:32], train=False)
    torch.testing.assert_close(out3["losses"][click], first["losses"][click] / 2)  # summed over 32, divided by 64
