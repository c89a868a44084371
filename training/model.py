"""The MMoE ranker (Ma et al., KDD 2018; Zhao et al., RecSys 2019) and its shallow tower.

`Ranker` is exactly what is exported: encoded features in, every head out in
its label's units. It is built from named parts, in data-flow order:

    SharedInput   encoded inputs -> one vector per row (B, D0), and each field's vector
    Interactions  the F fields' vectors -> their pairwise dot products (B, P), appended
                  to SharedInput's vector: the shared input x (B, D), D = D0 + P
    ExpertBank    x -> each expert's output (E, B, H)
    Gates         x -> one softmax over the experts per task (B, T, E); mixing the
                  experts by them gives each task's input (T, B, H)
    TowerBank     (T, B, H) -> one raw output per task (B, T): logits, standardised targets
    Heads         raw outputs (B, T) -> label units (B, T)

`RankerTrain` wraps it with what only training has: the shallow tower
(`ShallowTower`: position and device bias), the position as an input with
`[bias] mode = "feature"` (`PositionFeature`), and the masked multitask loss.

Shapes: B batch, T tasks, E experts, F fields (the features that are not
numeric), D shared input width, H expert output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from watchnext.config import POSITION, Config, Feature, FeatureKind, TaskKind
from watchnext.encoding import Encoder

EPS = 1e-6
EMBEDDING_INIT_STD = 0.15  # measured: 0.05 made learning users' tastes a matter of luck (click AUC 0.778-0.806 over seeds)
EMBEDDED = (FeatureKind.CATEGORICAL, FeatureKind.CATEGORICAL_LIST)  # the kinds read through an embedding table


class RunningNorm(nn.Module):
    """Per-column mean and variance learned from the stream (Chan's parallel update).

    Carried by the model as buffers, so the exported graph standardises its own inputs.

    update: x, mask (B, n) -> None; scale, unscale: (B, n) -> (B, n)
    """

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))
        self.register_buffer("count", torch.zeros(n))

    @torch.no_grad()
    def update(self, x: Tensor, mask: Tensor) -> None:
        """x, mask: (B, n); only entries with mask 1 count."""
        nb = mask.sum(0)
        mb = (x * mask).sum(0) / nb.clamp_min(1)
        vb = (((x - mb) ** 2) * mask).sum(0) / nb.clamp_min(1)
        total = self.count + nb
        delta = mb - self.mean
        w = nb / total.clamp_min(1)
        new_mean = self.mean + delta * w
        m2 = self.var * self.count + vb * nb + delta**2 * self.count * w
        new_var = m2 / total.clamp_min(1)
        seen = nb > 0
        self.mean.copy_(torch.where(seen, new_mean, self.mean))
        self.var.copy_(torch.where(seen & (total > 1), new_var, self.var))
        self.count.copy_(total)

    def scale(self, x: Tensor) -> Tensor:
        return (x - self.mean) / torch.sqrt(self.var + 1e-4)

    def unscale(self, z: Tensor) -> Tensor:
        return z * torch.sqrt(self.var + 1e-4) + self.mean


class SharedInput(nn.Module):
    """Encoded inputs -> one vector per row: embeddings, pooled lists, scaled numerics and vectors.

    Categorical features look up one row of their table, categorical lists take the mean
    of their ids' rows (id 0, "missing", is a zero row and not counted), numerics are
    standardised by running statistics (`numeric_norm`) and come with their missing-mask,
    vectors pass as they are. Features that name the same things (video ids as candidate,
    query and history) share one table (`table = ...`), so what is learned about a video
    in one role serves the others.

    forward: {input name: (B,) ids | (B, L) ids | (B, N) numerics | (B, size) vector}
             -> (B, D0) concatenated in `Encoder.input_specs` order,
                {field name: (B, d_f)} the vector of each feature that is not numeric
    """

    def __init__(self, config: Config):
        super().__init__()
        self.cat_names = [f.name for f in config.features_of(FeatureKind.CATEGORICAL)]
        self.list_names = [f.name for f in config.features_of(FeatureKind.CATEGORICAL_LIST)]
        self.vec_names = [f.name for f in config.features_of(FeatureKind.VECTOR)]
        self.n_numeric = len(config.features_of(FeatureKind.NUMERIC))
        self.table_of = {f.name: f.table or f.name for f in config.features if f.kind in EMBEDDED}
        self.embeddings = nn.ModuleDict(
            {
                f.name: nn.Embedding(f.buckets + 1, f.dim, padding_idx=0, sparse=True)
                for f in config.features
                if f.kind in EMBEDDED and f.table is None
            }
        )
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                emb.weight[0].zero_()
        self.numeric_norm = RunningNorm(self.n_numeric)
        self.out_dim = (
            sum(f.dim for f in config.features if f.kind in EMBEDDED)
            + 2 * self.n_numeric
            + sum(f.size for f in config.features_of(FeatureKind.VECTOR))
        )

    def forward(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        field = {n: self.embeddings[self.table_of[n]](inputs[n]) for n in self.cat_names}  # (B, d_f)
        for n in self.list_names:
            ids = inputs[n]  # (B, L)
            e = self.embeddings[self.table_of[n]](ids)  # (B, L, d); row 0 is zero
            count = (ids > 0).sum(1, keepdim=True).clamp_min(1).to(e.dtype)  # (B, 1)
            field[n] = e.sum(1) / count
        for n in self.vec_names:
            field[n] = inputs[n]
        parts = [field[n] for n in self.cat_names + self.list_names]
        if self.n_numeric:
            parts.append(self.numeric_norm.scale(inputs["numeric"]))
            parts.append(inputs["numeric_mask"])
        parts.extend(field[n] for n in self.vec_names)
        return torch.cat(parts, dim=1), field


class Interactions(nn.Module):
    """Pairwise dot products between fields (as in DLRM / factorisation machines), in several heads.

    MLPs learn user-by-item products poorly, and different tasks need different products
    (what a user clicks is not what satisfies them): each field is projected to `heads`
    vectors of width `dim`, and every pair of fields gives one dot product per head.
    Only built with `[model] interactions = true`.

    forward: {field name: (B, d_f)} for the F fields -> (B, heads * F(F-1)/2), head-major
    """

    def __init__(self, fields: list[Feature], heads: int, dim: int):
        super().__init__()
        self.field_names = [f.name for f in fields]
        self.heads, self.dim = heads, dim
        self.projections = nn.ModuleDict(
            {f.name: nn.Linear(f.size if f.kind == FeatureKind.VECTOR else f.dim, heads * dim, bias=False) for f in fields}
        )
        n = len(fields)
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pair_index", rows * n + cols, persistent=False)  # the pairs i < j of the (F, F) grid
        self.out_dim = heads * (n * (n - 1) // 2)

    def forward(self, field: Mapping[str, Tensor]) -> Tensor:
        H, k = self.heads, self.dim
        f = torch.stack([self.projections[n](field[n]) for n in self.field_names], dim=1)  # (B, F, H*k)
        B, F = f.shape[0], f.shape[1]
        f = f.view(B, F, H, k).transpose(1, 2).reshape(B * H, F, k)  # (B*H, F, k)
        dots = torch.bmm(f, f.transpose(1, 2)).view(B, H, F * F)  # (B, H, F*F)
        return dots[:, :, self.pair_index].reshape(B, -1)  # (B, H * F(F-1)/2)


class ExpertBank(nn.Module):
    """E parallel MLPs over one input: a single matmul, then batched matmuls; ReLU after every layer.

    forward: x (B, D), offset (B, E*H0) or None -> (E, B, H), H = the last of `layers`
    """

    def __init__(self, d_in: int, layers: tuple[int, ...], experts: int):
        super().__init__()
        self.experts, self.width = experts, layers[0]
        self.first = nn.Linear(d_in, experts * layers[0])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(layers[:-1], layers[1:]):
            w = torch.empty(experts, a, b)
            for e in range(experts):
                nn.init.kaiming_uniform_(w[e].T, a=5**0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(experts, 1, b)))
        self.out_dim = layers[-1]

    def forward(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        """offset (B, E*H0), optional: added before the first ReLU (an input that is not in x)."""
        h = self.first(x)  # (B, E*H0)
        h = F.relu(h if offset is None else h + offset)
        h = h.view(-1, self.experts, self.width).transpose(0, 1)  # (E, B, H0)
        for w, b in zip(self.weights, self.biases):
            h = F.relu(torch.matmul(h, w) + b)  # (E, B, Hi)
        return h


class Gates(nn.Module):
    """One softmax gate per task over the E experts (MMoE), from the shared input.

    With `drop` (training), each expert's weight is zeroed with probability `dropout`
    and the rest renormalised (`_drop_experts`), against gates that settle on one expert.

    forward: x (B, D), offset (B, T*E) or None -> (B, T, E), each (b, t) summing to 1
    """

    def __init__(self, d_in: int, tasks: int, experts: int, dropout: float):
        super().__init__()
        self.tasks, self.experts, self.dropout = tasks, experts, dropout
        self.linear = nn.Linear(d_in, tasks * experts)
        self.shard = None  # data-parallel training: the step's rows over the ranks (`RankerTrain.set_shard`)

    def forward(self, x: Tensor, offset: Tensor | None = None, drop: bool = False) -> Tensor:
        """offset (B, T*E), optional: added to the gates' logits (an input that is not in x)."""
        g = self.linear(x)  # (B, T*E)
        if offset is not None:
            g = g + offset
        gates = torch.softmax(g.view(x.shape[0], self.tasks, self.experts), dim=-1)  # (B, T, E)
        if drop and self.dropout > 0:
            gates = _drop_experts(gates, self.dropout, self.shard)
        return gates


class TowerBank(nn.Module):
    """T towers of the same shape as batched matmuls, each ending in one output (ReLU between layers).

    forward: (T, B, H) -> (B, T) raw outputs
    """

    def __init__(self, tasks: int, d_in: int, layers: tuple[int, ...]):
        super().__init__()
        dims = (d_in, *layers, 1)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(tasks, a, b)
            for t in range(tasks):
                nn.init.kaiming_uniform_(w[t].T, a=5**0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(tasks, 1, b)))

    def forward(self, z: Tensor) -> Tensor:
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.matmul(z, w) + b
            if i < n - 1:
                z = F.relu(z)
        return z.squeeze(-1).transpose(0, 1)  # (B, T): squeeze names the unit axis only


class Heads(nn.Module):
    """Raw outputs -> label units: the sigmoid of a binary task's logit; a regression task's
    standardised output put back in its units by `target_norm` (then expm1 under `log1p`).

    `target_norm` holds the regression targets' running statistics; `RankerTrain` updates
    them from the labels (and standardises the targets with them for the loss).

    forward: (B, T) -> (B, T)
    """

    def __init__(self, config: Config):
        super().__init__()
        self.target_norm = RunningNorm(len(config.tasks))  # used for regression tasks only
        self.register_buffer("is_binary", torch.tensor([t.kind == TaskKind.BINARY for t in config.tasks]))
        self.register_buffer("is_log1p", torch.tensor([t.transform == "log1p" for t in config.tasks]))

    def forward(self, raw: Tensor) -> Tensor:
        reg = self.target_norm.unscale(raw)
        reg = torch.where(self.is_log1p, (torch.exp(reg) - 1.0).clamp_min(0.0), reg)  # no expm1 in ONNX
        return torch.where(self.is_binary, torch.sigmoid(raw), reg)


class Ranker(nn.Module):
    """Encoded features -> every task's head. This module is what ONNX exports.

    forward: the inputs in `input_names` order -> T tensors (B,), in `task_names` order

    Example:
        >>> ranker = Ranker(load_config())
        >>> heads = ranker(*[torch.from_numpy(a) for a in encoded.values()])  # T tensors of (B,)
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.input_names = [name for name, _, _ in Encoder(config).input_specs()]
        self.task_names = [t.name for t in config.tasks]
        m = config.model
        T = len(config.tasks)
        # built in this order: it is the order the parameters draw their initial values (and the optimisers' order)
        self.shared_input = SharedInput(config)
        fields = [f for f in config.features if f.kind != FeatureKind.NUMERIC]
        self.interactions = Interactions(fields, m.interaction_heads, m.interaction_dim) if m.interactions else None
        self.d_in = self.shared_input.out_dim + (self.interactions.out_dim if self.interactions is not None else 0)
        self.mmoe = m.arch == "mmoe"
        self.n_experts = m.experts if self.mmoe else 1
        self.experts = ExpertBank(self.d_in, m.expert_layers, self.n_experts)
        self.gates = Gates(self.d_in, T, self.n_experts, m.expert_dropout) if self.mmoe else None  # shared bottom: none
        self.towers = TowerBank(T, self.experts.out_dim, m.tower_layers)
        self.heads = Heads(config)

    def shared(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The shared input x (B, D): `SharedInput`'s vector, then the `Interactions`' products."""
        x, field = self.shared_input(inputs)  # (B, D0)
        if self.interactions is None:
            return x
        return torch.cat([x, self.interactions(field)], dim=1)  # (B, D0 + P)

    def raw(
        self, inputs: Mapping[str, Tensor], train_gates: bool = False, side: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Raw outputs (B, T) (logits; standardised regression targets) and gates (B, T, E).

        `train_gates`: expert dropout on. `side`: (expert offset, gate offset) of a training-only
        input (`PositionFeature`); the exported graph has none.
        """
        x = self.shared(inputs)  # (B, D)
        experts = self.experts(x, None if side is None else side[0])  # (E, B, H)
        T = len(self.task_names)
        if self.gates is None:  # shared bottom: the one expert is every task's input
            gates = torch.ones(x.shape[0], T, 1, device=x.device)
            mixed = experts.expand(T, -1, -1)  # (T, B, H)
        else:
            gates = self.gates(x, None if side is None else side[1], drop=train_gates)  # (B, T, E)
            mixed = torch.bmm(gates, experts.transpose(0, 1)).transpose(0, 1)  # (B, T, H) -> (T, B, H)
        return self.towers(mixed), gates

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Inputs in `input_names` order; one (B,) output per task, in `task_names` order."""
        out = self.heads(self.raw(dict(zip(self.input_names, tensors)))[0])  # (B, T)
        return tuple(out[:, j] for j in range(out.shape[1]))


# Checkpoints saved before the ranker was split into named parts hold these keys: old -> new
# (a name ending in "." renames every key under it). `upgrade_state_dict` maps them on load.
RENAMED_KEYS = (
    ("ranker.embeddings.", "ranker.shared_input.embeddings."),
    ("ranker.numeric_norm.", "ranker.shared_input.numeric_norm."),
    ("ranker.projections.", "ranker.interactions.projections."),
    ("ranker.gates.weight", "ranker.gates.linear.weight"),
    ("ranker.gates.bias", "ranker.gates.linear.bias"),
    ("ranker.target_norm.", "ranker.heads.target_norm."),
    ("ranker.is_binary", "ranker.heads.is_binary"),
    ("ranker.is_log1p", "ranker.heads.is_log1p"),
)


def upgrade_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A `RankerTrain` state dict with the keys of the old layout (`RENAMED_KEYS`) renamed; others kept."""
    out = {}
    for key, value in state.items():
        for old, new in RENAMED_KEYS:
            if key == old or (old.endswith(".") and key.startswith(old)):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _drop_experts(gates: Tensor, p: float, shard=None) -> Tensor:
    """Zero each expert's weight with probability p and renormalise (against gate polarisation)."""
    draw = torch.rand_like(gates) if shard is None else shard.rand(gates.shape, gates.device, gates.dtype)
    keep = (draw >= p).to(gates.dtype)
    none_left = keep.sum(-1, keepdim=True) == 0
    keep = torch.where(none_left, torch.ones_like(keep), keep)
    g = gates * keep
    return g / g.sum(-1, keepdim=True).clamp_min(EPS)


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward (Ganin & Lempitsky, ICML 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def reverse_grad(x: Tensor, scale: float) -> Tensor:
    return _ReverseGrad.apply(x, scale)


class ShallowTower(nn.Module):
    """Bias features (position, device, ...) -> one logit per task with `bias = true`, added in training.

    Each feature has its own embedding; `[bias] cross` adds one joint embedding of
    the named features (a row per combination, e.g. (slot 3, tv)), as Zhao et al.
    cross position with device. The MLP over the concatenated embeddings can learn
    such an interaction too, but only as far as its `hidden` ReLUs allow; the joint
    row states it exactly, at (max_position + 2) * (device buckets + 1) rows.

    forward: position rows (B,) (`RankerTrain.position_rows`), bias ids {name: (B,)}
             -> logits (B, T_bias), hidden state (B, hidden)
    """

    def __init__(self, config: Config):
        super().__init__()
        b = config.bias
        self.max_position = b.max_position
        self.features = [n for n in b.tower_features if n != POSITION]
        self.use_position = POSITION in b.tower_features
        rows = {n: config.feature(n).buckets + 1 for n in self.features}
        if self.use_position:
            rows[POSITION] = b.max_position + 2
        self.tables = nn.ModuleDict({n: nn.Embedding(k, b.dim, sparse=True) for n, k in rows.items()})
        self.cross = list(b.cross)
        self.cross_strides = [math.prod(rows[m] for m in self.cross[i + 1 :]) for i in range(len(self.cross))]
        self.cross_table = nn.Embedding(math.prod(rows[n] for n in self.cross), b.dim, sparse=True) if self.cross else None
        n_in = b.dim * (len(self.tables) + (1 if self.cross else 0))
        n_out = sum(t.bias for t in config.tasks)
        self.mlp = nn.Sequential(nn.Linear(max(n_in, 1), b.hidden), nn.ReLU(), nn.Linear(b.hidden, n_out))
        nn.init.zeros_(self.mlp[2].weight)  # starts neutral
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, position_rows: Tensor, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ids = {n: inputs[n] for n in self.features}
        if self.use_position:
            ids[POSITION] = position_rows
        parts = [self.tables[n](ids[n]) for n in self.features]
        if self.use_position:
            parts.append(self.tables[POSITION](position_rows))
        if self.cross_table is not None:
            joint = sum(ids[n] * stride for n, stride in zip(self.cross, self.cross_strides))
            parts.append(self.cross_table(joint))
        if not parts:
            x = torch.zeros(position_rows.shape[0], 1, device=position_rows.device)
        else:
            x = torch.cat(parts, dim=1)
        hidden = self.mlp[1](self.mlp[0](x))  # (B, hidden)
        return self.mlp[2](hidden), hidden


class PositionFeature(nn.Module):
    """`[bias] mode = "feature"`: the position as a plain input of the model, missing at serving.

    An embedding of the slot enters the experts' first layer and the gates as an
    additive term, which is what concatenating it to the shared input would do
    (both are linear there). Row 0 ("unknown slot") is zero and fixed, so the
    exported `Ranker`, which has no position input, is exactly this model with the
    position missing; `[bias] dropout` hides it in that share of training examples
    so the model learns the missing case.

    forward: position rows (B,) -> (expert offset (B, E*H0), gate offset (B, T*E) or None)
    """

    def __init__(self, config: Config, ranker: Ranker):
        super().__init__()
        b = config.bias
        self.table = nn.Embedding(b.max_position + 2, b.dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.table.weight, std=EMBEDDING_INIT_STD)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.to_experts = nn.Linear(b.dim, ranker.experts.first.out_features, bias=False)
        self.to_gates = nn.Linear(b.dim, ranker.gates.linear.out_features, bias=False) if ranker.gates is not None else None

    def forward(self, position_rows: Tensor) -> tuple[Tensor, Tensor | None]:
        e = self.table(position_rows)  # (B, dim); zero for row 0
        return self.to_experts(e), (self.to_gates(e) if self.to_gates is not None else None)


class RankerTrain(nn.Module):
    """Ranker + shallow tower + masked multitask loss. Only `ranker` is exported.

    The shallow tower's logit is added to the logits of the tasks with `bias = true`
    (binary tasks without `given` by default). Against a logging policy that placed
    the relevant items high, so that the tower could absorb relevance (Zhang et al.,
    KDD 2023, "Towards Disentangling Relevance and Bias in Unbiased Learning to Rank"):

    * observation dropout (`[bias] observation_dropout` = p): in training, the
      tower's whole logit (its output, not only its position input) is dropped
      for a share p of the examples, which the relevance model must then explain
      alone. The kept logits are not rescaled: the logit is an additive offset,
      and serving drops it for every example.
    * gradient reversal (`[bias] gradient_reversal` = lambda > 0): an adversary, a
      linear head on the tower's hidden state, learns to predict the relevance
      model's logit of each biased task (detached: the adversary's label, not a
      path into the relevance model) with a squared error. Between the hidden state
      and the adversary sits a gradient reversal layer: the adversary descends its
      loss, the tower's layers below receive that gradient times -lambda, i.e. they
      ascend it, so the tower learns what explains clicks and not what predicts
      relevance. The adversary's loss is added to the returned loss
      (`out["adversary_loss"]`).

    forward: inputs {name: tensor} (as `Ranker`'s), labels (B, T), mask (B, T), position (B,)
             -> loss (), out {name: tensor} (see `forward`)
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.ranker = Ranker(config)
        tasks = config.tasks
        b = config.bias
        self.bias_idx = [i for i, t in enumerate(tasks) if t.bias]
        has_tower = bool(b.tower_features) and bool(self.bias_idx)
        self.bias = ShallowTower(config) if has_tower else None
        self.adversary = nn.Linear(b.hidden, len(self.bias_idx)) if has_tower and b.gradient_reversal > 0 else None
        self.position_feature = PositionFeature(config, self.ranker) if b.mode == "feature" else None
        self.register_buffer("loss_weight", torch.tensor([t.loss_weight for t in tasks]))
        self.register_buffer("is_binary", torch.tensor([t.kind == TaskKind.BINARY for t in tasks]))
        self.register_buffer("is_log1p", torch.tensor([t.transform == "log1p" for t in tasks]))
        self.register_buffer("bias_index", torch.tensor(self.bias_idx, dtype=torch.long), persistent=False)
        self.given = [(i, config.task_index(t.given)) for i, t in enumerate(tasks) if t.given]
        self.shard = None  # data-parallel training only (training/distributed.py): see `set_shard`

    def set_shard(self, shard) -> None:
        """Data-parallel training (`training.distributed.RowShard`, None: one process): this rank holds rows
        [offset, offset + n) of a global batch; the loss's label counts, the running statistics and the dropout
        draws are then those of the global batch, so the ranks' gradients sum to the one-process gradient."""
        self.shard = shard
        if self.ranker.gates is not None:
            self.ranker.gates.shard = shard

    def _rand(self, shape: tuple[int, ...] | torch.Size, device: torch.device) -> Tensor:
        return torch.rand(shape, device=device) if self.shard is None else self.shard.rand(shape, device)

    def task_mask(self, labels: Tensor, mask: Tensor) -> Tensor:
        """Where each task's label counts: known, and its `given` task is positive. (B, T)"""
        m = mask.clone()
        for i, g in self.given:
            m[:, i] = m[:, i] * mask[:, g] * (labels[:, g] == 1).to(m.dtype)
        return m

    def position_rows(self, position: Tensor, train: bool) -> Tensor:
        """Slot -> embedding row (0: unknown), hidden in `[bias] dropout` of the examples in training."""
        rows = torch.where(position < 0, torch.zeros_like(position), position.clamp(max=self.config.bias.max_position) + 1)
        p = self.config.bias.dropout
        if train and p > 0:
            hide = self._rand(rows.shape, rows.device) < p
            rows = torch.where(hide, torch.zeros_like(rows), rows)
        return rows

    def forward(
        self,
        inputs: dict[str, Tensor],
        labels: Tensor,
        mask: Tensor,
        position: Tensor,
        train: bool = True,
        weight: Tensor | None = None,
        bce_target: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (loss, out) where out holds `heads` (serving, B×T), `full` (with bias, B×T),
        per-task `losses` (T,), `gates` (B, T, E), the task `mask` (B, T), `bias_logits`
        (B, T_bias, as added: after observation dropout; absent without a tower) and
        `adversary_loss` (with gradient reversal).

        `weight` (B,) or (B, T), optional: each example's weight in the loss (e.g. inverse
        propensities); a task's loss stays the weighted sum over the count of its labels.
        `bce_target` (B, T), optional: the binary tasks' cross-entropy targets in place of the labels
        (which are clamped to [0, 1]); inverse-propensity targets click / p may exceed 1. The labels
        still decide the task mask (`given`).
        """
        r = self.ranker
        b = self.config.bias
        sh = self.shard
        if train and r.shared_input.n_numeric:  # features only: no label reaches the scores early
            if sh is None:
                r.shared_input.numeric_norm.update(inputs["numeric"], inputs["numeric_mask"])
            else:
                r.shared_input.numeric_norm.update(*sh.numeric)  # the global batch's rows
        tmask = self.task_mask(labels, mask)
        target = torch.where(self.is_log1p, torch.log1p(labels.clamp_min(0)), labels)  # (B, T)
        rows = self.position_rows(position, train) if (self.bias is not None or self.position_feature is not None) else None
        side = self.position_feature(rows) if self.position_feature is not None else None
        raw, gates = r.raw(inputs, train_gates=train, side=side)  # (B, T)
        with torch.no_grad():  # scored before the labels move the target statistics
            heads = r.heads(r.raw(inputs)[0]) if side is not None else r.heads(raw)  # serving: position missing
        if train:
            reg_mask = tmask * (~self.is_binary).to(tmask.dtype)
            if sh is None:
                r.heads.target_norm.update(target, reg_mask)
            else:
                r.heads.target_norm.update(*sh.targets)
        logits = full_logits = raw
        extra: dict[str, Tensor] = {}
        adv_loss = None
        if self.bias is not None:
            bias_logits, hidden = self.bias(rows, inputs)  # (B, T_bias), (B, hidden)
            full_logits = raw.index_add(1, self.bias_index, bias_logits.detach())
            if train and b.observation_dropout > 0:
                keep = (self._rand((bias_logits.shape[0], 1), raw.device) >= b.observation_dropout)
                bias_logits = bias_logits * keep.to(bias_logits.dtype)
            logits = raw.index_add(1, self.bias_index, bias_logits)
            extra["bias_logits"] = bias_logits
            if self.adversary is not None:
                guess = self.adversary(reverse_grad(hidden, b.gradient_reversal))  # (B, T_bias)
                adv_sq = (guess - raw[:, self.bias_index].detach()) ** 2
                adv_loss = adv_sq.mean() if sh is None else adv_sq.sum() / (sh.total * adv_sq.shape[1])
                extra["adversary_loss"] = adv_loss.detach()
        scaled_target = r.heads.target_norm.scale(target)
        bce = F.binary_cross_entropy_with_logits(logits, labels.clamp(0, 1) if bce_target is None else bce_target,
                                                 reduction="none")
        se = (raw - scaled_target) ** 2
        per = torch.where(self.is_binary, bce, se)  # (B, T)
        if weight is not None:
            per = per * (weight[:, None] if weight.dim() == 1 else weight)
        counts = tmask.sum(0) if sh is None else sh.label_counts  # over the global batch when sharded
        losses = (per * tmask).sum(0) / counts.clamp_min(1)  # (T,)
        loss = (losses * self.loss_weight).sum()
        if adv_loss is not None:
            loss = loss + adv_loss
        with torch.no_grad():
            full = torch.where(self.is_binary, torch.sigmoid(full_logits), heads)
        return loss, {"heads": heads, "full": full, "losses": losses, "gates": gates, "mask": tmask, **extra}
