"""The model call on a Triton Inference Server (`--backend triton`): encoding, scoring and logging stay here.

Triton serves the same model repository (it has Triton's layout: see
watchnext/repository.py); the service sends encoded features to
`POST /v2/models/<name>/versions/<v>/infer` with tritonclient's HTTP client, as
binary tensors, and reads the heads back. A version is used only once Triton
says it is ready, its inputs and outputs (from Triton's model metadata) have
the names and datatypes the service's config encodes, and a warm-up batch came
back finite (service/models.py); otherwise it is refused and the current
version keeps serving.

tritonclient's HTTP client runs on gevent and is not thread-safe: rank work
runs in several worker threads, so every thread gets its own client (gevent
hubs are per thread, so one pooled client cannot be shared between threads
either). The clients belong to one `TritonBackend` for the service's life, not
to a version, so a swap opens no connections.

tritonclient is imported here only, and only when the backend is triton.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from watchnext.errors import WatchnextError

from .errors import Unavailable

PROVIDER = "triton"
INSTALL_HINT = "pip install 'watchnext[triton]'"
# numpy dtype name (as Encoder.input_specs gives it) -> KServe v2 datatype
DATATYPES = {"int64": "INT64", "int32": "INT32", "float32": "FP32", "float64": "FP64", "float16": "FP16",
             "bool": "BOOL"}
CONNECT_TIMEOUT_S = 5.0
NETWORK_TIMEOUT_S = 30.0


class TritonError(WatchnextError):
    """Triton cannot be reached, or answered with an error, or its client is not installed: a set-up problem the
    user can act on. `reason` says which and names the URL; `field` is "" (the reason says it all)."""


def import_tritonclient():
    try:
        import tritonclient.http as http
    except ImportError as e:
        raise TritonError("", f"backend triton needs tritonclient's HTTP client ({e}): {INSTALL_HINT}") from None
    return http


def _client_type(http) -> type:
    """tritonclient's HTTP client, with a finalizer that tolerates the end of its thread. A client kept per thread
    is finalized as its thread ends; by then gevent's per-thread state is gone, and `close` (which waits on the
    client's greenlet pool) raised AttributeError from gevent's hub look-up, an "exception ignored" that the test
    suite turned into a failure now and then. The thread's sockets go with it."""

    class Client(http.InferenceServerClient):
        def __del__(self) -> None:
            try:
                self.close()
            except AttributeError:
                pass

    return Client


class TritonBackend:
    """One Triton server (host:port of its HTTP endpoint): per-thread clients, readiness, and sessions on it."""

    def __init__(self, url: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 network_timeout_s: float = NETWORK_TIMEOUT_S, on_failure: Callable[[], None] | None = None):
        """`on_failure`: called when an inference fails (the service's model poll is woken: after a promotion
        Triton may have unloaded the old version before the service moved to the new one)."""
        self.http = import_tritonclient()
        self._client_type = _client_type(self.http)
        self.url = url
        self.on_failure = on_failure
        self.connect_timeout_s, self.network_timeout_s = connect_timeout_s, network_timeout_s
        self._local = threading.local()

    def client(self):
        """This thread's client (created on first use in the thread)."""
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = self._client_type(
                self.url, connection_timeout=self.connect_timeout_s, network_timeout=self.network_timeout_s)
        return c

    def call(self, what: str, fn, *args, **kwargs) -> Any:
        """`fn(client, ...)`, with every failure turned into a TritonError that says what was asked of which server."""
        try:
            return fn(self.client(), *args, **kwargs)
        except self.http.InferenceServerException as e:
            raise TritonError("", f"Triton at {self.url}: {what}: {e.message() or e}") from None
        except Exception as e:  # connection refused or reset, timeouts: geventhttpclient raises socket and gevent errors
            self._drop()  # a broken connection: the next call starts a fresh client
            raise TritonError("", f"Triton at {self.url} is unreachable ({what}): {type(e).__name__}: {e}") from None

    def _drop(self) -> None:
        """Close this thread's client, in this thread (gevent's state is per thread), and forget it."""
        c, self._local.client = getattr(self._local, "client", None), None
        if c is not None:
            try:
                c.close()
            except Exception:  # it was broken already: its sockets go with it
                pass

    def model_ready(self, model: str, version: int) -> bool:
        return bool(self.call(f"is {model} version {version} ready", lambda c: c.is_model_ready(model, str(version))))

    def problem(self, model: str, version: int) -> str | None:
        """None when `model` `version` is ready on Triton; else why not (for /readyz)."""
        try:
            if not self.model_ready(model, version):
                return f"Triton at {self.url} does not have {model} version {version} ready"
        except TritonError as e:
            return e.reason
        return None

    def session(self, model: str, version: int) -> TritonSession:
        return TritonSession(self, model, version)


class TritonSession:
    """One version on Triton, with InferenceSession's interface: `run(inputs) -> heads (B, T)` float32.

    Raises TritonError when the version is not ready on Triton or Triton cannot be reached.
    """

    provider = PROVIDER

    def __init__(self, backend: TritonBackend, model: str, version: int):
        self.backend, self.model, self.version = backend, model, str(version)
        if not backend.model_ready(model, version):
            raise TritonError("", f"Triton at {backend.url} does not have {model} version {version} ready "
                              f"(not in its model repository yet, or not loaded: see its log and the version policy "
                              f"in {model}/config.pbtxt)")
        meta = backend.call(f"metadata of {model} version {version}",
                            lambda c: c.get_model_metadata(model, self.version))
        self.inputs = {t["name"]: (t["datatype"], list(t.get("shape") or [])) for t in meta.get("inputs") or []}
        self.input_names = list(self.inputs)
        self.task_names = [t["name"] for t in meta.get("outputs") or []]
        http = backend.http
        self._outputs = [http.InferRequestedOutput(n, binary_data=True) for n in self.task_names]

    def check_inputs(self, specs: list[tuple[str, str, tuple[int, ...]]]) -> str | None:
        """None when Triton's inputs have the datatypes and trailing dims the encoder produces; else the mismatch."""
        for name, dtype, shape in specs:
            got = self.inputs.get(name)
            if got is None:
                continue  # a missing name is reported by the caller, with the full lists
            want = DATATYPES.get(dtype, dtype.upper())
            if got[0] != want:
                return f"input {name}: Triton has datatype {got[0]}, the config encodes {want}"
            tail = got[1][1:] if got[1] else []
            if [int(d) for d in tail] != list(shape) and got[1]:
                return f"input {name}: Triton has shape {got[1]}, the config encodes [-1, {', '.join(map(str, shape))}]"
        return None

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        http = self.backend.http
        request = []
        for name in self.input_names:
            a = np.ascontiguousarray(inputs[name])
            t = http.InferInput(name, list(a.shape), self.inputs[name][0])
            t.set_data_from_numpy(a, binary_data=True)
            request.append(t)
        try:
            res = self.backend.call(f"infer {self.model} version {self.version}",
                                    lambda c: c.infer(self.model, request, model_version=self.version,
                                                      outputs=self._outputs))
        except TritonError as e:
            if self.backend.on_failure is not None:
                self.backend.on_failure()
            raise Unavailable("model", f"{e.reason}; retry later") from None
        return np.stack([res.as_numpy(n) for n in self.task_names], axis=1).astype(np.float32, copy=False)
