"""The streaming trainer: one pass over examples in time order.

One loop with explicit steps: read and encode a chunk (in a background
thread), cut it into batches, and for each batch score it (progressive
validation), then train on it. Checkpoints are atomic and hold the model, the
optimisers, the normalisation statistics, the RNG state and the exact input
position, so a run killed at any moment resumes without training any example
twice or skipping one. `digest` chains the ids of every trained example, so
tests can prove it.

Nothing non-finite is kept: a batch whose loss or gradients are not finite is
skipped (no optimiser step, running statistics put back) and counted, and a
checkpoint or export holding NaN/Inf parameters is refused. A checkpoint ends
with the sha256 of its payload; an empty, truncated, damaged or foreign file,
or one saved under another `Config.checkpoint_hash`, is refused with one line.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from watchnext.config import Config, ConfigError, TaskKind, config_from_dict
from watchnext.errors import WatchnextError
from watchnext.examples import Chunk, Decoder, ExampleFiles, Position, first_ts
from watchnext.repository import ModelRepository, atomic_write
from watchnext.runtime import usable_cpus

from . import distributed
from .export import publish
from .model import RankerTrain, upgrade_state_dict
from .progressive import ProgressiveMetrics
from .propensity import Examination, SwapCounts, curve_examination, ipw_weights, unbiased_target

FORMAT = 2
TRAILER = b"\nwatchnext-checkpoint sha256="  # + 64 hex digits of the payload's sha256 + "\n": the file's end
TRAILER_LEN = len(TRAILER) + 64 + 1
START_OVER = "delete it or train with --fresh to start a new model"


class CheckpointError(WatchnextError):
    """A checkpoint that cannot be used or written; the message names the file (the CLI prints one line)."""


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    examples: int = 0
    batches: int = 0
    digest: str = ""  # chained hash of the ids of all trained examples
    last_ts: float = float("-inf")
    source: dict[str, Any] = field(default_factory=dict)  # files + position, or stream + last id
    bad_lines: int = 0
    parent_version: int | None = None
    exported_at_examples: int = 0
    skipped_batches: int = 0  # loss or gradients not finite: not trained on
    skipped_examples: int = 0
    explore_counts: dict = field(default_factory=dict)  # SwapCounts.state(): explored impressions by rank/position


class Trainer:
    def __init__(self, config: Config, device: torch.device | None = None):
        self.config = config
        self.device = device or pick_device()
        torch.manual_seed(config.trainer.seed)
        threads = config.trainer.threads or usable_cpus()
        torch.set_num_threads(threads)
        self.net = RankerTrain(config).to(self.device)
        sparse = [p for m in self.net.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()]
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in self.net.parameters() if id(p) not in sparse_ids]
        tc = config.trainer
        self.opt_dense = torch.optim.Adam(dense, lr=tc.learning_rate, weight_decay=tc.weight_decay)
        # a config without id features (numbers and vectors only) has no embedding table: no sparse optimiser
        self.opt_sparse = torch.optim.SparseAdam(sparse, lr=tc.embedding_learning_rate) if sparse else None
        self.state = TrainState()
        self.shared = distributed.active()  # data-parallel over a process group (training/distributed.py)
        self.metrics = ProgressiveMetrics(config, tc.eval_window, self.net.ranker.n_experts)
        self.names = self.net.ranker.input_names
        # randomised logging: explored examples are counted by (original rank, shown position); with
        # `trainer.ipw = "estimated"` the click task's cross-entropy is taken against click / p(position), p from
        # those counts (`ipw = "curve"`: from `ipw_curve`); `ipw_method = "weight"` weights its loss by 1 / p
        self.click = click_task(config)
        self.swaps = SwapCounts(config.bias.max_position + 1)
        self._exam: Examination | None = None
        if tc.ipw == "curve":
            self._exam = curve_examination(tc.ipw_curve, floor=1.0 / tc.ipw_clip)
        if tc.ipw != "none" and self.click is None:
            raise ConfigError(f"{config.path}: trainer.ipw", "needs a binary task without `given` (a click) to weight")

    # ------------------------------------------------------------ one batch
    def zero_grad(self) -> None:
        self.opt_dense.zero_grad(set_to_none=True)
        if self.opt_sparse is not None:
            self.opt_sparse.zero_grad(set_to_none=True)

    def tensors(self, chunk: Chunk) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        inputs = {k: torch.from_numpy(chunk.inputs[k]).to(dev, non_blocking=True) for k in self.names}
        return (
            inputs,
            torch.from_numpy(chunk.labels.values).to(dev),
            torch.from_numpy(chunk.labels.mask).to(dev),
            torch.from_numpy(chunk.position).to(dev),
        )

    def step(self, chunk: Chunk, ids: np.ndarray | bytes) -> float | None:
        """Score `chunk` (progressive validation), then train on it. `ids` name its rows.

        Returns the loss, or None when the loss or a gradient was not finite: then nothing
        moved (no optimiser step, running statistics restored) and the batch is counted skipped.
        Data-parallel (`shared`): this rank's rows of the step's global batch (every rank calls it).
        """
        if self.shared:
            return distributed.step(self, chunk, None if isinstance(ids, bytes) else ids)
        self.net.train()
        inputs, labels, mask, position = self.tensors(chunk)
        weight, bce_target = self.ipw_terms(chunk, labels)
        stats = [b.detach().clone() for b in self.net.buffers()]  # the forward pass moves running statistics
        loss, out = self.net(inputs, labels, mask, position, train=True, weight=weight, bce_target=bce_target)
        self.zero_grad()
        loss.backward()
        s = self.state
        if not self._finite(loss):
            with torch.no_grad():
                for b, kept in zip(self.net.buffers(), stats):
                    b.copy_(kept)
            self.zero_grad()
            s.skipped_batches += 1
            s.skipped_examples += len(chunk)
            return None
        self.opt_dense.step()
        if self.opt_sparse is not None:
            self.opt_sparse.step()
        self.metrics.add(
            out["heads"].cpu().numpy(),
            out["full"].cpu().numpy(),
            chunk.labels.values,
            out["mask"].cpu().numpy(),
            out["gates"].detach().cpu().numpy(),
        )
        raw = ids if isinstance(ids, bytes) else np.ascontiguousarray(ids).tobytes()
        s.digest = hashlib.blake2b(s.digest.encode() + raw, digest_size=16).hexdigest()
        s.examples += len(chunk)
        s.batches += 1
        s.last_ts = max(s.last_ts, float(chunk.ts.max()))
        self._count_explored(chunk)
        return float(loss.detach())

    # ------------------------------------------------------------ propensities
    def examination(self) -> Examination:
        """The examination curve p(k) / p(0): `ipw_curve`, or from the explored examples trained on so far."""
        if self._exam is None:
            tc = self.config.trainer
            self._exam = self.swaps.estimate(tc.ipw_min_count, floor=1.0 / tc.ipw_clip)
        return self._exam

    def ipw(self, chunk: Chunk) -> np.ndarray:
        """(n,) the click loss's weight per row: 1 / p(position), clipped at `ipw_clip`, mean 1 over the rows
        with a click label (1 elsewhere). The estimate uses the batches before this one, never its own labels."""
        known = chunk.labels.mask[:, self.click] > 0
        return ipw_weights(chunk.position, self.examination(), self.config.trainer.ipw_clip, rows=known)

    def click_target(self, chunk: Chunk) -> np.ndarray:
        """(n,) the click task's cross-entropy target: click / p(position), p >= 1 / ipw_clip (p = 1 where the
        position is unknown; 0 where the click label is unknown: masked out). The estimate uses the batches
        before this one, never its own labels."""
        c = self.click
        known = chunk.labels.mask[:, c] > 0
        click = np.where(known, chunk.labels.values[:, c], 0.0)
        return unbiased_target(click, self.examination().at(chunk.position), self.config.trainer.ipw_clip)

    def ipw_terms(self, chunk: Chunk, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bce_target) for `RankerTrain.forward`: with `ipw_method = "target"` the click task's
        cross-entropy target becomes click / p(position); with "weight" its loss is weighted by 1 / p(position).
        Other tasks, those `given` the click included, are untouched. (None, None) without IPW."""
        tc = self.config.trainer
        if tc.ipw == "none" or self.click is None:
            return None, None
        c = self.click
        if tc.ipw_method == "weight":
            w = torch.ones_like(labels)
            w[:, c] = torch.from_numpy(self.ipw(chunk).astype(np.float32)).to(labels.device)
            return w, None
        t = labels.clamp(0, 1).clone()
        t[:, c] = torch.from_numpy(self.click_target(chunk).astype(np.float32)).to(labels.device)
        return None, t

    def _count_explored(self, chunk: Chunk) -> None:
        if self.click is None or not (chunk.explore_rank >= 0).any():
            return
        c = self.click
        click = np.where(chunk.labels.mask[:, c] > 0, chunk.labels.values[:, c], np.nan)
        if self.swaps.add(chunk.explore_rank, chunk.position, click) and self.config.trainer.ipw != "curve":
            self._exam = None

    def _finite(self, loss: torch.Tensor) -> bool:
        """The loss and every gradient finite: their total norm (one fused pass, one device sync)."""
        grads = [g._values() if g.is_sparse else g for p in self.net.parameters() if (g := p.grad) is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm([loss.detach().reshape(1), *grads])))

    def refuse_nonfinite(self, what: str) -> None:
        """Raise naming `what` (a file, a repository) when a parameter or statistic holds NaN/Inf."""
        bad = nonfinite(self.net.state_dict())
        if bad:
            raise CheckpointError(what, f"refused: the model holds NaN/Inf in {', '.join(bad[:5])}"
                                  + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> None:
        """Atomically write the checkpoint: a torch payload, then a line with its sha256."""
        path = Path(path)
        self.refuse_nonfinite(f"{path}: writing the checkpoint")
        self.state.explore_counts = self.swaps.state()
        blob = {
            "format": FORMAT,
            "config": builtin(self.config.to_dict()),
            "config_hash": self.config.hash,
            "checkpoint_hash": self.config.checkpoint_hash,
            "model": self.net.state_dict(),
            "opt_dense": self.opt_dense.state_dict(),
            "opt_sparse": self.opt_sparse.state_dict() if self.opt_sparse is not None else None,
            "state": asdict(self.state),
            "rng": torch.get_rng_state(),
            "metrics": {k: getattr(self.metrics, k) for k in ("heads", "full", "labels", "mask", "gates", "filled", "ptr", "seen")},
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        payload = buf.getvalue()
        atomic_write(path, payload + TRAILER + hashlib.sha256(payload).hexdigest().encode() + b"\n")

    @classmethod
    def load(cls, path: Path, config: Config | None = None, device: torch.device | None = None) -> Trainer:
        """Resume from `path`; refuses (CheckpointError, one line naming the file) what cannot be trusted."""
        blob = read_checkpoint(path)
        try:
            saved = config_from_dict(blob["config"], str(path))
            if config is not None and config.checkpoint_hash != saved.checkpoint_hash:
                raise CheckpointError(
                    str(path), f"checkpoint was trained under another model shape ({shape_diff(saved, config)}); "
                    f"{START_OVER}, or point --checkpoint elsewhere"
                )
            bad = nonfinite(blob["model"])
            if bad:
                raise CheckpointError(str(path), f"the checkpoint holds NaN/Inf in {', '.join(bad[:5])}; {START_OVER}")
            t = cls(config or saved, device)
            t.net.load_state_dict(upgrade_state_dict(blob["model"]))  # a checkpoint of the old layout too
            t.opt_dense.load_state_dict(blob["opt_dense"])
            if t.opt_sparse is not None:
                t.opt_sparse.load_state_dict(blob["opt_sparse"])
            t.state = TrainState(**blob["state"])
            if t.state.explore_counts:
                t.swaps = SwapCounts.from_state(t.state.explore_counts)
            torch.set_rng_state(blob["rng"])
            for k, v in blob["metrics"].items():
                setattr(t.metrics, k, v)
        except (CheckpointError, ConfigError):
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(str(path), f"checkpoint does not fit this trainer ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); {START_OVER}") from None
        return t

    # ------------------------------------------------------------ export
    def export(self, repo: ModelRepository, promote: bool = False) -> int:
        self.refuse_nonfinite(f"{repo.dir}: exporting a version")
        s = self.state
        info = {
            "parent": s.parent_version,
            "metrics": self.metrics.report(),
            "watermark": {"last_example_ts": s.last_ts, "examples": s.examples, "source": s.source},
            "trainer": {"arch": self.config.model.arch, "device": str(self.device), "ipw": self.config.trainer.ipw,
                        "ipw_method": self.config.trainer.ipw_method},
        }
        if self.swaps.shown.any() or self.config.trainer.ipw == "curve":
            exam = self.examination()
            info["examination"] = {"curve": [round(float(x), 4) for x in exam.curve],
                                   "source": "ipw_curve" if self.config.trainer.ipw == "curve" else "explored",
                                   "estimated_positions": int(exam.known.sum()),
                                   "explored_impressions": int(self.swaps.shown.sum())}
        version = publish(self.net.ranker, repo, info)
        s.parent_version = version
        s.exported_at_examples = s.examples
        if promote:
            repo.promote(version)
        return version


def click_task(config: Config) -> int | None:
    """The index of the click task: the first binary task that is not `given` another (None when there is none)."""
    for i, t in enumerate(config.tasks):
        if t.kind == TaskKind.BINARY and t.given is None:
            return i
    return None


def builtin(x: Any) -> Any:
    """`x` (dicts, lists, tuples) with each enum member (the config's kinds) as its value: a checkpoint then holds
    only builtin types and tensors, and unpickles without watchnext's classes."""
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, dict):
        return {k: builtin(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(builtin(v) for v in x)
    return x


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding NaN or Inf."""
    return [k for k, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's blob once its checksum matches; CheckpointError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(str(path), f"cannot read the checkpoint: {e.strerror or e}") from None
    if not data:
        raise CheckpointError(str(path), f"the checkpoint is empty; {START_OVER}")
    payload, end = data[:-TRAILER_LEN], data[-TRAILER_LEN:]
    if len(data) < TRAILER_LEN or not end.startswith(TRAILER) or not end.endswith(b"\n"):
        raise CheckpointError(str(path), f"not a whole watchnext checkpoint (no checksum at its end: truncated, "
                              f"damaged, from an older version, or another kind of file); {START_OVER}")
    if hashlib.sha256(payload).hexdigest().encode() != end[len(TRAILER):-1]:
        raise CheckpointError(str(path), f"the checkpoint is damaged (its sha256 does not match its content); {START_OVER}")
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # the checksum matched, so the writer was not ours
        raise CheckpointError(str(path), f"cannot read the checkpoint ({type(e).__name__}); {START_OVER}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(str(path), f"not a watchnext checkpoint of format {FORMAT}; {START_OVER}")
    return blob


def shape_diff(saved: Config, now: Config) -> str:
    """What differs between two configs' parameter shapes, e.g. 'bias.dim 8 -> 16, features.age added'."""
    a, b = saved.checkpoint_dict(), now.checkpoint_dict()
    out = []
    for key in a:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], list):  # features, tasks: by name
            old, new = ({e["name"]: e for e in x[key]} for x in (a, b))
            out += [f"{key}.{n} removed" for n in old if n not in new]
            out += [f"{key}.{n} added" for n in new if n not in old]
            out += [f"{key}.{n} changed" for n in old if n in new and old[n] != new[n]]
            if [e["name"] for e in a[key]] != [e["name"] for e in b[key]] and all(n in new for n in old) and len(old) == len(new):
                out.append(f"{key} reordered")
        elif isinstance(a[key], dict):  # model, bias
            out += [f"{key}.{k} {a[key][k]!r} -> {b[key].get(k)!r}" for k in a[key] if a[key][k] != b[key].get(k)]
        else:
            out.append(f"{key} {a[key]!r} -> {b[key]!r}")
    return ", ".join(out) or "hash " + saved.checkpoint_hash + " -> " + now.checkpoint_hash


# ---------------------------------------------------------------- files


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run an iterator in a background thread (reading overlaps training)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    th = threading.Thread(target=work, daemon=True, name="watchnext-reader")
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@dataclass
class RunResult:
    examples: int
    trained_now: int
    seconds: float
    report: dict
    version: int | None
    bad_lines: int
    bad_samples: list[str]
    skipped_batches: int = 0  # loss or gradients not finite: not trained on (counted over the model's life)
    bad_now: int = 0  # lines this run skipped
    commonest_bad: tuple[int, str] | None = None  # this run's commonest kind of skip: (how many, "FILE:LINE: why")


def train_files(
    config: Config,
    paths: Sequence[str | os.PathLike],
    checkpoint: Path,
    repo: ModelRepository | None,
    *,
    fresh: bool = False,
    promote: bool = False,
    metrics_file: Path | None = None,
    on_progress: Callable[[int, int, dict], None] | None = None,
    device: torch.device | None = None,
    max_examples: int | None = None,
) -> RunResult:
    """Train once over `paths` in order, resuming from `checkpoint` when it holds these files.

    A checkpoint from other files continues training the same model on the new
    files (incremental training); `fresh` starts a new model. `max_examples` caps
    this run's trained examples (see `file_batches`). `on_progress(read bytes, total
    bytes, report)` is called after each chunk read (report {}) and with each progress
    report, which is also appended to `metrics_file` as a JSON line.
    """
    # ---- setup: the model, where the files stand, the reader
    checkpoint = Path(checkpoint)
    files = [str(Path(p).resolve()) for p in paths]
    trainer = Trainer.load(checkpoint, config, device) if checkpoint.is_file() and not fresh else Trainer(config, device)
    st = trainer.state
    if st.source.get("kind") == "files" and st.source.get("paths") == files:
        start = Position(**st.source["position"])
    else:
        first = first_ts(files[0]) if files else None
        if first is not None and first < st.last_ts:  # every line up to the checkpoint's last would be skipped
            raise CheckpointError(
                str(checkpoint), f"its model has trained up to ts {st.last_ts:.3f}, and {files[0]} starts before it "
                f"(ts {first:.3f}): examples must come in time order, so those lines would be skipped; train it as a "
                "new model with --fresh, or continue another model with --checkpoint PATH")
        start = Position()
        st.source = {"kind": "files", "paths": files, "position": start.to_dict()}
    decoder = Decoder(config)
    decoder.last_ts = st.last_ts
    decoder.bad.count = st.bad_lines
    bad_before = st.bad_lines
    reader = ExampleFiles(files, decoder, start)
    total = reader.total_bytes()
    tc = config.trainer
    # data-parallel (torchrun): every rank reads the files and trains its slice of each global batch of
    # world x batch_size rows; rank 0 alone writes the checkpoint, the metrics and the export
    world, rank = (distributed.dist.get_world_size(), distributed.dist.get_rank()) if trainer.shared else (1, 0)
    lead = rank == 0
    limit = None if max_examples is None else st.examples + max_examples  # in the model's trained examples
    t0 = time.perf_counter()
    trained_now = 0
    last_ckpt_ex, last_ckpt_t = st.examples, time.monotonic()
    last_report = st.examples
    mfile = open(metrics_file, "a") if metrics_file and lead else None
    try:
        # ---- the loop: one batch at a time, in the files' order
        for batch, read_bytes, tail in file_batches(reader, tc.batch_size * world, st, limit):
            if batch is None:  # a chunk was read and cut into batches
                if on_progress and lead:
                    on_progress(read_bytes, total, {})
                continue
            # step: score the batch (progressive validation), then train on it; None: not finite, skipped
            if trainer.shared:
                mine = distributed.share(batch, rank, world)
                if trainer.step(mine, np.stack([mine.file_index, mine.line], axis=1)) is not None:
                    trained_now += len(batch)
                st.source["ranks"] = rank_positions(batch, world, st.source)
            else:
                ids = np.stack([batch.file_index, batch.line], axis=1)
                if trainer.step(batch, ids) is not None:
                    trained_now += len(batch)
            st.source["position"] = batch.end().to_dict()  # a skipped batch is passed over, never tried again
            if tail:  # the rows after the last whole batch: the final checkpoint and report follow
                continue
            # checkpoint, every `checkpoint_every_examples` or `checkpoint_interval_s`
            if (st.examples - last_ckpt_ex >= tc.checkpoint_every_examples
                    or time.monotonic() - last_ckpt_t >= tc.checkpoint_interval_s):
                if lead:
                    save_checkpoint(trainer, decoder, checkpoint)
                last_ckpt_ex, last_ckpt_t = st.examples, time.monotonic()
            # progress report, every `report_every_examples`
            if st.examples - last_report >= tc.report_every_examples:
                last_report = st.examples
                rep = progress_report(trainer, decoder, trained_now, t0)
                write_line(mfile, rep)
                if on_progress and lead:
                    on_progress(read_bytes, total, rep)

        # ---- the end: checkpoint, final report, export
        if trainer.shared:
            distributed.finish(trainer)  # answer the ranks that still have rows until none has
        if lead:
            save_checkpoint(trainer, decoder, checkpoint)
        rep = progress_report(trainer, decoder, trained_now, t0, final=True)
        write_line(mfile, rep)
        version = None
        if repo is not None and trained_now > 0 and lead:
            version = trainer.export(repo, promote=promote)
            save_checkpoint(trainer, decoder, checkpoint)  # remembers the parent version
        return RunResult(st.examples, trained_now, time.perf_counter() - t0, rep, version, decoder.bad.count,
                         decoder.bad.first, st.skipped_batches, decoder.bad.count - bad_before,
                         decoder.bad.commonest())
    except RuntimeError as e:
        if trainer.shared and distributed.peer_lost(e):  # another rank died (torchrun stops this one next)
            raise WatchnextError("torch.distributed", f"lost another rank ({str(e).splitlines()[0][:160]}); the "
                                 "last checkpoint keeps what was trained: run the same command to resume") from None
        raise
    finally:
        if mfile:
            mfile.close()


def file_batches(
    reader: ExampleFiles, size: int, state: TrainState, limit: int | None = None
) -> Iterator[tuple[Chunk | None, int, bool]]:
    """The reader's chunks (read in a background thread) cut into batches of `size` rows.

    Yields (batch, bytes read so far, tail):

    * (batch, n, False) for each whole batch; rows short of a whole batch wait for the next chunk;
    * (None, n, False) after each chunk;
    * (rows, n, True) last: the rows left at the end (fewer than `size`; none if no row is left), or the
      partial batch that reaches `limit`.

    `limit`: the model's trained examples (`state.examples`, read before each chunk is
    cut, so it counts every batch yielded before) to stop at: whole batches while they
    fit under it, then one partial batch of the room left; the reading then stops, and
    the rows after it are read again by the next run (the checkpoint's position is the
    last trained row's).
    """
    leftover: Chunk | None = None
    read_bytes = 0
    for chunk, read_bytes in prefetch(iter(reader)):
        buf = chunk if leftover is None else Chunk.concat([leftover, chunk])
        n_full = len(buf) // size * size
        if limit is not None:
            n_full = min(n_full, max(0, (limit - state.examples) // size * size))
        room = None if limit is None else limit - state.examples - n_full  # read before these batches train
        for s in range(0, n_full, size):
            yield buf.take(slice(s, s + size)), read_bytes, False
        if room is not None and 0 < room <= len(buf) - n_full:  # the last, partial batch that reaches the limit
            yield buf.take(slice(n_full, n_full + room)), read_bytes, True
            return
        leftover = buf.take(slice(n_full, len(buf))) if n_full < len(buf) else None
        yield None, read_bytes, False
        if limit is not None and state.examples >= limit:
            return
    if leftover is not None and len(leftover):
        yield leftover, read_bytes, True


def rank_positions(batch: Chunk, world: int, source: dict) -> list[dict[str, int]]:
    """Data-parallel: each rank's input position after its slice of the global `batch` (a rank whose slice is
    empty keeps the position it had). Resuming starts every rank at the global position, the batch's end."""
    before = source.get("ranks") or [source["position"]] * world
    out = []
    for r in range(world):
        mine = distributed.share(batch, r, world)
        out.append(mine.end().to_dict() if len(mine) else before[r])
    return out


def save_checkpoint(trainer: Trainer, decoder: Decoder, path: Path) -> None:
    """`trainer.save(path)`, recording the bad lines up to the trained position (those read past it are met again
    on resuming, and counted then)."""
    st = trainer.state
    st.bad_lines = decoder.bad.settled(Position(**st.source["position"]))
    trainer.save(path)


def progress_report(trainer: Trainer, decoder: Decoder, trained_now: int, t0: float, final: bool = False) -> dict:
    """One progress report: examples, bad lines, skipped batches, the progressive metrics, and the speed of this
    run (`trained_now` examples since `t0`, its `time.perf_counter()` at the start)."""
    st = trainer.state
    rep = {"examples": st.examples, "bad_lines": decoder.bad.count, "skipped_batches": st.skipped_batches,
           **trainer.metrics.report()}
    rep["examples_per_s"] = round(trained_now / max(time.perf_counter() - t0, 1e-9), 1)
    if final:
        rep["final"] = True
    return rep


def write_line(file: IO[str] | None, rep: dict) -> None:
    """Append `rep` to the metrics file (if any) as one JSON line, flushed."""
    if file:
        file.write(json.dumps(rep) + "\n")
        file.flush()
