"""Tests for the deterministic visual-question scene generator."""

from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vismmoe.data import scenes
from vismmoe.data.scenes import (
    COLORS,
    IMAGE_SIZE,
    OCR_WORDS,
    POSITION_GAP,
    PLURALS,
    QTYPES,
    SHAPES,
    Sample,
    Scene,
    SceneObject,
    answer_vocabulary,
    balanced_subset,
    make_sample,
    make_sample_and_scene,
    make_split,
)

N_PER_SPLIT = 72  # 12 of each question type per split


@pytest.fixture(scope="module")
def generated() -> dict[str, list[tuple[Sample, Scene]]]:
    return {split: [make_sample_and_scene(split, i) for i in range(N_PER_SPLIT)] for split in ("train", "val", "test")}


def _all(generated: dict[str, list[tuple[Sample, Scene]]], qtype: str | None = None) -> list[tuple[Sample, Scene]]:
    return [(s, sc) for pairs in generated.values() for s, sc in pairs if qtype is None or s.qtype == qtype]


def _digest(sample: Sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + f"|{sample.question}|{sample.answer}".encode()).hexdigest()


def _named(scene: Scene, color: str | None = None, shape: str | None = None) -> list[SceneObject]:
    return [o for o in scene.objects if color in (None, o.color) and shape in (None, o.shape)]


# ---------------------------------------------------------------- determinism


def test_same_split_index_gives_identical_sample() -> None:
    for split in ("train", "test"):
        for i in range(len(QTYPES)):
            a, b = make_sample(split, i), make_sample(split, i)
            assert _digest(a) == _digest(b)
            assert (a.qtype, a.split, a.index) == (b.qtype, b.split, b.index)


def test_determinism_across_processes() -> None:
    keys = [("train", 4), ("test", 11)]
    code = (
        "import hashlib, sys\n"
        "from vismmoe.data import make_sample\n"
        f"for split, i in {keys!r}:\n"
        "    s = make_sample(split, i)\n"
        "    print(hashlib.sha256(s.image.tobytes() + f'|{s.question}|{s.answer}'.encode()).hexdigest())\n"
    )
    src = str(Path(scenes.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [_digest(make_sample(split, i)) for split, i in keys]


def test_splits_use_disjoint_seeds_and_differ(generated) -> None:
    for i in range(12):
        seeds = {scenes._seed(split, i) >> 60 for split in ("train", "val", "test")}
        assert len(seeds) == 3
    for i in range(len(QTYPES)):
        digests = {_digest(generated[split][i][0]) for split in ("train", "val", "test")}
        assert len(digests) == 3


def test_easyvqa_sources_do_not_leak_between_train_and_test(generated) -> None:
    by_split = collections.defaultdict(set)
    for split, pairs in generated.items():
        for _, scene in pairs:
            by_split[split].update(o.source for o in scene.objects if o.source != "drawn")
    assert all(src.startswith("easyvqa-train:") for src in by_split["train"] | by_split["val"])
    assert all(src.startswith("easyvqa-test:") for src in by_split["test"])
    assert by_split["train"] and by_split["test"]


# ---------------------------------------------------------------- format


def test_image_size_and_mode(generated) -> None:
    for sample, _ in _all(generated):
        assert sample.image.size == (IMAGE_SIZE, IMAGE_SIZE) and sample.image.mode == "RGB"


def test_qtypes_cycle_and_all_appear(generated) -> None:
    for split, pairs in generated.items():
        assert [s.qtype for s, _ in pairs[: len(QTYPES)]] == list(QTYPES)
        assert all(s.split == split and s.index == i for i, (s, _) in enumerate(pairs))


def test_balanced_subset_is_balanced_and_fixed() -> None:
    subset = balanced_subset("test", 15)
    counts = collections.Counter(s.qtype for s in subset)
    assert set(counts) == set(QTYPES) and max(counts.values()) - min(counts.values()) <= 1
    assert [_digest(s) for s in subset] == [_digest(s) for s in balanced_subset("test", 15)]
    assert [s.index for s in make_split("val", 3, start=5)] == [5, 6, 7]


def test_answer_vocabulary_is_small_sorted_and_covers_answers(generated) -> None:
    vocab = answer_vocabulary()
    assert vocab == sorted(set(vocab)) and len(vocab) < 60
    for sample, _ in _all(generated):
        assert sample.answer in vocab, sample
        assert sample.answer == sample.answer.lower() and " " not in sample.answer


def test_answers_are_not_degenerate_per_type(generated) -> None:
    for qtype in QTYPES:
        answers = collections.Counter(s.answer for s, _ in _all(generated, qtype))
        assert len(answers) >= 2, qtype
        assert max(answers.values()) <= 0.7 * sum(answers.values()), (qtype, answers)


# ---------------------------------------------------------------- scene geometry & rendering


def test_objects_are_placed_in_image_without_overlap(generated) -> None:
    for sample, scene in _all(generated):
        boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text else [])
        covered = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            assert not covered[y0:y1, x0:x1].any(), sample
            covered[y0:y1, x0:x1] = True
        for o in scene.objects:
            assert max(o.box[2] - o.box[0], o.box[3] - o.box[1]) >= 48
        assert covered.mean() < 0.5  # background stays the majority of the image
        if sample.qtype != "ocr":
            assert 1 <= len(scene.objects) <= 5


def test_rendered_pixels_match_object_metadata(generated) -> None:
    for sample, scene in _all(generated):
        pixels = np.asarray(sample.image)
        for o in scene.objects:
            cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2
            assert tuple(pixels[cy, cx]) == COLORS[o.color], (sample, o)


# ---------------------------------------------------------------- question/answer correctness


def test_exist_answers_match_scene(generated) -> None:
    pairs = _all(generated, "exist")
    answers = collections.Counter()
    hard_negatives = 0
    for sample, scene in pairs:
        color, shape = re.fullmatch(r"(?:Is there|Does the image contain) a (\w+) (\w+)(?: in the image)?\?", sample.question).groups()
        assert sample.answer == ("yes" if _named(scene, color, shape) else "no")
        answers[sample.answer] += 1
        if sample.answer == "no" and (_named(scene, color=color) or _named(scene, shape=shape)):
            hard_negatives += 1
    assert answers["yes"] >= 0.3 * len(pairs) and answers["no"] >= 0.3 * len(pairs)
    assert hard_negatives > 0


def test_color_and_shape_answers_match_unique_object(generated) -> None:
    for sample, scene in _all(generated, "color"):
        shape = re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", sample.question).group(1)
        (target,) = _named(scene, shape=shape)
        assert sample.answer == target.color
    for sample, scene in _all(generated, "shape"):
        color = re.fullmatch(r"What (?:shape is|is the shape of) the (\w+) object\?", sample.question).group(1)
        (target,) = _named(scene, color=color)
        assert sample.answer == target.shape


def test_count_answers_equal_number_of_matching_objects(generated) -> None:
    singular = {plural: shape for shape, plural in PLURALS.items()}
    pairs = _all(generated, "count")
    for sample, scene in pairs:
        word = re.fullmatch(r"How many (?:(\w+) )?(\w+) (?:are there|are in the image)\?", sample.question)
        attr, noun = word.groups()
        if noun in singular:
            expected = len(_named(scene, shape=singular[noun]))
        elif attr is not None:
            expected = len(_named(scene, color=attr))
        else:
            expected = len(scene.objects)
        assert sample.answer == str(expected), sample
    assert len({s.answer for s, _ in pairs}) >= 4


def test_position_answers_match_coordinates(generated) -> None:
    pairs = _all(generated, "position")
    pattern = r"Is the (\w+) (\w+) (left or right of|to the left or to the right of|above or below|over or under) the (\w+) (\w+)\?"
    for sample, scene in pairs:
        ca, sa, relation, cb, sb = re.fullmatch(pattern, sample.question).groups()
        (a,) = _named(scene, ca, sa)  # both referents must be unique
        (b,) = _named(scene, cb, sb)
        if "left" in relation:
            assert sample.answer in ("left", "right")
            left, right = (a, b) if sample.answer == "left" else (b, a)
            assert left.box[2] + POSITION_GAP <= right.box[0], sample
            assert left.center[0] < right.center[0]
        else:
            assert sample.answer in ("above", "below")
            top, bottom = (a, b) if sample.answer == "above" else (b, a)
            assert top.box[3] + POSITION_GAP <= bottom.box[1], sample
            assert top.center[1] < bottom.center[1]
    assert len({s.answer for s, _ in pairs}) == 4


def test_ocr_word_is_rendered_large_and_answered_in_lowercase(generated) -> None:
    for sample, scene in _all(generated, "ocr"):
        assert scene.text is not None and scene.text.word in OCR_WORDS
        assert sample.answer == scene.text.word.lower()
        x0, y0, x1, y1 = scene.text.box
        assert y1 - y0 >= 40  # cap height of the uppercase word (plus stroke)
        ink = np.all(np.asarray(sample.image)[y0:y1, x0:x1] == COLORS[scene.text.color], axis=-1)
        assert ink.mean() > 0.15, sample  # the word is actually drawn there
    for sample, scene in _all(generated):
        assert (scene.text is not None) == (sample.qtype == "ocr")


def test_label_parser_reads_easyvqa_questions() -> None:
    texts = ["what color is the shape?", "what is the blue shape?", "is there not a red shape?", "what shape is present?",
             "does the image contain a circle?", "what is the color of the triangle?"]
    answers = ["blue", "rectangle", "no", "circle", "yes", "gray"]
    ids = [0, 0, 1, 1, 2, 3]
    labels = scenes._parse_labels(texts, answers, ids)
    assert labels == {0: ("blue", "rectangle"), 1: ("red", "circle"), 3: ("gray", "triangle")}


def test_vocabulary_contains_every_category() -> None:
    vocab = set(answer_vocabulary())
    assert {"yes", "no", "left", "right", "above", "below"} <= vocab
    assert set(COLORS) | set(SHAPES) | {w.lower() for w in OCR_WORDS} | {str(k) for k in range(6)} <= vocab


def test_packed_sources_reproduce_the_package(tmp_path):
    """Scenes made from the packed silhouettes are byte-identical to scenes decoded from easy-vqa itself; with
    the packed file, nothing (not even warm_cache after samples were made) imports easy-vqa."""
    import hashlib
    import subprocess
    import sys
    code = ("import hashlib\nfrom vismmoe.data import make_sample\nh = hashlib.sha256()\n"
            "for split in ('train', 'val', 'test'):\n    for i in range(0, 120, 5):\n"
            "        s = make_sample(split, i)\n        h.update(s.image.tobytes()); h.update(s.answer.encode())\n"
            "print(h.hexdigest())")
    blocked = ("import sys\nsys.modules['easy_vqa'] = None\n" + code +
               "\nfrom vismmoe.data import warm_cache\nwarm_cache()\n")
    import os
    env = dict(os.environ)
    packed = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, env=env)
    assert packed.returncode == 0, packed.stderr[-2000:]
    env["VISMMOE_UNPACKED"] = "1"
    unpacked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert packed.stdout.strip() == unpacked.stdout.strip() and len(packed.stdout.strip()) == 64
    assert hashlib  # noqa


def test_where_curriculum_answers_match_the_image_centre() -> None:
    """The training-only `where` questions: the named object is unique and wholly on the answered side of the
    centre line; they come from a seed space of their own (never a scored sample), and never in val/test use."""
    mid = scenes.IMAGE_SIZE / 2
    pattern = r"Is the (\w+) (\w+) (left or right of|to the left or to the right of|above or below) the (middle|centre) of the image\?"
    answers = set()
    for j in range(60):
        sample, scene = scenes.make_sample_and_scene("train", j, "where")
        assert sample.qtype == "where"
        color, shape, relation, _ = re.fullmatch(pattern, sample.question).groups()
        (o,) = _named(scene, color, shape)
        x0, y0, x1, y1 = o.box
        want = {"left": x1 < mid, "right": x0 > mid, "above": y1 < mid, "below": y0 > mid}
        assert want[sample.answer], (sample.question, sample.answer, o.box)
        assert (sample.answer in ("left", "right")) == ("left" in relation)
        answers.add(sample.answer)
        assert sample.image.tobytes() != scenes.make_sample("train", j).image.tobytes()
    assert answers == {"left", "right", "above", "below"}
    with pytest.raises(ValueError, match="auxiliary"):
        scenes.make_sample("train", 0, "position")


def test_content_tokens_cover_objects_and_text_only() -> None:
    """content_tokens: the cell under every object's and the text's centre is marked; cells no box touches are
    not; a cell's extent is image_size / cells."""
    for i in range(12):
        _, scene = scenes.make_sample_and_scene("test", i)
        mask = scenes.content_tokens(scene, 14).reshape(14, 14)
        boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text else [])
        for x0, y0, x1, y1 in boxes:
            assert mask[int((y0 + y1) / 2 // 32), int((x0 + x1) / 2 // 32)]
        for r in range(14):
            for c in range(14):
                touched = any(x0 < (c + 1) * 32 and x1 > c * 32 and y0 < (r + 1) * 32 and y1 > r * 32
                              for x0, y0, x1, y1 in boxes)
                assert mask[r, c] == touched, (i, r, c)
        assert 0 < mask.sum() < mask.size


def test_subsets_are_made_as_they_are_read(monkeypatch) -> None:
    """`eval --limit 100000` held every scene (600 KB each) before answering one: memory grew until the machine
    ran out. A subset makes each scene when it is read; `evaluate` keeps one batch of them at a time."""
    import weakref

    from vismmoe.data import scenes
    from vismmoe.engine.core import Generation
    from vismmoe.tools.evaluate import evaluate

    refs: list = []
    made = []
    real = scenes.make_sample

    def counting(split, index, aux=None, photos=0.0):
        s = real(split, index, aux, photos)
        made.append(index)
        refs.append(weakref.ref(s))
        return s
    monkeypatch.setattr(scenes, "make_sample", counting)
    subset = balanced_subset("test", 1000)
    assert len(subset) == 1000 and made == []                 # nothing made yet
    assert subset[7].index == 7 and subset[-1].index == 999 and [s.index for s in subset[3:5]] == [3, 4]
    peak = []

    class Engine:
        def generate_batch(self, images, prompts, max_new_tokens):
            import gc
            gc.collect()
            peak.append(sum(r() is not None for r in refs))
            return [Generation(text="no", token_ids=[1]) for _ in images]
    res = evaluate(Engine(), limit=60, batch_size=8, progress=False, majority_samples=12)
    assert res["n"] == 60 and max(peak) <= 8 + 1, peak          # a batch, and the last sample of the one before


def test_photo_backgrounds_change_only_the_background() -> None:
    """A share of photograph backgrounds: the chosen samples keep their objects, question and answer (and the
    objects' exact colours), the others are unchanged, share 0 is the plain split, and the choice is stable."""
    n = 120
    plain = [make_sample_and_scene("train", i) for i in range(n)]
    mixed = [make_sample_and_scene("train", i, photos=0.5) for i in range(n)]
    photo = [i for i in range(n) if mixed[i][1].background == "photo"]
    assert 0.35 * n < len(photo) < 0.65 * n
    for (a, sa), (b, sb) in zip(plain, mixed):
        assert (a.question, a.answer, sa.objects, sa.text) == (b.question, b.answer, sb.objects, sb.text)
        same = _digest(a) == _digest(b)
        assert same == (sb.background != "photo")
        for o in sb.objects:
            cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2
            assert tuple(np.asarray(b.image)[cy, cx]) == COLORS[o.color]
    assert [_digest(make_sample("train", i, photos=0.5)) for i in photo[:3]] == \
        [_digest(mixed[i][0]) for i in photo[:3]]
    every = make_sample_and_scene("test", 7, photos=1.0)
    assert every[1].background == "photo" and every[0].image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert _digest(make_sample("test", 7, photos=0.0)) == _digest(make_sample("test", 7))
    assert [s.question for s in balanced_subset("val", 12, photos=1.0)] == \
        [s.question for s in balanced_subset("val", 12)]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            make_sample("train", 0, photos=bad)
        with pytest.raises(ValueError, match="share"):
            balanced_subset("train", 3, photos=bad)
