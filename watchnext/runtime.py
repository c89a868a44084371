"""ONNX Runtime sessions for exported versions (torch-free; the service, evaluate, compare).

ONNX Runtime sizes its thread pool from the host's cores, not the container's;
`make_session` sizes it from the CPUs this process may actually use. The CUDA
provider is asked for only when onnxruntime offers it, and the provider in use
is read back after the session is created: onnxruntime-gpu falls back to the
CPU silently.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from watchnext.errors import WatchnextError


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


def cuda_driver_present() -> bool:
    """Whether this machine has a CUDA driver at all (onnxruntime-gpu lists CUDA even where there is none)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def resolve_device(device: str) -> str:
    """'auto' becomes 'cpu' on a machine without a CUDA driver: no failed CUDA load (and none of ONNX Runtime's
    red loader errors) per session."""
    return "cpu" if device == "auto" and not cuda_driver_present() else device


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

    device = resolve_device(device)
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
        raise WatchnextError("--device", f"cuda was asked for, but ONNX Runtime runs {path} on {used} (no usable "
                                         "CUDA here: install onnxruntime-gpu with CUDA 13 and cuDNN 9, or use --device cpu)")
    return Session(
        sess,
        [i.name for i in sess.get_inputs()],
        [o.name for o in sess.get_outputs()],
        used,
    )
