"""ONNX Runtime sessions for exported versions (torch-free; the service, evaluate, compare).

ONNX Runtime sizes its thread pool from the host's cores, not the container's;
`make_session` sizes it from the CPUs this process may actually use. The CUDA
provider is asked for only when onnxruntime offers it, and the provider in use
is read back after the session is created: onnxruntime-gpu falls back to the
CPU silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def usable_cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


@dataclass
class Session:
    """A loaded version: run encoded inputs, get heads (B, T) in task order."""

    sess: Any
    input_names: list[str]
    task_names: list[str]
    provider: str

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        outs = self.sess.run(self.task_names, {k: inputs[k] for k in self.input_names})
        return np.stack(outs, axis=1)


def make_session(path: str | os.PathLike, device: str = "auto", threads: int = 0,
                 config_entries: dict[str, str] | None = None) -> Session:
    """device: auto (CUDA when available) | cpu | cuda. config_entries: ONNX Runtime session config keys."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.inter_op_num_threads = 1
    for k, v in (config_entries or {}).items():
        opts.add_session_config_entry(k, v)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    want_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
    providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), opts, providers=[p for p in providers if p in available])
    used = sess.get_providers()[0]
    if device == "cuda" and used != "CUDAExecutionProvider":
        raise RuntimeError(f"{path}: CUDA was asked for but ONNX Runtime runs on {used}")
    return Session(
        sess,
        [i.name for i in sess.get_inputs()],
        [o.name for o in sess.get_outputs()],
        used,
    )
