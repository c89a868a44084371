"""ONNX Runtime for the service: the CUDA provider with I/O binding when there is a GPU, the CPU otherwise.

`watchnext.runtime.make_session` sizes the thread pool from the CPUs this
process may use and reads back the provider actually in use (onnxruntime-gpu
falls back to the CPU silently); this module adds I/O binding on CUDA, so the
inputs are copied to the device once and the outputs are read back once,
without the extra staging copies of `session.run`.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from watchnext.runtime import Session, make_session, usable_cpus

CUDA = "CUDAExecutionProvider"


def cuda_driver_present() -> bool:
    """Whether this machine has a CUDA driver at all (onnxruntime-gpu lists CUDA even where there is none)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def resolve_device(device: str) -> str:
    """'auto' becomes 'cpu' on a machine without a CUDA driver, sparing a failed CUDA load per session."""
    return "cpu" if device == "auto" and not cuda_driver_present() else device


class InferenceSession:
    """One loaded ONNX version: `run(inputs) -> heads (B, T)` in label units, float32."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int = 0):
        # no spinning: idle ORT threads would busy-wait on the cores the event loop and JSON parsing need
        self.session: Session = make_session(path, resolve_device(device), threads or usable_cpus(),
                                             {"session.intra_op.allow_spinning": "0"})
        self.provider = self.session.provider
        self.input_names = list(self.session.input_names)
        self.task_names = list(self.session.task_names)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.provider != CUDA:
            return self.session.run(inputs)
        sess = self.session.sess
        binding = sess.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name]))
        for name in self.task_names:
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return np.stack(outs, axis=1)
