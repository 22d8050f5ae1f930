"""The console script's own surface: importing it (and `vismmoe --help`) loads no torch or transformers, every
option of every command says what it does, registry-backed options list every registered name, usage errors
point at the right help, and --compress / --keep-ratio are given together or not at all."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from vismmoe.cli.app import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_import_and_top_level_help_load_no_torch():
    code = ("import sys, contextlib, io\n"
            "import vismmoe.cli.app\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    vismmoe.cli.app.main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_every_option_of_every_command_has_help():
    for name, parser in _commands().items():
        for action in parser._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)


def test_generate_help_lists_every_registered_name(capsys):
    from vismmoe.engine.compress import COMPRESSORS
    from vismmoe.families import FAMILIES
    from vismmoe.offload.links import PROFILES
    from vismmoe.offload.policies import ONLINE_POLICIES
    from vismmoe.offload.predict import PREDICTORS
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())          # argparse wraps lines: compare words
    text = text[text.index("options:"):]                       # past the usage lines
    for flag, names in (("--policy", ONLINE_POLICIES), ("--prefetch", PREDICTORS), ("--compress", COMPRESSORS),
                        ("--link", PROFILES)):
        part = text[text.index(f"{flag} "):]
        part = part[: part.index(" --", 3)]
        for n in names:
            assert n in part, (flag, n)
        if flag == "--policy":          # offered only what a run accepts: belady needs the future (trace replays)
            assert "belady" not in part, part
    for help_flag in ("--image PATH the image", "--prompt TEXT the question", "--max-new-tokens N most tokens",
                      "--json print one JSON object"):
        assert help_flag in text, help_flag
    assert main(["make-tiny", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(f in text for f in FAMILIES)


def test_usage_errors_name_the_help_once(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("(see vismmoe --help)") and "vismmoe vismmoe" not in err, err
    assert main(["generate"]) == 2
    assert capsys.readouterr().err.strip().endswith("(see vismmoe generate --help)")


@pytest.mark.parametrize("command", ["generate", "eval", "calibrate"])
def test_keep_ratio_and_compress_go_together(tiny_dirs, image_file, capsys, tmp_path, command):
    base = {"generate": ["generate", "--model", tiny_dirs["qwen3_vl_moe"], "--image", image_file, "--prompt", "hi"],
            "eval": ["eval", "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "1"],
            "calibrate": ["calibrate", "--model", tiny_dirs["qwen3_vl_moe"], "--out", str(tmp_path / "c.npz")]}
    capsys.readouterr()                             # building the tiny checkpoint (first use) may print progress
    for extra, needle in ((["--compress", "none", "--keep-ratio", "0.3"], "--keep-ratio 0.3 given without --compress"),
                          (["--keep-ratio", "0.3"], "--keep-ratio 0.3 given without --compress"),
                          (["--compress", "pool"], "--compress pool given without --keep-ratio")):
        assert main(base[command] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_a_bad_image_is_reported_before_the_model_is_read(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "no.png"),
                 "--prompt", "hi"]) == 2
    assert "image not found" in capsys.readouterr().err


def test_registry_help_does_not_load_model_classes():
    """`vismmoe generate --help` lists the predictors and compressors: that reads their registries, which must not
    import transformers' model classes (it took about 5 s)."""
    import subprocess
    import sys
    code = ("import sys; from vismmoe.cli.args import compressors, predictors, policies; "
            "compressors(); predictors(); policies(); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-300:]
    assert out.stdout.strip() == "False"


def test_writers_offer_only_the_formats_they_write(capsys):
    """quantize and make-shape --format listed bf16 and dense, which they refuse (nothing new to write)."""
    for argv in (["quantize", "--help"], ["make-shape", "--help"]):
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        text = text[text.index("options:"):]                   # past the usage lines
        part = text[text.index("--format FORMAT"):]
        part = part[: part.index(" --", 5)]
        assert "one of fp8, int4" in part and "bf16" not in part, (argv, part)
