"""ONNX Runtime for the service: the CUDA provider with I/O binding when there is a GPU, the CPU otherwise.

`watchnext.runtime.make_session` reads back the provider actually in use
(onnxruntime-gpu falls back to the CPU silently). On CUDA this module adds I/O
binding, so the inputs are copied to the device once and the outputs are read
back once, without the extra staging copies of `session.run`. On the CPU it
runs a batch as parts at once, one ONNX Runtime thread each, as many as the
CPUs this process may use (or `threads`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from watchnext.runtime import Session, make_session, resolve_device, usable_cpus

CUDA = "CUDAExecutionProvider"


# a part smaller than this costs more in hand-off than running it beside another part saves
MIN_PART_ROWS = 48
_parts_pool: ThreadPoolExecutor | None = None
_parts_lock = threading.Lock()


def parts_pool() -> ThreadPoolExecutor:
    """The threads that run the parts of batches beside the calling thread (one pool per process)."""
    global _parts_pool
    with _parts_lock:
        if _parts_pool is None:
            _parts_pool = ThreadPoolExecutor(max_workers=max(1, usable_cpus()), thread_name_prefix="ort-part")
        return _parts_pool


class InferenceSession:
    """One loaded ONNX version: `run(inputs) -> heads (B, T)` in label units, float32.

    On the CPU a batch is split into up to `threads` parts that run at once, each on one ONNX
    Runtime thread (the session is thread-safe and releases the GIL). For this model that is far
    faster than ONNX Runtime's own intra-op threads on the whole batch: 500 rows on 2 cores took
    1.91 ms as two parts against 2.79 ms on two intra-op threads and 3.19 ms on one
    (2,000 rows: 6.46 / 8.58 / 12.99 ms).
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int = 0):
        threads = threads or usable_cpus()
        device = resolve_device(device)
        # no spinning: idle ORT threads would busy-wait on the cores the event loop and JSON parsing need
        entries = {"session.intra_op.allow_spinning": "0"}
        self.session: Session = make_session(path, device, 1 if device == "cpu" else threads, entries)
        if self.session.provider != CUDA and device != "cpu":  # CUDA was not there after all: as on the CPU
            self.session = make_session(path, "cpu", 1, entries)
        self.provider = self.session.provider
        self.parts = threads if self.provider != CUDA else 1
        self.input_names = list(self.session.input_names)
        self.task_names = list(self.session.task_names)

    def run(self, inputs: dict[str, np.ndarray], parts: int | None = None) -> np.ndarray:
        """Heads for a batch, as up to `parts` parts at once (default: self.parts)."""
        if self.provider == CUDA:
            return self._run_cuda(inputs)
        n = len(inputs[self.input_names[0]]) if self.input_names else 0
        k = min(self.parts if parts is None else parts, n // MIN_PART_ROWS)
        if k <= 1:
            return self.session.run(inputs)
        cut = [n * i // k for i in range(k + 1)]  # integers (np.linspace is Python code the request must run too)
        pieces = [{name: a[lo:hi] for name, a in inputs.items()} for lo, hi in zip(cut[:-1], cut[1:], strict=True)]
        pool = parts_pool()
        rest = [pool.submit(self.session.run, p) for p in pieces[1:]]
        first = self.session.run(pieces[0])  # this thread runs one part itself: the pool never waits on the pool
        return np.concatenate([first, *(f.result() for f in rest)])

    def _run_cuda(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        sess = self.session.sess
        binding = sess.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name]))
        for name in self.task_names:
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return np.stack(outs, axis=1)
