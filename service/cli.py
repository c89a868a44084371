"""`watchnext serve`, `watchnext up` and `watchnext features load`: registered into watchnext/cli.py.

Nothing here imports torch: the trainer runs as a child process (`watchnext train`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from watchnext.cli import EPILOG, CliError, common

REDIS_DIR = Path("data/redis")  # the embedded Redis's append-only files, shared by serve, up and features load


def register(sub) -> None:
    _serve(sub)
    _up(sub)
    _features(sub)


def server_flags(p: argparse.ArgumentParser) -> None:
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="ONNX Runtime device ($WATCHNEXT_DEVICE; default auto)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads ($WATCHNEXT_THREADS; default: the CPUs this process may use)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="($WATCHNEXT_LOG_LEVEL; default info)")


def settings_of(args, env=None, **extra):
    from .settings import Settings, SettingsError

    try:
        return Settings.from_env(env, config_path=args.config, models_dir=args.models, host=args.host, port=args.port,
                                 device=args.device, threads=args.threads, log_level=args.log_level, **extra)
    except SettingsError as e:
        raise CliError(str(e)) from None


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


def cmd_serve(args) -> int:
    import uvicorn

    from watchnext.redis_embed import start_embedded

    from .app import create_app
    from .settings import build_deps

    settings = settings_of(args)
    embedded = None
    if settings.redis_url is None:
        embedded = start_embedded(REDIS_DIR)
        settings = settings.with_(redis_url=embedded.url)
        print(f"watchnext: REDIS_URL is not set: started an embedded redis-server at {embedded.url}", file=sys.stderr)
    try:
        app = create_app(settings, build_deps(settings))
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=10)
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
    p.add_argument("--bootstrap-examples", type=int, default=100_000, metavar="N",
                   help="simulated examples to train the first version on, when the repository is empty (default 100000)")
    p.add_argument("--checkpoint", metavar="PATH", help="the continuous trainer's checkpoint (default checkpoints/<model>.pt)")
    p.add_argument("--no-trainer", action="store_true", help="do not start the continuous trainer")
    p.set_defaults(func=cmd_up)


def cmd_up(args) -> int:
    from .stack import run_stack

    if args.bootstrap_examples <= 0:
        raise CliError(f"--bootstrap-examples: must be > 0, got {args.bootstrap_examples}")
    return run_stack(args, settings_of(args))


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
        "Keys: wn:f:<source>:<id>, each a JSON object. Uses REDIS_URL; without it, the embedded server's data in "
        f"{REDIS_DIR}/ (the one `watchnext up` and `watchnext serve` start).",
        epilog=EPILOG,
    )
    common(ld)
    ld.add_argument("file", metavar="FILE")
    ld.set_defaults(func=cmd_features_load)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def cmd_features_load(args) -> int:
    import redis

    from watchnext.cli import config_of
    from watchnext.redis_embed import start_embedded

    from .features import load_file

    if not Path(args.file).is_file():
        raise CliError(f"{args.file}: no such file")
    config = config_of(args)
    url, embedded = os.environ.get("REDIS_URL"), None
    if not url:
        embedded = start_embedded(REDIS_DIR)
        url = embedded.url
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
