"""`ktrans serve` (and `python server/main.py`): the OpenAI/Ollama-compatible HTTP server.

The model flags are the chat's (ktrans/cli/model_args.py); the rest configure serving: where to
listen, the continuous-batching limits, authentication, CORS and the connection limits. The
process binds its port at once (and says so only once it listens) and loads the model in the
background; /health answers 503 until it is ready. If loading fails, the server stops and the
command exits non-zero with the reason: clients retry 503s, so it must not wait forever.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ktrans.errors import KtransError, UsageError

BACKENDS = ("balance_serve",)


def add_server_args(p: argparse.ArgumentParser) -> None:
    from ktrans.cli.model_args import add_model_args

    add_model_args(p, cache_lens=16384, chunk_size=512, max_new_tokens=4096)
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=10002, help="port to listen on (default: 10002)")
    g.add_argument("--max_batch_size", "--max-batch-size", type=int, default=4,
                   help="requests decoded together in one engine step (default: 4)")
    g.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=64,
                   help="requests allowed to wait for admission; more get 503 + Retry-After (default: 64)")
    g.add_argument("--backend_type", "--backend-type", default="balance_serve", choices=BACKENDS,
                   help="serving backend: balance_serve = continuous batching with chunked prefill")
    g.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("KTRANS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or x-api-key) on every API route "
                        "(default: $KTRANS_API_KEY; unset = no authentication)")
    g.add_argument("--served-model-name", "--served_model_name", dest="served_model_name", nargs="+",
                   default=None, help="model id(s) reported by /v1/models and /api/tags "
                                      "(default: the model directory or GGUF file name)")
    g.add_argument("--chat-template", "--chat_template", dest="chat_template", default=None, metavar="FILE",
                   help="Jinja chat template file used instead of the model's own (e.g. one that renders "
                        "tools, for a GGUF whose template does not)")
    g.add_argument("--cors-origins", dest="cors_origins", nargs="*", default=[],
                   help="origins allowed by CORS, e.g. http://localhost:3000 or '*' (default: none)")
    g.add_argument("--allowed-hosts", dest="allowed_hosts", nargs="*", default=None,
                   help="Host header names accepted (DNS-rebinding protection); default: the loopback "
                        "names when --host is loopback, any otherwise; '*' accepts any")
    g.add_argument("--ping-interval", dest="ping_interval", type=float, default=15.0,
                   help="seconds between keep-alive pings on silent streams (default: 15)")
    g.add_argument("--max-body-mb", dest="max_body_mb", type=float, default=16.0,
                   help="largest request body accepted, in MiB; larger ones get 413 (default: 16)")
    g.add_argument("--header-timeout", dest="header_timeout", type=float, default=30.0,
                   help="seconds a connection may take to send a request's headers (default: 30)")
    g.add_argument("--body-timeout", dest="body_timeout", type=float, default=30.0,
                   help="seconds a request body may stall between two chunks (default: 30)")
    g.add_argument("--send-timeout", dest="send_timeout", type=float, default=120.0,
                   help="seconds a client may leave a response unread before it is cut off (default: 120)")
    g.add_argument("--max-connections", dest="max_connections", type=int, default=1024,
                   help="open connections allowed; more get 503 and are closed (default: 1024)")
    g.add_argument("--log-level", dest="log_level", default="info",
                   choices=["debug", "info", "warning", "error"])


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over OpenAI- and Ollama-compatible HTTP APIs",
                       description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, "
                                   "/v1/models (OpenAI) and /api/chat, /api/generate, /api/tags, /api/show, "
                                   "/api/version, /api/ps (Ollama), plus /health and /metrics. Requests are "
                                   "batched continuously with chunked prefill.")
    add_server_args(p)
    p.set_defaults(func=run)


def _model_name(args) -> str:
    path = args.gguf_path or args.model_path
    base = os.path.basename(os.path.normpath(path))
    return base[:-5] if base.endswith(".gguf") else base


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535] (0 = any free port), got {args.port}")
    for name, low in (("max_batch_size", 1), ("max_queue", 0), ("max_connections", 1)):
        v = getattr(args, name)
        if v < low:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v}")
    for name in ("ping_interval", "max_body_mb", "header_timeout", "body_timeout", "send_timeout"):
        v = getattr(args, name)
        if not v > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {v}")


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"--chat-template {path}: {e.strerror}") from None
    if not text.strip():
        raise UsageError(f"--chat-template {path}: the file is empty")
    return text


def build_app(args, on_load_failed=None, on_loaded=None):
    from ktrans.cli.model_args import engine_kwargs, runner_kwargs, use_demo_model
    from ktrans.engine import AsyncEngine
    from ktrans_server.app import create_app
    from ktrans_server.http_guard import Limits, default_allowed_hosts
    from ktrans_server.service import Settings

    _check_args(args)
    demo = use_demo_model(args, lambda msg: print(msg, file=sys.stderr))
    template = _read_template(args.chat_template)
    hosts = args.allowed_hosts if args.allowed_hosts else default_allowed_hosts(args.host)
    limits = Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)), body_timeout=args.body_timeout,
                    send_timeout=args.send_timeout, allowed_hosts=[h.lower() for h in hosts])
    settings = Settings(model_name="ktrans-demo-random" if demo else _model_name(args),
                        served_model_names=args.served_model_name or [],
                        max_new_tokens=args.max_new_tokens, force_think=args.force_think,
                        api_key=args.api_key or None, cors_origins=args.cors_origins,
                        ping_interval=args.ping_interval, limits=limits, chat_template=template)
    kwargs = {**runner_kwargs(args, progress=sys.stderr.isatty()), **engine_kwargs(args)}

    def load():
        engine = AsyncEngine.from_args(**kwargs)
        if on_loaded is not None:
            on_loaded(engine)
        return engine

    return create_app(settings, load, on_load_failed)


def connection_limits(args):
    from ktrans_server.transport import ConnectionLimits

    return ConnectionLimits(header_timeout=args.header_timeout, max_connections=args.max_connections)


def run(args) -> int:
    import uvicorn

    from ktrans.fit import counts as expert_counts
    from ktrans_server.transport import bound_address, uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def load_failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = bound_address(self)
                print(f"ktrans serve: listening on http://{host}:{port} (model loads in the background; "
                      f"GET /health answers 200 when ready)", file=sys.stderr, flush=True)

    loaded = []
    app = build_app(args, load_failed, loaded.append)
    server = Server(uvicorn_config(app, args.host, args.port, connection_limits(args), log_level=args.log_level))
    server.run()
    for engine in loaded:                     # what the router chose while serving feeds the next --fit
        expert_counts.save_collected(engine.engine.runner.model,
                                     expert_counts.model_id(args.model_path, args.gguf_path))
    if failure:
        raise KtransError(f"the model failed to load: {failure[0]}")
    if not server.started:
        raise KtransError(f"could not listen on {args.host}:{args.port} (see the message above)")
    return 0
