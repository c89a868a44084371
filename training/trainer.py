"""The streaming trainer: one pass over examples in time order.

One loop with explicit steps: read and encode a chunk (in a background
thread), cut it into batches, and for each batch score it (progressive
validation), then train on it. Checkpoints are atomic and hold the model, the
optimisers, the normalisation statistics, the RNG state and the exact input
position, so a run killed at any moment resumes without training any example
twice or skipping one. `digest` chains the ids of every trained example, so
tests can prove it.
"""

from __future__ import annotations

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
from typing import Any

import numpy as np
import torch

from watchnext.config import Config, config_from_dict
from watchnext.examples import Chunk, Decoder, ExampleFiles, Position
from watchnext.repository import ModelRepository, atomic_write
from watchnext.runtime import usable_cpus

from .export import publish
from .model import RankerTrain
from .progressive import ProgressiveMetrics


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
        self.opt_sparse = torch.optim.SparseAdam(sparse, lr=tc.embedding_learning_rate)
        self.state = TrainState()
        self.metrics = ProgressiveMetrics(config, tc.eval_window, self.net.ranker.n_experts)
        self.names = self.net.ranker.input_names

    # ------------------------------------------------------------ one batch
    def tensors(self, chunk: Chunk) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        inputs = {k: torch.from_numpy(chunk.inputs[k]).to(dev, non_blocking=True) for k in self.names}
        return (
            inputs,
            torch.from_numpy(chunk.labels.values).to(dev),
            torch.from_numpy(chunk.labels.mask).to(dev),
            torch.from_numpy(chunk.position).to(dev),
        )

    def step(self, chunk: Chunk, ids: np.ndarray | bytes) -> float:
        """Score `chunk` (progressive validation), then train on it. `ids` name its rows."""
        self.net.train()
        inputs, labels, mask, position = self.tensors(chunk)
        loss, out = self.net(inputs, labels, mask, position, train=True)
        self.opt_dense.zero_grad(set_to_none=True)
        self.opt_sparse.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_dense.step()
        self.opt_sparse.step()
        self.metrics.add(
            out["heads"].cpu().numpy(),
            out["full"].cpu().numpy(),
            chunk.labels.values,
            out["mask"].cpu().numpy(),
            out["gates"].detach().cpu().numpy(),
        )
        s = self.state
        raw = ids if isinstance(ids, bytes) else np.ascontiguousarray(ids).tobytes()
        s.digest = hashlib.blake2b(s.digest.encode() + raw, digest_size=16).hexdigest()
        s.examples += len(chunk)
        s.batches += 1
        s.last_ts = max(s.last_ts, float(chunk.ts.max()))
        return float(loss.detach())

    # ------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> None:
        blob = {
            "format": 1,
            "config": self.config.to_dict(),
            "config_hash": self.config.hash,
            "model": self.net.state_dict(),
            "opt_dense": self.opt_dense.state_dict(),
            "opt_sparse": self.opt_sparse.state_dict(),
            "state": asdict(self.state),
            "rng": torch.get_rng_state(),
            "metrics": {k: getattr(self.metrics, k) for k in ("heads", "full", "labels", "mask", "gates", "filled", "ptr", "seen")},
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path, config: Config | None = None, device: torch.device | None = None) -> Trainer:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        saved = config_from_dict(blob["config"], str(path))
        if config is not None and config.hash != saved.hash:
            raise ValueError(
                f"{path}: checkpoint was trained with another model config (hash {saved.hash}, now {config.hash}); "
                "start over with --fresh or point --checkpoint elsewhere"
            )
        t = cls(config or saved, device)
        t.net.load_state_dict(blob["model"])
        t.opt_dense.load_state_dict(blob["opt_dense"])
        t.opt_sparse.load_state_dict(blob["opt_sparse"])
        t.state = TrainState(**blob["state"])
        torch.set_rng_state(blob["rng"])
        for k, v in blob["metrics"].items():
            setattr(t.metrics, k, v)
        return t

    # ------------------------------------------------------------ export
    def export(self, repo: ModelRepository, promote: bool = False) -> int:
        s = self.state
        info = {
            "parent": s.parent_version,
            "metrics": self.metrics.report(),
            "watermark": {"last_example_ts": s.last_ts, "examples": s.examples, "source": s.source},
            "trainer": {"arch": self.config.model.arch, "device": str(self.device)},
        }
        version = publish(self.net.ranker, repo, info)
        s.parent_version = version
        s.exported_at_examples = s.examples
        if promote:
            repo.promote(version)
        return version


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
    files (incremental training); `fresh` starts a new model.
    """
    checkpoint = Path(checkpoint)
    files = [str(Path(p).resolve()) for p in paths]
    trainer = Trainer.load(checkpoint, config, device) if checkpoint.is_file() and not fresh else Trainer(config, device)
    st = trainer.state
    src = st.source
    if src.get("kind") == "files" and src.get("paths") == files:
        start = Position(**src["position"])
    else:
        start = Position()
        st.source = {"kind": "files", "paths": files, "position": start.to_dict()}
    decoder = Decoder(config)
    decoder.last_ts = st.last_ts
    decoder.bad.count = st.bad_lines
    reader = ExampleFiles(files, decoder, start)
    total = reader.total_bytes()
    bs = config.trainer.batch_size
    tc = config.trainer
    t0 = time.perf_counter()
    trained_now = 0
    last_ckpt_ex, last_ckpt_t = st.examples, time.monotonic()
    last_report = st.examples
    mfile = open(metrics_file, "a") if metrics_file else None

    def commit(batch: Chunk) -> None:
        st.source["position"] = batch.end().to_dict()

    def emit(final: bool = False) -> dict:
        rep = {"examples": st.examples, "bad_lines": decoder.bad.count, **trainer.metrics.report()}
        rep["examples_per_s"] = round(trained_now / max(time.perf_counter() - t0, 1e-9), 1)
        if final:
            rep["final"] = True
        if mfile:
            mfile.write(json.dumps(rep) + "\n")
            mfile.flush()
        return rep

    def checkpoint_now() -> None:
        nonlocal last_ckpt_ex, last_ckpt_t
        st.bad_lines = decoder.bad.settled(Position(**st.source["position"]))
        trainer.save(checkpoint)
        last_ckpt_ex, last_ckpt_t = st.examples, time.monotonic()

    def train(batch: Chunk) -> None:
        nonlocal trained_now
        ids = np.stack([batch.file_index, batch.line], axis=1)
        trainer.step(batch, ids)
        commit(batch)
        trained_now += len(batch)

    leftover: Chunk | None = None
    read_bytes = 0
    try:
        for chunk, consumed in prefetch(iter(reader)):
            read_bytes = consumed
            buf = chunk if leftover is None else Chunk.concat([leftover, chunk])
            n_full = len(buf) // bs * bs
            if max_examples is not None:
                n_full = min(n_full, max(0, (max_examples - trained_now) // bs * bs))
            for s in range(0, n_full, bs):
                train(buf.take(slice(s, s + bs)))
                if st.examples - last_ckpt_ex >= tc.checkpoint_every_examples or (
                    time.monotonic() - last_ckpt_t >= tc.checkpoint_interval_s
                ):
                    checkpoint_now()
                if st.examples - last_report >= tc.report_every_examples:
                    last_report = st.examples
                    rep = emit()
                    if on_progress:
                        on_progress(read_bytes, total, rep)
            leftover = buf.take(slice(n_full, len(buf))) if n_full < len(buf) else None
            if on_progress:
                on_progress(read_bytes, total, {})
            if max_examples is not None and trained_now >= max_examples:
                leftover = None
                break
        if leftover is not None and len(leftover):
            train(leftover)
        checkpoint_now()
        rep = emit(final=True)
        version = None
        if repo is not None and trained_now > 0:
            version = trainer.export(repo, promote=promote)
            checkpoint_now()  # remembers the parent version
        return RunResult(st.examples, trained_now, time.perf_counter() - t0, rep, version, decoder.bad.count, decoder.bad.first)
    finally:
        if mfile:
            mfile.close()
