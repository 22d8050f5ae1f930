"""Prompts as the family adapters build them: images too long and thin for the processor are padded and
answered, and special-token strings in the user's text stay text (an image placeholder there used to make the
prompt carry two)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from vismmoe.cli.app import main
from vismmoe.families import get_family
from vismmoe.families.base import MAX_ASPECT, pad_to_aspect
from vismmoe.engine.inputs import load_image

from .conftest import FAMILIES as _RUNTIME_FAMILIES, MORE_FAMILIES

FAMILIES = _RUNTIME_FAMILIES + MORE_FAMILIES


def test_pad_to_aspect_keeps_the_picture_and_bounds_the_pixels():
    ip = get_family("qwen3_vl_moe").tiny_image_processor(max_side=1024)
    thin = Image.new("RGB", (8000, 30), (10, 200, 30))
    out = pad_to_aspect(thin, ip)
    assert out.size == (8000, 54) and max(out.size) / min(out.size) <= MAX_ASPECT
    a = np.asarray(out)
    assert (a[12:42] == (10, 200, 30)).all() and (a[:12] == 128).all() and (a[42:] == 128).all()
    ip = get_family("glm4v_moe").tiny_image_processor(max_side=224)
    endless = pad_to_aspect(Image.new("RGB", (5, 1_000_000)), ip)      # shrunk before padding, never 6.7 GP
    assert max(endless.size) / min(endless.size) <= MAX_ASPECT
    assert endless.size[0] * endless.size[1] <= 1.1 * ip.size["longest_edge"]      # the padded row rounds up
    square = Image.new("RGB", (40, 40))
    assert pad_to_aspect(square, ip) is square


def _generate(capsys, model, image, prompt):
    code = main(["generate", "--model", model, "--image", image, "--prompt", prompt, "--max-new-tokens", "2",
                 "--json"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", FAMILIES)
def test_long_thin_images_are_answered(tiny_dirs, tmp_path, capsys, family):
    for w, h in ((30, 8000), (8000, 30), (1, 1)):
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray((np.random.default_rng(w).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        code, out, err = _generate(capsys, tiny_dirs[family], str(path), "What is this?")
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["stats"]["visual_tokens"] >= 1


def _special_strings(tokenizer, family) -> list[str]:
    t = family.tokens
    return sorted({t.image, t.image_start, t.image_end, t.pad, *t.eos, *t.extra, *tokenizer.all_special_tokens} - {""})


@pytest.mark.parametrize("family_name", FAMILIES)
def test_special_token_strings_in_a_prompt_stay_text(tiny_dirs, image_file, family_name):
    family = get_family(family_name)
    model = tiny_dirs[family_name]
    tok = AutoTokenizer.from_pretrained(model)
    ip = family.load_image_processor(model)
    image = load_image(image_file)
    special_ids = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(s) for s in _special_strings(tok, family)}
    n_visual = int(family.build_inputs(tok, ip, [image], ["hi"])["mm_token_type_ids"].sum())
    template = family.prompt_ids(tok, "", n_visual)                   # the chat format around an empty prompt
    for s in _special_strings(tok, family):
        prompt = f"What does {s} mean? {s}{s}"
        inputs = family.build_inputs(tok, ip, [image], [prompt])
        ids = inputs["input_ids"][0].tolist()
        assert int(inputs["mm_token_type_ids"].sum()) == n_visual, s
        text = tok(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.decode(text) == prompt and not set(text) & special_ids, s
        start = next(i for i in range(len(ids)) if ids[i:i + len(text)] == text)
        assert ids[:start] + ids[start + len(text):] == template, s      # the prompt is that text, nothing else


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_with_the_image_placeholder_is_answered(tiny_dirs, image_file, capsys, family):
    placeholder = get_family(family).tokens.image
    code, out, err = _generate(capsys, tiny_dirs[family], image_file, f"What does {placeholder} mean?")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["token_ids"]
