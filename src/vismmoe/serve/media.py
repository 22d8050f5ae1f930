"""Where a request's images come from: `image_url` -> encoded image bytes, under the server's media rules.

    data:image/...;base64,...   decoded here (at most `max_bytes` bytes)
    file:///path                read only when the server names a folder (--allowed-local-media) and the path,
                                links resolved, lies inside it
    http(s)://...               fetched (httpx, a timeout, at most `max_bytes`) only with --allow-remote-media

Owns these rules and their one-line errors (UserError: the server answers 400). Decoding the bytes into pixels,
and refusing huge or broken images, is inputs.load_image's job.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from ..errors import UserError

MAX_IMAGE_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class MediaRules:
    allowed_local: str | None = None        # folder a file:// URL may read from (None: none)
    allow_remote: bool = False
    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = 10.0


def image_bytes(url: str, rules: MediaRules) -> bytes:
    """The encoded image behind `url` (see the module docstring); UserError otherwise."""
    if url.startswith("data:"):
        return _data_url(url, rules.max_bytes)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise UserError(f"file URL {url[:80]!r} names no absolute path", "write file:///absolute/path/image.png")
        return _local(unquote(parsed.path), rules)
    if scheme in ("http", "https"):
        if not rules.allow_remote:
            raise UserError("remote image URLs are turned off on this server",
                            "send the image as a data: URL (base64), or start the server with --allow-remote-media")
        return _remote(url, rules)
    raise UserError(f"unsupported image URL scheme {scheme or url[:16]!r}",
                    "send the image as a data:image/...;base64 URL")


def _data_url(url: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise UserError("image data URL is not base64", "send data:image/png;base64,<base64 bytes>")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise UserError(f"image is over {max_bytes // (1024 * 1024)} MiB", "send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image data URL holds invalid base64", "encode the image bytes with base64") from None


def _local(path: str, rules: MediaRules) -> bytes:
    if rules.allowed_local is None:
        raise UserError("local image files are turned off on this server",
                        "send the image as a data: URL, or start the server with --allowed-local-media DIR")
    root = os.path.realpath(rules.allowed_local)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise UserError(f"image path {path} is outside the allowed media folder",
                        "give a file:// URL of a file inside the server's --allowed-local-media folder")
    if not os.path.isfile(real):
        raise UserError(f"image not found: {path}", "check the file:// URL")
    if os.path.getsize(real) > rules.max_bytes:
        raise UserError(f"image is over {rules.max_bytes // (1024 * 1024)} MiB", "send a smaller image")
    try:
        with open(real, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read image {path} ({e.strerror})", "check the file's permissions") from None


def _remote(url: str, rules: MediaRules) -> bytes:
    import httpx
    try:
        with httpx.stream("GET", url, timeout=rules.timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise UserError(f"image URL answered HTTP {r.status_code}", "check the URL")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > rules.max_bytes:
                    raise UserError(f"image is over {rules.max_bytes // (1024 * 1024)} MiB", "send a smaller image")
            return bytes(data)
    except httpx.HTTPError as e:
        raise UserError(f"cannot fetch the image URL ({type(e).__name__})", "check the URL") from None
