"""config.json values that transformers refuses, that lie outside their domain, or that describe a smaller model
than the weights: one UserError at load naming config.json and the field (exit status 2 on the command line).
Each used to be a traceback (`"hidden_size": "256"`, an int `rms_norm_eps`) or, worse, a model that loaded and
answered wrongly with exit status 0 (a negative eps or rope_theta, a deepstack index past the vision blocks, a
vision `depth` smaller than the weights' blocks)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from vismmoe import load
from vismmoe.errors import UserError

from .test_checkpoint_faults import _copy, _edit_config as _edit


def _set(path: str, value):
    """An edit setting the field at dotted `path` of config.json."""
    *parents, last = path.split(".")

    def edit(cfg):
        for p in parents:
            cfg = cfg[p]
        cfg[last] = value
    return edit


def _both(*edits):
    def edit(cfg):
        for e in edits:
            e(cfg)
    return edit


def _refused(tiny_dirs, tmp_path, case, family, edit) -> str:
    d = _edit(_copy(tiny_dirs, tmp_path, case, family), edit)
    with pytest.raises(UserError, match="config.json") as err:
        load(d, expert_budget="50%")
    assert "\n" not in str(err.value)
    return str(err.value)


# ---- transformers' own validation of config.json: one line naming the field and the types it takes -----------
VL = ("qwen3_vl_moe", "glm4v_moe", "internvl", "qwen3_5_moe", "deepseek_ocr2", "gemma4", "ernie4_5_vl_moe")
TEXT = ("qwen3_moe", "glm4_moe")


@pytest.mark.parametrize("family", VL + TEXT)
def test_a_string_where_transformers_takes_a_number_is_one_line_in_every_family(tiny_dirs, tmp_path, family):
    path = "text_config.hidden_size" if family in VL else "hidden_size"
    msg = _refused(tiny_dirs, tmp_path, family, family, _set(path, "64"))
    assert f'{path} is "64", which transformers takes only as a whole number' in msg, msg
    assert "correct config.json" in msg


TYPE_CASES = {
    # (family, edit, what the error says)
    "eps_an_int": ("qwen3_vl_moe", _set("text_config.rms_norm_eps", -1),
                   "text_config.rms_norm_eps is -1, which transformers takes only as a number with a decimal point"),
    "depth_a_string": ("qwen3_vl_moe", _set("vision_config.depth", "4"),
                       'vision_config.depth is "4", which transformers takes only as a whole number'),
    "eps_a_string_in_vision": ("glm4v_moe", _set("vision_config.rms_norm_eps", "1e-5"),
                               'vision_config.rms_norm_eps is "1e-5"'),
    "layers_null": ("glm4_moe", _set("num_hidden_layers", None), "num_hidden_layers is null"),
    "architectures_a_string": ("qwen3_vl_moe", _set("architectures", "Qwen"),
                               'architectures is "Qwen", which transformers takes only as a list or null'),
    "bad_layer_types": ("qwen3_vl_moe", _set("text_config.layer_types", ["nope"] * 4),
                        "is invalid: The `layer_types` entries must be in"),
    "unknown_activation": ("qwen3_vl_moe", _set("vision_config.hidden_act", "nope"),
                           "does not build a qwen3_vl_moe model (KeyError: 'nope')"),
}


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_values_transformers_refuses_are_one_line_naming_the_field(tiny_dirs, tmp_path, case):
    family, edit, needle = TYPE_CASES[case]
    msg = _refused(tiny_dirs, tmp_path, case, family, edit)
    assert needle in msg, msg


# ---- numeric fields outside their domain: one table over the config and its sub-configs ------------------------
DOMAIN_CASES = {
    # (family, edit, what the error says)
    "eps_negative": ("qwen3_vl_moe", _set("text_config.rms_norm_eps", -1.0),
                     "text_config.rms_norm_eps is -1.0, which must be a number above 0"),
    "eps_nan": ("qwen3_moe", _set("rms_norm_eps", math.nan), "rms_norm_eps is NaN, which must be a number above 0"),
    "vision_eps_zero": ("glm4v_moe", _set("vision_config.rms_norm_eps", 0.0), "vision_config.rms_norm_eps is 0.0"),
    "layer_norm_eps_negative": ("internvl", _set("vision_config.layer_norm_eps", -1e-6),
                                "vision_config.layer_norm_eps is -1e-06, which must be a number above 0"),
    "rope_theta_negative": ("qwen3_vl_moe", _set("text_config.rope_parameters.rope_theta", -5.0),
                            "text_config.rope_parameters.rope_theta is -5.0, which must be a number above 0"),
    "rope_theta_legacy_field": ("qwen3_vl_moe", _set("text_config.rope_theta", -5.0),
                                "text_config.rope_theta is -5.0, which must be a number above 0"),
    "rope_theta_per_layer_type": ("gemma4", _set("text_config.rope_parameters.sliding_attention.rope_theta", 0.0),
                                  "text_config.rope_parameters.sliding_attention.rope_theta is 0.0"),
    "rope_theta_a_string": ("qwen3_vl_moe", _set("text_config.rope_parameters.rope_theta", "x"),
                            'rope_theta is "x", which must be a number above 0'),
    "partial_rotary_above_one": ("glm4v_moe", _set("text_config.rope_parameters.partial_rotary_factor", 1.5),
                                 "partial_rotary_factor is 1.5, which must be a number above 0 and at most 1"),
    "vision_depth_zero": ("qwen3_vl_moe", _set("vision_config.depth", 0),
                          "vision_config.depth is 0, which must be a whole number at least 1"),
    "vision_heads_zero": ("ernie4_5_vl_moe", _set("vision_config.num_heads", 0), "vision_config.num_heads is 0"),
    "vision_heads_not_dividing": ("qwen3_vl_moe", _set("vision_config.num_heads", 3),
                                  "vision_config.num_heads is 3, which must be a divisor of vision_config.hidden_size"),
    "vision_layers_zero": ("gemma4", _set("vision_config.num_hidden_layers", 0),
                           "vision_config.num_hidden_layers is 0"),
    "attention_heads_zero": ("glm4_moe", _set("num_attention_heads", 0), "num_attention_heads is 0"),
    "kv_heads_above_heads": ("qwen3_vl_moe", _set("text_config.num_key_value_heads", 8),
                             "text_config.num_key_value_heads is 8, which must be a whole number from 1 to "
                             "text_config.num_attention_heads (4)"),
    "kv_heads_not_dividing": ("qwen3_vl_moe", _set("text_config.num_key_value_heads", 3),
                              "text_config.num_key_value_heads is 3, which must be a divisor"),
    "head_dim_zero": ("qwen3_vl_moe", _set("text_config.head_dim", 0), "text_config.head_dim is 0"),
    "moe_width_list_zero": ("ernie4_5_vl_moe", _set("text_config.moe_intermediate_size", [48, 0]),
                            "text_config.moe_intermediate_size[1] is 0, which must be a whole number at least 1"),
    "topk_group_above_groups": ("glm4_moe", _set("topk_group", 3), "topk_group is 3, which must be a whole number "
                                "from 1 to n_group (2)"),
    "scaling_factor_zero": ("glm4_moe", _set("routed_scaling_factor", 0.0), "routed_scaling_factor is 0.0"),
    "sam_layers_zero": ("deepseek_ocr2", _set("vision_config.sam_config.num_hidden_layers", 0),
                        "vision_config.sam_config.num_hidden_layers is 0"),
    "deepstack_past_the_blocks": ("qwen3_vl_moe", _set("vision_config.deepstack_visual_indexes", [9]),
                                  "vision_config.deepstack_visual_indexes[0] is 9, which must be a distinct vision "
                                  "block index from 0 to 1 (vision_config.depth is 2)"),
    "deepstack_negative": ("qwen3_vl_moe", _set("vision_config.deepstack_visual_indexes", [0, -1]),
                           "vision_config.deepstack_visual_indexes[1] is -1"),
    "deepstack_repeated": ("qwen3_vl_moe", _set("vision_config.deepstack_visual_indexes", [1, 1]),
                           "vision_config.deepstack_visual_indexes[1] is 1, which must be a distinct"),
    "mrope_section_short": ("qwen3_vl_moe", _set("text_config.rope_parameters.mrope_section", [1, 1, 1]),
                            "text_config.rope_parameters.mrope_section is [1, 1, 1], which must be sections that sum "
                            "to 8"),
    "mrope_section_long_partial": ("glm4v_moe", _set("text_config.rope_parameters.mrope_section", [2, 3, 3]),
                                   "mrope_section is [2, 3, 3], which must be sections that sum to 4"),
}


@pytest.mark.parametrize("case", list(DOMAIN_CASES))
def test_numeric_fields_outside_their_domain_are_refused_at_load(tiny_dirs, tmp_path, case):
    family, edit, needle = DOMAIN_CASES[case]
    msg = _refused(tiny_dirs, tmp_path, case, family, edit)
    assert needle in msg, msg
    assert "correct config.json" in msg


def test_the_domain_table_passes_every_shipped_shape_and_transformers_default():
    """No legitimate config is refused: the real models' shapes (bench.shapes) and transformers' defaults."""
    import transformers

    from vismmoe.bench.shapes import SHAPES, get_shape
    from vismmoe.families.checks import check_domains
    for name in SHAPES:
        check_domains(get_shape(name)[1].to_dict(), name)
    for cls in ("Qwen3VLMoeConfig", "Glm4vMoeConfig", "InternVLConfig", "Qwen3_5MoeConfig", "Gemma4Config",
                "Ernie4_5_VLMoeConfig", "Qwen3MoeConfig", "Glm4MoeConfig"):
        check_domains(getattr(transformers, cls)().to_dict(), cls)


# ---- stored tensors the model built from config.json does not have ---------------------------------------------
UNUSED_CASES = {
    # (family, edit, what the error says)
    "vision_depth_below_the_weights": (
        "qwen3_vl_moe", _both(_set("vision_config.depth", 1), _set("vision_config.deepstack_visual_indexes", [0])),
        "(e.g. model.visual.blocks.1."),
    "fewer_deepstack_mergers": ("qwen3_vl_moe", _set("vision_config.deepstack_visual_indexes", [1]),
                                "model.visual.deepstack_merger_list 1 entries (vision_config.deepstack_visual_indexes "
                                "[1]), the weights more"),
    "glm_vision_depth": ("glm4v_moe", _set("vision_config.depth", 1),
                         "config.json gives model.visual.blocks 1 entries (vision_config.depth 1)"),
    "ernie_vision_depth": ("ernie4_5_vl_moe", _set("vision_config.depth", 1), "vision_config.depth 1"),
    "internvl_vision_layers": ("internvl", _set("vision_config.num_hidden_layers", 1),
                               "(vision_config.num_hidden_layers 1)"),
    "gemma_vision_layers": ("gemma4", _set("vision_config.num_hidden_layers", 1), "vision_config.num_hidden_layers 1"),
}


@pytest.mark.parametrize("case", list(UNUSED_CASES))
def test_weights_the_config_leaves_unused_are_refused(tiny_dirs, tmp_path, case):
    family, edit, needle = UNUSED_CASES[case]
    msg = _refused(tiny_dirs, tmp_path, case, family, edit)
    assert "tensors that the model built from config.json does not have" in msg and needle in msg, msg


def _add_tensors(d: str, extra: dict) -> str:
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    sd.update(extra)
    save_file(sd, path, metadata={"format": "pt"})
    return d


def test_a_stray_tensor_is_refused_but_what_transformers_drops_loads(tiny_dirs, tmp_path):
    """Multi-token-prediction layers (GLM's num_nextn_predict_layers) and rotary inv_freq buffers are tensors that
    checkpoints legitimately carry: they load; a tensor no module has is refused."""
    d = _add_tensors(_copy(tiny_dirs, tmp_path, "mtp", "glm4_moe"),
                     {"model.layers.4.input_layernorm.weight": torch.ones(64),
                      "model.rotary_emb.inv_freq": torch.ones(4)})
    load(d, expert_budget="50%")
    d = _add_tensors(_copy(tiny_dirs, tmp_path, "stray", "glm4_moe"), {"model.extra_head.weight": torch.ones(4, 64)})
    with pytest.raises(UserError, match=r"hold 1 tensors .* \(e\.g\. model\.extra_head\.weight\)"):
        load(d, expert_budget="50%")


def test_config_faults_are_one_line_and_exit_2_on_the_command_line(tiny_dirs, tmp_path):
    env = dict(os.environ, VISMMOE_QUIET="1", PYTHONPATH=os.pathsep.join(sys.path))
    for case, edit, needle in (("type", _set("text_config.hidden_size", "64"), "text_config.hidden_size is \"64\""),
                               ("depth", _set("vision_config.depth", 0), "vision_config.depth is 0")):
        d = _edit(_copy(tiny_dirs, tmp_path, case, "qwen3_vl_moe"), edit)
        out = subprocess.run([sys.executable, "-m", "vismmoe", "generate", "--model", d, "--prompt", "what?"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert needle in out.stderr and out.stdout == "", out.stderr
