"""Which version serves: load and warm a new version before the old one is dropped.

The serving version is one immutable `LoadedModel`; a request takes it once and
uses it to the end, so the version it names is the version that scored it, and
a swap (one reference assignment) never fails a request in flight. A version
whose config hash differs from the service's config, whose file does not match
its recorded checksum or does not load, or whose outputs are not finite on a
warm-up batch, is refused with one log line (`model_refused`), and the current
version keeps serving. A worker that starts while the promoted version is refused
serves the last good one instead: the version promoted before it, else the newest
that loads (`fallback` says which and why; /readyz and /v1/models show it). Only
when no version at all loads does it have none (503).

With `backend = "triton"` the model call goes to a Triton Inference Server that
serves the same repository (service/triton.py): a version is loaded when Triton
says it is ready and its inputs and outputs match the config. A version Triton
does not have ready yet (it polls the repository on its own schedule), or a
Triton that cannot be reached, is refused as well, once in the log, but tried
again on every poll until it serves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from watchnext.config import Config
from watchnext.encoding import Encoder
from watchnext.repository import ModelRepository, RepositoryError, sha256_file
from watchnext.scoring import weight_vector

from .errors import Unavailable
from .inference import InferenceSession
from .observability import Metrics, log

if TYPE_CHECKING:
    from .triton import TritonBackend  # imported where used: it needs tritonclient

logger = logging.getLogger("watchnext.service.models")
WARM_BATCHES = (1, 64, 512)


@dataclass(frozen=True)
class LoadedModel:
    version: int
    session: InferenceSession
    metadata: dict[str, Any]
    weights: np.ndarray  # (T,) score weights in the session's task order
    loaded_at: float

    @property
    def provider(self) -> str:
        return self.session.provider


class VersionRefused(Exception):
    """`retry`: the version itself may be fine, but its backend cannot take it now (Triton not ready or unreachable)."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


class ModelManager:
    """Serves the repository's serving version; a background thread polls for promotions."""

    def __init__(self, config: Config, repo: ModelRepository, metrics: Metrics, device: str = "auto", threads: int = 0,
                 backend: str = "onnxruntime", triton_url: str | None = None):
        self.config, self.repo, self.metrics = config, repo, metrics
        self.device, self.threads = device, threads
        self.backend = backend
        self.triton: TritonBackend | None = None  # when backend == "triton" (imports tritonclient)
        if backend == "triton":
            from .triton import TritonBackend

            assert triton_url is not None, "Settings requires triton_url with the triton backend"
            self.triton = TritonBackend(triton_url, on_failure=self.wake)
        self.encoder = Encoder(config)
        self.current: LoadedModel | None = None
        self.refused: dict[int, tuple[str, str]] = {}  # version -> (file stamp, reason)
        # serving another version than the promoted one: {"promoted": N or None, "serving": M, "reason": ...}
        self.fallback: dict[str, Any] | None = None
        self._state_error: str | None = None  # serving.json's damage, logged once
        self.lock = threading.RLock()  # one load or swap at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ loading
    def load(self, version: int) -> LoadedModel:
        """Load, check and warm `version`; raises VersionRefused with the reason."""
        return load_version(self.config, self.repo, version, self.device, self.threads, self.encoder,
                            self._triton_session if self.triton is not None else None)

    def _triton_session(self, version: int):
        from .triton import TritonError

        assert self.triton is not None  # passed to load_version only with the triton backend
        try:
            session = self.triton.session(self.repo.name, version)
        except TritonError as e:
            raise VersionRefused(str(e), retry=True) from None
        wrong = session.check_inputs(self.encoder.input_specs())
        if wrong:
            raise VersionRefused(f"on Triton at {self.triton.url}: {wrong}")
        return session

    def backend_problem(self, model: LoadedModel | None) -> str | None:
        """Why `model` cannot be run now by its backend (Triton down, or the version unloaded there); None if it can.

        Without a model: why the serving version was refused, when its backend refused it."""
        if self.triton is None:
            return None
        if model is None:
            try:
                target = self.repo.serving()
            except RepositoryError as e:
                return str(e)
            refused = self.refused.get(target) if target is not None else None
            return refused[1] if refused else None
        return self.triton.problem(self.repo.name, model.version)

    def ensure(self, version: int | None = None) -> LoadedModel | None:
        """Make `version` (default: the repository's serving version) the one that serves, if it can be.

        When it cannot (or serving.json is damaged), the version serving keeps serving; with none serving yet
        (a fresh start), the first of `repo.fallbacks` that loads serves. `fallback` then says so."""
        with self.lock:
            cur = self.current
            why = None
            try:
                target = self.repo.serving() if version is None else version
            except RepositoryError as e:  # damaged serving.json: which version is promoted is unknown
                target, why = None, str(e)
                if self._state_error != why:
                    log(logger, logging.ERROR, "model_state_unreadable", reason=why,
                        serving=cur.version if cur else None)
            self._state_error = why
            if target is not None:
                if cur is not None and cur.version == target:
                    self.fallback = None
                    return cur
                new = self._try(target, cur)
                if new is not None:
                    return new
                why = self.refused[target][1]
            if why is None:  # an empty repository
                return cur
            if cur is None:
                for v in self.repo.fallbacks(target):
                    if self._try(v, None) is not None:
                        break
            cur = self.current
            self.fallback = {"promoted": target, "serving": cur.version, "reason": why} if cur is not None else None
            return cur

    def _try(self, version: int, cur: LoadedModel | None) -> LoadedModel | None:
        """Load `version` and swap to it; None when it is refused (logged once while its file is unchanged)."""
        stamp = _stamp(self.repo.path(version))
        if version in self.refused and self.refused[version][0] == stamp:
            return None  # refused before, file unchanged: stay quiet
        t0 = time.perf_counter()
        try:
            new = self.load(version)
        except VersionRefused as e:
            before = self.refused.get(version)
            # a retryable refusal is tried again on every poll, but logged once (until its reason changes)
            self.refused[version] = ("" if e.retry else stamp, str(e))
            if not e.retry or before is None or before[1] != str(e):
                self.metrics.model_refused.inc()
                log(logger, logging.ERROR, "model_refused", version=version, reason=str(e),
                    serving=cur.version if cur else None, **({"retry": True} if e.retry else {}))
            return None
        self.swap(new, t0)
        return new

    def swap(self, new: LoadedModel, t0: float) -> None:
        """Make `new` the serving version: one reference assignment; requests in flight keep the one they took."""
        with self.lock:
            cur = self.current
            self.refused.pop(new.version, None)
            self.current = new
            self.fallback = None  # ensure() sets it again when `new` stands in for a refused version
            if cur is not None and cur.version == new.version:
                return
            self.metrics.model_swaps.inc()
            self.metrics.serving(new.version, new.provider)
            log(logger, logging.INFO, "model_serving", version=new.version, previous=cur.version if cur else None,
                provider=new.provider, load_ms=round((time.perf_counter() - t0) * 1000, 1))

    # ------------------------------------------------------------ polling
    def start(self, poll_s: float) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.ensure()
                except Exception as e:  # a poll must never kill the thread
                    log(logger, logging.ERROR, "model_poll_failed", error=repr(e))
                self._wake.wait(poll_s)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="watchnext-model-poll", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)


def load_version(config: Config, repo: ModelRepository, version: int, device: str = "cpu", threads: int = 1,
                 encoder: Encoder | None = None, open_session: Callable[[int], Any] | None = None) -> LoadedModel:
    """Load `version` and run it: what must hold before it serves, or is promoted (`watchnext models promote`
    calls this too, on the CPU). Raises VersionRefused with a reason that names the file at fault.

    The checks: metadata.json is readable and carries the config's hash; model.onnx matches its recorded
    checksum and loads (ONNX Runtime, or `open_session(version)`: Triton); its inputs and outputs are the
    config's; warm-up batches of every feature absent give finite heads of shape (n, tasks)."""
    encoder = encoder or Encoder(config)
    folder = repo.path(version)
    meta_file, onnx = folder / "metadata.json", folder / "model.onnx"
    try:
        meta = repo.metadata(version)
    except RepositoryError as e:
        raise VersionRefused(str(e)) from None
    if meta.get("config_hash") != config.hash:
        raise VersionRefused(f"{meta_file}: config hash {meta.get('config_hash')} does not match the service's config "
                             f"{config.hash} ({config.path})")
    want = (meta.get("onnx") or {}).get("sha256")
    try:
        if want and sha256_file(onnx) != want:
            raise VersionRefused(f"{onnx}: checksum does not match metadata.json (corrupt or partly written file)")
    except OSError as e:
        raise VersionRefused(f"{onnx}: cannot be read: {e.strerror}") from None
    if open_session is not None:
        session = open_session(version)
    else:
        try:
            session = InferenceSession(onnx, device, threads)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise VersionRefused(f"{onnx}: ONNX Runtime cannot load it: {str(e).splitlines()[0][:300]}") from None
    specs = [name for name, _, _ in encoder.input_specs()]
    if sorted(session.input_names) != sorted(specs):
        raise VersionRefused(f"{onnx}: inputs {session.input_names} do not match the config's {specs}")
    tasks = [t.name for t in config.tasks]
    if sorted(session.task_names) != sorted(tasks):
        raise VersionRefused(f"{onnx}: outputs {session.task_names} do not match the config's tasks {tasks}")
    for n in WARM_BATCHES:  # first runs allocate; do it before traffic sees this version
        try:
            heads = session.run(encoder.empty_inputs(n))
        except Unavailable as e:  # Triton went away, or answered an error, mid warm-up
            raise VersionRefused(f"warm-up batch of {n}: {e.reason}", retry=True) from None
        except Exception as e:  # ONNX Runtime fails a graph that loads but cannot run these inputs
            raise VersionRefused(f"{onnx}: a warm-up batch of {n} fails: {str(e).splitlines()[0][:300]}") from None
        if heads.shape != (n, len(tasks)) or not np.isfinite(heads).all():
            raise VersionRefused(f"{onnx}: a warm-up batch of {n} gave outputs of shape {heads.shape} "
                                 "or non-finite values")
    w = weight_vector(session.task_names, config.score.weights)
    return LoadedModel(version, session, meta, w, time.time())


def _stamp(folder: Path) -> str:
    try:
        st = (folder / "model.onnx").stat()
        m = (folder / "metadata.json").stat()
        return f"{st.st_size}:{st.st_mtime_ns}:{m.st_mtime_ns}"
    except OSError:
        return "missing"
