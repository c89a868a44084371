"""The FastAPI app factory: `create_app(settings, deps)`. Nothing is created at import time.

Endpoints (docs/api.md): POST /v1/rank, POST /v1/feedback, GET /v1/models,
POST /v1/models/{version}/promote and POST /v1/models/rollback (admin token),
PUT/GET/DELETE /v1/experiments/{name} (admin token to change), GET /v1/experiments,
GET /v1/experiments/{name}/report, GET /healthz, GET /readyz, GET /metrics.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import anyio
import orjson
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope

from watchnext.encoding import Encoder, kernels
from watchnext.experiments import NAME_PATTERN
from watchnext.repository import RepositoryError, models_summary

from .errors import BadRequest, Conflict, NotFound, ServiceError, Unauthorized, Unavailable
from .experiments import Experiments, report_of, view
from .features import OnlineFeatures
from .feedback import MAX_EVENTS, parse_feedback, parse_json
from .front import FrontRoute, header, receive_body
from .impressions import REASONS, REDIS_ERRORS, ImpressionLog
from .models import ModelManager, VersionRefused
from .observability import CONTENT_TYPE, MULTIPROC_ENV, Metrics, Stopwatch, log, setup_logging
from .ranker import Ranker
from .schema import (
    FeedbackResponse,
    RankResponse,
    errors,
    feedback_example,
    feedback_request_schema,
    json_body,
    rank_body,
)
from .settings import Deps, Settings

logger = logging.getLogger("watchnext.service")

# an experiment's name, as watchnext.experiments checks it
ExperimentName = Annotated[str, Path(pattern=f"^{NAME_PATTERN}$")]
# PUT /v1/experiments/{name}: checked by watchnext.experiments (this schema documents it)
EXPERIMENT_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["arms"],
    "properties": {
        "name": {"type": "string", "description": "must equal the URL's name when given"},
        "salt": {"type": "string", "minLength": 1, "maxLength": 256,
                 "description": "assignment salt (default: the name); valid Unicode"},
        "arms": {"type": "array", "minItems": 2, "description": "the control first; shares sum to 1", "items": {
            "type": "object", "required": ["name", "share"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "pattern": f"^{NAME_PATTERN}$"},
                           "share": {"type": "number", "minimum": 0.0001, "maximum": 1},
                           "version": {"type": ["integer", "null"], "description": "null: the promoted version"},
                           "weights": {"type": "object",
                                       "additionalProperties": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                                       "description": "score weights instead of the config's [score] weights; with "
                                       "combine = multiplicative, also bounded so no head can overflow the score"}}}},
        "meta": {"type": "object", "description": "free-form (owner, description): valid Unicode, finite numbers, "
                 "at most 4 levels deep and 4096 bytes as JSON"},
    },
}


class Service:
    """Everything one app instance owns; started and stopped by the app's lifespan."""

    def __init__(self, settings: Settings, deps: Deps):
        self.settings, self.deps = settings, deps
        self.config = deps.config
        # with several worker processes, shared through prometheus_client's multiprocess directory
        self.metrics = Metrics(deps.metrics_dir)
        self.models = ModelManager(deps.config, deps.repo, self.metrics, settings.device, settings.threads,
                                   settings.backend, settings.triton_url)
        svc_cfg = deps.config.service
        self.store = OnlineFeatures(deps.config, Encoder(deps.config), deps.redis_url, self.metrics,
                                    svc_cfg.feature_timeout_ms, settings.feature_backoff_s,
                                    int(svc_cfg.feature_cache_mb * (1 << 20)))
        self.log = (
            ImpressionLog(deps.config, deps.redis_url, self.metrics, settings.flush_interval_s,
                          int(settings.impression_buffer_mb * (1 << 20)), settings.close_interval_s)
            if deps.redis_url else None
        )
        self.ranker = Ranker(deps.config, self.store, self.metrics)
        kernels()  # the encoder's compiled loops, loaded now rather than by the first request (about a second)
        self.experiments = Experiments(deps.config, deps.redis_url, self.models) if deps.redis_url else None
        # worker threads for the rank requests that wait on the network (see rank); more than a few at
        # once only queue inside ONNX Runtime. 0: none, everything on the event loop
        self.limiter = anyio.CapacityLimiter(settings.rank_workers) if settings.rank_workers else None
        self.remote_model = settings.backend == "triton"
        self.ranking = 0  # rank requests in flight (counted on the event loop)

    def refresh_gauges(self) -> None:
        if self.log is not None:
            self.log.set_gauges()

    def start(self) -> None:
        self.models.ensure()
        if self.models.current is None:
            log(logger, logging.WARNING, "no_model_yet", repository=str(self.deps.repo.dir),
                hint="train one with `watchnext train --data FILE`; the service picks it up when it appears")
        self.models.start(self.config.service.model_poll_s)
        if self.log is not None:
            self.log.start()
        self.store.start()
        if self.experiments is not None:
            self.experiments.start(self.config.service.model_poll_s)
        self.metrics.workers.set(1)  # serving from now: counted among the worker processes
        cur = self.models.current
        log(logger, logging.INFO, "service_started", config=self.config.path, config_hash=self.config.hash,
            model_version=cur.version if cur else None, provider=cur.provider if cur else None,
            backend=self.settings.backend, redis=bool(self.deps.redis_url), shared_metrics=self.deps.metrics_dir,
            feature_cache_mb=self.config.service.feature_cache_mb)

    def stop(self) -> None:
        self.models.stop()
        if self.experiments is not None:
            self.experiments.stop()
        left = self.log.stop() if self.log is not None else 0
        self.store.close()
        self.metrics.workers.set(0)  # no longer serving
        log(logger, logging.INFO, "service_stopped", unwritten_impressions=left)

    def require_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        if not token:
            raise Unauthorized("Authorization", "admin endpoints are disabled: start the service with WATCHNEXT_ADMIN_TOKEN set")
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Unauthorized("Authorization", "missing or wrong bearer token")


async def read_body(request: Request, limit: int) -> bytes:
    """A FastAPI route's request body, within `limit` bytes and the `body_timeout_s` setting (413, 408)."""
    timeout = request.app.state.service.settings.body_timeout_s
    return await receive_body(request.receive, request.headers.get("content-length"), limit, timeout)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), status, media_type="application/json")


class AnswerBugs:
    """ASGI middleware: an exception no handler took (a bug) is answered by `answer` (the app's one error handler),
    here rather than by Starlette's outermost middleware, which re-raises it after answering, so that uvicorn
    logs it a second time and closes the client's connection. Once an answer has begun it can only be re-raised."""

    def __init__(self, app, answer) -> None:
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:  # the client left before its body was read: nobody is left to answer
            return
        except Exception as exc:
            if started:
                raise
            response = await self.answer(Request(scope), exc)
            await response(scope, receive, send)


class App(FastAPI):
    """FastAPI, with one route answered in front of its middleware stack (`front`, service/front.py)."""

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return self.front(stack) if self.front is not None else stack


def offline_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the swagger-ui-bundle package's files, served here (FastAPI's default loads them
    from a CDN: a blank page on a machine without internet)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="watchnext API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def create_app(settings: Settings, deps: Deps) -> App:
    """Build the app around `deps`; the lifespan starts the model poller and the impression threads."""
    setup_logging(settings.log_level)
    svc = Service(settings, deps)
    config = deps.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(svc.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(svc.stop)  # flushes the impression buffer

    app = App(title="watchnext", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
              description="Ranks candidate videos with a multitask (MMoE) model; closes the loop to the trainer.")
    app.state.service = svc
    offline_docs(app)

    # ------------------------------------------------------------ errors
    async def error_answer(request: Request, exc: Exception) -> Response:
        """Every error answer, one shape: {"error": {"field": ..., "reason": ...}} with its status.

        A ServiceError as raised (counted in watchnext_requests_total); FastAPI's validation errors (422) and
        Starlette's own (404 no such route, 405 wrong method) converted to one; anything else is a bug: 500 naming
        "service" (counted), its traceback logged, nothing of the exception in the body."""
        counted, headers = True, None
        if isinstance(exc, ServiceError):
            err = exc
        elif isinstance(exc, RequestValidationError):
            first = (exc.errors() or [{}])[0]
            loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
            err, counted = BadRequest(".".join(loc) or "body", first.get("msg", "invalid")), False
        elif isinstance(exc, StarletteHTTPException):
            code = exc.status_code
            field = "path" if code == 404 else "method" if code == 405 else "request"
            err, counted, headers = ServiceError(field, str(exc.detail), status=code), False, exc.headers
        else:
            logger.error("internal_error", exc_info=exc, extra={"fields": {
                "method": request.method, "path": request.url.path, "error": type(exc).__name__}})
            err = ServiceError("service", "internal error: the service failed on this request (a bug, logged "
                               "with its traceback); retry, or report it", status=500)
        if counted:
            svc.metrics.requests.labels(request.url.path if err.status != 404 else "other", str(err.status)).inc()
        resp = json_response(err.body(), err.status)
        if headers:
            resp.headers.update(headers)
        if err.status == 408:  # a stalled upload: close now rather than after the keep-alive timeout
            resp.headers["connection"] = "close"
        return resp

    for kind in (ServiceError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(kind, error_answer)
    app.add_middleware(AnswerBugs, answer=error_answer)  # any other exception

    # ------------------------------------------------------------ rank
    async def rank_request(scope: Scope, receive: Receive) -> bytes:
        """POST /v1/rank (answered by FrontRoute, in front of FastAPI's stack): the response's JSON."""
        clock = Stopwatch()
        svc.ranking += 1  # from before the body is read: a request waiting for its body counts too
        try:
            body = await receive_body(receive, header(scope, b"content-length"), config.service.max_body_bytes,
                                      settings.body_timeout_s)
            model = svc.models.current
            if model is None:
                raise Unavailable("model", "no model version is loaded yet (the repository is empty or every version was refused)")
            live = svc.experiments.live if svc.experiments is not None else None  # taken once, like the model
            # parsed on the event loop (msgspec holds the GIL either way, and its nesting limit then meets the
            # same stack depth for every body); ranked there too when it is the only request in flight, its
            # cache misses read from Redis there as well (no thread hand-off and back: 0.36 ms off the p50 of a
            # 500-candidate request whose every id missed, 7.23 -> 6.87 ms with bench/serve_ab.py, 12 rounds, on
            # 2026-12-04 at 22:55; 0.1 and 0.7 ms in earlier runs that day; a request that arrives meanwhile
            # waits for the read as it would for ONNX Runtime, and an unreachable Redis costs one
            # `feature_timeout_ms` before the store's backoff skips it). Otherwise on a worker thread, which keeps the loop free to read other
            # bodies while this one waits on Redis or ONNX Runtime.
            prep = svc.ranker.prepare(body, header(scope, b"content-type"))
            if svc.limiter is None or (svc.ranking == 1 and not svc.remote_model):
                ranked = svc.ranker.rank(prep, model, live)
            else:
                ranked = await anyio.to_thread.run_sync(svc.ranker.rank, prep, model, live, limiter=svc.limiter)
        finally:
            svc.ranking -= 1
        if svc.log is not None:  # queued before the answer leaves: whoever has the answer finds its impression
            svc.log.add(ranked.impression)
        # orjson: the body holds only str, float and None (the ranker's own), and json.dumps took 0.3 ms
        out = orjson.dumps(ranked.body)
        svc.metrics.rank_latency.observe(clock.seconds)
        svc.metrics.rank_candidates.observe(ranked.candidates)
        svc.metrics.rank_ok.inc()  # watchnext_requests_total{endpoint="/v1/rank",status="200"}
        return out

    app.front = partial(FrontRoute, method="POST", path="/v1/rank", handler=rank_request, answer=error_answer)

    @app.post("/v1/rank", response_model=None, openapi_extra=rank_body(config),
              responses={200: {"model": RankResponse}, **errors(400, 408, 413, 422, 503)},
              summary="Rank candidates for one request; the best first")
    async def rank(request: Request) -> Response:  # named as before: /openapi.json's operationId is rank_v1_rank_post
        """POST /v1/rank as /openapi.json documents it. FrontRoute answers these requests in front of FastAPI's
        stack (`app.front`), so none gets here; one that did would get the same answer."""
        return Response(await rank_request(request.scope, request.receive), media_type="application/json")

    # ------------------------------------------------------------ feedback
    @app.post("/v1/feedback", response_model=None, openapi_extra=json_body(feedback_request_schema(config, MAX_EVENTS), feedback_example(config)),
              responses={200: {"model": FeedbackResponse}, **errors(400, 408, 413, 422, 503)},
              summary="Record what the user did with served items (one event or a list)")
    async def feedback(request: Request) -> Response:
        body = await read_body(request, config.service.max_body_bytes)
        events = parse_feedback(body, config)
        if svc.log is None:
            raise Unavailable("service", "feedback needs Redis, and this service runs without it")
        try:
            results = await anyio.to_thread.run_sync(svc.log.record_feedback, events)
            # another replica may not have written the impression yet: one more look after its flush
            # interval, waiting on the event loop (no thread is held), so any replica can take any feedback
            late = [i for i, r in enumerate(results) if r == "unknown"]
            if late and svc.log.unknown_grace_s > 0:
                await anyio.sleep(svc.log.unknown_grace_s)
                again = await anyio.to_thread.run_sync(svc.log.record_feedback, [events[i] for i in late])
                for i, r in zip(late, again, strict=True):
                    results[i] = r
        except ConnectionError:
            raise Unavailable("service", "Redis is unreachable; retry the feedback later") from None
        svc.log.count_feedback(results)
        dropped = [
            {"index": i, "request_id": e["request_id"], "item_id": e["item_id"], "reason": REASONS.get(r, r)}
            for i, (e, r) in enumerate(zip(events, results)) if r != "ok"
        ]
        svc.metrics.feedback_ok.inc()
        return json_response({"accepted": len(events) - len(dropped), "dropped": dropped})

    # ------------------------------------------------------------ models
    @app.get("/v1/models", summary="Versions, their metrics, and which one serves")
    async def models() -> dict[str, Any]:
        summary = await anyio.to_thread.run_sync(models_summary, deps.repo)
        cur = svc.models.current
        summary["loaded"] = {"version": cur.version, "provider": cur.provider} if cur else None
        summary["refused"] = {str(v): reason for v, (_, reason) in svc.models.refused.items()}
        summary["serving_fallback"] = svc.models.fallback
        live = svc.experiments.live if svc.experiments is not None else None
        summary["experiment"] = {"name": live.exp.name, "loaded": sorted(live.models)} if live is not None else None
        return summary

    @app.post("/v1/models/{version}/promote", responses=errors(401, 404, 409),
              summary="Serve VERSION (admin): loaded and warmed before the swap")
    async def promote(version: int, request: Request) -> dict[str, Any]:
        svc.require_admin(request)

        def do() -> dict[str, Any]:
            if version not in deps.repo.versions():
                raise NotFound("version", f"no version {version} (have: {deps.repo.versions()})")
            return switch(svc, version, lambda: deps.repo.promote(version))

        return await anyio.to_thread.run_sync(do)

    @app.post("/v1/models/rollback", responses=errors(401, 409),
              summary="Serve the previously promoted version again (admin)")
    async def rollback(request: Request) -> dict[str, Any]:
        svc.require_admin(request)

        def do() -> dict[str, Any]:
            try:
                target = deps.repo.rollback_target()
            except RepositoryError as e:  # none to roll back to, or a damaged serving.json (named)
                raise Conflict("version", str(e)) from None
            return switch(svc, target, deps.repo.rollback)

        return await anyio.to_thread.run_sync(do)

    # ------------------------------------------------------------ experiments
    def experiments_of(svc: Service) -> Experiments:
        if svc.experiments is None:
            raise Unavailable("service", "experiments need Redis, and this service runs without it")
        return svc.experiments

    async def in_redis(fn, *args):
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except REDIS_ERRORS:
            raise Unavailable("service", "Redis is unreachable; retry later") from None

    @app.put("/v1/experiments/{name}", responses=errors(400, 401, 408, 409, 413, 422, 503),
             openapi_extra=json_body(EXPERIMENT_BODY),
             summary="Create or update an A/B experiment (admin): every arm's version is loaded before it goes live")
    async def put_experiment(name: ExperimentName, request: Request) -> dict[str, Any]:
        svc.require_admin(request)
        exps = experiments_of(svc)
        raw = await read_body(request, config.service.max_body_bytes)
        body = parse_json(raw)  # the one body parser (400 naming the body; a 100k-deep one too)
        return await in_redis(exps.put, name, body, deps.repo.versions())

    @app.get("/v1/experiments", summary="Every experiment, live and stopped")
    async def list_experiments() -> dict[str, Any]:
        return {"experiments": await in_redis(experiments_of(svc).list)}

    @app.get("/v1/experiments/{name}", responses=errors(404, 503), summary="One experiment's definition and status")
    async def get_experiment(name: ExperimentName) -> dict[str, Any]:
        return view(await in_redis(experiments_of(svc).stored, name))

    @app.delete("/v1/experiments/{name}", responses=errors(401, 404, 503),
                summary="Stop an experiment (admin): all traffic returns to the promoted version")
    async def delete_experiment(name: ExperimentName, request: Request) -> dict[str, Any]:
        svc.require_admin(request)
        return await in_redis(experiments_of(svc).delete, name)

    @app.get("/v1/experiments/{name}/report", response_model=None, responses=errors(404, 409, 422, 429, 503),
             summary="Per-arm metrics with user-level intervals, differences from the control, SRM check "
             "(include_open=true reads every open impression: one such report at a time per process, else 429)")
    async def experiment_report(name: ExperimentName, confidence: float = 0.95, format: str = "json",
                                points: int = 0, include_open: bool = False) -> Response:
        from analysis.abreport import render_table
        from watchnext.experiments import Experiment

        if not 0 < confidence < 1:
            raise BadRequest("confidence", f"expected a number in (0, 1), got {confidence}")
        if not 0 <= points <= 200:
            raise BadRequest("points", f"expected 0..200 time points, got {points}")
        if format not in ("json", "table"):
            raise BadRequest("format", f"expected json or table, got {format!r}")
        exps = experiments_of(svc)

        def build() -> dict[str, Any]:
            stored = exps.stored(name)
            exp = Experiment.from_dict(stored["experiment"])
            if include_open and svc.log is not None:  # closed and open, each once (ImpressionLog.events_with_open)
                lines = b"\n".join(x for x in (exps.legacy_events(name), svc.log.events_with_open(name)) if x)
            else:
                lines = exps.events(name)
            rep = report_of(exp, lines, confidence, points)
            rep["include_open"] = include_open
            rep["status"], rep["stopped_at"] = stored["status"], stored.get("stopped_at")
            return rep

        if not include_open:
            rep = await in_redis(build)
        else:  # costs ~1 s per 30k open impressions: one at a time per process (checked and set on the event loop)
            if getattr(app.state, "open_report_busy", False):
                raise ServiceError("include_open", "another report with include_open=true is being built by this "
                                   "process (one at a time: each reads every open impression); retry shortly, or "
                                   "ask without include_open", status=429)
            app.state.open_report_busy = True
            try:
                rep = await in_redis(build)
            finally:
                app.state.open_report_busy = False
        if format == "table":
            return Response(render_table(rep) + "\n", media_type="text/plain; charset=utf-8")
        return json_response(rep)

    # ------------------------------------------------------------ operations
    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready to rank: a model is loaded, and with --backend triton Triton has it ready "
             "(also reports the provider and Redis)",
             responses={503: {"description": "no model loaded yet, or Triton cannot run it"}})
    async def readyz() -> Response:
        cur = svc.models.current
        redis_ok = await anyio.to_thread.run_sync(svc.log.ping) if svc.log is not None else None
        triton = svc.models.triton
        problem = await anyio.to_thread.run_sync(svc.models.backend_problem, cur) if triton is not None else None
        ready = cur is not None and problem is None
        body: dict[str, Any] = {
            "ready": ready,
            "model_version": str(cur.version) if cur else None,
            "provider": cur.provider if cur else None,
            "backend": svc.settings.backend,
            "redis": redis_ok,
            "degraded": redis_ok is False,
            "impression_backlog": svc.log.backlog() if svc.log is not None else 0,
        }
        if svc.models.fallback is not None:  # serving another version than the promoted one, which was refused
            body["serving_fallback"] = svc.models.fallback  # {"promoted", "serving", "reason"}
        if triton is not None:
            body["triton_url"], body["backend_error"] = triton.url, problem
        return json_response(body, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        svc.refresh_gauges()
        if svc.deps.metrics_dir:  # every worker process's files, read and combined off the event loop
            body = await anyio.to_thread.run_sync(svc.metrics.exposition)
        else:
            body = svc.metrics.exposition()
        return Response(body, media_type=CONTENT_TYPE)

    return app


SETTINGS_ENV = "WATCHNEXT_WORKER_SETTINGS"  # set by cli.serve.run_server for its worker processes
# set by cli.serve.run_server too: the worker processes' shared metrics directory (prometheus_client's multiprocess mode)
METRICS_DIR_ENV = MULTIPROC_ENV


def worker_app() -> App:
    """The app of one worker process of `watchnext serve --workers N` (uvicorn's factory, "service.app:worker_app"):
    the settings the parent checked, read from its environment."""
    import os

    from .settings import build_deps

    # the parent checked these; should this still fail, uvicorn exits with STARTUP_FAILURE and the parent
    # stops rather than restart the worker
    settings = Settings.from_json(os.environ[SETTINGS_ENV])
    app = create_app(settings, build_deps(settings, os.environ.get(METRICS_DIR_ENV)))
    freeze_startup()
    return app


def freeze_startup() -> None:
    """What start-up built (modules, the app) lives as long as the process: take it out of the collector's
    generations, so that the full collections requests trigger do not walk it all (500 candidates at
    concurrency 1 on 2 cores: p99 28-38 ms without this, 11-24 ms with it; measured 2026-11-23)."""
    import gc

    gc.collect()
    gc.freeze()


def switch(svc: Service, version: int, commit) -> dict[str, Any]:
    """Load and warm `version`, record the promotion, then swap; refuse (409) a version that cannot serve."""
    with svc.models.lock:
        t0 = time.perf_counter()
        cur = svc.models.current
        if cur is None or cur.version != version:
            try:
                new = svc.models.load(version)
            except VersionRefused as e:
                svc.metrics.model_refused.inc()
                log(logger, logging.ERROR, "model_refused", version=version, reason=str(e),
                    serving=cur.version if cur else None)
                raise Conflict("version", f"version {version} cannot serve: {e}") from None
        else:
            new = cur
        try:
            st = commit()
        except RepositoryError as e:
            raise Conflict("version", str(e)) from None
        svc.models.swap(new, t0)
    return {"promoted": st["promoted"], "serving": new.version, "provider": new.provider}
