"""Fuzz of the command line (hypothesis): whatever the arguments, exit status 0 or 2 and never a traceback.

Two layers, bounded in time (well under a minute on 2 cores together):
- every subcommand's parsing and checking, in-process, with the work itself replaced by a stand-in that only
  records it was reached (so hundreds of argument lists cost milliseconds each): arbitrary option mixes, values
  from plausible to hostile (non-UTF-8 text, NUL, huge and negative numbers, folders, FIFOs and files where
  other things belong);
- `generate` on a tiny checkpoint for real, a few examples: runtime options and sampling values mixed, including
  ones that pass the checks and reach the model.
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vismmoe.cli.app import build_parser, main


class Reached(Exception):
    """The command passed its checks and started its work."""


def _subcommands():
    import argparse
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in p._actions if a.option_strings and a.dest != "help"] for name, p in sub.choices.items()}


SUBCOMMANDS = _subcommands()


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "file.txt").write_text("keep")
    (root / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    (root / "full").mkdir()
    (root / "full" / "x").write_text("keep")
    os.mkfifo(root / "fifo")
    return {"dir": str(root), "file": str(root / "file.txt"), "png": str(root / "img.png"),
            "full": str(root / "full"), "fifo": str(root / "fifo"), "new": str(root / "new" / "x.npz"),
            "npz": str(root / "out.npz"), "newdir": str(root / "fresh")}


def _values(places):
    plausible = st.sampled_from(["0", "1", "2", "-1", "3", "8", "64", "100000", "0.5", "1e9", "nan", "inf", "-inf",
                                 "25%", "0%", "150%", "1KiB", "512MiB", "lots", "", " ", "lru", "predictive",
                                 "belady", "gate", "trace", "none", "edge", "mobile", "GBps=0", "GBps=3,us=5",
                                 "affinity:gamma=2", "pool", "cpu", "cuda", "bf16", "int3", "qwen3_vl_moe",
                                 "tiny-qwen3", "448,10", "1,0.5", "x,,y", "ondemand,vismmoe", "caf\udce9",
                                 "a\x00b", "-" * 3, "--json"])
    paths = st.sampled_from(list(places.values()))
    return st.one_of(plausible, paths, st.text(max_size=12))


@st.composite
def argv(draw, places):
    name = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    out = [name]
    for action in draw(st.lists(st.sampled_from(SUBCOMMANDS[name]), max_size=6)):
        out.append(action.option_strings[-1])
        if action.nargs != 0:
            out.append(draw(_values(places)))
    if draw(st.booleans()):                  # and sometimes the required options, so more lists pass the parser
        if name == "generate":
            out += ["--prompt", draw(st.sampled_from(["hi", "  ", "caf\udce9", "x" * 50]))]
        if name in ("make-tiny", "make-shape", "export-gguf", "calibrate"):
            out += ["--out", draw(st.sampled_from(list(places.values())))]
        if name == "make-tiny":
            out += ["--family", draw(st.sampled_from(["qwen3_vl_moe", "nope"]))]
        if name == "make-shape":
            out += ["--shape", draw(st.sampled_from(["tiny-qwen3", "nope"]))]
    return out


@contextlib.contextmanager
def _work_stubbed(monkeypatch):
    """Every command's work (model load, writers, server, demo) raises Reached instead of running."""
    import vismmoe.bench.make_shape
    import vismmoe.bench.random_model
    import vismmoe.cpu.rates
    import vismmoe.tools.demo
    import vismmoe.engine.loading
    import vismmoe.tools.export_gguf
    import vismmoe.serve.cli
    import vismmoe.tools.tiny

    def reached(*a, **k):
        raise Reached()
    for module, attr in ((vismmoe.engine.loading, "load"), (vismmoe.tools.tiny, "make_tiny"),
                         (vismmoe.bench.make_shape, "make_shape"), (vismmoe.tools.export_gguf, "export"),
                         (vismmoe.serve.cli, "serve"), (vismmoe.tools.demo, "run_demo"),
                         (vismmoe.bench.random_model, "random_engine"), (vismmoe.cpu.rates, "calibrate")):
        monkeypatch.setattr(module, attr, reached)
    yield


def _run(args: list[str]) -> tuple[int | str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except Reached:
            code = "reached"
        except BaseException:                        # anything else escaping main is the failure we look for
            return "raised", traceback.format_exc()
    return code, err.getvalue()


def _value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag` (argparse keeps the last)."""
    idx = [i for i, a in enumerate(args[:-1]) if a == flag]
    return args[idx[-1] + 1] if idx else None


def _must_have_been_refused(args: list[str]) -> str | None:
    """Why an argument list that reached the work should have been refused before it, or None."""
    for a in args:
        if "\x00" in a or any(0xD800 <= ord(c) <= 0xDFFF for c in a):
            return "text that is not UTF-8, or a NUL, reached the work"
    name = args[0]
    outputs = {"generate": (("--trace", ".npz"), ("--timeline", ".png")), "calibrate": (("--out", ".npz"),)}
    for flag, ext in outputs.get(name, ()):
        path = _value(args, flag)
        if path is not None and (not path.endswith(ext) or os.path.isdir(path)
                                 or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            return f"{flag} {path!r} cannot be written, yet the work started"
    if name in ("generate", "serve"):
        if _value(args, "--policy") == "belady":
            return "belady reached the work"
        if _value(args, "--prefetch") == "none" and ("--fixed-lookahead" in args or
                                                     _value(args, "--lookahead") is not None):
            return "a lookahead with --prefetch none reached the work"
    return None


def test_argument_checks_never_raise(places, monkeypatch):
    with _work_stubbed(monkeypatch):
        @settings(max_examples=300, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(argv(places))
        def check(args):
            code, err = _run(args)
            assert code in (0, 2, "reached"), (args, code, err)
            assert "Traceback" not in err, (args, err)
            if code == 2:
                assert err.strip().count("\n") == 0 and err.startswith("vismmoe: error:"), (args, err)
            if code == "reached":
                assert _must_have_been_refused(args) is None, (args, _must_have_been_refused(args))
        check()
    assert os.listdir(places["full"]) == ["x"] and open(places["file"]).read() == "keep"


RUNTIME = st.fixed_dictionaries({}, optional={
    "--expert-budget": st.sampled_from(["1", "1KiB", "20%", "100%", "3%", "0.5%"]),
    "--policy": st.sampled_from(["lru", "lfu", "lfru", "predictive", "none", "predictive:admit=0", "lru:x=1"]),
    "--prefetch": st.sampled_from(["none", "gate", "blend", "trace"]),
    "--link": st.sampled_from(["real", "edge", "GBps=50", "GBps=0.001,us=1"]),
    "--temperature": st.sampled_from(["0", "0.7", "2", "2.5", "-1"]),
    "--top-p": st.sampled_from(["1", "0.5", "0"]),
    "--top-k": st.sampled_from(["0", "1", "5", "-3", "100000"]),
    "--seed": st.sampled_from(["0", "7", "-1", str(2**70)]),
    "--max-new-tokens": st.sampled_from(["1", "3", "0", "9000"]),
    "--expert-tier": st.sampled_from(["host", "disk"]),
})


def test_generate_for_real_exits_0_or_2(tiny_dirs, image_file):
    """The tiny checkpoint really loads and answers: what passes the checks must then run (or be refused in one
    line), whatever the mix. Few examples: each is a real load and generation."""
    model = tiny_dirs["glm4v_moe"]

    @settings(max_examples=8, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @example({}, False, "caf\udce9?")                                   # bytes that are not UTF-8
    @example({"--expert-budget": "1", "--expert-tier": "disk"}, True, "What is it?")
    @example({"--max-new-tokens": "9000", "--temperature": "0.7", "--seed": "7"}, True, "<|im_end|>")
    @given(RUNTIME, st.booleans(), st.sampled_from(["What is it?", "caf\udce9?", "\u00e9\u4e2d\U0001f600", "<|im_end|>"]))
    def check(opts, with_image, prompt):
        args = ["generate", "--model", model, "--prompt", prompt, "--json"]
        args += ["--image", image_file] if with_image else []
        for k, v in opts.items():
            args += [k, v]
        code, err = _run(args)
        assert code in (0, 2), (args, code, err)
        assert "Traceback" not in err, (args, err)
    check()
