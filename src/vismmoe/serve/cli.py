"""`vismmoe serve`: options -> engine -> warm-up -> uvicorn.

Owns turning the command's arguments into `ServeOptions`, loading the engine, one warm-up request (the fast
decode step compiles and captures on its first call; better at start than on a client's first request), and
running uvicorn until interrupted. The HTTP side is app.py's.
"""

from __future__ import annotations

import logging
import os
import sys

from ..config import parse_size
from ..errors import UserError



def check_args(args) -> None:
    """UserError for a bad server argument, before any weight is read."""
    if args.allowed_local_media is not None and not os.path.isdir(args.allowed_local_media):
        raise UserError(f"--allowed-local-media {args.allowed_local_media} is not a folder", "give an existing folder")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} is out of range", "give a port from 1 to 65535 (0: any free port)")
    for flag, v in (("--default-max-tokens", args.default_max_tokens), ("--max-queue", args.max_queue),
                    ("--max-batch", args.max_batch)):
        if v < 1:
            raise UserError(f"{flag} {v} must be at least 1", "give a positive number")
    parse_size(args.max_body, what="--max-body")


def options_from(args, engine):
    """ServeOptions of the command's (checked) arguments."""
    from .app import ServeOptions
    from .media import MediaRules
    name = args.served_model_name or os.path.basename(os.path.normpath(engine.model_dir))
    return ServeOptions(model_name=name, api_key=args.api_key or os.environ.get("VISMMOE_API_KEY") or None,
                        max_body_bytes=parse_size(args.max_body, what="--max-body"),
                        default_max_tokens=args.default_max_tokens,
                        media=MediaRules(allowed_local=args.allowed_local_media,
                                         allow_remote=args.allow_remote_media),
                        max_batch=args.max_batch, max_queue=args.max_queue)


def warm_up(engine, max_batch: int, make_request=None) -> None:
    """One short request per batch size the server may run (powers of two up to `max_batch`): compiles and
    captures the fast step's shapes now instead of on clients' first requests. `make_request()` gives the request
    to warm with (default: a text-only "Hello"); the fast step compiles again for a KV length it has not seen."""
    from ..request import GenerationRequest
    if make_request is None:
        def make_request():
            return GenerationRequest.from_prompt(None, "Hello", max_new_tokens=2, ignore_eos=True)
    b = 1
    while True:
        engine.generate_requests([make_request() for _ in range(b)])
        if b >= max_batch:
            return
        b = min(2 * b, max_batch)


def serve(args, engine_from) -> int:
    import uvicorn
    from .app import create_app
    check_args(args)
    engine = engine_from(args)
    opts = options_from(args, engine)
    if engine.device.type == "cuda":
        warm_up(engine, opts.max_batch)
    app = create_app(engine, opts)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"vismmoe: serving {opts.model_name!r} at http://{args.host}:{args.port}/v1 "
          f"(max batch {opts.max_batch}, queue {opts.max_queue}"
          f"{', API key required' if opts.api_key else ''})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    finally:
        app.state.scheduler.close()
    return 0
