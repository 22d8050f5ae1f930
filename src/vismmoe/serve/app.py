"""`vismmoe serve`: an OpenAI-compatible HTTP server over one engine (FastAPI on uvicorn).

    POST /v1/chat/completions   messages with text and image_url parts, several images, history; max_tokens /
                                max_completion_tokens (neither: the server's default or what the context leaves,
                                whichever is less), temperature, top_p, top_k, seed, stop, stream (SSE ending
                                in [DONE], usage in the last chunk with stream_options.include_usage)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text (metrics.py)

    request -> [API key] -> body (size limit) -> JSON -> schema (schema.py) -> images (media.py) -> prepared
            (tokens, pixels; Engine.prepare_request, in a worker thread) -> scheduler queue (429 when full)
            -> batch on the engine thread -> text deltas back to the event loop -> response / SSE chunks

Every refusal is OpenAI's error object with a 4xx status: 400 bad JSON (nested deeper than `MAX_JSON_DEPTH`,
more than `MAX_JSON_VALUES` values, NaN/Infinity, text that is not Unicode), fields, images, more images than `max_images`, a prompt over the
character limit or the context; 401 missing or wrong API key; 404 unknown model or path; 413 body too large; 429
queue full or too many remote images in flight (Retry-After). A client that disconnects, even before its body
ends, cancels its request: it leaves the queue, or its row stops at the next token (a cancellation, not an
error). One request never fails another: a row's own failure is that request's answer alone. Two answers are the
server's own: 500 when the model's output for a request holds NaN/Inf (broken weights) or on a bug; 503 while it
shuts down (a request still running at the drain deadline ends with finish reason "shutdown": answered 503, or
an error event when streaming).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import UserError
from ..engine.inputs import load_image
from ..engine.request import GenerationRequest
from ..engine.sampling import NonFiniteLogits, SamplingParams
from .media import MediaBusy, MediaRules, image_bytes
from .metrics import ServerMetrics
from .scheduler import QueueFull, Scheduler, ShuttingDown
from .schema import ChatCompletionRequest, error_body

log = logging.getLogger("vismmoe.serve")
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_JSON_DEPTH = 16             # the deepest valid request nests 6 levels (body, messages, message, parts, part, url)
MAX_JSON_VALUES = 50_000        # values in one body (a 1,000-turn chat with images holds a few thousand)
CHARS_PER_TOKEN = 16            # the default prompt limit: this many characters per token of the model's context


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    default_max_tokens: int = 256
    media: MediaRules = MediaRules()
    max_batch: int = 8
    max_queue: int = 16
    batching: str = "continuous"            # or "static" (serve/scheduler.py)
    admit_wait_s: float = 0.0               # continuous: newcomers may wait this long to share a prefill
    max_prompt_chars: int | None = None     # characters of text in a request's messages (None: CHARS_PER_TOKEN x
    #                                         the model's context); checked before anything is tokenized
    max_images: int = 32                    # image parts in one request
    shutdown_timeout_s: float = 5.0         # drain: running requests may finish this long, then end ("shutdown")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}


class _ClientGone(Exception):
    """The client closed its connection before its request body ended."""


def _error(status: int, message: str, kind: str, code=None, param=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=status, headers=headers)


def model_context(engine) -> int | None:
    """The model's context in tokens (prompt + new tokens), as the engine checks it; None when the config names
    none."""
    limit = getattr(engine.family.text_config(engine.config), "max_position_embeddings", None)
    return int(limit) if limit else None


def default_prompt_chars(engine) -> int:
    """The default --max-prompt-chars: CHARS_PER_TOKEN characters per token of the model's context (a prompt
    that long would need tokens of 16 characters on average to fit), 1,000,000 when the config names no context."""
    limit = model_context(engine)
    return CHARS_PER_TOKEN * limit if limit else 1_000_000


def check_options(engine, opts: ServeOptions) -> None:
    """UserError for options that would refuse every request on this engine: a default token limit that leaves
    no room for a prompt in the model's context."""
    limit = model_context(engine)
    if limit is not None and opts.default_max_tokens >= limit:
        raise UserError(f"--default-max-tokens {opts.default_max_tokens} leaves no room for a prompt in the model's "
                        f"context of {limit} tokens", f"give fewer than {limit} (default 256)")


def create_app(engine, opts: ServeOptions) -> FastAPI:
    """The app over `engine` (loaded; the server owns it from now on). Its scheduler's worker thread starts
    here; `app.state.scheduler.close()` stops it."""
    check_options(engine, opts)
    app = FastAPI(title="vismmoe", docs_url=None, redoc_url=None, openapi_url=None)
    sched_box: list[Scheduler] = []
    metrics = ServerMetrics(engine, lambda: sched_box[0])
    sched = Scheduler(engine, max_batch=opts.max_batch, max_queue=opts.max_queue, batching=opts.batching,
                      admit_wait_s=opts.admit_wait_s,
                      on_batch=lambda reqs: metrics.batch_size.observe(len(reqs)), on_start=metrics.started)
    sched_box.append(sched)
    app.state.scheduler, app.state.metrics, app.state.engine = sched, metrics, engine
    app.state.drain = lambda: sched.drain(opts.shutdown_timeout_s)     # called when the server begins to stop
    app.state.shutdown_timeout_s = opts.shutdown_timeout_s
    max_chars = opts.max_prompt_chars or default_prompt_chars(engine)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.kind, e.code, e.param, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone):          # nobody reads it
        return _error(400, "the client closed the connection before its request body ended", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return _error(500, "internal server error", "server_error")

    def authorize(request: Request) -> None:
        if opts.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time
        if not (scheme.lower() == "bearer" and
                secrets.compare_digest(token.strip().encode(), opts.api_key.encode())):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": created,
                                            "owned_by": "vismmoe"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            authorize(request)
            body = await _read_body(request, opts.max_body_bytes)
            chat_req = await run_in_threadpool(_parse, body)          # a big body: not on the event loop
            if chat_req.model != opts.model_name:
                raise APIError(404, f"model {chat_req.model!r} does not exist: this server serves "
                                    f"{opts.model_name!r}", "not_found_error", "model_not_found", "model")
            req = await run_in_threadpool(_to_request, engine, chat_req, opts, max_chars)
        except APIError as e:
            metrics.observe(None, "rejected" if e.status == 429 else "client_error")
            raise
        except _ClientGone:
            metrics.observe(None, "cancelled")
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.on_text = lambda delta: loop.call_soon_threadsafe(events.put_nowait, ("text", delta))

        def done(r, error):                     # on the engine thread; the client may be gone already
            error = _as_api_error(r, error)
            _outcome(metrics, r, error)
            loop.call_soon_threadsafe(events.put_nowait, ("done", error))

        try:
            sched.submit(req, done)
        except ShuttingDown:
            metrics.observe(None, "rejected")
            raise APIError(503, "the server is shutting down: send the request again shortly", "server_error",
                           "server_shutdown", headers={"Retry-After": "1"}) from None
        except QueueFull as e:
            metrics.observe(None, "rejected")
            raise APIError(429, f"server busy ({e}): try again shortly", "rate_limit_error", "queue_full",
                           headers={"Retry-After": "1"}) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if chat_req.stream:
            include_usage = bool(chat_req.stream_options and chat_req.stream_options.include_usage)
            return StreamingResponse(_sse(req, rid, events, opts.model_name, include_usage),
                                     media_type="text/event-stream")
        error = await _wait(request, req, events)
        if error is not None:
            raise error
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": opts.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                             "finish_reason": req.finish_reason, "logprobs": None}],
                "usage": _usage(req)}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"request body is over {_size(limit)} (the server's --max-body)", code="body_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:
        raise _ClientGone() from None
    return bytes(body)


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB" if n >= 1024 * 1024 else f"{n / 1024:g} KiB"


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e.__class__.__name__})", code="invalid_json") from None
    except ValueError as e:                                             # NaN, Infinity, -Infinity
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    _check_tree(obj)
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        # a union (content: str | parts) reports every branch; the deepest location is the one that says what is
        # wrong (a part's unknown type, an image_url that is not an object), not "should be a valid string"
        err = max(e.errors(), key=lambda x: len(x["loc"]))
        where = client_path(err["loc"], obj) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"].endswith("_type") and err["type"] != "model_type":
            msg += f", not {_json_kind(err.get('input'))}"
        raise APIError(400, f"{where}: {msg}", param=where) from None


def client_path(loc: tuple, body) -> str:
    """A pydantic error location as the client wrote the field's path ("messages.0.content.0.image_url.url"):
    the parts that name no key or index of the body are the validator's own (a union's branch such as
    "str" or "list[tagged-union[TextPart,ImagePart]]", function-before/after markers, a tagged union's tag) and
    are left out. Walks `body` (the parsed JSON) along `loc`; a last key the body lacks (a missing field) stays."""
    out, cur, tag_seen = [], body, None
    for i, part in enumerate(loc):
        if isinstance(cur, list) and isinstance(part, int) and not isinstance(part, bool) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, dict) and isinstance(part, str) and not _internal_loc(part):
            if i + 1 < len(loc) and cur.get("type") == part and tag_seen is not cur:
                tag_seen = cur                  # a tagged union's tag (the object's own "type"), not a key
                continue
            if part in cur:
                out.append(part)
                cur = cur[part]
            elif i == len(loc) - 1:
                out.append(part)                # a required field the client left out
    return ".".join(map(str, out))


_BRANCH_NAMES = {"str", "int", "float", "bool", "bytes", "none"}    # a union's branches of these types


def _internal_loc(part: str) -> bool:
    """A location part that pydantic adds (a union's branch, a validator's marker), never a field name here."""
    return "[" in part or part in _BRANCH_NAMES


def _json_kind(value) -> str:
    """What a JSON value is, for "should be a valid integer, not a boolean"."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _check_tree(obj) -> None:
    """APIError 400 unless the parsed body nests at most MAX_JSON_DEPTH levels, holds at most MAX_JSON_VALUES
    values (validating more would hold the server up for nothing), and every string in it (keys too) is Unicode
    text: JSON's \\ud800-style escapes can spell lone surrogates, which no encoder takes."""
    stack, count = [(obj, 1, ())], 0
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        count += len(value)
        if count > MAX_JSON_VALUES:
            raise APIError(400, f"request body holds more than {MAX_JSON_VALUES:,} JSON values", code="invalid_json")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text in ((key, item) if isinstance(key, str) else (item,)):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        at = ".".join(map(str, where + (key,)))
                        raise APIError(400, f"{at}: text holds a lone UTF-16 surrogate (not valid Unicode)",
                                       code="invalid_json", param=at) from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, where + (key,)))


def _to_request(engine, c: ChatCompletionRequest, opts: ServeOptions, max_chars: int) -> GenerationRequest:
    """The chat request as a prepared GenerationRequest (images fetched and decoded, tokens, pixels). APIError 400
    for anything the engine refuses, before any work when the text is over `max_chars` characters; its `param`
    is the field to change: an image's `messages.i.content.j.image_url.url`, `messages` for a prompt that leaves
    no room for an answer, the token limit the client wrote for one that the prompt leaves too little room."""
    messages, images = [], []                   # images: (url, its path in the body)
    for i, m in enumerate(c.messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        parts = []
        for j, p in enumerate(m.content):
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
            else:
                parts.append({"type": "image"})
                images.append((p.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
        messages.append({"role": role, "content": parts})
    texts = [m["content"] if isinstance(m["content"], str) else p.get("text", "")
             for m in messages for p in (m["content"] if isinstance(m["content"], list) else [{}])]
    if not any(t.strip() for t in texts):
        raise APIError(400, "the messages hold no text: ask something about the image", param="messages")
    if len(images) > opts.max_images:
        raise APIError(400, f"the messages hold {len(images)} images, over this server's limit of "
                            f"{opts.max_images} (--max-images)", param="messages")
    chars = sum(len(t) for t in texts)
    if chars > max_chars:
        raise APIError(400, f"the messages hold {chars:,} characters of text, over this server's limit of "
                            f"{max_chars:,} (--max-prompt-chars): shorten them", code="prompt_too_long",
                       param="messages")
    asked = c.max_completion_tokens or c.max_tokens
    asked_field = "max_completion_tokens" if c.max_completion_tokens else "max_tokens"
    limit = model_context(engine)
    if asked is not None and limit is not None and asked >= limit:
        raise APIError(400, f"{asked_field} {asked} leaves no room for a prompt in the model's context of {limit} "
                            f"tokens: ask for fewer than {limit}", code="context_length_exceeded", param=asked_field)
    if images:
        try:
            engine.family.check_images(len(images))    # a text-only model: refused before any image is fetched
        except UserError as e:
            raise APIError(400, f"{images[0][1]}: {e}", param=images[0][1]) from None
    sampling = SamplingParams(temperature=1.0 if c.temperature is None else c.temperature,
                              top_p=1.0 if c.top_p is None else c.top_p, top_k=c.top_k or 0, seed=c.seed)
    deadline = time.monotonic() + opts.media.timeout_s                     # all of this request's remote images
    # no limit asked for: prepared with 1 new token (the prompt must leave room for one), then given the
    # server's default or what the context leaves, whichever is less (as OpenAI-style servers do)
    req = GenerationRequest(messages=messages, images=[_image(u, where, opts, deadline) for u, where in images],
                            max_new_tokens=asked or 1, sampling=sampling, stop=tuple(c.stop or ()),
                            ignore_eos=c.ignore_eos)
    try:
        engine.prepare_request(req)
    except UserError as e:
        if limit is None or not req.prompt_tokens or req.prompt_tokens + req.max_new_tokens <= limit:
            raise APIError(400, str(e), param="messages") from None         # the chat template refused them
        if req.prompt_tokens >= limit:
            raise APIError(400, f"prompt of {req.prompt_tokens} tokens leaves no room for an answer in the model's "
                                f"context of {limit} tokens: shorten the prompt or use a smaller image",
                           code="context_length_exceeded", param="messages") from None
        raise APIError(400, f"prompt of {req.prompt_tokens} tokens + {asked_field} {asked} exceeds the model's "
                            f"context of {limit} tokens: ask for at most {limit - req.prompt_tokens} new tokens, "
                            f"or shorten the prompt", code="context_length_exceeded", param=asked_field) from None
    if asked is None:
        room = opts.default_max_tokens if limit is None else limit - req.prompt_tokens
        req.max_new_tokens = min(opts.default_max_tokens, room)
    return req


def _image(url: str, where: str, opts: ServeOptions, deadline: float):
    """The image part at `where` (its path in the body), fetched and decoded. APIError 429 while too many remote
    images are being fetched; else 400 naming that path: code invalid_image_url when the URL gives no bytes,
    invalid_image_format when its bytes are not an image this server takes."""
    try:
        data = image_bytes(url, opts.media, deadline)
    except MediaBusy as e:
        raise APIError(429, str(e), "rate_limit_error", "media_busy", headers={"Retry-After": "1"}) from None
    except UserError as e:
        raise APIError(400, f"{where}: {e}", code="invalid_image_url", param=where) from None
    try:
        return load_image(data)
    except UserError as e:
        raise APIError(400, f"{where}: {e}", code="invalid_image_format", param=where) from None


async def _wait(request: Request, req: GenerationRequest, events: asyncio.Queue):
    """Wait for `req` to end, cancelling it when the client disconnects (or this task is cancelled); its error
    (None when it finished)."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                continue
            if kind == "done":
                return value
    except asyncio.CancelledError:
        req.cancel()
        raise


def _as_api_error(req: GenerationRequest, error):
    """How the server answers a request that ended: None (its completion), or an APIError: the batch's error,
    or the row's own (`req.error`), or 503 for a row the shutdown ended."""
    if error is None and req.finish_reason == "shutdown":
        return APIError(503, f"the server shut down before this request finished ({len(req.token_ids)} tokens "
                             "generated): send it again", "server_error", "server_shutdown",
                        headers={"Retry-After": "1"})
    if error is None or isinstance(error, APIError):
        return error
    if isinstance(error, NonFiniteLogits):
        log.error("request failed: %s", error)
        return APIError(500, str(error), "server_error", "model_output_not_finite")
    if isinstance(error, UserError):
        return APIError(400, str(error))
    log.error("request failed: %r", error)
    return APIError(500, "internal server error", "server_error")


def _outcome(metrics: ServerMetrics, req: GenerationRequest, error) -> None:
    if error is not None and error.code == "server_shutdown":
        metrics.observe(req, "cancelled")
    elif error is not None:
        metrics.observe(req, "client_error" if error.status < 500 else "error")
    else:
        metrics.observe(req, "cancelled" if req.finish_reason == "cancelled" else "ok")


def _usage(req: GenerationRequest) -> dict:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
            "total_tokens": req.prompt_tokens + req.completion_tokens}


async def _sse(req: GenerationRequest, rid: str, events: asyncio.Queue, model: str, include_usage: bool):
    """Server-sent events of a streamed completion; a client gone (the generator closed) cancels the request."""
    created = int(time.time())

    def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield chunk({"content": value})
                continue
            error = value
            finished = True
            if error is not None:
                yield f"data: {json.dumps(error_body(error.message, error.kind, error.code, error.param))}\n\n"
            else:
                yield chunk({}, finish=req.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(req), choices=False)
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            req.cancel()
