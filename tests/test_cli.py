"""The console script: `generate --json` fields, and one clear line + exit 2 for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vismmoe.cli.app import main

STATS_KEYS = {"expert_budget_bytes", "expert_bytes_peak", "hits", "misses", "prefetch_hits", "bytes_moved",
              "stall_s", "ttft_s", "tpot_s", "e2e_s", "visual_tokens", "visual_tokens_kept"}


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_has_contract_fields(tiny_dirs, image_file, capsys, tmp_path):
    trace = tmp_path / "t.npz"
    code, out, err = _run(capsys, "generate", "--model", tiny_dirs["qwen3_vl_moe"], "--image", image_file,
                          "--prompt", "What is this?", "--max-new-tokens", "5", "--expert-budget", "30%",
                          "--json", "--trace", str(trace))
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    obj = json.loads(last)
    assert {"text", "token_ids", "stats"} <= obj.keys()
    assert STATS_KEYS <= obj["stats"].keys()
    s = obj["stats"]
    assert s["expert_bytes_peak"] <= s["expert_budget_bytes"]
    assert s["hits"] + s["misses"] > 0 and s["bytes_moved"] == s["misses"] * s["expert_bytes"]
    assert 1 <= len(obj["token_ids"]) <= 5
    assert trace.exists()


def _expect_user_error(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], lines[0]
    assert lines[0].startswith("vismmoe: error:")


@pytest.fixture()
def bad_inputs(tmp_path, tiny_dirs):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake_png = tmp_path / "broken.png"
    fake_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "mystery_moe"
    (unknown / "config.json").write_text(json.dumps(cfg))
    broken_cfg = tmp_path / "brokencfg"
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], broken_cfg)
    (broken_cfg / "config.json").write_text("{not json")
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], no_weights)
    os.remove(no_weights / "model.safetensors")
    return {"text": str(text), "fake_png": str(fake_png), "huge": str(huge), "unknown": str(unknown),
            "broken_cfg": str(broken_cfg), "no_weights": str(no_weights)}


def test_bad_input_one_line_exit_2(tiny_dirs, image_file, capsys, bad_inputs, tmp_path):
    model = tiny_dirs["qwen3_vl_moe"]
    base = ["generate", "--prompt", "hi", "--max-new-tokens", "2"]
    cases = [
        (["--model", str(tmp_path / "nope"), "--image", image_file], "model directory not found"),
        (["--model", model, "--image", str(tmp_path / "missing.png")], "image not found"),
        (["--model", model, "--image", bad_inputs["text"]], "not a readable image"),
        (["--model", model, "--image", bad_inputs["fake_png"]], "not a readable image"),
        (["--model", model, "--image", bad_inputs["huge"]], "image too large"),
        (["--model", model, "--image", str(tmp_path)], "is a directory"),
        (["--model", bad_inputs["unknown"], "--image", image_file], "unknown model type 'mystery_moe'"),
        (["--model", bad_inputs["broken_cfg"], "--image", image_file], "not valid JSON"),
        (["--model", bad_inputs["no_weights"], "--image", image_file], "no safetensors weights"),
        (["--model", model, "--image", image_file, "--expert-budget", "1KiB"], "top-k needs 2"),
        (["--model", model, "--image", image_file, "--expert-budget", "lots"], "bad expert budget"),
        (["--model", model, "--image", image_file, "--device-memory", "1MiB"], "too small"),
        (["--model", model, "--image", image_file, "--policy", "fifo"], "unknown cache policy"),
        (["--model", model, "--image", image_file, "--policy", "lru:admit=0"], "unknown policy option"),
        (["--model", model, "--image", image_file, "--compress", "affinity:gamma=x"], "bad compressor knob"),
        (["--model", model, "--image", image_file, "--dtype", "int3"], "unknown dtype"),
        (["--model", model, "--image", image_file, "--max-new-tokens", "0"], "at least 1"),
        (["--model", model, "--image", image_file, "--prompt", "   "], "empty --prompt"),
        (["--model", model, "--image", image_file, "--expert-budget", "1GiB", "--device-memory", "2GiB"],
         "not allowed with argument"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", model, "--image", image_file, "--device", "cuda"], "no CUDA device"))
    for extra, needle in cases:
        argv = base + extra
        if "--prompt" in extra:                      # the case overrides the prompt
            argv = ["generate", "--max-new-tokens", "2"] + extra
        _expect_user_error(capsys, argv, needle)


def test_other_commands_bad_numbers_one_line_exit_2(capsys, tmp_path):
    """Counts below their least legal value (0 once meant "the default" for bench) and malformed image sides are
    user errors, found before any model is built."""
    out = str(tmp_path / "o")
    cases = [
        (["bench", "--reps", "0", "--out", out], "--reps 0 is too small"),
        (["bench", "--limit", "0", "--out", out], "--limit 0 is too small"),
        (["bench", "--max-new-tokens", "-1", "--out", out], "--max-new-tokens -1 is too small"),
        (["bench", "--shape", "tiny-qwen3", "--image-sides", "abc", "--out", out], "bad --image-sides"),
        (["bench", "--shape", "tiny-qwen3", "--image-sides", "448,10", "--out", out], "bad --image-sides"),
        (["calibrate", "--depth", "0", "--limit", "3", "--out", str(tmp_path / "c.npz")], "--depth 0 is too small"),
        (["calibrate", "--limit", "2", "--out", str(tmp_path / "c.npz")], "at least 3 samples"),
        (["eval", "--limit", "0"], "--limit 0 is too small"),
        (["eval", "--photo-backgrounds", "1.5"], "--photo-backgrounds 1.5 is not a share"),
        (["eval", "--photo-backgrounds", "nan"], "--photo-backgrounds nan is not a share"),
        (["analyze", "--limit", "-2", "--out", out], "--limit -2 is too small"),
    ]
    for argv, needle in cases:
        _expect_user_error(capsys, argv, needle)


def test_budget_error_names_the_minimum(tiny_dirs, image_file, capsys):
    code, _, err = _run(capsys, "generate", "--model", tiny_dirs["glm4v_moe"], "--image", image_file,
                        "--prompt", "hi", "--expert-budget", "100")
    assert code == 2 and "give at least --expert-budget" in err


def test_console_script_subprocess(tiny_dirs, image_file, tmp_path):
    """The installed entry point, as a user runs it: success prints JSON last, a bad image exits 2 cleanly."""
    script = os.path.join(os.path.dirname(sys.executable), "vismmoe")     # installed with this interpreter
    exe = [script] if os.path.exists(script) else [sys.executable, "-m", "vismmoe"]
    env = dict(os.environ, VISMMOE_QUIET="1")
    ok = subprocess.run(exe + ["generate", "--model", tiny_dirs["glm4v_moe"], "--image", image_file, "--prompt",
                               "hi", "--max-new-tokens", "3", "--expert-budget", "50%", "--json"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "stats" in json.loads(ok.stdout.strip().splitlines()[-1])
    bad = subprocess.run(exe + ["generate", "--model", tiny_dirs["glm4v_moe"], "--image", str(tmp_path / "x.jpg"),
                                "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_scene_sides_for_a_model(tiny_dirs, capsys, tmp_path):
    """eval --image-side and bench --image-sides resize a model's test scenes; a side its image processor would
    shrink (the tiny models take 224 px) is refused with one line, as is one outside 28-4096."""
    from vismmoe.data import balanced_subset
    from vismmoe.data.scenes import at_side
    model = tiny_dirs["qwen3_vl_moe"]
    s = balanced_subset("test", 2, side=160)[1]
    assert s.image.size == (160, 160) and s.question == balanced_subset("test", 2)[1].question
    assert at_side(s, None) is s
    assert main(["eval", "--model", model, "--limit", "2", "--json", "--image-side", "160"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_side"] == 160
    _expect_user_error(capsys, ["eval", "--model", model, "--limit", "2", "--image-side", "448"],
                       "takes images up to 224 px a side")
    _expect_user_error(capsys, ["eval", "--model", model, "--image-side", "10"], "bad --image-side")
    _expect_user_error(capsys, ["bench", "--model", model, "--image-sides", "96,448", "--out",
                                str(tmp_path / "b")], "takes images up to 224 px a side")
    text = tiny_dirs["qwen3_moe"]                   # no vision tower: no side to give (it ended in a TypeError)
    _expect_user_error(capsys, ["eval", "--model", text, "--limit", "2", "--image-side", "160"],
                       "is a text-only model")
    _expect_user_error(capsys, ["bench", "--model", text, "--image-sides", "160", "--out", str(tmp_path / "t")],
                       "is a text-only model")
    out = str(tmp_path / "ok")
    assert main(["bench", "--model", model, "--image-sides", "96,160", "--limit", "1", "--reps", "1",
                 "--max-new-tokens", "2", "--systems", "ondemand", "--link", "edge", "--budgets", "50%",
                 "--out", out, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "at 96,160 px" in res["title"]


def test_bench_accelerate_where_it_cannot_run(tiny_dirs, capsys, tmp_path):
    """accelerate is measured on CUDA over the real link only: without --link real it crashed drawing an empty
    plot (exit 1), and beside other systems, or with --quick, it was dropped without a word."""
    out = str(tmp_path / "b")
    _expect_user_error(capsys, ["bench", "--quick", "--systems", "accelerate", "--out", out], "add --link real")
    if not torch.cuda.is_available():
        _expect_user_error(capsys, ["bench", "--model", tiny_dirs["qwen3_vl_moe"], "--systems", "accelerate,vismmoe",
                                    "--link", "real", "--quick", "--out", out], "runs on a CUDA device only")
    assert not os.path.exists(out)


@pytest.mark.parametrize("decode,label", [("eager", "eager"), ("fast", "fast"), ("auto", "eager")])
def test_stats_say_which_decode_step_ran(tiny_dirs, image_file, capsys, decode, label):
    """--decode auto picks a step by the device (the eager one on the CPU): the stats say which one ran."""
    code, out, err = _run(capsys, "generate", "--model", tiny_dirs["qwen3_vl_moe"], "--image", image_file,
                          "--prompt", "What is this?", "--max-new-tokens", "3", "--decode", decode, "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stats"]["decode"] == label
