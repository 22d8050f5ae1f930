"""Turning user input into something the model can take: image files are checked here, once.

Owns what counts as a usable image (exists as a regular file, decodes, not absurdly large), how any image Pillow opens becomes the
8-bit RGB picture an image viewer would show (EXIF orientation applied, 16-bit and float samples scaled to 8 bits,
transparency composited over white), and the one-line errors for the rest. Prompt formatting and pixel
processing for a model (resizing, padding, patches) belong to the family adapters.
"""

from __future__ import annotations

import io
import os
import warnings
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from ..errors import UserError
from ..paths import input_file

MAX_IMAGE_PIXELS = 50_000_000      # ~7000 x 7000; larger inputs are resized by the user, not silently by us
_FIX_READABLE = "give a PNG, JPEG, WebP, BMP, GIF or TIFF file"


def _too_large(where: str, pixels: str) -> UserError:
    return UserError(f"image too large: {where} is {pixels}",
                     f"resize it below {MAX_IMAGE_PIXELS // 1_000_000} megapixels")


def load_image(path_or_image) -> Image.Image:
    """An RGB PIL image from a path, encoded image bytes (a server's decoded upload), or a PIL image passed
    through; a UserError saying what is wrong otherwise."""
    if isinstance(path_or_image, Image.Image):
        w, h = path_or_image.size
        if w * h > MAX_IMAGE_PIXELS:
            raise _too_large("the image", f"{w}x{h} pixels")
        return to_rgb(path_or_image)
    if isinstance(path_or_image, (bytes, bytearray)):
        return _decode(io.BytesIO(path_or_image), "the image data")
    path = os.fspath(path_or_image)
    if not os.path.exists(path):
        scheme, sep, rest = path.partition("://")
        if sep and scheme.isalpha():            # a URL: a path is what is read here
            fix = (f"give the path itself: {unquote(urlparse(path).path)}" if scheme.lower() == "file" else
                   "download the image and give the file's path")
            raise UserError(f"--image takes a file path, not a URL: {path}", fix)
        raise UserError(f"image not found: {path}", "check the --image path")
    input_file(path, "image", "give an image file (PNG, JPEG, WebP, ...)")     # a FIFO would block the decoder
    return _decode(path, path)


def _decode(source, where: str) -> Image.Image:
    """Open, check the size before decoding any pixel, decode, convert (`to_rgb`)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (a stray stderr line) above its own pixel limit and refuses above twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise _too_large(where, f"{w}x{h} pixels")
                im.load()
                return to_rgb(im)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS // 1_000_000
        raise _too_large(where, f"over Pillow's safety limit of {limit} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"not a readable image: {where} ({type(e).__name__})", _FIX_READABLE) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """The 8-bit RGB picture an image viewer shows for `im`: EXIF orientation applied, samples of more than 8
    bits scaled down (not clipped), transparent pixels composited over white. Any mode Pillow has."""
    im = ImageOps.exif_transpose(im)
    try:
        if ImageMode.getmode(im.mode).typestr[1:] not in ("u1", "b1"):   # I, F, I;16, I;16B, I;32, ...
            im = _to_8bit(im)
        if im.has_transparency_data:
            if im.mode == "La":                                   # premultiplied; Pillow converts it via LA only
                im = im.convert("LA")
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba)
        return im.convert("RGB")
    except ValueError as e:                                       # a mode Pillow cannot convert to RGB
        raise UserError(f"unsupported image mode {im.mode} ({e})", "save the image as 8-bit RGB") from None


def _full_scale(mode: str, a: np.ndarray) -> float:
    """The sample value that means white. Modes with a declared depth (I;16: 65535, I;32: 2**32 - 1) say it;
    `I` (32-bit integers) and `F` (32-bit floats) do not, so the smallest usual range holding every finite
    sample is taken: 1.0 (floats only, the common normalised range), 255, 65535 (16-bit data in a 32-bit
    container, as older Pillow opened 16-bit PNGs), else 2**31 - 1 (integers) or the largest sample (floats)."""
    if mode not in ("I", "F"):
        return float(np.iinfo(a.dtype).max)
    finite = a[np.isfinite(a)]
    top = float(finite.max()) if finite.size else 0.0
    scales = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0)
    return next((s for s in scales if top <= s), top if mode == "F" else float(np.iinfo(np.int32).max))


def _to_8bit(im: Image.Image) -> Image.Image:
    """A single-band image of more than 8 bits per sample -> mode L, scaled so its full scale maps to 255
    (negative samples are black, NaN black, +inf white)."""
    raw = np.asarray(im)
    scale = _full_scale(im.mode, raw)
    a = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=scale, neginf=0.0)
    out = np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(out)
