"""The model repository (docs/training.md), laid out like Triton's.

    models/<name>/config.pbtxt        Triton model config (its version policy follows promotion)
    models/<name>/<version>/model.onnx
    models/<name>/<version>/metadata.json
    models/<name>/serving.json        which version is promoted, and the promotion history

A version is built in a hidden staging folder and renamed into place, so it
appears whole or not at all. Torch-free: the service uses this module too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config
from .encoding import Encoder
from .errors import WatchnextError

STAGING = ".staging"


class RepositoryError(WatchnextError):
    """A repository request that cannot be met (unknown version, nothing to roll back to), or a damaged file in
    it: `field` names the file ("" when the reason names what is missing)."""


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelRepository:
    def __init__(self, root: str | os.PathLike, name: str):
        self.root = Path(root)
        self.name = name
        self.dir = self.root / name

    # ------------------------------------------------------------ reading
    def versions(self) -> list[int]:
        """Complete versions, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            if p.name.isdigit() and (p / "model.onnx").is_file() and (p / "metadata.json").is_file():
                out.append(int(p.name))
        return sorted(out)

    def path(self, version: int) -> Path:
        return self.dir / str(version)

    def metadata(self, version: int) -> dict[str, Any]:
        """A version's metadata.json; RepositoryError naming the file when it is missing or damaged."""
        p = self.path(version) / "metadata.json"
        if not p.is_file():
            raise RepositoryError("", f"model {self.name!r} has no version {version} (have: {self.versions()})")
        return read_json_object(p)

    def state(self) -> dict[str, Any]:
        """serving.json (none yet: nothing promoted); RepositoryError naming the file when it is damaged."""
        p = self.dir / "serving.json"
        if not p.is_file():
            return {"promoted": None, "history": []}
        st = read_json_object(p, "fix or remove it (the newest version then serves)")
        promoted, history = st.get("promoted"), st.get("history", [])
        if promoted is not None and not _is_version(promoted):
            raise RepositoryError(str(p), f"'promoted' is {promoted!r}, not a version number: fix or remove it")
        if not isinstance(history, list) or not all(isinstance(h, dict) and _is_version(h.get("version"))
                                                    for h in history):
            raise RepositoryError(str(p), "'history' is not a list of {\"version\": N, ...}: fix or remove it")
        return st

    def promoted(self) -> int | None:
        return self.state().get("promoted")

    def serving(self) -> int | None:
        """The promoted version, else the newest; None on an empty repository."""
        p = self.promoted()
        if p is not None and p in self.versions():
            return p
        vs = self.versions()
        return vs[-1] if vs else None

    def fallbacks(self, refused: int | None) -> list[int]:
        """The versions to serve instead of `refused`, best first: those promoted before it, the latest
        promotion first, then the others, newest first. With a damaged serving.json: newest first."""
        try:
            history = [h["version"] for h in self.state().get("history") or []]
        except RepositoryError:
            history = []
        have = self.versions()
        order = [v for v in reversed(history) if v in have] + sorted(have, reverse=True)
        return [v for v in dict.fromkeys(order) if v != refused]

    def rollback_target(self) -> int:
        """The version `rollback` would promote: the one promoted before the current one. Rollbacks walk back
        (promote 1, 2, 3; rollback: 2; rollback: 1), never toggle between two versions."""
        st = self.state()
        current = st.get("promoted")
        previous = [v for v in promotion_stack(st.get("history") or []) if v != current and v in self.versions()]
        if not previous:
            raise RepositoryError("", f"model {self.name!r}: no earlier promoted version to roll back to")
        return previous[-1]

    # ------------------------------------------------------------ writing
    def publish(self, build: Callable[[Path], dict[str, Any]]) -> int:
        """Build a version in staging with `build(folder) -> metadata`, then move it into place.

        Returns the new version number. Concurrent publishers get distinct numbers.
        """
        staging = self.root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        self._clean_staging(staging)
        tmp = Path(tempfile.mkdtemp(dir=staging, prefix=f"{self.name}-"))
        try:
            meta = build(tmp)
            self.dir.mkdir(parents=True, exist_ok=True)
            version = (self.versions() or [0])[-1] + 1
            while True:
                meta["version"] = version
                atomic_write(tmp / "metadata.json", json.dumps(meta, indent=2, sort_keys=True))
                try:
                    os.rename(tmp, self.path(version))  # atomic; fails if the number was taken
                    break
                except OSError:
                    if not self.path(version).exists():
                        raise
                    version += 1
            self.write_triton_config(meta)
            return version
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _clean_staging(self, staging: Path, older_than_s: float = 3600.0) -> None:
        """Remove what a publisher killed mid-export left behind (never a live build: those are young)."""
        now = time.time()
        for p in staging.glob(f"{self.name}-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass

    def promote(self, version: int) -> dict[str, Any]:
        """Point serving.json at `version`. Checks only that it exists: loading and running it is the
        caller's check (service.models.load_version), before it calls this."""
        if version not in self.versions():
            raise RepositoryError("", f"model {self.name!r} has no version {version} (have: {self.versions()})")
        meta = self._promotable(version)  # before anything is written: a damaged one changes nothing
        st = self.state()
        if st.get("promoted") != version:
            st["history"] = (st.get("history") or []) + [{"version": version, "at": now_iso()}]
            st["promoted"] = version
            atomic_write(self.dir / "serving.json", json.dumps(st, indent=2))
        self.write_triton_config(meta)
        return st

    def rollback(self) -> dict[str, Any]:
        """Promote the version promoted before the current one."""
        target = self.rollback_target()
        meta = self._promotable(target)
        st = self.state()
        current = st.get("promoted")
        st["history"] = (st.get("history") or []) + [{"version": target, "at": now_iso(), "rollback_from": current}]
        st["promoted"] = target
        atomic_write(self.dir / "serving.json", json.dumps(st, indent=2))
        self.write_triton_config(meta)
        return st

    def _promotable(self, version: int) -> dict[str, Any]:
        """The metadata of `version`, checked to describe its inputs and outputs for Triton's config."""
        meta = self.metadata(version)
        try:
            triton_config(self.name, meta, [version])
        except (KeyError, TypeError) as e:
            raise RepositoryError(str(self.path(version) / "metadata.json"), "its inputs or outputs do not describe "
                                  f"the model's tensors ({type(e).__name__}: {e})") from None
        return meta

    def triton_versions(self) -> list[int]:
        """What Triton should keep loaded: the promoted version and the one promoted before it (a service
        still on the old one while it swaps, and a rollback, find it loaded). Empty: none promoted yet, or
        serving.json is damaged (Triton then serves the newest, as a worker would)."""
        try:
            st = self.state()
        except RepositoryError:
            return []
        promoted, have = st.get("promoted"), set(self.versions())
        if promoted is None:
            return []
        before = [h["version"] for h in st.get("history") or [] if h["version"] != promoted and h["version"] in have]
        return sorted({promoted, *before[-1:]})

    def write_triton_config(self, meta: dict[str, Any]) -> None:
        atomic_write(self.dir / "config.pbtxt", triton_config(self.name, meta, self.triton_versions()))


def models_summary(repo: ModelRepository) -> dict:
    """Every version with its metrics, and which one is promoted. A damaged metadata.json is a row with an
    `error` naming the file; a damaged serving.json is `state_error` (the newest version then serves)."""
    state_error = None
    try:
        promoted, serving = repo.promoted(), repo.serving()
    except RepositoryError as e:
        state_error, promoted = str(e), None
        versions = repo.versions()
        serving = versions[-1] if versions else None
    out = []
    for v in repo.versions():
        try:
            m = repo.metadata(v)
        except RepositoryError as e:
            out.append({"version": v, "error": str(e), "serving": v == serving})
            continue
        out.append(
            {
                "version": v,
                "created_at": m.get("created_at"),
                "parent": m.get("parent"),
                "config_hash": m.get("config_hash"),
                "examples": (m.get("watermark") or {}).get("examples"),
                "metrics": {k: t.get("auc", t.get("rmse")) for k, t in ((m.get("metrics") or {}).get("tasks") or {}).items()},
                "serving": v == serving,
            }
        )
    summary = {"model": repo.name, "promoted": promoted, "serving": serving, "versions": out}
    if state_error is not None:
        summary["state_error"] = state_error
    return summary


def promotion_stack(history: list[dict[str, Any]]) -> list[int]:
    """The promotions still in force, oldest first, replayed from serving.json's history: a promotion pushes its
    version, a rollback pops back to its target."""
    stack: list[int] = []
    for h in history:
        v = h["version"]
        if "rollback_from" in h:
            while stack and stack[-1] != v:
                stack.pop()
            if not stack:
                stack.append(v)
        elif not stack or stack[-1] != v:
            stack.append(v)
    return stack


def read_json_object(path: Path, fix: str = "") -> dict[str, Any]:
    """A JSON object from `path`; RepositoryError naming the file and what is wrong with it."""
    hint = f": {fix}" if fix else ""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise RepositoryError(str(path), f"cannot be read: {e.strerror}{hint}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RepositoryError(str(path), f"not valid JSON: {e}{hint}") from None
    if not isinstance(data, dict):
        raise RepositoryError(str(path), f"expected a JSON object, got {type(data).__name__}{hint}")
    return data


def _is_version(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


_TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}


def input_layout(config: Config) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": d, "shape": [-1, *s]} for n, d, s in Encoder(config).input_specs()]


def triton_config(name: str, meta: dict[str, Any], versions: list[int]) -> str:
    """A Triton model config for the ONNX Runtime backend; every axis 0 is the batch."""

    def tensor(t: dict[str, Any]) -> str:
        dims = ", ".join(str(d) for d in t["shape"])
        return f'  {{ name: "{t["name"]}" data_type: {_TRITON_TYPES[t["dtype"]]} dims: [ {dims} ] }}'

    policy = (
        f"version_policy: {{ specific: {{ versions: [ {', '.join(map(str, versions))} ] }} }}"
        if versions
        else "version_policy: { latest: { num_versions: 1 } }"
    )
    return "\n".join(
        [
            f'name: "{name}"',
            'platform: "onnxruntime_onnx"',
            "max_batch_size: 0  # the graph carries its own dynamic batch axis",
            policy,
            "input [",
            ",\n".join(tensor(t) for t in meta["inputs"]),
            "]",
            "output [",
            ",\n".join(tensor(t) for t in meta["outputs"]),
            "]",
            "",
        ]
    )
