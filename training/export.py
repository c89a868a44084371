"""ONNX export of the Ranker into the model repository (docs/training.md).

The exported graph is `Ranker.forward`: encoded features in (dynamic batch
axis), one output per task in its label's units. The shallow tower is not in
it. Each export is checked against PyTorch on the same inputs before it is
published, so a broken graph never reaches the repository.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from watchnext.encoding import Encoder
from watchnext.repository import ModelRepository, input_layout, now_iso, sha256_file

from .model import Ranker

OPSET = 17
TOLERANCE = 1e-5


def random_inputs(ranker: Ranker, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible encoded inputs for checks and benches: valid rows, some missing values."""
    rng = np.random.default_rng(seed)
    cfg = ranker.config
    out = Encoder(cfg).empty_inputs(n)
    for f in cfg.features:
        if f.kind == "categorical":
            out[f.name][:] = rng.integers(0, f.buckets + 1, n)
        elif f.kind == "categorical_list":
            ids = rng.integers(1, f.buckets + 1, (n, f.max_len))
            ids[rng.random((n, f.max_len)) < 0.3] = 0
            out[f.name][:] = ids
        elif f.kind == "vector":
            out[f.name][:] = rng.normal(size=(n, f.size)).astype(np.float32)
    if "numeric" in out:
        out["numeric"][:] = rng.normal(2.0, 1.5, out["numeric"].shape).astype(np.float32)
        out["numeric_mask"][:] = (rng.random(out["numeric"].shape) < 0.9).astype(np.float32)
    return out


def export_onnx(ranker: Ranker, path: Path) -> None:
    model = copy.deepcopy(ranker).cpu().eval()
    example = random_inputs(model, 2)
    args = tuple(torch.from_numpy(example[n]) for n in model.input_names)
    axes = {n: {0: "batch"} for n in model.input_names + model.task_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=model.input_names,
            output_names=model.task_names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def check_onnx(ranker: Ranker, path: Path, sizes: tuple[int, ...] = (1, 7, 256)) -> float:
    """Max |ONNX Runtime - PyTorch| over the heads on random inputs; raises past TOLERANCE.

    Probabilities are compared absolutely; regression heads (seconds, ratings) are
    compared relative to max(1, |y|), since fp32 carries ~7 significant digits.
    """
    import onnxruntime as ort

    model = copy.deepcopy(ranker).cpu().eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, n in enumerate(sizes):
        x = random_inputs(model, n, seed=100 + i)
        got = sess.run(model.task_names, {k: x[k] for k in model.input_names})
        with torch.no_grad():
            want = model(*[torch.from_numpy(x[k]) for k in model.input_names])
        for g, w in zip(got, want):
            if g.shape != (n,):
                raise RuntimeError(f"ONNX output has shape {g.shape}, expected ({n},)")
            w = w.numpy()
            worst = max(worst, float(np.max(np.abs(g - w) / np.maximum(1.0, np.abs(w)))))
    if worst > TOLERANCE:
        raise RuntimeError(f"ONNX export differs from PyTorch by {worst:.2e} (> {TOLERANCE})")
    return worst


def publish(ranker: Ranker, repo: ModelRepository, info: dict[str, Any]) -> int:
    """Export, check and publish a new version; `info` adds metrics, watermark, parent."""
    cfg = ranker.config

    def build(folder: Path) -> dict[str, Any]:
        onnx_path = folder / "model.onnx"
        export_onnx(ranker, onnx_path)
        diff = check_onnx(ranker, onnx_path)
        return {
            "model": cfg.model.name,
            "config_hash": cfg.hash,
            "config": cfg.model_dict(),
            "tasks": [{"name": t.name, "kind": t.kind, "group": t.group, "transform": t.transform} for t in cfg.tasks],
            "inputs": input_layout(cfg),
            "outputs": [{"name": t.name, "dtype": "float32", "shape": [-1]} for t in cfg.tasks],
            "onnx": {"opset": OPSET, "sha256": sha256_file(onnx_path), "max_abs_diff_vs_torch": diff},
            "created_at": now_iso(),
            **info,
        }

    return repo.publish(build)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of a state dict (tests compare resumed and uninterrupted runs)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
