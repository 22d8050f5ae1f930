"""The family registry: model types vismmoe cannot offload are refused through the CLI with one line naming the
supported families and exit status 2, whether transformers ignores the experts setting for them or vismmoe does
not know them at all."""

from __future__ import annotations

import json

import pytest

from vismmoe.cli.app import main
from vismmoe.families import FAMILIES, IGNORES_EXPERTS_SETTING


def _model_dir(tmp_path, model_type: str) -> str:
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(d)


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vismmoe: error:")
    return lines[0]


@pytest.mark.parametrize("model_type", sorted(IGNORES_EXPERTS_SETTING))
def test_families_that_ignore_the_experts_setting_are_refused(model_type, tmp_path, capsys):
    line = _one_line_error(capsys, ["generate", "--model", _model_dir(tmp_path, model_type), "--prompt", "hi"])
    assert f"model type {model_type!r} is not supported" in line and "ignores transformers' experts setting" in line
    assert all(name in line for name in FAMILIES)


@pytest.mark.parametrize("model_type", ["mystery_moe", "qwen3_vl", "llama"])
def test_unknown_model_types_are_refused(model_type, tmp_path, capsys):
    line = _one_line_error(capsys, ["generate", "--model", _model_dir(tmp_path, model_type), "--prompt", "hi"])
    assert f"unknown model type {model_type!r}" in line and all(name in line for name in FAMILIES)


@pytest.mark.parametrize("model_type", ["llama4", "mystery_moe"])
def test_make_tiny_refuses_them_too(model_type, tmp_path, capsys):
    line = _one_line_error(capsys, ["make-tiny", "--family", model_type, "--out", str(tmp_path / "out")])
    assert model_type in line and all(name in line for name in FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_make_tiny_through_the_cli(family, tmp_path, capsys):
    """`vismmoe make-tiny --family F --out DIR` writes a checkpoint of that model type (in the family's hub
    layout: tests/test_family_exactness.py loads it and its fused variant)."""
    out = tmp_path / family
    assert main(["make-tiny", "--family", family, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert capsys.readouterr().out.strip() == str(out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_device_memory_sizes_every_family(family, tiny_dirs):
    """`--device-memory` sizes the expert budget from each family's config (per-layer attention widths, vision
    towers of several encoders): what is left after weights and the reserve, at least one layer's top-k."""
    from vismmoe import load
    eng = load(tiny_dirs[family], device_memory="256MiB")
    assert eng.geometry.top_k * eng.layout.nbytes <= eng.budget_bytes < 256 * 1024**2 - eng.nonexpert_bytes


def _config_dir(tmp_path, name: str, config) -> str:
    d = tmp_path / name
    config.save_pretrained(d)
    return str(d)


def test_families_without_routed_experts_are_refused(tmp_path, capsys):
    """InternVL around a dense text model, Gemma 4 without its MoE block: one line, exit 2, before any weight."""
    from transformers import Gemma4Config, InternVLConfig
    internvl = InternVLConfig(text_config={"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "num_key_value_heads": 2,
                                           "intermediate_size": 128, "vocab_size": 300})
    gemma = Gemma4Config(text_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
                                      "vocab_size": 300, "enable_moe_block": False}, audio_config=None)
    for name, config, needle in (("ivl", internvl, "has no routed experts"), ("g4", gemma, "has no MoE block")):
        line = _one_line_error(capsys, ["generate", "--model", _config_dir(tmp_path, name, config), "--prompt", "hi"])
        assert needle in line, line
