"""`vismmoe serve`: options -> listening socket -> engine -> warm-up -> uvicorn, and the drain at shutdown.

Owns the server's own command-line options (`add_arguments`) and their checks, turning them into `ServeOptions`,
binding the port before the weights are read (a busy port is one line and exit 2, before anything says it
serves), loading the engine, one warm-up request (the fast decode step compiles and captures on its first call;
better at start than on a client's first request), and running it (server.py: says where it serves once it
does, the bound port for --port 0, and drains on SIGTERM/SIGINT). The HTTP side is app.py's.
"""

from __future__ import annotations

import logging
import math
import os
import sys

from ..config import parse_size
from ..errors import UserError


MIN_BODY_BYTES = 1024           # --max-body's floor: a small chat request, with room to spare


def add_arguments(sv) -> None:
    """The server options that cli.py's `serve` parser does not spell out itself."""
    sv.add_argument("--allow-media-networks", default="", metavar="CIDRS",
                    help="with --allow-remote-media: networks (comma-separated CIDRs or addresses, e.g. "
                         "10.0.0.0/8,127.0.0.1) that image URLs may reach though not public (default: none; "
                         "loopback, private, link-local and other non-public addresses are refused)")
    sv.add_argument("--max-prompt-chars", type=int, default=None, metavar="N",
                    help="most characters of text in one request, checked before tokenizing (default: 16 per "
                         "token of the model's context)")
    sv.add_argument("--max-images", type=int, default=32, metavar="N", help="most images in one request (default 32)")
    sv.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                    help="continuous: a request joins the running rows between decode steps and leaves when it "
                         "ends; static: waiting requests run as one batch to its end (default continuous; "
                         "docs/serving.md)")
    sv.add_argument("--admit-wait-ms", type=float, default=0.0, metavar="MS",
                    help="continuous batching: while rows run, fewer newcomers than free places wait up to MS "
                         "milliseconds for others, so they share one prefill (under an expert budget a prefill is "
                         "mostly expert copies, shared by the requests prefilled together) (default 0: at once)")
    sv.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="S",
                    help="on SIGTERM/SIGINT, seconds running requests may go on; then they end with finish reason "
                         "'shutdown' (HTTP 503) (default 5)")


def check_args(args) -> None:
    """UserError for a bad server argument, before any weight is read."""
    if args.allowed_local_media is not None and not os.path.isdir(args.allowed_local_media):
        raise UserError(f"--allowed-local-media {args.allowed_local_media} is not a folder", "give an existing folder")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} is out of range", "give a port from 1 to 65535 (0: any free port)")
    for flag, v in (("--default-max-tokens", args.default_max_tokens), ("--max-queue", args.max_queue),
                    ("--max-batch", args.max_batch), ("--max-images", args.max_images)):
        if v < 1:
            raise UserError(f"{flag} {v} must be at least 1", "give a positive number")
    if args.max_prompt_chars is not None and args.max_prompt_chars < 1:
        raise UserError(f"--max-prompt-chars {args.max_prompt_chars} must be at least 1", "give a positive number")
    if not (math.isfinite(args.admit_wait_ms) and 0 <= args.admit_wait_ms <= 60_000):
        raise UserError(f"--admit-wait-ms {args.admit_wait_ms} is not a wait in milliseconds",
                        "give 0 to 60000")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise UserError(f"--shutdown-timeout {args.shutdown_timeout} is not a number of seconds", "give 0 or more")
    body = parse_size(args.max_body, what="--max-body")
    if body < MIN_BODY_BYTES:
        raise UserError(f"--max-body {args.max_body} is under 1 KiB, too small for any chat request",
                        "give 1KiB or more (default 32MiB)")
    _allow_networks(args)
    api_key(args)


def _allow_networks(args) -> tuple:
    from .media import parse_networks
    nets = parse_networks(args.allow_media_networks)
    if nets and not args.allow_remote_media:
        raise UserError("--allow-media-networks needs --allow-remote-media", "add --allow-remote-media, or drop it")
    return nets


def api_key(args) -> str | None:
    """The key clients must send (--api-key, else VISMMOE_API_KEY; None: none). UserError for an empty key or
    one that an HTTP header cannot carry: a server would otherwise run without the protection it was asked for."""
    key, where = args.api_key, "--api-key"
    if key is None:
        key, where = os.environ.get("VISMMOE_API_KEY"), "VISMMOE_API_KEY"
    if key is None:
        return None
    if not key.strip():
        raise UserError(f"{where} is empty", "give a key, or leave it out (and unset VISMMOE_API_KEY) to serve "
                                             "without one")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise UserError(f"{where} holds spaces or characters other than printable ASCII",
                        "give a key of printable ASCII without spaces (it travels in an HTTP header)")
    return key


def options_from(args, engine):
    """ServeOptions of the command's (checked) arguments; UserError for one that this engine's model refuses (a
    --default-max-tokens that leaves no room in its context)."""
    from .app import ServeOptions, check_options
    from .media import MediaRules
    name = args.served_model_name or os.path.basename(os.path.normpath(engine.model_dir))
    opts = ServeOptions(model_name=name, api_key=api_key(args),
                        max_body_bytes=parse_size(args.max_body, what="--max-body"),
                        default_max_tokens=args.default_max_tokens,
                        media=MediaRules(allowed_local=args.allowed_local_media,
                                         allow_remote=args.allow_remote_media,
                                         allow_networks=_allow_networks(args)),
                        max_batch=args.max_batch, max_queue=args.max_queue, batching=args.batching,
                        admit_wait_s=args.admit_wait_ms / 1e3, max_prompt_chars=args.max_prompt_chars,
                        max_images=args.max_images, shutdown_timeout_s=args.shutdown_timeout)
    check_options(engine, opts)
    return opts


WARM_LENGTHS = (256, 512, 1024)     # KV lengths a continuous server's step shape is captured at before it serves


def warm_up(engine, max_batch: int, make_request=None, static: bool = True, continuous: bool = False) -> None:
    """Compile and capture the fast step's shapes now instead of on clients' first requests.

    `static`: one short request per batch size a static server may run (powers of two up to `max_batch`);
    `make_request()` gives the request to warm with (default: a text-only "Hello"); the fast step compiles again
    for a KV length it has not seen. `continuous`: the running batch's one shape of `max_batch` rows
    (engine/running.py) at each KV length of `WARM_LENGTHS`: a request whose token limit needs that length
    joins, takes one step and is cancelled (a longer batch later captures the next length, twice the last).
    With CPU experts (--cpu-experts on|auto) each shape's split step (one graph per MoE layer, step/split_step.py)
    is made too: a second pass in which every step splits (`on` splits every step anyway: one pass)."""
    split = getattr(engine.fast_step(), "split", None)
    always = split is not None and split.rule.always
    if not always:                                      # the one-graph steps
        _warm_shapes(engine, max_batch, make_request, static, continuous)
    if split is None:
        return
    split.rule.always = True
    try:
        _warm_shapes(engine, max_batch, make_request, static, continuous)
    finally:
        split.rule.always = always


def _warm_shapes(engine, max_batch: int, make_request, static: bool, continuous: bool) -> None:
    from ..engine.request import GenerationRequest
    from ..engine.running import RunningBatch
    if make_request is None:
        def make_request():
            return GenerationRequest.from_prompt(None, "Hello", max_new_tokens=2, ignore_eos=True)
    b = 1
    while static:
        engine.generate_requests([make_request() for _ in range(b)])
        if b >= max_batch:
            break
        b = min(2 * b, max_batch)
    if continuous and engine.fast_step() is not None:
        rb = RunningBatch(engine, capacity=max_batch)
        for L in WARM_LENGTHS:
            req = GenerationRequest.from_prompt(None, "Hello", max_new_tokens=L - 64, ignore_eos=True)
            if not rb.admit(req):
                rb.step()
                req.cancel()
                rb.step()


def serve(args, engine_from) -> int:
    from .app import create_app
    from .server import HTTPServer, listen, server_config
    check_args(args)
    sock = listen(args.host, args.port)          # a busy port fails here, before the weights are read
    try:
        engine = engine_from(args)
        opts = options_from(args, engine)
        if engine.device.type == "cuda":
            cont = opts.batching == "continuous"
            warm_up(engine, opts.max_batch, static=not cont, continuous=cont)
        app = create_app(engine, opts)
    except BaseException:
        sock.close()
        raise
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = f"[{args.host}]" if ":" in args.host else args.host

    def started(port: int) -> None:
        print(f"vismmoe: serving {opts.model_name!r} at http://{host}:{port}/v1 "
              f"({app.state.scheduler.batching} batching, max batch {opts.max_batch}, queue {opts.max_queue}"
              f"{', API key required' if opts.api_key else ''})", file=sys.stderr, flush=True)

    server = HTTPServer(server_config(app, opts.shutdown_timeout_s), on_started=started)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.scheduler.close()
    return 0
