"""The model repository (CONTRACT §5), laid out like Triton's.

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

STAGING = ".staging"


class RepositoryError(ValueError):
    """A repository request that cannot be met (unknown version, nothing to roll back to)."""


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
        p = self.path(version) / "metadata.json"
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise RepositoryError(f"model {self.name!r} has no version {version} (have: {self.versions()})") from None

    def state(self) -> dict[str, Any]:
        p = self.dir / "serving.json"
        if not p.is_file():
            return {"promoted": None, "history": []}
        return json.loads(p.read_text())

    def promoted(self) -> int | None:
        return self.state().get("promoted")

    def serving(self) -> int | None:
        """The promoted version, else the newest; None on an empty repository."""
        p = self.promoted()
        if p is not None and p in self.versions():
            return p
        vs = self.versions()
        return vs[-1] if vs else None

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
        if version not in self.versions():
            raise RepositoryError(f"model {self.name!r} has no version {version} (have: {self.versions()})")
        st = self.state()
        if st.get("promoted") != version:
            st["history"] = (st.get("history") or []) + [{"version": version, "at": now_iso()}]
            st["promoted"] = version
            atomic_write(self.dir / "serving.json", json.dumps(st, indent=2))
        self.write_triton_config(self.metadata(version))
        return st

    def rollback(self) -> dict[str, Any]:
        """Promote the version promoted before the current one."""
        st = self.state()
        hist = [h["version"] for h in st.get("history") or []]
        current = st.get("promoted")
        previous = [v for v in hist if v != current and v in self.versions()]
        if not previous:
            raise RepositoryError(f"model {self.name!r}: no earlier promoted version to roll back to")
        target = previous[-1]
        st["history"] = (st.get("history") or []) + [{"version": target, "at": now_iso(), "rollback_from": current}]
        st["promoted"] = target
        atomic_write(self.dir / "serving.json", json.dumps(st, indent=2))
        self.write_triton_config(self.metadata(target))
        return st

    def triton_versions(self) -> list[int]:
        """What Triton should keep loaded: the promoted version and the one promoted before it (a service
        still on the old one while it swaps, and a rollback, find it loaded). Empty: none promoted yet."""
        st = self.state()
        promoted, have = st.get("promoted"), set(self.versions())
        if promoted is None:
            return []
        before = [h["version"] for h in st.get("history") or [] if h["version"] != promoted and h["version"] in have]
        return sorted({promoted, *before[-1:]})

    def write_triton_config(self, meta: dict[str, Any]) -> None:
        atomic_write(self.dir / "config.pbtxt", triton_config(self.name, meta, self.triton_versions()))


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
