"""Data-parallel training over torch.distributed: one model, N processes (`torchrun --nproc_per_node=N`).

Used only when a process group of more than one rank is running; a single process never comes here.

* Rows: every step is one global batch, the union of the ranks' batches in rank order (rank 0's rows first).
  The files trainer cuts the input into global batches of N x `batch_size` rows in time order and gives rank
  r the r-th contiguous slice (`share`), so N ranks x b rows train exactly as one process x N*b rows. (Every
  rank still reads and decodes every line, keeping its slice; reading only its own lines is not done yet.)
* Loss: each task's loss is a mean over the labels present in the global batch. Every rank sums its own rows'
  terms and divides by the global count (an all-reduce of the per-task label counts), so the sum of the
  ranks' losses is the one-process loss and the sum of their gradients is its gradient.
* Gradients are summed with collectives, not DistributedDataParallel (whose reducer does not take the sparse
  gradients of `nn.Embedding(sparse=True)` in general): the dense ones in one flat all-reduce; each sparse
  one by an all-gather of its coalesced (row, values), put together and coalesced again, so `SparseAdam`
  sees the union of the rows touched on any rank, each with the sum of its gradients, as in one process.
* What moves statistics or draws random numbers sees the global batch: the running normalisations are
  updated with the all-gathered rows; dropout masks are drawn for the whole global batch from the same
  seeded generator on every rank, each rank keeping its own rows; the examined-position counts, the
  inverse propensities, the progressive metrics and the exactly-once digest are computed over the gathered
  rows. Parameters, optimiser state, buffers and RNG therefore stay identical on every rank.
* Uneven input: each step begins with an all-reduce of the ranks' row counts; a rank without rows takes
  part with none (no forward pass; afterwards it copies the buffers and RNG state of the first rank that had
  rows), and `finish` keeps a rank that has run out answering until no rank has rows left.
* The sharded Redis stream (training/stream_worker.py) steps through the same `step`, and takes its decisions
  (step, checkpoint, export, stop) together with `agree`, one all-reduce of flags per iteration.
* A dead rank: its peers' next collective fails (`peer_lost`), at once when its connections close (kill -9),
  else after COLLECTIVE_TIMEOUT; torchrun stops the others, and the same command resumes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from watchnext.encoding import Labels
from watchnext.examples import Chunk

if TYPE_CHECKING:
    from .trainer import Trainer


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def active() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# How long a collective waits for the other ranks before it fails (torch's own default is 30 minutes). It covers
# the longest a rank works alone while the others wait in a collective: rank 0 writing a checkpoint or exporting a
# version. A rank killed mid-run fails its peers' next collective at once (gloo sees the connection close, and
# torchrun then stops them); the timeout bounds the wait where nothing closes (a rank frozen, a host gone).
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


def init_from_env(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): start the process group (nccl on CUDA, gloo otherwise; collectives time out
    after COLLECTIVE_TIMEOUT) and return this rank's device (cuda:LOCAL_RANK on CUDA). A single process:
    `device` unchanged, nothing started."""
    if world_size_from_env() <= 1 or dist.is_initialized():
        return device
    # Imported before the group starts, not after: torch._dynamo (which building an optimiser imports) brings in
    # torch.distributed._shard, and imported while a group runs that keeps the group's C++ half alive past
    # destroy_process_group. Its gloo threads then live on into the interpreter's exit, where one still at work can
    # end the rank with SIGABRT ("terminate called without an active exception") after its work is done (seen once
    # in the tests). The tests check that no thread of the group is left after `shutdown`.
    import torch._dynamo  # noqa: F401
    timeout = COLLECTIVE_TIMEOUT
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def rank_world() -> tuple[int, int]:
    """(this rank, the number of ranks): (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def agree(values: list[int], device: torch.device | None = None) -> list[int]:
    """Each value summed over the ranks (one all-reduce; itself in a single process). Flags (0/1) summed say how
    many ranks raised each: > 0 any, == world every. Every rank must call it at the same point."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device or torch.device("cpu"))
    dist.all_reduce(t)
    return [int(x) for x in t.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (`obj` itself in a single process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out",
              "Connection refused")


def peer_lost(e: BaseException) -> bool:
    """`e`, raised by a collective, says another rank is gone (it died, or timed out: COLLECTIVE_TIMEOUT)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_LOST))


def shutdown() -> None:
    """End the process group (every rank, at the end of its work): its threads end here, not at the exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(batch: Chunk, rank: int, world: int) -> Chunk:
    """Rank `rank`'s contiguous slice of a global batch: ceil(len / world) rows each (b of a whole batch of
    world x b), the last ranks fewer, maybe none, in a short tail. In rank order the slices are the batch."""
    b = -(-len(batch) // world)
    return batch.take(slice(min(rank * b, len(batch)), min((rank + 1) * b, len(batch))))


class RowShard:
    """This step's rows over the ranks: `counts[r]` rows on rank r; this rank's are global rows
    [offset, offset + n). Set as `RankerTrain`'s `shard` for the forward pass, which makes no collective."""

    def __init__(self, counts: list[int], rank: int):
        self.counts = counts
        self.rank = rank
        self.total = sum(counts)
        self.offset = sum(counts[:rank])
        self.n = counts[rank]
        # the global batch's, set by `_step` before the forward pass (which then needs no collective, so a
        # rank without rows, which runs none, stays in step): (numeric, numeric_mask), (target, regression
        # mask) for the running statistics, and each task's label count (the loss's denominators)
        self.numeric: tuple[torch.Tensor, torch.Tensor] | None = None
        self.targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self.label_counts: torch.Tensor | None = None

    def rand(self, shape: torch.Size | tuple[int, ...], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """torch.rand of `shape` (rows first) as this rank's rows of one draw for the whole global batch."""
        full = torch.rand((self.total, *shape[1:]), device=device, dtype=dtype)
        return full[self.offset:self.offset + self.n]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch's rows of `t` (this rank's are its first dimension), in rank order."""
        kind = t.dtype
        x = t.to(torch.uint8) if kind == torch.bool else t
        m = max(self.counts)
        pad = x.new_zeros((m, *x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in self.counts]
        dist.all_gather(parts, pad.contiguous())
        out = torch.cat([p[:c] for p, c in zip(parts, self.counts)])
        return out.to(kind) if kind == torch.bool else out

    @staticmethod
    def sum(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out)
        return out


def row_counts(n: int, device: torch.device) -> list[int]:
    """Every rank's row count for this step (one all-reduce): the has-data flag of each."""
    c = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    c[dist.get_rank()] = n
    dist.all_reduce(c)
    return [int(x) for x in c.tolist()]


_META = ("position", "ts", "line", "end_offset", "end_line", "file_index", "propensity", "explore_rank")


def gather_meta(chunk: Chunk | None, shard: RowShard, tasks: int, device: torch.device) -> Chunk:
    """The global batch's labels and row fields (no inputs), gathered in one collective (float64 holds every
    int64 field exactly: lines and offsets stay far below 2**53)."""
    if chunk is None or len(chunk) == 0:
        cols = np.zeros((0, 2 * tasks + len(_META)))
    else:
        cols = np.concatenate([chunk.labels.values.astype(np.float64), chunk.labels.mask.astype(np.float64),
                               np.stack([getattr(chunk, f).astype(np.float64) for f in _META], axis=1)], axis=1)
    g = shard.gather(torch.from_numpy(np.ascontiguousarray(cols)).to(device)).cpu().numpy()
    ref = chunk if chunk is not None and len(chunk) else None
    vdt = ref.labels.values.dtype if ref is not None else np.float32
    mdt = ref.labels.mask.dtype if ref is not None else np.float32
    fields = {f: g[:, 2 * tasks + i].astype(np.float64 if f in ("ts", "propensity") else np.int64)
              for i, f in enumerate(_META)}
    return Chunk({}, Labels(g[:, :tasks].astype(vdt), g[:, tasks:2 * tasks].astype(mdt)),
                 group=np.zeros(len(g), np.uint64), **fields)


def reduce_gradients(trainer: Trainer) -> None:
    """Sum every parameter's gradient over the ranks (identical on all of them afterwards)."""
    net = trainer.net
    sparse = [p for g in (trainer.opt_sparse.param_groups if trainer.opt_sparse is not None else []) for p in g["params"]]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in net.parameters() if id(p) not in sparse_ids]
    dev = next(net.parameters()).device
    # dense: one flat all-reduce, with a has-gradient flag per parameter at its end
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense]
                     + [torch.tensor([float(p.grad is not None) for p in dense], device=dev)])
    dist.all_reduce(flat)
    flags = flat[-len(dense):]
    at = 0
    for i, p in enumerate(dense):
        n = p.numel()
        p.grad = flat[at:at + n].view_as(p).clone() if flags[i] > 0 else None
        at += n
    # sparse: all-gather each table's coalesced (row, values); the union, coalesced, is the sum
    world = dist.get_world_size()
    locs = []
    for p in sparse:
        g = p.grad.coalesce() if p.grad is not None else None
        locs.append(g)
    sizes = torch.tensor([[g.indices().shape[1] if g is not None else 0, float(g is not None)] for g in locs],
                         dtype=torch.int64, device=dev).reshape(len(sparse), 2)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes)
    for j, (p, g) in enumerate(zip(sparse, locs)):
        counts = [int(e[j, 0]) for e in every]
        if not any(int(e[j, 1]) for e in every):
            p.grad = None
            continue
        dim = p.shape[1]
        if g is None:
            rows = torch.zeros((0, dim + 1), dtype=torch.float64, device=dev)
        else:
            rows = torch.cat([g.indices()[0].to(torch.float64)[:, None], g.values().to(torch.float64)], dim=1)
        allrows = RowShard([max(c, 0) for c in counts], dist.get_rank()).gather(rows) if sum(counts) else rows[:0]
        idx = allrows[:, 0].to(torch.int64)[None]
        vals = allrows[:, 1:].to(p.dtype)
        p.grad = torch.sparse_coo_tensor(idx, vals, p.shape, check_invariants=False).coalesce()


def _broadcast_state(trainer: Trainer, src: int) -> None:
    """Copy the buffers and RNG state of rank `src` (a rank that ran the forward pass) to every rank."""
    for b in trainer.net.buffers():
        dist.broadcast(b.data, src)
    rng = torch.get_rng_state()
    dist.broadcast(rng, src)
    torch.set_rng_state(rng)
    if trainer.device.type == "cuda":
        crng = torch.cuda.get_rng_state(trainer.device).to(trainer.device)
        dist.broadcast(crng, src)
        torch.cuda.set_rng_state(crng.cpu(), trainer.device)


def step(trainer: Trainer, chunk: Chunk | None, ids: np.ndarray | None, id_width: int = 2) -> float | None:
    """`Trainer.step` over the ranks: this rank's rows `chunk` (None or empty: none this step). Every rank must
    call it once per step. `ids`: (rows, id_width) int64 naming the rows for the digest; every rank gives the
    same `id_width` (files: file, line; the stream: shard, ms, seq). Returns the global batch's loss, None when
    it was skipped (not finite) or no rank had rows."""
    n = 0 if chunk is None else len(chunk)
    counts = row_counts(n, trainer.device)
    if sum(counts) == 0:  # no rank has rows (the stream's entries were all bad): nothing to step
        return None
    return _step(trainer, chunk if n else None, ids if n else None, counts, id_width)


def finish(trainer: Trainer) -> None:
    """Called by a rank whose input has ended: takes part, without rows, in the steps of the ranks that still
    have some, until none has (then every rank has returned from here or is returning)."""
    while True:
        counts = row_counts(0, trainer.device)
        if sum(counts) == 0:
            return
        _step(trainer, None, None, counts)


def _step(trainer: Trainer, chunk: Chunk | None, ids: np.ndarray | None, counts: list[int],
          id_width: int = 2) -> float | None:
    net, dev, config = trainer.net, trainer.device, trainer.config
    rank = dist.get_rank()
    shard = RowShard(counts, rank)
    T = len(config.tasks)
    meta = gather_meta(chunk, shard, T, dev)
    tens = trainer.tensors(chunk) if chunk is not None else None
    norm = net.ranker.shared_input.numeric_norm if net.ranker.shared_input.n_numeric else None
    if norm is not None:
        k = norm.mean.shape[0]
        own = (tens[0] if tens is not None else
               {"numeric": torch.zeros(0, k, device=dev), "numeric_mask": torch.zeros(0, k, device=dev)})
        shard.numeric = (shard.gather(own["numeric"]), shard.gather(own["numeric_mask"]))
    labels_all = torch.from_numpy(meta.labels.values).to(dev)
    tmask = net.task_mask(labels_all, torch.from_numpy(meta.labels.mask).to(dev))
    target = torch.where(net.is_log1p, torch.log1p(labels_all.clamp_min(0)), labels_all)
    shard.targets = (target, tmask * (~net.is_binary).to(tmask.dtype))
    shard.label_counts = tmask.sum(0)
    net.train()
    stats = [b.detach().clone() for b in net.buffers()]
    trainer.zero_grad()
    out: dict[str, torch.Tensor] = {}
    local = torch.zeros(1, device=dev)
    if tens is not None:
        inputs, labels, mask, position = tens
        weight, bce_target = trainer.ipw_terms(meta, labels_all)
        rows = slice(shard.offset, shard.offset + shard.n)
        weight = None if weight is None else weight[rows]
        bce_target = None if bce_target is None else bce_target[rows]
        net.set_shard(shard)
        try:
            loss, out = net(inputs, labels, mask, position, train=True, weight=weight, bce_target=bce_target)
        finally:
            net.set_shard(None)
        loss.backward()
        local = loss.detach().reshape(1).to(torch.float32)
    reduce_gradients(trainer)
    total_loss = RowShard.sum(local)
    finite = torch.tensor([float(trainer._finite(total_loss[0]))], device=dev)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    s = trainer.state
    if finite.item() < 1:
        with torch.no_grad():
            for b, kept in zip(net.buffers(), stats):
                b.copy_(kept)
        trainer.zero_grad()
        if 0 in counts:
            _broadcast_state(trainer, next(r for r, c in enumerate(counts) if c))
        s.skipped_batches += 1
        s.skipped_examples += shard.total
        return None
    trainer.opt_dense.step()
    if trainer.opt_sparse is not None:
        trainer.opt_sparse.step()
    if 0 in counts:  # a rank without rows ran no forward pass: statistics and RNG from one that did
        _broadcast_state(trainer, next(r for r, c in enumerate(counts) if c))
    E = net.ranker.n_experts
    empty = {"heads": torch.zeros(0, T, device=dev), "full": torch.zeros(0, T, device=dev),
             "mask": torch.zeros(0, T, device=dev), "gates": torch.zeros(0, T, E, device=dev)}
    got = {k: shard.gather((out[k] if out else empty[k]).detach().to(torch.float32)).cpu().numpy()
           for k in ("heads", "full", "mask", "gates")}
    trainer.metrics.add(got["heads"], got["full"], meta.labels.values, got["mask"], got["gates"])
    id_rows = np.zeros((0, id_width), np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64).reshape(len(ids), -1)
    all_ids = shard.gather(torch.from_numpy(id_rows).to(dev)).cpu().numpy()
    s.digest = hashlib.blake2b(s.digest.encode() + np.ascontiguousarray(all_ids).tobytes(), digest_size=16).hexdigest()
    s.examples += shard.total
    s.batches += 1
    s.last_ts = max(s.last_ts, float(meta.ts.max()))
    trainer._count_explored(meta)
    return float(total_loss[0])
