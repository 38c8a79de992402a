"""`ktrans serve` (and `python server/main.py`): the OpenAI/Ollama-compatible HTTP server.

The model flags are the chat's (ktrans/cli/model_args.py); the rest configure serving: where to
listen, the continuous-batching limits, authentication and CORS. The process binds its port at
once and loads the model in the background; /health answers 503 until it is ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ktrans.errors import UsageError

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
    g.add_argument("--cors-origins", dest="cors_origins", nargs="*", default=[],
                   help="origins allowed by CORS, e.g. http://localhost:3000 or '*' (default: none)")
    g.add_argument("--ping-interval", dest="ping_interval", type=float, default=15.0,
                   help="seconds between keep-alive pings on silent streams (default: 15)")
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


def build_app(args):
    from ktrans.cli.model_args import engine_kwargs, runner_kwargs, use_demo_model
    from ktrans.engine import AsyncEngine
    from ktrans_server.app import create_app
    from ktrans_server.service import Settings

    for name in ("port", "max_batch_size", "max_queue"):
        v = getattr(args, name)
        if v < (0 if name == "max_queue" else 1):
            raise UsageError(f"--{name} must be a positive integer, got {v}")
    demo = use_demo_model(args, lambda msg: print(msg, file=sys.stderr))
    settings = Settings(model_name="ktrans-demo-random" if demo else _model_name(args), served_model_names=args.served_model_name or [],
                        max_new_tokens=args.max_new_tokens, force_think=args.force_think,
                        api_key=args.api_key or None, cors_origins=args.cors_origins,
                        ping_interval=args.ping_interval)
    kwargs = {**runner_kwargs(args, progress=sys.stderr.isatty()), **engine_kwargs(args)}

    def load():
        return AsyncEngine.from_args(**kwargs)

    return create_app(settings, load)


def run(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args)
    print(f"ktrans serve: listening on http://{args.host}:{args.port} (model loads in the background; "
          f"GET /health answers 200 when ready)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
