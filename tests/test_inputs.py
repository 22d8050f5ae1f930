"""Images as users give them: every Pillow mode reaches the model as the picture a viewer shows (16-bit and float
samples scaled, transparency over white), EXIF orientation applied, huge files named too large."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vismmoe.errors import UserError
from vismmoe.engine.inputs import load_image, to_rgb

def _reference() -> Image.Image:
    """An 8-bit RGB picture with smooth gradients and noise, every channel spanning 0..255."""
    y, x = np.mgrid[0:48, 0:64]
    rng = np.random.default_rng(0)
    rgb = np.stack([x * 255 / 63, y * 255 / 47, rng.random((48, 64)) * 255], -1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def _twins() -> dict[str, tuple[Image.Image, Image.Image]]:
    """mode -> (an image in that mode, its 8-bit twin: the same picture in L, RGB or P)."""
    ref = _reference()
    g = ref.convert("L")
    g16 = np.asarray(g).astype(np.uint16) * 257                       # 8-bit samples at 16-bit full scale
    opaque = Image.new("L", ref.size, 255)
    p = ref.quantize(64)
    bilevel = ref.convert("1")
    pa = p.convert("PA")
    pa.putalpha(opaque)
    return {
        "1": (bilevel, bilevel.convert("L")),
        "L": (g, g),
        "P": (p, p.convert("RGB")),
        "PA": (pa, p.convert("RGB")),
        "RGB": (ref, ref),
        "RGBA": (ref.convert("RGBA"), ref),
        "RGBX": (ref.convert("RGBX"), ref),
        "RGBa": (ref.convert("RGBA").convert("RGBa"), ref),
        "LA": (Image.merge("LA", [g, opaque]), g),
        "La": (Image.merge("LA", [g, opaque]).convert("La"), g),
        "CMYK": (ref.convert("CMYK"), ref),
        "YCbCr": (ref.convert("YCbCr"), ref),
        "LAB": (ref.convert("LAB"), ref),
        "HSV": (ref.convert("HSV"), ref),
        "I;16": (Image.fromarray(g16), g),
        "I;16L": (Image.frombytes("I;16L", g.size, g16.astype("<u2").tobytes()), g),
        "I;16B": (Image.frombytes("I;16B", g.size, g16.astype(">u2").tobytes()), g),
        "I;16N": (Image.frombytes("I;16N", g.size, g16.astype("=u2").tobytes()), g),
        "I": (Image.fromarray(g16.astype(np.int32)), g),
        "I (8-bit samples)": (g.convert("I"), g),
        "F": (Image.fromarray(np.asarray(g, dtype=np.float32) / 255), g),
        "F (0..255 samples)": (g.convert("F"), g),
    }


@pytest.mark.parametrize("mode", list(_twins()))
def test_every_mode_matches_its_8bit_twin(mode):
    img, twin = _twins()[mode]
    got, want = np.asarray(to_rgb(img), dtype=int), np.asarray(twin.convert("RGB"), dtype=int)
    assert got.shape == want.shape == (48, 64, 3)
    # Pillow's own colour-space round trips round on the way (LAB keeps a and b in 8 bits, out of gamut clips)
    tol = {"YCbCr": 4, "HSV": 8, "LAB": 40}.get(mode, 1)
    assert np.abs(got - want).max() <= tol, mode
    assert np.abs(got - want).mean() < (1.5 if tol > 1 else 0.5), mode


def test_16bit_png_and_float_tiff_files_are_scaled_not_white(tmp_path):
    """The reported case: a 16-bit grayscale PNG (Pillow opens it as I;16) reached the model all white."""
    g = _reference().convert("L")
    g16 = np.asarray(g).astype(np.uint16) * 257
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(np.asarray(g, dtype=np.float32) / 255).save(tmp_path / "f.tif")
    want = np.asarray(g.convert("RGB"), dtype=int)
    for name in ("g16.png", "f.tif"):
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I;16", "F")
        got = np.asarray(load_image(str(tmp_path / name)), dtype=int)
        assert np.abs(got - want).max() <= 1, name


def test_transparency_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200                      # red underneath everywhere
    rgba[0, 0, 3] = 255                     # opaque
    rgba[0, 1, 3] = 0                       # fully transparent: white, as viewers on a white page show it
    rgba[0, 2, 3] = 128                     # half: halfway between red and white
    got = np.asarray(to_rgb(Image.fromarray(rgba)), dtype=int)
    assert got[0, 0].tolist() == [200, 0, 0]
    assert got[0, 1].tolist() == [255, 255, 255]
    assert np.abs(got[0, 2] - [228, 127, 127]).max() <= 1


@pytest.mark.parametrize("orientation, top, left", [(1, "red", "red"), (3, "blue", "blue"),
                                                    (6, "red", "red"), (8, "blue", "blue")])
def test_exif_orientation_is_applied(tmp_path, orientation, top, left):
    """A 64x32 JPEG, left half red and right half blue, tagged as a camera would tag it: 6 (shown turned 90
    degrees clockwise: the red left half on top), 8 (counter-clockwise: blue on top), 3 (upside down)."""
    px = np.zeros((32, 64, 3), dtype=np.uint8)
    px[:, :32] = (255, 0, 0)
    px[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(px).save(path, exif=exif, quality=95)
    got = np.asarray(load_image(str(path)), dtype=float)
    turned = orientation in (6, 8)
    assert got.shape == ((64, 32, 3) if turned else (32, 64, 3))
    colour = {"red": np.array([255, 0, 0]), "blue": np.array([0, 0, 255])}
    first = got[: got.shape[0] // 2] if turned else got[:, : got.shape[1] // 2]   # top half, or left half
    assert np.abs(first.reshape(-1, 3).mean(0) - colour[top if turned else left]).max() < 20


def _png_header(path, w: int, h: int) -> str:
    """A PNG that declares w x h 8-bit gray pixels (the header is all Pillow reads before deciding the size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("side", [20000, 10000, 7500])      # 400 MP (Pillow refuses), 100 MP (Pillow warns), 56 MP
def test_huge_png_is_too_large_without_warnings(tmp_path, side):
    path = _png_header(tmp_path / f"{side}.png", side, side)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="image too large"):
            load_image(path)
    assert not seen, [str(w.message) for w in seen]
