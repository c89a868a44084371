"""The service's one error handler, over a real uvicorn: every error answer is {"error": {"field", "reason"}}; an
unexpected exception is a 500 naming "service" (nothing of it in the body) with its traceback in the log."""

from __future__ import annotations

import json

from tests.service.traffic import rank_requests


def _requests_total(client, endpoint: str, status: str) -> float:
    """watchnext_requests_total{endpoint, status} from /metrics (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if (line.startswith("watchnext_requests_total{") and f'endpoint="{endpoint}"' in line
                and f'status="{status}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_unexpected_exception_is_a_500_naming_the_service_and_its_traceback_is_logged(
        trained, server, client, monkeypatch, capfd):
    req = rank_requests(trained["history"], 1, top_k=3)[0]
    assert client.post("/v1/rank", json=req).status_code == 200
    secret = "the ranker's state went bad at 0x5eed"

    def broken(*args, **kwargs):
        raise ZeroDivisionError(secret)

    monkeypatch.setattr(server.service.ranker, "rank", broken)
    capfd.readouterr()
    r = client.post("/v1/rank", json=req)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"field", "reason"} and err["field"] == "service" and "internal error" in err["reason"]
    for leak in (secret, "ZeroDivisionError", "Traceback", "broken"):  # nothing of the exception in the body
        assert leak not in r.text
    err_text = capfd.readouterr().err
    logged = [json.loads(ln) for ln in err_text.splitlines() if '"internal_error"' in ln]
    assert len(logged) == 1, err_text
    assert "Exception in ASGI application" not in err_text  # answered here: uvicorn neither logs it again nor
    # closes the connection (the requests below reuse it)
    line = logged[0]
    assert line["level"] == "error" and line["path"] == "/v1/rank" and line["method"] == "POST"
    assert line["error"] == "ZeroDivisionError"
    assert line["exc"].startswith("Traceback (most recent call last):") and "in broken" in line["exc"]
    assert f"ZeroDivisionError: {secret}" in line["exc"]
    assert _requests_total(client, "/v1/rank", "500") == 1
    # the service goes on serving
    monkeypatch.undo()
    assert client.post("/v1/rank", json=req).status_code == 200


def test_framework_errors_have_the_same_shape(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": {"field": "path", "reason": "Not Found"}}
    r = client.get("/v1/rank")
    assert r.status_code == 405 and r.json() == {"error": {"field": "method", "reason": "Method Not Allowed"}}
    assert r.headers["allow"] == "POST"
    r = client.post("/v1/models/three/promote")  # the path's version is not an integer: FastAPI's validation
    assert r.status_code == 422 and r.json()["error"]["field"] == "version"
    r = client.get("/v1/experiments/-bad-name")
    assert r.status_code == 422 and r.json()["error"]["field"] == "name"


def test_rank_is_answered_in_front_of_fastapi_and_fastapis_route_answers_the_same(trained, server, client):
    from service.front import FrontRoute

    req = rank_requests(trained["history"], 1, top_k=3)[0]
    bad = {**req, "top_k": 0}
    oversized = b"{" + b" " * (9 << 20) + b"}"  # past the 8 MiB default of [service] max_body_bytes
    answers = []
    for front in (True, False):
        if not front:  # FastAPI's own stack only: its /v1/rank route, the one /openapi.json documents
            assert isinstance(server.app.middleware_stack, FrontRoute)
            server.app.middleware_stack = server.app.middleware_stack.app
        got = [client.post("/v1/rank", json=req), client.post("/v1/rank", json=bad),
               client.post("/v1/rank", content=oversized, headers={"content-type": "application/json"})]
        answers.append([(r.status_code, r.headers["content-type"], r.json()) for r in got])
    assert [a[0] for a in answers[0]] == [200, 422, 413]
    assert answers[0][0][2]["items"] and answers[0][1][2]["error"]["field"] == "top_k"
    assert answers[0] == answers[1]
    assert _requests_total(client, "/v1/rank", "200") == 2 and _requests_total(client, "/v1/rank", "422") == 2
    # documented as before (a generated client's method name comes from the operationId)
    assert client.get("/openapi.json").json()["paths"]["/v1/rank"]["post"]["operationId"] == "rank_v1_rank_post"
