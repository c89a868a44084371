"""The MMoE ranker (Ma et al., KDD 2018; Zhao et al., RecSys 2019) and its shallow tower.

`Ranker` is exactly what is exported: encoded features in, every head out in
its label's units. `RankerTrain` wraps it with the shallow tower (position and
device bias, training only) and the masked multitask loss.

Shapes: B batch, T tasks, E experts, D shared input width, H expert output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from watchnext.config import POSITION, Config
from watchnext.encoding import Encoder

EPS = 1e-6
EMBEDDING_INIT_STD = 0.15  # measured: 0.05 made learning users' tastes a matter of luck (click AUC 0.778-0.806 over seeds)


class RunningNorm(nn.Module):
    """Per-column mean and variance learned from the stream (Chan's parallel update).

    Carried by the model as buffers, so the exported graph standardises its own inputs.
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


class ExpertBank(nn.Module):
    """E parallel MLPs over one input: a single matmul, then batched matmuls.

    forward: (B, D) -> (E, B, H)
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

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.first(x))  # (B, E*H0)
        h = h.view(-1, self.experts, self.width).transpose(0, 1)  # (E, B, H0)
        for w, b in zip(self.weights, self.biases):
            h = F.relu(torch.matmul(h, w) + b)  # (E, B, Hi)
        return h


class TowerBank(nn.Module):
    """T towers of the same shape as batched matmuls, each ending in one output.

    forward: (T, B, H) -> (B, T)
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


class Ranker(nn.Module):
    """Encoded features -> every task's head. This module is what ONNX exports.

    Example:
        >>> ranker = Ranker(load_config())
        >>> heads = ranker(*[torch.from_numpy(a) for a in encoded.values()])  # T tensors of (B,)
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        specs = Encoder(config).input_specs()
        self.input_names = [name for name, _, _ in specs]
        self.task_names = [t.name for t in config.tasks]
        self.cat_names = [f.name for f in config.features_of("categorical")]
        self.list_names = [f.name for f in config.features_of("categorical_list")]
        self.vec_names = [f.name for f in config.features_of("vector")]
        self.n_numeric = len(config.features_of("numeric"))
        # features that name the same things (video ids as candidate, query and history)
        # share one table, so what is learned about a video in one role serves the others
        self.table_of = {
            f.name: f.table or f.name for f in config.features if f.kind in ("categorical", "categorical_list")
        }
        self.embeddings = nn.ModuleDict(
            {
                f.name: nn.Embedding(f.buckets + 1, f.dim, padding_idx=0, sparse=True)
                for f in config.features
                if f.kind in ("categorical", "categorical_list") and f.table is None
            }
        )
        for emb in self.embeddings.values():
            nn.init.normal_(emb.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                emb.weight[0].zero_()
        # Pairwise dot products between fields (as in DLRM / factorisation machines), in
        # several heads: MLPs learn user-by-item products poorly, and different tasks need
        # different products (what a user clicks is not what satisfies them).
        self.interact = config.model.interactions
        k, H = config.model.interaction_dim, config.model.interaction_heads
        fields = [f for f in config.features if f.kind != "numeric"]
        self.field_names = [f.name for f in fields]
        self.heads_k = (H, k)
        self.projections = nn.ModuleDict(
            {f.name: nn.Linear(f.size if f.kind == "vector" else f.dim, H * k, bias=False) for f in fields}
            if self.interact
            else {}
        )
        n_fields = len(fields)
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pair_index", rows * n_fields + cols, persistent=False)
        n_pairs = n_fields * (n_fields - 1) // 2
        self.numeric_norm = RunningNorm(self.n_numeric)
        T = len(config.tasks)
        self.target_norm = RunningNorm(T)  # used for regression tasks only
        self.register_buffer("is_binary", torch.tensor([t.kind == "binary" for t in config.tasks]))
        self.register_buffer("is_log1p", torch.tensor([t.transform == "log1p" for t in config.tasks]))
        d_in = (
            sum(f.dim for f in config.features if f.kind in ("categorical", "categorical_list"))
            + 2 * self.n_numeric
            + sum(f.size for f in config.features_of("vector"))
            + (n_pairs * H if self.interact else 0)
        )
        m = config.model
        self.mmoe = m.arch == "mmoe"
        self.n_experts = m.experts if self.mmoe else 1
        self.expert_dropout = m.expert_dropout if self.mmoe else 0.0
        self.experts = ExpertBank(d_in, m.expert_layers, self.n_experts)
        self.gates = nn.Linear(d_in, T * self.n_experts) if self.mmoe else None
        self.towers = TowerBank(T, self.experts.out_dim, m.tower_layers)
        self.d_in = d_in

    # ------------------------------------------------------------ pieces
    def shared_input(self, inputs: dict[str, Tensor]) -> Tensor:
        """Embeddings, pooled lists, scaled numerics and vectors, concatenated: (B, D)."""
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
        if self.interact:
            H, k = self.heads_k
            f = torch.stack([self.projections[n](field[n]) for n in self.field_names], dim=1)  # (B, F, H*k)
            B, F = f.shape[0], f.shape[1]
            f = f.view(B, F, H, k).transpose(1, 2).reshape(B * H, F, k)  # (B*H, F, k)
            dots = torch.bmm(f, f.transpose(1, 2)).view(B, H, F * F)  # (B, H, F*F)
            parts.append(dots[:, :, self.pair_index].reshape(B, -1))  # (B, H * F(F-1)/2)
        return torch.cat(parts, dim=1)

    def raw(self, inputs: dict[str, Tensor], train_gates: bool = False) -> tuple[Tensor, Tensor]:
        """Raw outputs (B, T) (logits; standardised regression targets) and gates (B, T, E)."""
        x = self.shared_input(inputs)  # (B, D)
        experts = self.experts(x)  # (E, B, H)
        B = x.shape[0]
        T = len(self.task_names)
        if self.gates is not None:
            gates = torch.softmax(self.gates(x).view(B, T, self.n_experts), dim=-1)  # (B, T, E)
            if train_gates and self.expert_dropout > 0:
                gates = _drop_experts(gates, self.expert_dropout)
            mixed = torch.bmm(gates, experts.transpose(0, 1))  # (B, T, H)
            mixed = mixed.transpose(0, 1)  # (T, B, H)
        else:
            gates = torch.ones(B, T, 1, device=x.device)
            mixed = experts.expand(T, -1, -1)  # (T, B, H)
        return self.towers(mixed), gates

    def heads(self, raw: Tensor) -> Tensor:
        """Raw outputs (B, T) -> label units (B, T)."""
        reg = self.target_norm.unscale(raw)
        reg = torch.where(self.is_log1p, (torch.exp(reg) - 1.0).clamp_min(0.0), reg)  # no expm1 in ONNX
        return torch.where(self.is_binary, torch.sigmoid(raw), reg)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Inputs in `input_names` order; one (B,) output per task, in `task_names` order."""
        out = self.heads(self.raw(dict(zip(self.input_names, tensors)))[0])  # (B, T)
        return tuple(out[:, j] for j in range(out.shape[1]))


def _drop_experts(gates: Tensor, p: float) -> Tensor:
    """Zero each expert's weight with probability p and renormalise (against gate polarisation)."""
    keep = (torch.rand_like(gates) >= p).to(gates.dtype)
    none_left = keep.sum(-1, keepdim=True) == 0
    keep = torch.where(none_left, torch.ones_like(keep), keep)
    g = gates * keep
    return g / g.sum(-1, keepdim=True).clamp_min(EPS)


class ShallowTower(nn.Module):
    """Bias features (position, device, ...) -> one logit per binary task, added in training.

    forward: positions (B,) int64 (-1 unknown), bias ids {name: (B,)} -> (B, T_binary)
    """

    def __init__(self, config: Config):
        super().__init__()
        b = config.bias
        self.max_position = b.max_position
        self.features = [n for n in b.features if n != POSITION]
        self.use_position = POSITION in b.features
        tables = {n: nn.Embedding(config.feature(n).buckets + 1, b.dim, sparse=True) for n in self.features}
        if self.use_position:
            tables[POSITION] = nn.Embedding(b.max_position + 2, b.dim, sparse=True)
        self.tables = nn.ModuleDict(tables)
        n_in = b.dim * len(tables)
        n_bin = len(config.binary_tasks)
        self.mlp = nn.Sequential(nn.Linear(max(n_in, 1), b.hidden), nn.ReLU(), nn.Linear(b.hidden, n_bin))
        nn.init.zeros_(self.mlp[2].weight)  # starts neutral
        nn.init.zeros_(self.mlp[2].bias)

    def position_rows(self, position: Tensor) -> Tensor:
        return torch.where(position < 0, torch.zeros_like(position), position.clamp(max=self.max_position) + 1)

    def forward(self, position_rows: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        parts = [self.tables[n](inputs[n]) for n in self.features]
        if self.use_position:
            parts.append(self.tables[POSITION](position_rows))
        if not parts:
            return torch.zeros(position_rows.shape[0], self.mlp[2].out_features, device=position_rows.device)
        return self.mlp(torch.cat(parts, dim=1))


class RankerTrain(nn.Module):
    """Ranker + shallow tower + masked multitask loss. Only `ranker` is exported."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.ranker = Ranker(config)
        self.bias = ShallowTower(config) if config.bias.features else None
        tasks = config.tasks
        self.binary_idx = [i for i, t in enumerate(tasks) if t.kind == "binary"]
        self.register_buffer("loss_weight", torch.tensor([t.loss_weight for t in tasks]))
        self.register_buffer("is_binary", torch.tensor([t.kind == "binary" for t in tasks]))
        self.register_buffer("is_log1p", torch.tensor([t.transform == "log1p" for t in tasks]))
        self.given = [(i, config.task_index(t.given)) for i, t in enumerate(tasks) if t.given]

    def task_mask(self, labels: Tensor, mask: Tensor) -> Tensor:
        """Where each task's label counts: known, and its `given` task is positive. (B, T)"""
        m = mask.clone()
        for i, g in self.given:
            m[:, i] = m[:, i] * mask[:, g] * (labels[:, g] == 1).to(m.dtype)
        return m

    def forward(
        self, inputs: dict[str, Tensor], labels: Tensor, mask: Tensor, position: Tensor, train: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (loss, out) where out holds `heads` (serving, B×T), `full` (with bias, B×T),
        per-task `losses` (T,), `gates` (B, T, E) and the task `mask` (B, T)."""
        r = self.ranker
        if train and r.n_numeric:  # features only: no label reaches the scores early
            r.numeric_norm.update(inputs["numeric"], inputs["numeric_mask"])
        tmask = self.task_mask(labels, mask)
        target = torch.where(self.is_log1p, torch.log1p(labels.clamp_min(0)), labels)  # (B, T)
        raw, gates = r.raw(inputs, train_gates=train)  # (B, T)
        with torch.no_grad():  # scored before the labels move the target statistics
            heads = r.heads(raw)
        if train:
            r.target_norm.update(target, tmask * (~self.is_binary).to(tmask.dtype))
        logits = raw
        if self.bias is not None:
            rows = self.bias.position_rows(position)
            if train and self.config.bias.dropout > 0:
                hide = torch.rand(rows.shape, device=rows.device) < self.config.bias.dropout
                rows = torch.where(hide, torch.zeros_like(rows), rows)
            bias_logits = self.bias(rows, inputs)  # (B, T_binary)
            logits = raw.index_add(1, torch.tensor(self.binary_idx, device=raw.device), bias_logits)
        scaled_target = r.target_norm.scale(target)
        bce = F.binary_cross_entropy_with_logits(logits, labels.clamp(0, 1), reduction="none")
        se = (raw - scaled_target) ** 2
        per = torch.where(self.is_binary, bce, se)  # (B, T)
        losses = (per * tmask).sum(0) / tmask.sum(0).clamp_min(1)  # (T,)
        loss = (losses * self.loss_weight).sum()
        with torch.no_grad():
            full = torch.where(self.is_binary, torch.sigmoid(logits), heads)
        return loss, {"heads": heads, "full": full, "losses": losses, "gates": gates, "mask": tmask}
