"""A request body that does not arrive in time is answered 408 and let go (WATCHNEXT_BODY_TIMEOUT_S), while the
service keeps answering everyone else. Real uvicorn, real sockets: the stalled client sends its headers and part of
the body, then nothing."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.service.fixtures import ADMIN, live_service

TIMEOUT_S = 1.0
DECLARED = 7 * 1024 * 1024  # what the stalled client announces
SENT = 1024 * 1024  # what it sends before it stalls


def stall(port: int, path: str, method: str = "POST", headers: str = "") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
              f"Content-Length: {DECLARED}\r\n\r\n".encode() + b"[" * SENT)
    return s


def answer(s: socket.socket, wait_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection or `wait_s` passes, and when the first bytes came."""
    s.settimeout(0.1)
    got, first, deadline = b"", None, time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        first = first or time.monotonic()
        got += chunk
        if b"\r\n\r\n" in got and got.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
            break
    return got, first


def test_a_stalled_upload_is_answered_408_within_the_bound_and_others_are_served(trained, models_dir, redis_url):
    with live_service(trained["config_path"], models_dir, redis_url, body_timeout_s=TIMEOUT_S) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as c:
        t0 = time.monotonic()
        stalled = [stall(srv.port, "/v1/rank") for _ in range(3)]
        stalled.append(stall(srv.port, "/v1/experiments/e1", "PUT", f"Authorization: Bearer {ADMIN}\r\n"))
        # meanwhile everyone else is served
        served = 0
        while time.monotonic() - t0 < TIMEOUT_S * 0.8:
            r = c.post("/v1/rank", json={"candidates": [{"video_id": "v1"}, {"video_id": "v2"}]})
            assert r.status_code == 200, r.text
            served += 1
        assert served >= 1
        for s in stalled:
            got, first = answer(s, 5 * TIMEOUT_S)
            s.settimeout(1.0)
            closed = s.recv(1) == b""  # the connection is closed with the answer, not after a keep-alive timeout
            s.close()
            assert closed
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), got[:300]
            assert TIMEOUT_S * 0.9 < first - t0 < TIMEOUT_S + 3.0, first - t0
            err = json.loads(body)["error"]
            assert err["field"] == "body" and f"not received within {TIMEOUT_S:g} s" in err["reason"], err
        assert c.get("/v1/experiments/e1").status_code == 404  # the PUT went nowhere
        assert c.post("/v1/rank", json={"candidates": [{"video_id": "v1"}]}).status_code == 200


def test_a_client_that_leaves_mid_body_is_not_logged_as_a_bug_and_others_are_served(trained, models_dir, redis_url,
                                                                                     capfd):
    with live_service(trained["config_path"], models_dir, redis_url, body_timeout_s=30.0) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as c:
        capfd.readouterr()
        for path in ("/v1/rank", "/v1/rank", "/v1/feedback"):  # headers and part of a body, then the connection
            stall(srv.port, path).close()  # closes: nobody is left to answer
        time.sleep(0.5)
        r = c.post("/v1/rank", json={"candidates": [{"video_id": "v1"}, {"video_id": "v2"}]})
        assert r.status_code == 200, r.text
        err = capfd.readouterr().err
        assert "internal_error" not in err and "Exception in ASGI application" not in err, err[-2000:]
        metrics = c.get("/metrics").text
        assert 'status="500"' not in metrics
