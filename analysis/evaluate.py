"""`watchnext evaluate` and the scoring pass `compare` builds on (torch-free)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from watchnext.config import Config, ConfigError
from watchnext.examples import Decoder, ExampleFiles
from watchnext.metrics import auc, ndcg_by_group, rmse
from watchnext.repository import ModelRepository
from watchnext.runtime import make_session
from watchnext.scoring import combine, weight_vector


@dataclass
class Scored:
    """Heads, labels and task masks of every example in the files, in order."""

    heads: np.ndarray  # (N, T)
    labels: np.ndarray  # (N, T)
    mask: np.ndarray  # (N, T) bool: label known and its `given` task positive
    group: np.ndarray  # (N,) request hash
    bad_lines: int


def task_mask(config: Config, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask > 0
    for i, t in enumerate(config.tasks):
        if t.given:
            g = config.task_index(t.given)
            m[:, i] &= m[:, g] & (labels[:, g] == 1)
    return m


def score_files(config: Config, onnx_path: Path, paths: Sequence[str], device: str = "auto",
                on_progress: Callable[[int, int], None] | None = None) -> Scored:
    sess = make_session(onnx_path, device)
    decoder = Decoder(config, on_bad_line="skip")
    files = ExampleFiles(paths, decoder)
    total = files.total_bytes()
    parts = []
    for chunk, done in files:
        if len(chunk):
            parts.append((sess.run(chunk.inputs), chunk.labels.values, chunk.labels.mask, chunk.group))
        if on_progress:
            on_progress(done, total)
    T = len(config.tasks)
    if not parts:
        z = np.zeros((0, T), np.float32)
        return Scored(z, z, z.astype(bool), np.zeros(0, np.uint64), decoder.bad.count)
    heads, labels, mask, group = (np.concatenate(x) for x in zip(*parts))
    return Scored(heads, labels, task_mask(config, labels, mask), group, decoder.bad.count)


def task_metrics(config: Config, s: Scored) -> dict:
    out = {}
    for j, t in enumerate(config.tasks):
        m = s.mask[:, j]
        entry: dict = {"n": int(m.sum())}
        if t.kind == "binary":
            entry["auc"] = _r(auc(s.labels[m, j], s.heads[m, j]))
        else:
            entry["rmse"] = _r(rmse(s.labels[m, j], s.heads[m, j]))
        out[t.name] = entry
    return out


def ranking_quality(config: Config, s: Scored, weights: dict[str, float] | None = None) -> dict:
    """NDCG@10 per request of the combined score, against the realised value of each impression.

    The realised gain is the same weighted sum over the observed labels (missing = 0),
    clipped at 0, so a ranking is judged by what the combination is meant to value.
    """
    names = [t.name for t in config.tasks]
    w = weight_vector(names, weights or config.score.weights)
    score = combine(s.heads, w, config.score.combine)
    gains = np.where(s.mask, s.labels, 0.0) @ np.where(np.isin(names, [t.name for t in config.binary_tasks]), w, 0.0)
    return {"ndcg@10": _r(ndcg_by_group(s.group, score, gains, 10)), "requests": int(len(np.unique(s.group))),
            "gain": "weighted binary labels of the [score] weights"}


def evaluate(config: Config, repo: ModelRepository, version: int, paths: Sequence[str], device: str = "auto",
             on_progress=None) -> dict:
    meta = repo.metadata(version)
    if meta.get("config_hash") != config.hash:
        raise ConfigError(config.path, f"version {version} was trained with config hash {meta.get('config_hash')}, "
                                       f"this config is {config.hash}: pass the --config it was trained with")
    s = score_files(config, repo.path(version) / "model.onnx", paths, device, on_progress)
    return {
        "model": repo.name,
        "version": version,
        "examples": int(len(s.heads)),
        "bad_lines": s.bad_lines,
        "tasks": task_metrics(config, s),
        "ranking": ranking_quality(config, s),
    }


def _r(x: float) -> float | None:
    return None if x != x else round(float(x), 5)
