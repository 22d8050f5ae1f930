"""Turning user input into something the model can take: image files are checked here, once.

Owns what counts as a usable image (exists, decodes, not absurdly large) and the one-line errors for the rest.
Prompt formatting and pixel processing belong to the family adapters.
"""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from .errors import UserError

MAX_IMAGE_PIXELS = 50_000_000      # ~7000 x 7000; larger inputs are resized by the user, not silently by us


def load_image(path_or_image) -> Image.Image:
    """An RGB PIL image from a path (or a PIL image passed through), or a UserError saying what is wrong."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    path = os.fspath(path_or_image)
    if not os.path.exists(path):
        raise UserError(f"image not found: {path}", "check the --image path")
    if os.path.isdir(path):
        raise UserError(f"image path is a directory: {path}", "give an image file (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserError(f"image too large: {path} is {w}x{h} pixels",
                                f"resize it below {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
            im.load()
            return im.convert("RGB")
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"not a readable image: {path} ({type(e).__name__})",
                        "give a PNG, JPEG, WebP, BMP or GIF file") from None
