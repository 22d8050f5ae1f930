"""Deterministic synthetic visual-question scenes ("visual heavy" VQA data).

This module owns the whole dataset: it composes 448x448 RGB scenes of 1-5
coloured shapes (or a large printed word) on redundant, photo-like
backgrounds (plain colour, gradients, smooth noise, soft waves), and asks one
single-word question per image.  Every sample is a pure function of
``(split, index)``: a SHA-256 seed (split id in the top bits, so split seed
spaces are disjoint) drives one ``random.Random``; numpy is only used for
elementwise float32 arithmetic (no BLAS, no vectorised transcendentals), so
the same pair yields identical pixels and text in any process and, given the
same Pillow/numpy versions, on any machine.

Object sources (mixed in every split):

* silhouettes of the shapes in the offline ``easy-vqa`` package (MIT): each
  64x64 source image is parsed for its shape/colour label from easy-vqa's own
  questions, its near-white background is keyed out into an alpha mask, the
  mask is cropped to the shape, rescaled to 64-128 px and pasted in the
  shape's (exact, flat) colour.  ``train``/``val`` only use easy-vqa *train*
  images and ``test`` only easy-vqa *test* images, so no pasted source image
  is shared between training and the held-out test split;
* shapes drawn with PIL (circle, rectangle, triangle, star, cross).

Question types (``QTYPES``), answers are always one lowercase word:

* ``exist``    "Is there a red circle?" -> yes/no (~50 % no; half of the
  negatives are hard: the colour or the shape is present, but not together).
* ``color``    "What color is the triangle?" (the shape is unique in the scene).
* ``shape``    "What shape is the blue object?" (the colour is unique).
* ``count``    "How many circles are there?" -> digits ``"0"``..``"5"``
  (``"0"`` only for attribute counts, "How many objects" is ``"1"``..``"5"``).
* ``position`` "Is the red star left or right of the gray circle?" ->
  left/right/above/below.  Both referents are unique colour+shape pairs and
  their bounding boxes are separated by at least ``POSITION_GAP`` pixels in
  the asked axis.
* ``ocr``      "What word is written in the image?" -> one of ``OCR_WORDS``
  (rendered uppercase, cap height >= ~40 px), answered in lowercase.

The question type cycles with the index (``QTYPES[index % 6]``), so any
prefix of a split is type-balanced.  Generation costs ~2-4 ms per sample on
one CPU core after easy-vqa sources are decoded (lazily, per label; call
:func:`warm_cache` once before forking worker processes).

What this module deliberately does not know: anything about models,
tokenizers, chat templates, visual-token grids or training loops.  It hands
out ``PIL`` images and strings; turning them into tensors is someone else's
job.
"""

from __future__ import annotations

import hashlib
import math
import random
import textwrap
from dataclasses import dataclass, replace
import os
from functools import lru_cache
from collections.abc import Sequence
from typing import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

IMAGE_SIZE = 448
QTYPES: tuple[str, ...] = ("exist", "color", "shape", "count", "position", "ocr")
# Training-only question types: never in val or test, never scored; a curriculum for the scored ones.
AUX_QTYPES: tuple[str, ...] = ("where",)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# The eight easy-vqa colours (exact RGB values used by easy-vqa's renderer).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle", "star", "cross")
EASYVQA_SHAPES: frozenset[str] = frozenset({"circle", "rectangle", "triangle"})
PLURALS: dict[str, str] = {
    "circle": "circles",
    "rectangle": "rectangles",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
TEXT_COLORS: tuple[str, ...] = ("black", "blue", "red", "brown", "teal")
OCR_WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "CAR", "BUS", "HAT", "CUP", "KEY", "BOX", "PEN",
    "MAP", "EGG", "TREE", "FISH", "BIRD", "BOOK", "MOON", "CAKE", "DOOR",
    "LAMP", "SHIP", "MILK", "RAIN", "SNOW", "FROG", "LION",
)
COUNT_ANSWERS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
POSITION_ANSWERS: tuple[str, ...] = ("left", "right", "above", "below")
MAX_OBJECTS = 5
MIN_OBJECT = 64          # max side of an object, in pixels (lower bound)
POSITION_GAP = 16        # min bbox separation in the asked axis
_PLACE_GAP = 12          # min distance between any two object boxes
_BORDER = 8              # objects/text keep this far from the image border
_EASYVQA_PROB = 0.6      # chance to use an easy-vqa silhouette when possible
_MIN_SOURCE = 20         # easy-vqa shapes smaller than this (px) upscale too coarsely

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # 448x448 RGB
    question: str
    answer: str
    qtype: str
    split: str  # "train" | "val" | "test"
    index: int


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: Box
    source: str  # "drawn" or "easyvqa-<train|test>:<image id>"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class TextItem:
    word: str  # uppercase, as rendered
    color: str
    box: Box  # ink bounding box
    font_size: int


@dataclass(frozen=True)
class Scene:
    """Ground truth behind a sample (for tests and debugging)."""

    objects: tuple[SceneObject, ...]
    text: TextItem | None
    background: str


# --------------------------------------------------------------------------
# Seeding


def _seed(split: str, index: int, aux: str | None = None) -> int:
    """Stable 64-bit seed; the top bits hold the split so spaces are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError("index must be >= 0")
    name = f"{split}/{index}" if aux is None else f"{split}/{aux}/{index}"
    digest = hashlib.sha256(f"vismmoe.scenes/v1/{name}".encode()).digest()
    return (SPLITS.index(split) << 60) | (int.from_bytes(digest[:8], "big") >> 4)


# --------------------------------------------------------------------------
# easy-vqa sources (lazy, cached per process)


@dataclass(frozen=True)
class _Source:
    key: str
    alpha: Image.Image  # "L" mask cropped tightly to the shape


_LABELLED: dict[str, dict[tuple[str, str], list[tuple[str, str]]]] = {}  # part -> label -> [(key, path)]
_POOLS: dict[tuple[str, str, str], list[_Source]] = {}  # (part, colour, shape) -> usable sources
_SOURCES: dict[str, _Source] = {}  # source key -> source, for every usable source decoded


def _parse_labels(texts: list[str], answers: list[str], ids: list[int]) -> dict[int, tuple[str, str]]:
    """Recover (colour, shape) of every easy-vqa image from its questions."""
    shape: dict[int, str] = {}
    color: dict[int, str] = {}
    for text, answer, iid in zip(texts, answers, ids):
        words = set(text.rstrip("?").lower().split())
        if answer in EASYVQA_SHAPES or answer in COLORS:
            found = (answer, words)
        elif answer in ("yes", "no"):
            negated = bool(words & {"not", "no"})
            if (answer == "yes") == negated:
                continue  # a negative statement tells us nothing certain
            found = (None, words)
        else:
            continue
        ans, qwords = found
        for s in ([ans] if ans in EASYVQA_SHAPES else []) + sorted(qwords & EASYVQA_SHAPES):
            shape.setdefault(iid, s)
        for c in ([ans] if ans in COLORS else []) + sorted(qwords & set(COLORS)):
            color.setdefault(iid, c)
    return {iid: (color[iid], shape[iid]) for iid in shape if iid in color}


def _easyvqa_part(split: str) -> str:
    return "test" if split == "test" else "train"


def _labelled(part: str) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(colour, shape) -> [(source key, png path)] for one easy-vqa split ("train"/"test")."""
    if part not in _LABELLED:
        import easy_vqa

        if part == "train":
            questions, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
        else:
            questions, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
        labelled: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for iid, label in sorted(_parse_labels(*questions).items()):
            labelled.setdefault(label, []).append((f"easyvqa-{part}:{iid}", paths[iid]))
        _LABELLED[part] = labelled
    return _LABELLED[part]


# The usable easy-vqa silhouettes (MIT-licensed images, reduced to alpha masks), packed by `pack_sources`; with it
# the package needs no easy-vqa at run time. VISMMOE_UNPACKED=1 decodes the package instead.
PACKED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "easyvqa_masks.npz")


def pack_sources(path: str = PACKED) -> str:
    """Write every usable easy-vqa silhouette (both parts, pool order) to one compressed .npz, so scenes can be
    made where the easy-vqa package is not installed (e.g. the GPU machine). Needs easy-vqa once, here."""
    warm_cache()
    keys, labels, shapes, chunks = [], [], [], []
    for (part, color, shape), pool in sorted(_POOLS.items()):
        for src in pool:
            arr = np.asarray(src.alpha, dtype=np.uint8)
            keys.append(src.key)
            labels.append(f"{part}|{color}|{shape}")
            shapes.append(arr.shape)
            chunks.append(arr.reshape(-1))
    pools = np.array(["|".join(k) for k in sorted(_POOLS)])            # every pool, empty ones too
    np.savez_compressed(path, keys=np.array(keys), labels=np.array(labels), shapes=np.array(shapes),
                        pixels=np.concatenate(chunks), pools=pools)
    return path


def _use_packed() -> bool:
    """Fill the pools from the packed file once per process, if it is there and wanted (identical to decoding
    the package); True when the pools come from it."""
    if _PACKED_STATE:
        return _PACKED_STATE[0]
    _PACKED_STATE.append(not os.environ.get("VISMMOE_UNPACKED") and _load_packed())
    return _PACKED_STATE[0]


_PACKED_STATE: list[bool] = []      # [whether the pools came from the packed file], once decided


def _load_packed() -> bool:
    if not os.path.exists(PACKED):
        return False
    data = np.load(PACKED)
    for pool in data["pools"].tolist():
        _POOLS.setdefault(tuple(pool.split("|")), [])
    pos = 0
    pixels = data["pixels"]                  # one read: NpzFile decompresses on every item access
    for key, label, (h, w) in zip(data["keys"].tolist(), data["labels"].tolist(), data["shapes"].tolist()):
        part, color, shape = label.split("|")
        mask = Image.fromarray(pixels[pos: pos + h * w].reshape(h, w), "L")
        pos += h * w
        src = _Source(key, mask)
        _POOLS.setdefault((part, color, shape), []).append(src)
        _SOURCES[key] = src
    return True


def _pool(part: str, color: str, shape: str) -> list[_Source]:
    """Usable easy-vqa silhouettes with this label, decoded on first use and cached."""
    if _use_packed() or (part, color, shape) in _POOLS:
        return _POOLS.get((part, color, shape), [])
    pool = []
    for key, path in _labelled(part).get((color, shape), []):
        source = _load_source(key, path, color)
        if source is not None:
            pool.append(source)
            _SOURCES[key] = source
    _POOLS[(part, color, shape)] = pool
    return pool


def _load_source(key: str, path: str, color: str) -> _Source | None:
    """Decode one easy-vqa image into a tight alpha mask (None if unusable)."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    bg = arr[0, 0]
    diff = np.asarray(COLORS[color], dtype=np.float32) - bg
    alpha = np.clip(((arr - bg) * diff).sum(axis=-1) / max(float((diff * diff).sum()), 1.0), 0.0, 1.0)
    strongest = arr.reshape(-1, 3)[np.abs(arr - bg).max(axis=2).argmax()]
    nearest = min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - strongest) ** 2)))
    rows, cols = np.nonzero(alpha > 0.05)
    if nearest != color or rows.size == 0:  # label and pixels disagree
        return None
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    h, w = y1 - y0, x1 - x0
    cut_off = y0 == 0 or x0 == 0 or y1 == alpha.shape[0] or x1 == alpha.shape[1]
    if cut_off or max(h, w) < _MIN_SOURCE or min(h, w) < 0.5 * max(h, w):
        return None
    mask = Image.fromarray((alpha[y0:y1, x0:x1] * 255).round().astype(np.uint8), "L")
    return _Source(key, mask)


def warm_cache() -> None:
    """Decode all easy-vqa sources now (e.g. in a parent before forking workers)."""
    if _use_packed():
        return
    for part in ("train", "test"):
        for color, shape in _labelled(part):
            _pool(part, color, shape)


# --------------------------------------------------------------------------
# Object planning (what to draw, at which size) and layout


@dataclass(frozen=True)
class _Plan:
    color: str
    shape: str
    size: tuple[int, int]  # w, h
    source: _Source | None  # None -> drawn procedurally


def _shape_size(rng: random.Random, shape: str, side: int) -> tuple[int, int]:
    if shape == "rectangle":
        short = round(side * rng.uniform(0.6, 1.0))
        return (side, short) if rng.random() < 0.5 else (short, side)
    if shape == "triangle":
        return side, round(side * 0.87)
    return side, side


def _plan(rng: random.Random, split: str, color: str, shape: str, max_side: int) -> _Plan:
    side = rng.randint(MIN_OBJECT, max_side)
    part = _easyvqa_part(split)
    if shape in EASYVQA_SHAPES and rng.random() < _EASYVQA_PROB:
        sources = _pool(part, color, shape)
        if sources:
            source = rng.choice(sources)
            w, h = source.alpha.size
            scale = side / max(w, h)
            return _Plan(color, shape, (max(1, round(w * scale)), max(1, round(h * scale))), source)
    return _Plan(color, shape, _shape_size(rng, shape, side), None)


def _plans(rng: random.Random, split: str, specs: list[tuple[str, str]]) -> list[_Plan]:
    max_side = 128 if len(specs) <= 2 else 112
    return [_plan(rng, split, c, s, max_side) for c, s in specs]


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _free_layout(rng: random.Random, sizes: list[tuple[int, int]], avoid: list[Box]) -> list[Box] | None:
    boxes: list[Box] = []
    for w, h in sizes:
        for _ in range(100):
            x = rng.randint(_BORDER, IMAGE_SIZE - _BORDER - w)
            y = rng.randint(_BORDER, IMAGE_SIZE - _BORDER - h)
            box = (x, y, x + w, y + h)
            if not any(_overlaps(box, other, _PLACE_GAP) for other in boxes + avoid):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _grid_layout(rng: random.Random, sizes: list[tuple[int, int]]) -> list[Box] | None:
    grid = 2 if len(sizes) <= 4 and rng.random() < 0.5 else 3
    cell = IMAGE_SIZE // grid
    boxes: list[Box] = []
    for (w, h), c in zip(sizes, rng.sample(range(grid * grid), len(sizes))):
        if max(w, h) > cell - 2 * _PLACE_GAP:
            return None
        col, row = c % grid, c // grid
        x = col * cell + rng.randint(_PLACE_GAP, cell - _PLACE_GAP - w)
        y = row * cell + rng.randint(_PLACE_GAP, cell - _PLACE_GAP - h)
        boxes.append((x, y, x + w, y + h))
    return boxes


def _layout(rng: random.Random, plans: list[_Plan], avoid: list[Box]) -> list[Box]:
    """Non-overlapping boxes for all plans; shrinks objects if space is tight."""
    sizes = [p.size for p in plans]
    while True:
        boxes = None
        if not avoid and rng.random() < 0.5:
            boxes = _grid_layout(rng, sizes)
        if boxes is None:
            boxes = _free_layout(rng, sizes, avoid)
        if boxes is not None:
            return boxes
        sizes = [(max(1, round(w * 0.9)), max(1, round(h * 0.9))) for w, h in sizes]


def _place(rng: random.Random, split: str, specs: list[tuple[str, str]], avoid: list[Box] | None = None) -> list[SceneObject]:
    plans = _plans(rng, split, specs)
    boxes = _layout(rng, plans, avoid or [])
    return [
        SceneObject(p.shape, p.color, box, p.source.key if p.source else "drawn")
        for p, box in zip(plans, boxes)
    ]


def _random_specs(rng: random.Random, n: int, exclude: Callable[[str, str], bool] = lambda c, s: False) -> list[tuple[str, str]]:
    specs = []
    while len(specs) < n:
        spec = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
        if not exclude(*spec):
            specs.append(spec)
    return specs


# --------------------------------------------------------------------------
# Rendering


_BG_RES = 224  # smooth backgrounds are computed at this size, then upscaled


def _light_color(rng: random.Random) -> np.ndarray:
    base = rng.uniform(195.0, 245.0)
    tint = np.array([rng.uniform(-22.0, 22.0) for _ in range(3)], dtype=np.float32)
    return np.clip(base + tint, 178.0, 252.0).astype(np.float32)


@lru_cache(maxsize=16)
def _interp_weights(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from k knots to _BG_RES samples: (lo index, lo weight, hi weight)."""
    pos = np.linspace(0.0, k - 1.0, _BG_RES)
    lo = np.minimum(pos.astype(int), k - 2)
    frac = (pos - lo).astype(np.float32)
    return lo, 1.0 - frac, frac


_COORD = np.arange(_BG_RES, dtype=np.float32) / (_BG_RES - 1)


def _ramp(angle: float) -> np.ndarray:
    """(_BG_RES, _BG_RES) projection of pixel coordinates on a direction."""
    return np.float32(math.cos(angle)) * _COORD[None, :] + np.float32(math.sin(angle)) * _COORD[:, None]


def _gradient(rng: random.Random) -> np.ndarray:
    c1, c2 = _light_color(rng), _light_color(rng)
    t = _ramp(rng.uniform(0.0, 2.0 * math.pi))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c1 + t[..., None] * (c2 - c1)


def _smooth_noise(rng: random.Random, amp: float) -> np.ndarray:
    """Bilinearly interpolated k x k random knots (elementwise ops only: no BLAS)."""
    k = rng.randint(4, 9)
    knots = np.array([rng.gauss(0.0, amp) for _ in range(k * k * 3)], dtype=np.float32).reshape(k, k, 3)
    lo, w0, w1 = _interp_weights(k)
    rows = knots[lo] * w0[:, None, None] + knots[lo + 1] * w1[:, None, None]  # (R, k, 3)
    return rows[:, lo] * w0[None, :, None] + rows[:, lo + 1] * w1[None, :, None]  # (R, R, 3)


def _waves(rng: random.Random) -> np.ndarray:
    """Soft stripes: amp * sin(2 pi (x cos a + y sin a) / period + phase), built from 1-D sines."""
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(24.0, 90.0) / (IMAGE_SIZE - 1)
    amp = rng.uniform(4.0, 9.0)
    phase = rng.uniform(0, 2 * math.pi)
    u = [2 * math.pi * math.cos(angle) * float(c) / period + phase for c in _COORD]
    v = [2 * math.pi * math.sin(angle) * float(c) / period for c in _COORD]
    su, cu = np.array([math.sin(a) for a in u], np.float32), np.array([math.cos(a) for a in u], np.float32)
    sv, cv = np.array([math.sin(a) for a in v], np.float32), np.array([math.cos(a) for a in v], np.float32)
    wave = np.float32(amp) * (su[None, :] * cv[:, None] + cu[None, :] * sv[:, None])
    return _light_color(rng) + wave[..., None]


@lru_cache(maxsize=1)
def _grain_bank() -> tuple[Image.Image, ...]:
    """A few fixed-seed luminance grain images with values 0..6 (offset by -3 when added)."""
    nrng = np.random.default_rng(20240601)
    return tuple(
        Image.fromarray(np.repeat(nrng.integers(0, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8), 3, axis=2), "RGB")
        for _ in range(4)
    )


def _background(rng: random.Random) -> tuple[Image.Image, str]:
    kind = rng.choice(("plain", "gradient", "noise", "gradient+noise", "waves"))
    if kind == "plain":
        color = tuple(int(v) for v in _light_color(rng).round())
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color), kind
    if kind == "gradient":
        arr = _gradient(rng)
    elif kind == "noise":
        arr = _light_color(rng) + _smooth_noise(rng, rng.uniform(6.0, 12.0))
    elif kind == "gradient+noise":
        arr = _gradient(rng) + _smooth_noise(rng, rng.uniform(4.0, 8.0))
    else:
        arr = _waves(rng)
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    image = small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:  # fine sensor-like grain
        grain = rng.choice(_grain_bank()).transpose(rng.choice(list(Image.Transpose)))
        image = ImageChops.add(image, grain, offset=-3)
    return image, kind


# Photographs shipped inside packages this project depends on (matplotlib's sample data), used as backgrounds
# when a share of photo backgrounds is asked for (`make_sample_and_scene(..., photos=P)`).
PHOTO_FILES: tuple[str, ...] = ("grace_hopper.jpg",)


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    import matplotlib.cbook as cbook
    out = []
    for name in PHOTO_FILES:
        with Image.open(cbook.get_sample_data(name, asfileobj=False)) as im:
            out.append(im.convert("RGB"))
    return tuple(out)


def _check_share(photos: float) -> None:
    """ValueError unless `photos` (a share of photograph backgrounds) is in [0, 1]."""
    if not 0.0 <= photos <= 1.0:
        raise ValueError(f"photos is a share of the samples, in [0, 1]; got {photos}")


def _photo_background(rng: random.Random) -> Image.Image:
    """A square crop (35-100% of the short side) of a bundled photograph at a random place, maybe mirrored, its
    colour channels permuted and blended 20-50% toward a light colour (objects of every colour stay visible, as
    on the synthetic backgrounds), resized to the scene."""
    photo = rng.choice(_photos())
    W, H = photo.size
    side = int(min(W, H) * rng.uniform(0.35, 1.0))
    x, y = rng.randint(0, W - side), rng.randint(0, H - side)
    crop = photo.crop((x, y, x + side, y + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    bands = crop.split()
    order = rng.sample(range(3), 3)
    crop = Image.merge("RGB", [bands[i] for i in order])
    light = Image.new("RGB", crop.size, tuple(int(v) for v in _light_color(rng).round()))
    return Image.blend(crop, light, rng.uniform(0.2, 0.5))


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [
        ((1.0 if i % 2 == 0 else inner) * math.sin(math.pi * i / n),
         -(1.0 if i % 2 == 0 else inner) * math.cos(math.pi * i / n))
        for i in range(2 * n)
    ]


_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "star": _star_points(),
    "cross": [(1 / 3, 0), (2 / 3, 0), (2 / 3, 1 / 3), (1, 1 / 3), (1, 2 / 3), (2 / 3, 2 / 3),
              (2 / 3, 1), (1 / 3, 1), (1 / 3, 2 / 3), (0, 2 / 3), (0, 1 / 3), (1 / 3, 1 / 3)],
}


def _fit(points: list[tuple[float, float]], w: float, h: float) -> list[tuple[float, float]]:
    """Scale a polygon so its bounding box is exactly [0, w] x [0, h]."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, sx, sy = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - x0) / sx * w, (y - y0) / sy * h) for x, y in points]


def _drawn_mask(shape: str, w: int, h: int, ss: int = 4) -> Image.Image:
    """Anti-aliased 'L' mask of a procedural shape filling a w x h box."""
    big = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse((0, 0, w * ss - 1, h * ss - 1), fill=255)
    elif shape == "rectangle":
        draw.rectangle((0, 0, w * ss - 1, h * ss - 1), fill=255)
    else:
        draw.polygon(_fit(_UNIT_POLYGONS[shape], w * ss - 1, h * ss - 1), fill=255)
    return big.resize((w, h), Image.Resampling.BOX)


@lru_cache(maxsize=32)
def _sharpen_lut(steep: int) -> list[int]:
    # Midpoint above 50 %: drops the half-covered edge rows of easy-vqa's small
    # rasterised shapes, which would otherwise show up as soft "tabs".
    return [min(255, max(0, round((v - 160) * steep + 127.5))) for v in range(256)]


def _sharpen(mask: Image.Image, scale: float) -> Image.Image:
    """Undo the blur of upscaling a small anti-aliased mask (edge ~1-2 px wide)."""
    steep = min(6, max(1, round(scale / 1.5)))
    return mask.point(_sharpen_lut(steep)) if steep > 1 else mask


def _paste_object(image: Image.Image, obj: SceneObject, source: _Source | None) -> None:
    x0, y0, x1, y1 = obj.box
    w, h = x1 - x0, y1 - y0
    if source is None:
        mask = _drawn_mask(obj.shape, w, h)
    else:
        mask = _sharpen(source.alpha.resize((w, h), Image.Resampling.BICUBIC), max(w, h) / max(source.alpha.size))
    image.paste(COLORS[obj.color], obj.box, mask)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_stroke(size: int) -> int:
    return max(1, size // 30)


def _plan_text(rng: random.Random) -> TextItem:
    word = rng.choice(OCR_WORDS)
    color = rng.choice(TEXT_COLORS)
    size = rng.randint(60, 84)
    while True:
        font = _font(size)
        l, t, r, b = font.getbbox(word, stroke_width=_text_stroke(size))
        if r - l <= IMAGE_SIZE - 2 * _BORDER - 8:
            break
        size -= 4
    x = rng.randint(_BORDER - l, IMAGE_SIZE - _BORDER - r)
    y = rng.randint(_BORDER - t, IMAGE_SIZE - _BORDER - b)
    return TextItem(word, color, (x + l, y + t, x + r, y + b), size)


def _draw_text(image: Image.Image, text: TextItem) -> None:
    font = _font(text.font_size)
    l, t, _, _ = font.getbbox(text.word, stroke_width=_text_stroke(text.font_size))
    ImageDraw.Draw(image).text(
        (text.box[0] - l, text.box[1] - t), text.word, font=font, fill=COLORS[text.color],
        stroke_width=_text_stroke(text.font_size), stroke_fill=COLORS[text.color],
    )


def _draw_scene(image: Image.Image, objects: list[SceneObject], text: TextItem | None) -> None:
    """Paste the scene's objects and text onto a background, in place."""
    for obj in objects:
        _paste_object(image, obj, _SOURCES.get(obj.source))
    if text is not None:
        _draw_text(image, text)


# --------------------------------------------------------------------------
# Question builders: each returns (objects, text, question, answer)

_Built = tuple[list[SceneObject], TextItem | None, str, str]


def _name(obj: SceneObject) -> str:
    return f"{obj.color} {obj.shape}"


def _build_exist(rng: random.Random, split: str) -> _Built:
    objects = _place(rng, split, _random_specs(rng, rng.randint(1, MAX_OBJECTS)))
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        color, shape = rng.choice(hard if hard and rng.random() < 0.5 else absent)
        answer = "no"
    template = rng.choice(("Is there a {} {}?", "Is there a {} {} in the image?", "Does the image contain a {} {}?"))
    return objects, None, template.format(color, shape), answer


def _build_color(rng: random.Random, split: str) -> _Built:
    target = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
    others = _random_specs(rng, rng.randint(0, MAX_OBJECTS - 1), lambda c, s: s == target[1])
    specs = others + [target]
    rng.shuffle(specs)
    template = rng.choice(("What color is the {}?", "What is the color of the {}?"))
    return _place(rng, split, specs), None, template.format(target[1]), target[0]


def _build_shape(rng: random.Random, split: str) -> _Built:
    target = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
    others = _random_specs(rng, rng.randint(0, MAX_OBJECTS - 1), lambda c, s: c == target[0])
    specs = others + [target]
    rng.shuffle(specs)
    template = rng.choice(("What shape is the {} object?", "What is the shape of the {} object?"))
    return _place(rng, split, specs), None, template.format(target[0]), target[1]


def _build_count(rng: random.Random, split: str) -> _Built:
    variant = rng.choice(("all", "shape", "color"))
    if variant == "all":
        k = rng.randint(1, MAX_OBJECTS)
        specs = _random_specs(rng, k)
        question = rng.choice(("How many objects are there?", "How many shapes are in the image?"))
    else:
        k = rng.randint(0, MAX_OBJECTS)
        n_other = rng.randint(1 if k == 0 else 0, MAX_OBJECTS - k)
        if variant == "shape":
            shape = rng.choice(SHAPES)
            specs = [(rng.choice(COLOR_NAMES), shape) for _ in range(k)]
            specs += _random_specs(rng, n_other, lambda c, s: s == shape)
            template = rng.choice(("How many {} are there?", "How many {} are in the image?"))
            question = template.format(PLURALS[shape])
        else:
            color = rng.choice(COLOR_NAMES)
            specs = [(color, rng.choice(SHAPES)) for _ in range(k)]
            specs += _random_specs(rng, n_other, lambda c, s: c == color)
            template = rng.choice(("How many {} objects are there?", "How many {} shapes are in the image?"))
            question = template.format(color)
        rng.shuffle(specs)
    return _place(rng, split, specs), None, question, str(k)


def _relations(a: SceneObject, b: SceneObject) -> list[tuple[str, str]]:
    """(axis, answer) pairs that hold with a clear margin for 'a relative to b'."""
    out = []
    if a.box[2] + POSITION_GAP <= b.box[0]:
        out.append(("x", "left"))
    if b.box[2] + POSITION_GAP <= a.box[0]:
        out.append(("x", "right"))
    if a.box[3] + POSITION_GAP <= b.box[1]:
        out.append(("y", "above"))
    if b.box[3] + POSITION_GAP <= a.box[1]:
        out.append(("y", "below"))
    return out


def _build_position(rng: random.Random, split: str) -> _Built:
    while True:
        objects = _place(rng, split, _random_specs(rng, rng.randint(2, MAX_OBJECTS)))
        names = [_name(o) for o in objects]
        unique = [o for o, nm in zip(objects, names) if names.count(nm) == 1]
        options = [(a, b, rel) for a in unique for b in unique if a is not b for rel in _relations(a, b)]
        if options:
            break
    a, b, (axis, answer) = rng.choice(options)
    if axis == "x":
        template = rng.choice(("Is the {} left or right of the {}?", "Is the {} to the left or to the right of the {}?"))
    else:
        template = rng.choice(("Is the {} above or below the {}?", "Is the {} over or under the {}?"))
    return objects, None, template.format(_name(a), _name(b)), answer


def _build_where(rng: random.Random, split: str) -> _Built:
    """Absolute side: "Is the red star left or right of the middle of the image?". The location feature of
    one object, which `position` then needs for two (a curriculum step; answers share `position`'s words)."""
    mid = IMAGE_SIZE / 2
    while True:
        objects = _place(rng, split, _random_specs(rng, rng.randint(1, MAX_OBJECTS)))
        names = [_name(o) for o in objects]
        options = []
        for o, nm in zip(objects, names):
            if names.count(nm) != 1:
                continue
            x0, y0, x1, y1 = o.box
            for axis, answer, ok in (("x", "left", x1 + POSITION_GAP / 2 <= mid),
                                     ("x", "right", x0 - POSITION_GAP / 2 >= mid),
                                     ("y", "above", y1 + POSITION_GAP / 2 <= mid),
                                     ("y", "below", y0 - POSITION_GAP / 2 >= mid)):
                if ok:
                    options.append((o, axis, answer))
        if options:
            break
    o, axis, answer = rng.choice(options)
    if axis == "x":
        template = rng.choice(("Is the {} left or right of the middle of the image?",
                               "Is the {} to the left or to the right of the centre of the image?"))
    else:
        template = rng.choice(("Is the {} above or below the middle of the image?",
                               "Is the {} above or below the centre of the image?"))
    return objects, None, template.format(_name(o)), answer


def _build_ocr(rng: random.Random, split: str) -> _Built:
    text = _plan_text(rng)
    objects = _place(rng, split, _random_specs(rng, rng.randint(0, 2)), avoid=[text.box])
    question = rng.choice(("What word is written in the image?", "What does the text in the image say?", "What word is shown?"))
    return objects, text, question, text.word.lower()


_BUILDERS: dict[str, Callable[[random.Random, str], _Built]] = {
    "exist": _build_exist,
    "color": _build_color,
    "shape": _build_shape,
    "count": _build_count,
    "position": _build_position,
    "ocr": _build_ocr,
    "where": _build_where,
}


# --------------------------------------------------------------------------
# Public API


def content_tokens(scene: Scene, cells: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """[cells * cells] bool, raster order: the visual tokens (square cells of the image, as the merged vision
    grid has them) that overlap an object or the text; the rest show only background."""
    out = np.zeros((cells, cells), dtype=bool)
    step = image_size / cells
    boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text is not None else [])
    for x0, y0, x1, y1 in boxes:
        c0, c1 = int(x0 // step), min(cells - 1, int((x1 - 1) // step))
        r0, r1 = int(y0 // step), min(cells - 1, int((y1 - 1) // step))
        out[r0:r1 + 1, c0:c1 + 1] = True
    return out.reshape(-1)


def qtype_of(index: int) -> str:
    return QTYPES[index % len(QTYPES)]


def make_sample_and_scene(split: str, index: int, aux: str | None = None,
                          photos: float = 0.0) -> tuple[Sample, Scene]:
    """The sample for (split, index) plus the ground-truth scene behind it. With `aux` (one of `AUX_QTYPES`),
    the index-th sample of that training-only type instead, from a seed space of its own.

    `photos` in [0, 1]: the share of samples whose background is a crop of a bundled photograph
    (`_photo_background`) instead of a synthetic one. Which samples, and their crops, come from a seed of their
    own, so the objects, question and answer of every sample are the same at any share, and share 0 gives
    exactly the samples made before photographs existed."""
    _check_share(photos)
    seed = _seed(split, index) if aux is None else _seed(split, index, aux)
    if aux is None:
        qtype = qtype_of(index)
    else:
        if aux not in AUX_QTYPES:
            raise ValueError(f"unknown auxiliary question type {aux!r}; expected one of {AUX_QTYPES}")
        qtype = aux
    rng = random.Random(seed)
    objects, text, question, answer = _BUILDERS[qtype](rng, split)
    image, background = _background(rng)
    if photos > 0:
        prng = random.Random(f"vismmoe.scenes/photo/{seed}")
        if prng.random() < photos:
            image, background = _photo_background(prng), "photo"
    _draw_scene(image, objects, text)
    scene = Scene(tuple(objects), text, background)
    return Sample(image, question, answer, qtype, split, index), scene


def make_sample(split: str, index: int, aux: str | None = None, photos: float = 0.0) -> Sample:
    """Fully deterministic sample for (split, index) (or (split, aux type, index)); `photos` as in
    `make_sample_and_scene`."""
    return make_sample_and_scene(split, index, aux, photos)[0]


def make_split(split: str, n: int, start: int = 0) -> list[Sample]:
    """Samples start .. start+n-1 of a split."""
    return [make_sample(split, i) for i in range(start, start + n)]


class LazySeq(Sequence):
    """`n` items, item i made by `make(i)` each time it is asked for and never kept: memory stays one item
    whatever `n` is (a scene is a few ms to make and 600 KB to keep). Indexing (negative too), slicing (another
    LazySeq) and iteration work as on a list."""

    def __init__(self, n: int, make: Callable[[int], object], start: int = 0):
        self.n, self.make, self.start = max(0, int(n)), make, start

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        idx = range(self.start, self.start + self.n)[i]        # IndexError and slice bounds as a list's
        if isinstance(i, slice):
            if idx.step == 1:
                return LazySeq(len(idx), self.make, idx.start)
            return [self.make(j) for j in idx]
        return self.make(idx)


def at_side(sample: Sample, side: int | None) -> Sample:
    """The sample with its image resized to `side` x `side` px (bicubic, as training resizes); None: as made."""
    if side is None or sample.image.size == (side, side):
        return sample
    return replace(sample, image=sample.image.resize((side, side), Image.Resampling.BICUBIC))


def balanced_subset(split: str, limit: int, photos: float = 0.0, side: int | None = None) -> LazySeq:
    """First `limit` samples of a split, made as they are read (`LazySeq`); type counts differ by at most one.
    `photos`: the share of photograph backgrounds (`make_sample_and_scene`); `side`: images resized to that many
    pixels a side (`at_side`; None: the scenes' own 448)."""
    _seed(split, 0)                                             # an unknown split fails here, not on first read
    _check_share(photos)
    if side is not None and side < 1:
        raise ValueError(f"side is an image side in pixels, at least 1; got {side}")
    return LazySeq(limit, lambda i: at_side(make_sample(split, i, photos=photos), side))


def answer_vocabulary() -> list[str]:
    """Every answer the generator can produce, sorted."""
    answers = {"yes", "no", *COLORS, *SHAPES, *COUNT_ANSWERS, *POSITION_ANSWERS}
    answers.update(w.lower() for w in OCR_WORDS)
    return sorted(answers)


def save_preview(path: str, n: int = 16, split: str = "train", start: int = 0, cols: int = 4, thumb: int = 336) -> None:
    """Write a PNG contact sheet of n samples with question/answer captions."""
    line_h, caption_h = 18, 62
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    for k, sample in enumerate(make_split(split, n, start)):
        x, y = (k % cols) * thumb, (k // cols) * (thumb + caption_h)
        sheet.paste(sample.image.resize((thumb, thumb), Image.Resampling.BILINEAR), (x, y))
        lines = textwrap.wrap(f"[{sample.qtype}] {sample.question}", width=thumb // 8)[:2]
        for i, line in enumerate(lines + [f"-> {sample.answer}"]):
            fill = (180, 0, 0) if i == len(lines) else (0, 0, 0)
            draw.text((x + 4, y + thumb + 3 + i * line_h), line, font=font, fill=fill)
    sheet.save(path)
