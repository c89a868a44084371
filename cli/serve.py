"""`watchnext serve`, `watchnext up` and `watchnext features load`: registered into cli/main.py.

Nothing here imports torch: the trainer runs as a child process (`watchnext train`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from cli.main import EPILOG, CliError, common

REDIS_DIR = Path("data/redis")  # the embedded Redis's append-only files, shared by serve, up and features load


def register(sub) -> None:
    from cli.ab import AB_ACTIONS

    _serve(sub)
    _up(sub)
    _features(sub)
    if _ab_actions not in AB_ACTIONS:  # `watchnext ab create / stop / show`, and `ab report --url`
        AB_ACTIONS.append(_ab_actions)


def server_flags(p: argparse.ArgumentParser) -> None:
    """The flags that set the service's settings (`Settings.flags()`; each one's dest is its flag's name). They take
    text as given: `Settings` alone converts and checks it, and holds the defaults."""
    common(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", help="port (default 8000)")
    p.add_argument("--device", help="ONNX Runtime device: auto, cpu or cuda ($WATCHNEXT_DEVICE; default auto)")
    p.add_argument("--threads", help="ONNX Runtime threads: on the CPU a batch runs as up to this many parts at once, one thread each ($WATCHNEXT_THREADS; default: the CPUs this process may use)")
    p.add_argument("--workers", help="worker processes sharing the port, each a whole service with its own "
                   "model session ($WATCHNEXT_WORKERS; default 0: for serve one per CPU this process may use, one "
                   "where there is a CUDA driver; for up one, as it shares the machine with the trainer)")
    p.add_argument("--log-level", help="debug, info, warning or error ($WATCHNEXT_LOG_LEVEL; default info)")
    p.add_argument("--backend",
                   help="who runs the model: onnxruntime (ONNX Runtime in this process) or triton (a Triton Inference "
                   "Server serving the same model repository; needs `pip install 'watchnext[triton]'`) "
                   "($WATCHNEXT_BACKEND; default onnxruntime)")
    p.add_argument("--triton-url", metavar="HOST:PORT",
                   help="Triton's HTTP endpoint, e.g. localhost:8000 ($WATCHNEXT_TRITON_URL; required with --backend triton)")


def settings_of(args, env=None, **extra):
    """The environment, then the flags given (`extra`: more overrides). A refused value is a SettingsError (a
    WatchnextError) naming the setting, its variable and its flag."""
    from service.settings import Settings

    flags = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in Settings.flags().items()}
    settings = Settings.from_env(env, **{**flags, **extra})
    if settings.backend == "triton":  # before anything starts: a missing client is a set-up error (TritonError)
        from service.triton import import_tritonclient

        import_tritonclient()
    return settings


# ---------------------------------------------------------------- serve


def _serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the ranking service alone (FastAPI + ONNX Runtime)",
        description="Serve POST /v1/rank, /v1/feedback, /v1/models, /healthz, /readyz and /metrics for the "
        "repository's serving version, picking up promotions as they happen. Uses REDIS_URL for online features, "
        "the impression log and the training stream; without it an embedded redis-server is started "
        f"(data in {REDIS_DIR}/). WATCHNEXT_ADMIN_TOKEN enables promote and rollback.",
        epilog=EPILOG,
    )
    server_flags(p)
    p.set_defaults(func=cmd_serve)


def exit_on_sigterm() -> None:
    """Make SIGTERM (`docker stop`, systemd, `kill`) end this process as Ctrl-C does: `finally` blocks run, so
    an embedded redis-server and the continuous trainer are stopped, not orphaned. uvicorn handles SIGTERM
    itself while it serves (a graceful shutdown), then restores this handler and raises the signal again;
    Python's default for SIGTERM would end the process on the spot."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def run_server(settings, deps=None) -> None:
    """Serve with uvicorn until a signal stops it (`serve` and `up`): in this process, or with
    `settings.worker_count()` > 1 in that many worker processes sharing the port, each a whole service
    (models, impression log, experiments) as replicas are, with /metrics added up across them."""
    import uvicorn

    from service.app import create_app, freeze_startup
    from service.settings import build_deps

    workers = settings.worker_count()
    deps = deps or build_deps(settings)  # a bad config or repository stops it here, with its message
    options = dict(host=settings.host, port=settings.port, log_level="warning", access_log=False,
                   timeout_graceful_shutdown=10)
    if workers == 1:
        app = create_app(settings, deps)
        freeze_startup()
        uvicorn.run(app, **options)
        return
    import tempfile

    from uvicorn.supervisors import Multiprocess

    from service.app import METRICS_DIR_ENV, SETTINGS_ENV
    from service.observability import retire_workers

    class Supervisor(Multiprocess):
        """uvicorn's, remembering a SIGTERM (this process then ends as it does with one worker, see
        exit_on_sigterm), and taking the workers that ended out of the live gauges of /metrics."""

        terminated = False

        def handle_term(self) -> None:
            self.terminated = True
            super().handle_term()

        def keep_subprocess_alive(self) -> None:  # replaces the workers that died or hang
            super().keep_subprocess_alive()
            self.retire()

        def handle_signals(self) -> None:  # SIGHUP replaces every worker, SIGTTOU ends one
            super().handle_signals()
            self.retire()

        def retire(self) -> None:
            """Every worker that is no longer in the pool has ended (uvicorn joins it first): its counters and
            histograms stay in the sums, its gauges (the backlog, watchnext_worker_processes) go."""
            retire_workers(metrics_dir, [p.pid for p in self.processes if p.pid is not None])

    # the workers are spawned, not forked: they read the checked settings from the environment, and
    # prometheus_client in each takes its multiprocess mode from PROMETHEUS_MULTIPROC_DIR as it is imported
    # there (this process never counts anything itself)
    before = os.environ.get(METRICS_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="watchnext-metrics-") as metrics_dir:
        os.environ[SETTINGS_ENV] = settings.to_json()
        os.environ[METRICS_DIR_ENV] = metrics_dir  # empty: no figures of an earlier run
        try:
            config = uvicorn.Config("service.app:worker_app", factory=True, workers=workers, **options)
            print(f"watchnext: serving on http://{settings.host}:{settings.port} with {workers} worker processes",
                  file=sys.stderr, flush=True)
            supervisor = Supervisor(config, sockets=[config.bind_socket()])
            supervisor.run()
        finally:  # children started later (`up`'s trainer) do not inherit a removed directory
            if before is None:
                os.environ.pop(METRICS_DIR_ENV, None)
            else:
                os.environ[METRICS_DIR_ENV] = before
    if supervisor.terminated:
        raise SystemExit(128 + signal.SIGTERM)


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds, before any work (Redis, a bootstrap, loading a model)."""
    import socket

    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            raise CliError("--port", f"cannot listen on {host}:{port} ({e.strerror}): another program holds it; "
                           "choose another port with --port N (make run PORT=N)") from None


def embedded_note(url: str, started: bool) -> str:
    """Which Redis a command without REDIS_URL took: the one already running on the shared data, or its own."""
    if started:
        return f"started an embedded redis-server at {url} (data in {REDIS_DIR}/)"
    return f"using the embedded redis-server already running on {REDIS_DIR}/ at {url}"


def cmd_serve(args) -> int:
    from watchnext.redis_embed import redis_for

    settings = settings_of(args)
    check_port(settings.host, settings.port)
    exit_on_sigterm()
    embedded = None
    if settings.redis_url is None:
        url, embedded = redis_for(None, REDIS_DIR)
        settings = settings.with_(redis_url=url)
        print(f"watchnext: REDIS_URL is not set: {embedded_note(url, embedded is not None)}", file=sys.stderr)
    try:
        run_server(settings)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


# ---------------------------------------------------------------- up


def _up(sub) -> None:
    p = sub.add_parser(
        "up",
        help="the whole local stack: Redis, the service and the continuous trainer",
        description="Start Redis (embedded unless REDIS_URL is set), the ranking service and the continuous "
        "trainer (`watchnext train --stream --promote`). On an empty model repository, first train a version on "
        "simulated history and load its users' and videos' features into the online store. Prints the URL and a "
        "curl example; Ctrl-C stops everything cleanly.",
        epilog=EPILOG,
    )
    server_flags(p)
    p.add_argument("--bootstrap-examples", type=int, default=200_000, metavar="N",
                   help="simulated examples to train the first version on, when the repository is empty (default "
                   "200000: enough for version 1 to beat showing the candidates unranked)")
    p.add_argument("--checkpoint", metavar="PATH", help="the continuous trainer's checkpoint (default checkpoints/<model>.pt)")
    p.add_argument("--no-trainer", action="store_true", help="do not start the continuous trainer")
    p.add_argument("--demo", type=float, default=0, metavar="S",
                   help="once serving, run an A/B experiment (engagement-only against satisfaction weights) with "
                   "S seconds of simulated traffic, print its report and write data/demo.png (make run: 60)")
    p.set_defaults(func=cmd_up)


def cmd_up(args) -> int:
    from cli.stack import run_stack

    if args.bootstrap_examples <= 0:
        raise CliError("--bootstrap-examples", f"must be > 0, got {args.bootstrap_examples}")
    settings = settings_of(args)
    check_port(settings.host, settings.port)
    exit_on_sigterm()
    return run_stack(args, settings)


# ---------------------------------------------------------------- features


def _features(sub) -> None:
    p = sub.add_parser("features", help="the online feature store (Redis)", epilog=EPILOG)
    fsub = p.add_subparsers(title="actions", metavar="ACTION")
    ld = fsub.add_parser(
        "load",
        help="write users', queries' and videos' features from a JSON-lines file to Redis",
        description="Each line is an entity record {\"source\": \"user\"|\"query\"|\"candidate\", \"id\": ID, "
        "\"features\": {...}} or an example / rank request whose sections carry their ids (user_id, "
        "query_video_id, the [item] id): every section becomes the entry of its entity, later lines winning. "
        "Entities are written encoded for this config (the hash wn:f:<source>:<layout>) with their JSON beside "
        "(wn:f:<source>:json), and running services refresh what they cache (the stream wn:f:changes). Uses REDIS_URL; without it, the embedded server's data in "
        f"{REDIS_DIR}/ (the one `watchnext up` and `watchnext serve` start).",
        epilog=EPILOG,
    )
    common(ld)
    ld.add_argument("file", metavar="FILE")
    ld.set_defaults(func=cmd_features_load)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def cmd_features_load(args) -> int:
    import redis

    from cli.main import config_of
    from watchnext.entities import load_file
    from watchnext.redis_embed import redis_for

    if not Path(args.file).is_file():
        raise CliError(args.file, "no such file")
    config = config_of(args)
    given = os.environ.get("REDIS_URL")
    url, embedded = redis_for(given, REDIS_DIR)
    if not given:
        print(f"watchnext: REDIS_URL is not set: {embedded_note(url, embedded is not None)}", file=sys.stderr)
    client = redis.Redis.from_url(url)
    try:
        counts = load_file(client, config, args.file)
        if embedded is not None:
            client.bgrewriteaof()
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    print(json.dumps({"file": args.file, **counts}))
    return 0


# ---------------------------------------------------------------- ab (a running service's experiments)

DEFAULT_URL = "http://127.0.0.1:8000"


def _ab_actions(asub) -> None:
    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("WATCHNEXT_URL", DEFAULT_URL),
                       help=f"the service ($WATCHNEXT_URL; default {DEFAULT_URL})")
        p.add_argument("--token", default=os.environ.get("WATCHNEXT_ADMIN_TOKEN"),
                       help="admin token ($WATCHNEXT_ADMIN_TOKEN)")

    c = asub.add_parser(
        "create", help="start (or update) an experiment on a running service",
        description="PUT /v1/experiments/NAME: every arm's version is loaded and warmed before the experiment goes "
        "live. Arms: --arm NAME=SHARE[:VERSION][:w=TASK=W,...] once per arm, the control first (no VERSION: the "
        "promoted one; w=...: score weights instead of the config's [score] weights), or --file with the JSON body.",
        epilog="example: watchnext ab create sat --arm control=0.5 --arm sat=0.5:w=click=1,like=4")
    c.add_argument("name", metavar="NAME")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--arm", action="append", metavar="NAME=SHARE[:VERSION][:w=TASK=W,...]")
    src.add_argument("--file", metavar="JSON", help="the body: {\"arms\": [...], \"salt\": ...}")
    c.add_argument("--salt", help="assignment salt (default: the name; a new salt reshuffles users)")
    target(c)
    c.set_defaults(func=cmd_ab_create)

    st = asub.add_parser("stop", help="stop an experiment: all traffic returns to the promoted version",
                         description="DELETE /v1/experiments/NAME. Its events are kept for `ab report`.")
    st.add_argument("name", metavar="NAME")
    target(st)
    st.set_defaults(func=cmd_ab_stop)

    sh = asub.add_parser("show", help="an experiment's definition and status (without NAME: every experiment)")
    sh.add_argument("name", metavar="NAME", nargs="?")
    target(sh)
    sh.set_defaults(func=cmd_ab_show)

    r = asub.choices["report"]
    r.add_argument("--url", help="ask a running service (GET /v1/experiments/NAME/report) instead of reading --events")
    r.add_argument("--open", action="store_true",
                   help="with --url: also impressions whose attribution window is still open (feedback so far)")
    offline = r.get_default("func")
    r.set_defaults(func=lambda a: cmd_ab_report_url(a) if a.url else offline(a))


def parse_arm(i: int, spec: str) -> dict:
    """'sat=0.5:3:w=click=1,like=4' -> {"name": "sat", "share": 0.5, "version": 3, "weights": {...}}."""
    head, *rest = spec.split(":")
    name, eq, share = head.partition("=")
    where = f"--arm {spec!r}"
    try:
        arm: dict = {"name": name.strip(), "share": float(share)}
    except ValueError:
        raise CliError(where, "expected NAME=SHARE[:VERSION][:w=TASK=W,...]") from None
    if not eq:
        raise CliError(where, "expected NAME=SHARE[:VERSION][:w=TASK=W,...]")
    for part in rest:
        if part.startswith("w="):
            weights = {}
            for kv in part[2:].split(","):
                k, eq, v = kv.partition("=")
                try:
                    weights[k.strip()] = float(v)
                except ValueError:
                    raise CliError(where, f"weight {kv!r}: expected TASK=NUMBER") from None
            arm["weights"] = weights
        elif part in ("", "promoted"):
            continue
        elif part.isdigit():
            arm["version"] = int(part)
        else:
            raise CliError(where, f"{part!r} is neither a version number nor w=TASK=W,...")
    return arm


def call(args, method: str, path: str, body: dict | None = None, admin: bool = False, raw: bool = False):
    """One request to the service; an error answer becomes a CliError naming the field and the reason."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if admin:
        if not args.token:
            raise CliError("--token", "the admin token is needed (or set WATCHNEXT_ADMIN_TOKEN)")
        headers["Authorization"] = f"Bearer {args.token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            err = json.loads(text)["error"]
            msg = f"{err['field']}: {err['reason']}"
        except (ValueError, KeyError, TypeError):
            msg = text[:300]
        raise CliError(f"{method} {path}", f"{e.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"--url {args.url}", f"cannot reach the service ({getattr(e, 'reason', e)})") from None
    return text if raw else json.loads(text)


def cmd_ab_create(args) -> int:
    if args.file:
        try:
            body = json.loads(Path(args.file).read_text())
        except (OSError, ValueError) as e:
            raise CliError("--file", str(e)) from None
    else:
        body = {"arms": [parse_arm(i, s) for i, s in enumerate(args.arm)]}
    if args.salt:
        body["salt"] = args.salt
    print(json.dumps(call(args, "PUT", f"/v1/experiments/{args.name}", body, admin=True), indent=2))
    return 0


def cmd_ab_stop(args) -> int:
    print(json.dumps(call(args, "DELETE", f"/v1/experiments/{args.name}", admin=True), indent=2))
    return 0


def cmd_ab_show(args) -> int:
    print(json.dumps(call(args, "GET", f"/v1/experiments/{args.name}" if args.name else "/v1/experiments"), indent=2))
    return 0


def cmd_ab_report_url(args) -> int:
    from urllib.parse import urlencode

    from analysis.chart import write_chart
    from cli.ab import print_report

    if args.events or args.pre or args.experiment or args.arms:
        raise CliError("ab report --url", "the service has the events and the definition; "
                       "drop --events, --pre, --experiment and --arms")
    q = {"confidence": args.confidence, "points": args.points if args.chart else 0,
         "include_open": "true" if args.open else "false"}
    rep = call(args, "GET", f"/v1/experiments/{args.name}/report?{urlencode(q)}")
    ts = rep.pop("timeseries", None)
    if args.chart and ts is not None:
        rep["chart"] = str(write_chart(ts, args.chart, f"experiment {rep['experiment']}"))
    print_report(rep, args.json)
    if rep["srm"]["flagged"]:
        print("watchnext: warning: sample ratio mismatch (p < 0.001): the split is broken; "
              "do not trust the differences", file=sys.stderr)
    return 0
