"""A stand-in for Triton Inference Server: the parts of its HTTP protocol (KServe v2) that tritonclient uses.

No real Triton can run on the development machines (it needs its container and,
for the ONNX Runtime backend we care about, a GPU box), so the tests run this
instead: a real HTTP/1.1 server (keep-alive) on a loopback port, serving the
model repository the way Triton does in `--model-control-mode=poll`, with the
real ONNX files run by ONNX Runtime. Nothing about the model is mocked.

Endpoints (https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md
and Triton's binary tensor data extension)::

    GET  /v2/health/live, /v2/health/ready
    GET  /v2                                             server metadata
    GET  /v2/models/{name}[/versions/{v}]/ready          200 when loaded, 400 otherwise
    GET  /v2/models/{name}[/versions/{v}]                model metadata: inputs and outputs with datatype and shape
    POST /v2/models/{name}[/versions/{v}]/infer          JSON or binary tensors (Inference-Header-Content-Length)

Every version folder `<repo>/<name>/<v>/model.onnx` is served (loaded on first
use, reloaded when the file changes); `hidden` lists versions to answer as not
ready (a version Triton has not loaded yet). Errors are `{"error": "..."}` with
status 400, as Triton answers them. `calls` counts inferences per (name, version).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

# KServe v2 datatypes <-> numpy (the ones an ONNX ranker can have)
DATATYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "UINT8": np.uint8, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
ORT_TYPES = {"tensor(bool)": "BOOL", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
             "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(float16)": "FP16",
             "tensor(float)": "FP32", "tensor(double)": "FP64"}
MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")


class StandinError(Exception):
    """Answered as 400 {"error": message}."""


class Loaded:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.stamp = _stamp(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        def tensor(t) -> dict[str, Any]:
            return {"name": t.name, "datatype": ORT_TYPES[t.type], "shape": [d if isinstance(d, int) else -1 for d in t.shape]}

        return {"name": name, "versions": [version], "platform": "onnxruntime_onnx",
                "inputs": [tensor(t) for t in self.sess.get_inputs()],
                "outputs": [tensor(t) for t in self.sess.get_outputs()]}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class TritonStandin:
    """`with TritonStandin(models_dir) as t:` serves on `t.url` (host:port, as tritonclient takes it)."""

    def __init__(self, repository: str | Path, port: int = 0):
        self.repository = Path(repository)
        self.port = port
        self.hidden: set[int] = set()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, selected headers)
        self._models: dict[tuple[str, str], Loaded] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> TritonStandin:
        standin = self

        class Handler(_Handler):
            owner = standin

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]  # the same port on a restart
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="triton-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (keep-alive ones included), as a crashed server would."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._server = None

    def __enter__(self) -> TritonStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ the repository, like Triton's poll mode
    def model(self, name: str, version: str | None) -> tuple[str, Loaded]:
        folder = self.repository / name
        if version in (None, ""):  # the newest version (Triton's default `latest` policy)
            versions = sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit() and (p / "model.onnx").is_file())
            if not versions:
                raise StandinError(f"Request for unknown model: '{name}' is not found")
            version = str(versions[-1])
        if not version.isdigit() or int(version) in self.hidden:
            raise StandinError(f"Request for unknown model: '{name}' version {version} is not at ready state")
        path = folder / version / "model.onnx"
        if not path.is_file():
            raise StandinError(f"Request for unknown model: '{name}' version {version} is not found")
        key = (name, version)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None or loaded.stamp != _stamp(path):
                try:
                    loaded = self._models[key] = Loaded(path)
                except Exception as e:  # a file ONNX Runtime refuses: the version fails to load
                    raise StandinError(f"failed to load '{name}' version {version}: {e}") from None
        return version, loaded

    def infer(self, name: str, version: str | None, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        version, m = self.model(name, version)
        header_bytes = body if header_length is None else body[:header_length]
        if header_length is not None and not 0 <= header_length <= len(body):
            raise StandinError(f"Inference-Header-Content-Length {header_length} is outside the body ({len(body)} bytes)")
        try:
            req = json.loads(header_bytes)
        except ValueError as e:
            raise StandinError(f"failed to parse the request JSON buffer: {e}") from None
        binary, offset = (b"" if header_length is None else body[header_length:]), 0
        feeds: dict[str, np.ndarray] = {}
        for t in req.get("inputs") or []:
            tname, dtype_name, shape = t.get("name"), t.get("datatype"), t.get("shape")
            if tname not in m.inputs:
                raise StandinError(f"unexpected inference input '{tname}' for model '{name}'")
            want = ORT_TYPES[m.inputs[tname].type]
            if dtype_name != want:
                raise StandinError(f"inference input '{tname}' data-type is '{dtype_name}', but model '{name}' expects '{want}'")
            dtype = np.dtype(DATATYPES[dtype_name]).newbyteorder("<")
            count = int(np.prod(shape)) if shape else 1
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is not None:  # binary tensor data: little-endian, row major, after the JSON
                if size != count * dtype.itemsize or offset + size > len(binary):
                    raise StandinError(f"input '{tname}': binary_data_size {size} does not match shape {shape} "
                                       f"({count * dtype.itemsize} bytes) or the body")
                arr = np.frombuffer(binary, dtype, count, offset)
                offset += size
            else:
                arr = np.asarray(t.get("data"), dtype=dtype)
                if arr.size != count:
                    raise StandinError(f"input '{tname}': {arr.size} values for shape {shape}")
            feeds[tname] = arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
        if offset != len(binary):
            raise StandinError(f"{len(binary) - offset} bytes of binary data follow the inputs unused")
        missing = set(m.inputs) - set(feeds)
        if missing:
            raise StandinError(f"expected {len(m.inputs)} inputs but got {len(feeds)} inputs for model '{name}' "
                               f"(missing {sorted(missing)})")
        params = req.get("parameters") or {}
        requested = req.get("outputs")
        if requested:
            wanted = [(o["name"], (o.get("parameters") or {}).get("binary_data", params.get("binary_data_output", False)))
                      for o in requested]
        else:
            wanted = [(o, params.get("binary_data_output", False)) for o in m.outputs]
        for o, _ in wanted:
            if o not in m.outputs:
                raise StandinError(f"unexpected inference output '{o}' for model '{name}'")
        try:
            results = m.sess.run([o for o, _ in wanted], feeds)
        except Exception as e:
            raise StandinError(f"onnx runtime error: {str(e).splitlines()[0]}") from None
        with self._lock:
            self.calls[(name, version)] += 1
        outs, blobs = [], []
        for (o, as_binary), arr in zip(wanted, results):
            arr = np.asarray(arr)
            dtname = next(k for k, v in DATATYPES.items() if np.dtype(v) == arr.dtype)
            out: dict[str, Any] = {"name": o, "datatype": dtname, "shape": list(arr.shape)}
            if as_binary:
                blob = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = arr.ravel().tolist()
            outs.append(out)
        head = json.dumps({"model_name": name, "model_version": version, "id": req.get("id", ""),
                           "outputs": outs}).encode()
        if not blobs:
            return head, None
        return head + b"".join(blobs), len(head)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient's connection pool expects
    owner: TritonStandin

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _record(self) -> None:
        keep = {k: v for k, v in self.headers.items() if k.lower() in ("inference-header-content-length", "content-type")}
        with self.owner._lock:
            self.owner.requests.append((self.command, self.path.split("?")[0], keep))

    def do_GET(self) -> None:
        self._record()
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v2/health/live", "/v2/health/ready"):
            return self._send(200, b"")
        if path == "/v2":
            return self._json(200, {"name": "triton-standin", "version": "0", "extensions": ["binary_tensor_data"]})
        m = MODEL_PATH.match(path)
        if m is None or m["rest"] == "/infer":
            return self._json(400, {"error": f"unknown request: GET {path}"})
        try:
            version, loaded = self.owner.model(m["name"], m["version"])
        except StandinError as e:
            return self._send(400, b"") if m["rest"] == "/ready" else self._json(400, {"error": str(e)})
        if m["rest"] == "/ready":
            return self._send(200, b"")
        return self._json(200, loaded.metadata(m["name"], version))

    def do_POST(self) -> None:
        self._record()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0].rstrip("/")
        m = MODEL_PATH.match(path)
        if m is None or m["rest"] != "/infer":
            return self._json(400, {"error": f"unknown request: POST {path}"})
        if self.headers.get("Content-Encoding"):
            return self._json(400, {"error": "the stand-in does not decompress request bodies"})
        hl = self.headers.get("Inference-Header-Content-Length")
        try:
            out, header_length = self.owner.infer(m["name"], m["version"], body, int(hl) if hl is not None else None)
        except StandinError as e:
            return self._json(400, {"error": str(e)})
        if header_length is None:
            return self._send(200, out)
        self._send(200, out, {"Inference-Header-Content-Length": str(header_length)}, "application/octet-stream")
