"""Where a request's images come from: `image_url` -> encoded image bytes, under the server's media rules.

    data:image/...;base64,...   decoded here (at most `max_bytes` bytes; another media type is refused)
    file:///path                read only when the server names a folder (--allowed-local-media) and the path,
                                links resolved, lies inside it
    http(s)://...               fetched only with --allow-remote-media, under the rules below

Remote fetches (httpcore, with a network backend of ours at the socket):
- one deadline (`timeout_s`) for all of a request's fetches: name resolution, connecting, TLS, headers and body
  together, not per read, so a host that sends a byte now and then cannot hold a worker;
- at most `max_bytes` (a larger declared length is refused before the body), no content encoding;
- an address policy: every address the host resolves to must be public (not loopback, private, link-local,
  multicast, unspecified, reserved, shared, nor an IPv6 form that embeds an IPv4 address) unless
  `allow_networks` (--allow-media-networks) holds it. The socket connects to an address that was checked, and the
  address it is connected to is checked again, so a name that resolves elsewhere the second time (DNS
  rebinding) gains nothing; redirects (at most `MAX_REDIRECTS`) go through the same checks;
- one message for every way of not reaching a host (no such name, refused, timed out, not a public address), so
  errors do not tell which hosts resolve or which ports are open;
- at most `MAX_FETCHES` fetches at once (more: MediaBusy, the server answers 429), so slow hosts cannot hold
  every worker thread.

Owns these rules and their one-line errors (UserError: the server answers 400). Decoding the bytes into pixels,
and refusing huge or broken images, is inputs.load_image's job.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures as cf
import ipaddress
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlparse

import httpcore

from ..errors import UserError

log = logging.getLogger("vismmoe.serve")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_FETCHES = 8
MAX_REDIRECTS = 3
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class MediaRules:
    allowed_local: str | None = None        # folder a file:// URL may read from (None: none)
    allow_remote: bool = False
    allow_networks: tuple = ()              # ipaddress networks remote fetches may reach though not public
    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = 10.0                 # all of one request's remote fetches together


class MediaBusy(UserError):
    """`MAX_FETCHES` remote fetches run already (the server answers 429)."""


def parse_networks(text: str) -> tuple:
    """"10.0.0.0/8,127.0.0.1,::1" -> ipaddress networks (an address alone is a network of one); UserError."""
    nets = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise UserError(f"--allow-media-networks: {item!r} is not an IP address or network",
                            "give addresses or CIDR networks separated by commas, e.g. 10.0.0.0/8,127.0.0.1") from None
    return tuple(nets)


def image_bytes(url: str, rules: MediaRules, deadline: float | None = None) -> bytes:
    """The encoded image behind `url` (see the module docstring); UserError otherwise. `deadline`
    (time.monotonic()) bounds a remote fetch; None: `rules.timeout_s` from now."""
    if url[:5].lower() == "data:":
        return _data_url(url, rules.max_bytes)
    try:
        parsed = urlparse(url)
    except ValueError:                                              # e.g. an unclosed IPv6 bracket
        raise UserError(f"image URL {url[:80]!r} is not a valid URL", "check the URL") from None
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise UserError(f"file URL {url[:80]!r} names no absolute path", "write file:///absolute/path/image.png")
        return _local(unquote(parsed.path), rules)
    if scheme in ("http", "https"):
        if not rules.allow_remote:
            raise UserError("remote image URLs are turned off on this server",
                            "send the image as a data: URL (base64), or start the server with --allow-remote-media")
        return _remote(url, rules, time.monotonic() + rules.timeout_s if deadline is None else deadline)
    raise UserError(f"unsupported image URL scheme {scheme or url[:16]!r}",
                    "send the image as a data:image/...;base64 URL")


def _too_big(max_bytes: int) -> UserError:
    return UserError(f"image is over {max_bytes / (1024 * 1024):g} MiB", "send a smaller image")


def _data_url(url: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise UserError("image data URL is not base64", "send data:image/png;base64,<base64 bytes>")
    kind = head[5:].split(";")[0].strip().lower()          # RFC 2397: none given means text/plain
    if not kind.startswith("image/"):
        what = f"media type {kind!r}" if kind else "no media type (so text/plain)"
        raise UserError(f"image data URL has {what}, not an image/* type",
                        "send data:image/png;base64,<base64 bytes> (or image/jpeg, image/webp, ...)")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise _too_big(max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image data URL holds invalid base64", "encode the image bytes with base64") from None


def _local(path: str, rules: MediaRules) -> bytes:
    if rules.allowed_local is None:
        raise UserError("local image files are turned off on this server",
                        "send the image as a data: URL, or start the server with --allowed-local-media DIR")
    if "\x00" in path:
        raise UserError("file URL holds a NUL character (%00)", "give the file's real path")
    try:
        root = os.path.realpath(rules.allowed_local)
        real = os.path.realpath(path)
    except (OSError, ValueError):
        raise UserError(f"image path {path[:200]!r} cannot be resolved", "check the file:// URL") from None
    if os.path.commonpath([root, real]) != root:
        raise UserError(f"image path {path} is outside the allowed media folder",
                        "give a file:// URL of a file inside the server's --allowed-local-media folder")
    try:
        st = os.stat(real)
    except OSError:
        raise UserError(f"image not found: {path}", "check the file:// URL") from None
    if not stat.S_ISREG(st.st_mode):                 # a folder, or a FIFO that would block the read
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
        raise UserError(f"image path {path} is {kind}, not an image file", "give the file:// URL of an image file")
    if st.st_size > rules.max_bytes:
        raise _too_big(rules.max_bytes)
    try:
        with open(real, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read image {path} ({e.strerror})", "check the file's permissions") from None


# ---- remote ---------------------------------------------------------------------------------------------------
_slots = threading.BoundedSemaphore(MAX_FETCHES)
_resolver = cf.ThreadPoolExecutor(MAX_FETCHES, thread_name_prefix="vismmoe-dns")


def _unreachable() -> UserError:
    return UserError("cannot fetch the image URL: its host did not answer in time, refused the connection, or is "
                     "not at a public address", "send the image as a data: URL, or serve it from a public address")


def allowed_address(ip, allow_networks=()) -> bool:
    """May a remote fetch connect to `ip` (an ipaddress address)? Public addresses yes; others only inside
    `allow_networks`. An IPv4-mapped IPv6 address is judged as its IPv4 address; other IPv6 forms that embed an
    IPv4 address (6to4, Teredo, NAT64) only when allowed."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allow_networks):
        return True
    if ip.version == 6 and (ip.sixtofour is not None or ip.teredo is not None or ip in _NAT64):
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def _remote(url: str, rules: MediaRules, deadline: float) -> bytes:
    if not _slots.acquire(blocking=False):
        raise MediaBusy(f"{MAX_FETCHES} remote images are being fetched already", "try again shortly, or send "
                                                                                  "the image as a data: URL")
    try:
        with httpcore.ConnectionPool(network_backend=_Backend(rules.allow_networks, deadline), retries=0) as pool:
            for _ in range(MAX_REDIRECTS + 1):
                _check_url(url)
                left = max(0.001, deadline - time.monotonic())
                timeouts = {"connect": left, "read": left, "write": left, "pool": left}
                with pool.stream("GET", url, headers=[(b"Accept", b"image/*"), (b"Accept-Encoding", b"identity"),
                                                      (b"User-Agent", b"vismmoe")],
                                 extensions={"timeout": timeouts}) as r:
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in r.headers}
                    if r.status in (301, 302, 303, 307, 308) and "location" in headers:
                        url = urljoin(url, headers["location"])
                        continue
                    if r.status != 200:
                        raise UserError(f"image URL answered HTTP {r.status}", "check the URL")
                    return _body(r, headers, rules.max_bytes)
            raise UserError(f"image URL redirects more than {MAX_REDIRECTS} times", "give the image's final URL")
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
            httpcore.ConnectionNotAvailable, OSError, ValueError):
        raise _unreachable() from None
    finally:
        _slots.release()


def _check_url(url: str) -> None:
    """UserError unless `url` is an ASCII http(s) URL with a host and a valid port (a redirect's too)."""
    bad = UserError(f"image URL {url[:80]!r} is not a valid http(s) URL",
                    "give an http(s) URL in ASCII (an IDNA host name, a percent-encoded path)")
    if not url.isascii():
        raise bad
    try:
        parsed = urlparse(url)
        parsed.port                                                  # ValueError when out of range
    except ValueError:
        raise bad from None
    if parsed.scheme.lower() not in ("http", "https") or not parsed.hostname:
        raise bad


def _body(r, headers: dict, max_bytes: int) -> bytes:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UserError(f"image URL answered with content encoding {encoding!r}", "serve the image uncompressed")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_big(max_bytes)
    data = bytearray()
    for chunk in r.iter_stream():
        data += chunk
        if len(data) > max_bytes:
            raise _too_big(max_bytes)
    return bytes(data)


class _Backend(httpcore.NetworkBackend):
    """httpcore's network backend for remote media: resolves within the deadline, connects only to allowed
    addresses (checked again once connected), and bounds every later read and write by the same deadline."""

    def __init__(self, allow_networks: tuple, deadline: float):
        self.allow, self.deadline = allow_networks, deadline

    def connect_tcp(self, host: str, port: int, timeout=None, local_address=None, socket_options=None):
        host = host.strip("[]")
        try:
            infos = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(
                timeout=max(0.0, self.deadline - time.monotonic()))
        except (cf.TimeoutError, OSError, UnicodeError):
            raise httpcore.ConnectError("no address") from None
        addrs = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        if not addrs or not all(allowed_address(ipaddress.ip_address(a[0]), self.allow) for _, a in addrs):
            log.info("remote image host %r refused: it resolves to a non-public address", host[:100])
            raise httpcore.ConnectError("address not allowed")
        for _, sockaddr in addrs:
            left = _clamp(timeout, self.deadline)
            if left <= 0:
                break
            try:
                stream = _connect(sockaddr[0], sockaddr[1], left)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
            peer = stream.get_extra_info("server_addr")
            if not peer or not allowed_address(ipaddress.ip_address(peer[0]), self.allow):
                stream.close()
                raise httpcore.ConnectError("connected to an address that is not allowed")
            return _DeadlineStream(stream, self.deadline)
        raise httpcore.ConnectError("unreachable")

    def connect_unix_socket(self, *args, **kw):
        raise httpcore.ConnectError("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _connect(ip: str, port: int, timeout: float):
    """A TCP connection to the address `ip` (no name resolution): httpcore's own socket stream."""
    return httpcore.SyncBackend().connect_tcp(ip, port, timeout=timeout)


def _clamp(timeout: float | None, deadline: float) -> float:
    left = deadline - time.monotonic()
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose reads, writes and TLS handshake all end by one deadline."""

    def __init__(self, inner, deadline: float):
        self.inner, self.deadline = inner, deadline

    def _left(self, timeout, exc):
        left = _clamp(timeout, self.deadline)
        if left <= 0:
            raise exc("the deadline passed")
        return left

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname,
                                                    self._left(timeout, httpcore.ConnectTimeout)), self.deadline)

    def get_extra_info(self, info: str):
        return self.inner.get_extra_info(info)
