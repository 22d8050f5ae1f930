"""uvicorn for `vismmoe serve`: the listening socket, the message that says where it serves, and the drain.

    listen(host, port)  ->  a bound socket, before the weights are read: a busy port or a bad address is one line
                            (UserError) and nothing has claimed to serve
    HTTPServer          ->  uvicorn's server over that socket: tells `on_started(port)` once it accepts (the real
                            port for --port 0); when it begins to stop (SIGTERM, SIGINT) calls the app's
                            `state.drain()`: new requests get 503, running ones get the drain deadline, then end
                            with finish reason "shutdown" (scheduler.py), and uvicorn lets their answers go out
"""

from __future__ import annotations

import socket

import uvicorn

from ..errors import UserError

GRACE_S = 5.0       # after the drain deadline: time for the cancelled rows' answers to go out before uvicorn cuts


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) (0: any free port); UserError when the address is busy, not this machine's,
    or not an address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}", "give an address of this machine, e.g. 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})",
                        "choose another --port (0: any free port), or stop what uses this one") from None
    return sock


class HTTPServer(uvicorn.Server):
    """uvicorn's server over a socket bound beforehand (`listen`): once it accepts connections it calls
    `on_started(port)`; when it begins to stop (SIGTERM, SIGINT, `should_exit`) it calls the app's
    `state.drain()` first, so requests still running get their deadline and an answer instead of waiting for
    ever. uvicorn itself gives up on connections `config.timeout_graceful_shutdown` seconds later."""

    def __init__(self, config: uvicorn.Config, on_started=None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started(self.servers[0].sockets[0].getsockname()[1])

    async def shutdown(self, sockets=None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None:
            drain()
        await super().shutdown(sockets)


def server_config(app, shutdown_timeout_s: float, **kw) -> uvicorn.Config:
    """uvicorn's config for `app`: quiet logs, keep-alive 30 s, and a graceful-shutdown limit past the drain."""
    return uvicorn.Config(app, log_level=kw.pop("log_level", "warning"), timeout_keep_alive=30,
                          timeout_graceful_shutdown=shutdown_timeout_s + GRACE_S, **kw)
