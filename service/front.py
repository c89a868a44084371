"""One route answered in front of FastAPI's stack: `FrontRoute`, and the body reader every route uses.

POST /v1/rank is the request production sends hundreds of times a second. FastAPI's
layers around a route (its six middlewares, the router, dependency solving, a
Response object, a wrapper per layer around `send`) cost that request about 0.5 ms
at 500 candidates on 2 cores, more than parsing its body and gathering 500 cached
candidates together (`bench/serve_ab.py`, ids by a warm cache, 10 rounds in turns:
p50 5.19 ms through FastAPI, 4.68 ms in front of it, 2026-12-03). `FrontRoute` is an ASGI app
that answers one method and path itself and hands every other request to FastAPI.
What the layers did for that route is done here: the body's size and time limits
(`receive_body`, which FastAPI's routes call too), the one error shape and its count
(the app's error handler, which also logs a bug with its traceback), and the answer.
FastAPI still documents the route in /openapi.json (service/app.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import PayloadTooLarge, ServiceError

# the route's work: (scope, receive) -> the JSON body of a 200 answer; raises ServiceError for a 4xx or 5xx
Handler = Callable[[Scope, Receive], Awaitable[bytes]]
# the app's error handler: (request, exception) -> the answer
Answer = Callable[[Request, Exception], Awaitable[Response]]


async def receive_body(receive: Receive, declared: str | None, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (or declares more), and with 408 when
    it has not all arrived within `timeout` seconds (a stalled upload then lets go of what it had sent). Raises
    ClientDisconnect when the client goes away first."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge("body", f"larger than the limit of {limit} bytes ({declared} bytes)")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):  # asyncio's own: a third of anyio.fail_after's cost (uvicorn runs asyncio)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge("body", f"larger than the limit of {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        chunks.clear()
        raise ServiceError("body", f"not received within {timeout:g} s ({size} bytes arrived); "
                                   "send the whole body at once", status=408) from None
    return b"".join(chunks)


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (`name` in lower case, as ASGI gives them); None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class FrontRoute:
    """ASGI: `method path` answered by `handler` (200 with its JSON, or `answer`'s error), anything else by `app`."""

    def __init__(self, app: ASGIApp, method: str, path: str, handler: Handler, answer: Answer):
        self.app, self.method, self.path, self.handler, self.answer = app, method, path, handler, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != self.method or _route_path(scope) != self.path:
            await self.app(scope, receive, send)
            return
        try:
            body = await self.handler(scope, receive)
        except ClientDisconnect:  # nobody is left to answer
            return
        except Exception as exc:  # a ServiceError's answer, or a bug's 500 (logged by `answer`)
            response = await self.answer(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def _route_path(scope: Scope) -> str:
    """The path as FastAPI's router matches it: without the app's root_path, if it starts with it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
