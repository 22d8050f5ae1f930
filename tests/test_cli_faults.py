"""The command line refuses bad arguments and paths before the work starts, never destroys data it writes over,
and says what it ran: non-UTF-8 text, output paths that cannot be written (checked before any model is read),
options another option makes meaningless, checks that came only after seconds of loading, special files given as
inputs, `--out` onto existing data, the context error's token count, and the runtime defaults (one table for
`generate` and `serve`, shown in `--help`), `--version`, the warm-up kept out of a request's times, the vision
encoder on the timeline, and Ctrl-C or SIGTERM while worker processes run (one line, no worker tracebacks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from vismmoe.cli.app import build_parser, main


def _error(capsys, argv, needle):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, (argv, err)
    return err


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test if a command gets as far as reading a model."""
    import vismmoe.engine.loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was refused")
    monkeypatch.setattr(vismmoe.engine.loading, "load", refuse)


def test_non_utf8_text_is_one_line_exit_2(tiny_dirs, tmp_path):
    """Bytes that are not UTF-8 reach Python as lone surrogates; the tokenizer raised on them (a traceback)."""
    env = dict(os.environ, VISMMOE_QUIET="1", PYTHONPATH=os.pathsep.join(sys.path))
    for argv in ([b"generate", b"--model", tiny_dirs["qwen3_vl_moe"].encode(), b"--prompt", b"what \xff is it?"],
                 [b"make-tiny", b"--family", b"qwen3_vl_moe", b"--out", str(tmp_path).encode() + b"/\xfe"]):
        out = subprocess.run([sys.executable.encode(), b"-m", b"vismmoe"] + argv, capture_output=True, env=env,
                             timeout=300)
        err = out.stderr.decode("utf-8", "replace")
        assert out.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "is not valid UTF-8 text (byte 0x" in err, err


def test_non_utf8_and_nul_in_process(capsys, no_load):
    _error(capsys, ["generate", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text (byte 0xe9)")
    _error(capsys, ["generate", "--prompt", "hi", "--image", "a\x00b.png"], "--image contains a NUL character")
    # a bad value that a later repeat of the option replaced is refused too (it never reaches the work)
    _error(capsys, ["analyze", "--model", "caf\udce9", "--model", "0"], "--model is not valid UTF-8 text (byte 0xe9)")
    _error(capsys, ["generate", "--prompt=caf\udce9", "--prompt", "hi"], "--prompt is not valid UTF-8 text (byte 0xe9)")


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--prompt", "hi", "--trace", "{tmp}/missing/t.npz"], "folder {tmp}/missing does not exist"),
    (["generate", "--prompt", "hi", "--trace", "{tmp}/t.json"], "does not end in .npz"),
    (["generate", "--prompt", "hi", "--timeline", "{tmp}"], "--timeline {tmp} is an existing folder"),
    (["generate", "--prompt", "hi", "--timeline", "{tmp}/t.npz"], "does not end in .png"),
    (["calibrate", "--out", "{tmp}/missing/c.npz"], "folder {tmp}/missing does not exist"),
    (["calibrate", "--out", "{tmp}/c"], "does not end in .npz"),
    (["analyze", "--out", "{tmp}/file.txt"], "is an existing file, not a folder"),
    (["analyze", "--out", "{tmp}/other"], "is a folder with other files in it"),
    (["bench", "--out", "{tmp}/file.txt"], "is an existing file, not a folder"),
    (["bench", "--out", "{tmp}/file.txt/sub"], "is a file, so the folder cannot be made"),
    (["bench", "--out", "{tmp}/other"], "is a folder with other files in it"),
    (["bench", "--out", "{tmp}/b", "--save-traces", "{tmp}/other"], "is a folder with other files in it"),
    (["export-gguf", "--out", "{tmp}/file.txt"], "is an existing file, not a folder"),
    (["make-tiny", "--family", "glm4v_moe", "--out", "{tmp}/file.txt"], "is an existing file, not a folder"),
    (["make-shape", "--shape", "tiny-qwen3", "--out", "{tmp}/other"], "already holds files"),
])
def test_output_paths_are_checked_before_the_work(tmp_path, capsys, no_load, argv, needle):
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me too")
    tmp = str(tmp_path)
    _error(capsys, [a.replace("{tmp}", tmp) for a in argv], needle.replace("{tmp}", tmp))
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me too"


def test_report_folders_of_an_earlier_run_are_reused(tmp_path):
    """bench/analyze --out may name the folder of their own earlier run (runs/bench by default), and --force
    accepts any folder."""
    from vismmoe.errors import UserError
    from vismmoe.paths import output_dir
    d = tmp_path / "runs"
    d.mkdir()
    (d / "bench.json").write_text("{}")
    (d / "latency_vs_budget.png").write_bytes(b"")
    assert output_dir(str(d), "--out", owned=("bench.json",)) == str(d)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y").write_text("")
    with pytest.raises(UserError):
        output_dir(str(tmp_path / "x"), "--out", owned=("bench.json",))
    assert output_dir(str(tmp_path / "x"), "--out", force=True)


@pytest.mark.parametrize("extra,needle", [
    (["--policy", "fifo"], "unknown cache policy 'fifo'"),
    (["--policy", "belady"], "needs a recorded trace"),
    (["--link", "warp"], "unknown link profile"),
    (["--expert-budget", "lots"], "bad expert budget"),
    (["--expert-budget", "0%"], "bad expert budget"),
    (["--device-memory=-1GiB"], "bad device memory"),
    (["--reserve", "1GiB"], "--reserve given without --device-memory"),
    (["--prefetch", "none", "--lookahead", "3"], "--lookahead given with --prefetch none"),
    (["--prefetch", "none", "--fixed-lookahead"], "--fixed-lookahead given with --prefetch none"),
    (["--calibration", "{tmp}/c.npz"], "--calibration is read by --prefetch trace or blend only"),
    (["--prefetch", "trace", "--calibration", "{tmp}"], "calibration file is a directory"),
    (["--lookahead", "9"], "--lookahead 9 is out of range"),
    (["--prefill-chunk", "-4"], "--prefill-chunk -4 is negative"),
    (["--check-weights", "most"], "invalid choice"),
])
def test_runtime_values_are_refused_before_loading(tmp_path, capsys, no_load, extra, needle):
    """Refused before the engine is imported or any weight read (they came after 5-9 s of loading), for generate
    and serve alike."""
    (tmp_path / "c.npz").write_bytes(b"")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    _error(capsys, ["generate", "--prompt", "hi"] + extra, needle)
    _error(capsys, ["serve"] + extra, needle)


def test_runtime_errors_come_before_model_code_is_imported():
    """In a fresh process: the error is printed with transformers (and the engine) never imported."""
    code = ("import sys\nfrom vismmoe.cli.app import main\n"
            "rc = main(['generate', '--prompt', 'hi', '--policy', 'fifo'])\n"
            "print(rc, sorted(m for m in ('transformers', 'vismmoe.engine.core', 'vismmoe.engine.loading') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.stdout.strip() == "2 []", (out.stdout, out.stderr[-500:])


def test_a_fifo_as_image_is_refused_not_waited_on(tmp_path, capsys, no_load):
    fifo = tmp_path / "img.png"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("code", main(["generate", "--prompt", "hi",
                                                                          "--image", str(fifo)])), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "generate waited on the FIFO"
    assert result["code"] == 2 and "not a regular file" in capsys.readouterr().err


def test_an_image_that_is_a_folder_or_a_url_says_so(tmp_path, capsys, no_load):
    """A file:// URL said "image not found" even where it names a folder (or a file): --image takes a path. A plain
    path to a folder says it is a directory."""
    _error(capsys, ["generate", "--prompt", "hi", "--image", f"file://{tmp_path}"],
           f"--image takes a file path, not a URL: file://{tmp_path}: give the path itself: {tmp_path}")
    _error(capsys, ["generate", "--prompt", "hi", "--image", "https://example.com/cat.png"],
           "--image takes a file path, not a URL")
    _error(capsys, ["generate", "--prompt", "hi", "--image", str(tmp_path)], f"image is a directory: {tmp_path}")


def test_make_tiny_never_destroys_an_existing_checkpoint(tiny_dirs, tmp_path, capsys):
    """`make-tiny --out` onto a checkpoint deleted its weight shards and exited 0."""
    d = tmp_path / "ckpt"
    import shutil
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    capsys.readouterr()                         # the fixture's progress, when it made the checkpoint just now
    _error(capsys, ["make-tiny", "--family", "glm4v_moe", "--out", str(d)], "already holds files")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert main(["make-tiny", "--family", "glm4v_moe", "--out", str(d), "--force"]) == 0
    assert json.loads((d / "config.json").read_text())["model_type"] == "glm4v_moe"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]           # no temporary folder left


def test_a_failed_write_leaves_the_old_folder_and_no_partial_one(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Written under a temporary name and renamed at the end: a failure half-way (here, the tokenizer's files)
    leaves the existing checkpoint whole even with --force."""
    import shutil

    from vismmoe.tools import tiny
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real = tiny.build_tokenizer

    def broken(*a, **k):
        tok = real(*a, **k)

        def fail(*a, **k):
            raise OSError(28, "No space left on device")
        tok.save_pretrained = fail
        return tok
    monkeypatch.setattr(tiny, "build_tokenizer", broken)
    with pytest.raises(OSError):
        tiny.make_tiny("glm4v_moe", str(d), force=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_make_shape_never_overwrites_weights_in_place(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["make-shape", "--shape", "tiny-qwen3", "--layers", "1", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    shards = {p.name: p.read_bytes() for p in out.iterdir()}
    _error(capsys, ["make-shape", "--shape", "tiny-qwen3", "--layers", "1", "--seed", "5", "--out", str(out),
                    "--device", "cpu"], "already holds files")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == shards
    assert main(["make-shape", "--shape", "tiny-qwen3", "--layers", "1", "--seed", "5", "--out", str(out),
                 "--device", "cpu", "--force"]) == 0
    info = json.loads((out / "vismmoe_shape.json").read_text())
    assert info["seed"] == 5 and info["dir"] == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_context_error_counts_the_prompt(tiny_dirs, tmp_path, capsys):
    """The context error said "prompt of 0 tokens" whatever the prompt's length."""
    d = tmp_path / "short"
    import shutil
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    err = _error(capsys, ["generate", "--model", str(d), "--prompt", "word " * 40, "--max-new-tokens", "30"],
                 "exceeds the model's context of 64 tokens")
    count = int(err.split("prompt of ")[1].split(" tokens")[0])
    assert count > 30, err
    _error(capsys, ["generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "64"],
           "64 new tokens leave no room for a prompt in the model's context of 64 tokens")


def test_help_shows_every_default_and_the_version(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.required or action.nargs == 0:
                continue                                  # positionals, required options, flags
            text = formatter._get_help_string(action)
            assert "default" in text, (name, action.option_strings, text)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("vismmoe ")


def test_generate_and_serve_share_the_runtime_defaults():
    """One table: the predictive policy with gate prefetch (what measured best at a budget); the LRU baseline is
    one flag away."""
    from vismmoe.config import declared
    gen = build_parser().parse_args(["generate", "--prompt", "x"])
    srv = build_parser().parse_args(["serve"])
    assert {f.name for f in declared("generate")} == {f.name for f in declared("serve")}
    for f in declared("serve"):
        assert getattr(gen, f.name) == getattr(srv, f.name) == f.metadata["cli_default"], f.name
    assert (gen.policy, gen.prefetch) == ("predictive", "gate")
    base = build_parser().parse_args(["generate", "--prompt", "x", "--policy", "lru", "--prefetch", "none"])
    assert (base.policy, base.prefetch) == ("lru", "none")


def test_generate_stats_separate_the_warm_up_and_the_timeline_has_the_vision_encoder(tiny_dirs, image_file,
                                                                                     tmp_path, capsys):
    png = tmp_path / "t.png"
    code = main(["generate", "--model", tiny_dirs["qwen3_vl_moe"], "--image", image_file, "--prompt", "hi",
                 "--max-new-tokens", "3", "--expert-budget", "40%", "--json", "--timeline", str(png),
                 "--trace", str(tmp_path / "t.npz")])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])["stats"]
    assert s["warmup_s"] > 0 and (s["policy"], s["prefetch"]) == ("predictive", "gate")
    assert png.stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["t.npz", "t.png"]
    from vismmoe.offload.trace import RoutingTrace
    assert RoutingTrace.load(str(tmp_path / "t.npz")).steps[0]["kind"] == "prefill"   # the request's, not the warm-up's
    from vismmoe import load
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="40%")
    eng.record_timeline()
    eng.generate(image_file, "hi", max_new_tokens=2)
    tl = eng.last_timeline
    assert len(tl.vision) == 1
    start, end = tl.vision[0]
    assert 0 <= start < end <= min(s for _, s, _ in tl.compute) + 1e-3      # the encoder runs before the decoder
    assert "vision" in tl.ascii()


def test_progress_stays_off_when_stderr_is_not_a_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VISMMOE_QUIET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-m", "vismmoe", "make-tiny", "--family", "qwen3_vl_moe", "--out",
                          str(tmp_path / "t")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_an_output_never_destroys_an_input(tmp_path, capsys, no_load, image_file):
    """An output that is an input (the image, the calibration file), an existing file inside the model folder, or
    a checkpoint folder that holds the model is refused before the work, --force or not; the inputs are untouched."""
    import shutil
    from vismmoe.checkpoints import BUNDLED
    img = tmp_path / "photo.png"
    shutil.copy(image_file, img)
    before = img.read_bytes()
    _error(capsys, ["generate", "--image", str(img), "--prompt", "hi", "--timeline", str(img)],
           f"--timeline {img} would overwrite the input of --image")
    cal = tmp_path / "cal.npz"
    shutil.copy(os.path.join(BUNDLED, "calibration.npz"), cal)
    _error(capsys, ["generate", "--prompt", "hi", "--prefetch", "trace", "--calibration", str(cal), "--expert-budget",
                    "25%", "--trace", str(cal)], "would overwrite the input of --calibration")
    _error(capsys, ["generate", "--prompt", "hi", "--trace", os.path.join(BUNDLED, "calibration.npz")],
           "would replace a file of the --model folder")
    _error(capsys, ["calibrate", "--out", os.path.join(BUNDLED, "calibration.npz")],
           "would replace a file of the --model folder")
    _error(capsys, ["bench", "--out", str(tmp_path / "b"), "--save-traces", str(tmp_path / "b")],
           "is the --out folder")
    assert img.read_bytes() == before


def test_quantize_never_writes_over_its_own_model(tiny_dirs, tmp_path, capsys):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["qwen3_vl_moe"], d)
    files = sorted(os.listdir(d))
    for out in (d, tmp_path):                                   # the model folder, or a folder holding it
        _error(capsys, ["quantize", "--model", str(d), "--format", "fp8", "--out", str(out), "--force"],
               "would overwrite the input of --model")
    assert sorted(os.listdir(d)) == files


def test_a_file_that_is_not_a_calibration_is_one_line(tiny_dirs, tmp_path, capsys, image_file):
    """A routing trace (or any .npz without transition tables) given as --calibration: one line, exit 2 (was a
    KeyError traceback); the bundled model's shipped tables serve --prefetch trace without --calibration."""
    d = tiny_dirs["qwen3_vl_moe"]
    trace = tmp_path / "t.npz"
    assert main(["generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "2", "--trace", str(trace)]) == 0
    capsys.readouterr()
    _error(capsys, ["generate", "--model", d, "--prompt", "hi", "--prefetch", "trace", "--calibration", str(trace),
                    "--expert-budget", "25%"], "is not a calibration file")
    assert main(["generate", "--prompt", "What color is the shape?", "--image", image_file, "--prefetch", "trace",
                 "--expert-budget", "25%", "--max-new-tokens", "2"]) == 0


def test_sigterm_cleans_up_like_sigint(tmp_path):
    """SIGTERM during a checkpoint write: exit 143, one line, no partial folder left (SIGINT already did this)."""
    import signal
    import time
    env = dict(os.environ, VISMMOE_QUIET="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "vismmoe", "make-shape", "--shape", "qwen3-vl-30b-a3b", "--device",
                             "cpu", "--out", str(tmp_path / "big")], env=env, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not any(n.startswith(".big.partial-") for n in os.listdir(tmp_path)) and time.time() - t0 < 120:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "vismmoe: terminated", err
    assert "Traceback" not in err and os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi"], ["generate", "--prompt", "hi", "--image", "{img}"], ["eval"], ["serve"],
    ["calibrate", "--out", "{tmp}/c.npz"], ["analyze", "--out", "{tmp}/a"], ["bench", "--out", "{tmp}/b"],
    ["quantize", "--format", "fp8", "--out", "{tmp}/q"], ["export-gguf", "--out", "{tmp}/g"], ["calibrate-rates"],
], ids=lambda argv: argv[0] + ("-image" if "--image" in argv else ""))
def test_a_file_as_model_says_a_model_is_a_directory(tmp_path, capsys, image_file, argv):
    """--model naming a file (its config.json, a weights file) said "model directory not found" (calibrate-rates:
    that config.json/config.json cannot be read)."""
    from vismmoe.checkpoints import BUNDLED
    config = os.path.join(BUNDLED, "config.json")
    argv = [a.format(tmp=tmp_path, img=image_file) for a in argv]
    err = _error(capsys, argv + ["--model", config], f"{config} is a file, not a model directory")
    assert "a model is a directory holding config.json" in err
    assert os.listdir(tmp_path) == []


def _children(pid: int) -> list[int]:
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _ignores_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (signal.SIGINT - 1)))


def _alive(pids: list[int], wait: float = 0.0) -> list[int]:
    """Those of `pids` still running (a zombie has ended) after up to `wait` seconds."""
    deadline = time.time() + wait
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except OSError:
                pass
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.1)


def _signal_the_group_in_the_pool(argv: list[str], sig: int) -> tuple[int, str, list[int]]:
    """Run `argv` in a process group of its own; once its worker pool runs (two children, set up: they ignore
    SIGINT, or half a second on), send `sig` to the whole group as a terminal's Ctrl-C does. Returns (exit status,
    stderr, the workers' pids)."""
    env = dict(os.environ, VISMMOE_QUIET="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    workers = []
    try:
        seen_at, t0 = None, time.time()
        while proc.poll() is None and time.time() - t0 < 300:
            workers = _children(proc.pid)
            if len(workers) >= 2:
                seen_at = seen_at or time.time()
                if all(map(_ignores_sigint, workers)) or time.time() - seen_at > 0.5:
                    break
            time.sleep(0.02)
        assert seen_at is not None and proc.poll() is None, "the worker pool was not seen running"
        os.killpg(proc.pid, sig)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:                         # hung: end it and what is left of its pool
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _alive(workers, 30):
            os.kill(pid, signal.SIGKILL)
    return proc.returncode, err, workers


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig,code,line", [(signal.SIGINT, 130, "vismmoe: interrupted"),
                                           (signal.SIGTERM, 143, "vismmoe: terminated")], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_eval_runs_its_pool_is_one_line(sig, code, line):
    """Ctrl-C (or SIGTERM to the process group) while eval's pool makes the majority baseline: each worker printed a
    'Process ForkPoolWorker-N:' traceback before the command's line (stopping the pool raised the command's SIGTERM
    handler in them too). Now the one line, its exit status, and no worker left running."""
    rc, err, workers = _signal_the_group_in_the_pool([sys.executable, "-m", "vismmoe", "eval", "--limit", "6"], sig)
    assert rc == code and err == line + "\n", (rc, err)
    assert not _alive(workers, 30), "pool workers outlived the command"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_ctrl_c_in_the_training_corpus_pool_leaves_the_workers_quiet():
    rc, err, workers = _signal_the_group_in_the_pool(
        [sys.executable, "-c", "from vismmoe.tools.train import corpus_texts; corpus_texts(100000, 2)"], signal.SIGINT)
    assert "ForkPoolWorker" not in err and err.strip().splitlines()[-1] == "KeyboardInterrupt", err
    assert not _alive(workers, 30), "pool workers outlived the command"


def test_make_shape_refuses_more_layers_than_the_shape_and_a_missing_cuda(tmp_path, capsys):
    """--layers past the shape's layer count wrote the shape's own count with exit 0; --device cuda without CUDA
    ended in a traceback."""
    import torch
    _error(capsys, ["make-shape", "--shape", "tiny-qwen3", "--layers", "9999", "--out", str(tmp_path / "a")],
           "--layers 9999: shape tiny-qwen3 has 4 decoder layers")
    if not torch.cuda.is_available():
        _error(capsys, ["make-shape", "--shape", "tiny-qwen3", "--device", "cuda", "--out", str(tmp_path / "b")],
               "no CUDA device is visible")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["demo"], ["demo", "--json"], ["generate", "--prompt", "hi"], ["eval"], ["serve"], ["calibrate", "--out", "{tmp}/c.npz"],
    ["analyze", "--out", "{tmp}/a"], ["bench", "--out", "{tmp}/b"], ["calibrate-rates"],
    ["make-shape", "--shape", "tiny-qwen3", "--out", "{tmp}/s"],
], ids=lambda argv: "-".join(a.lstrip("-") for a in argv if not a.startswith("{")))
def test_a_device_it_cannot_use_is_refused_before_any_output(tmp_path, capsys, argv):
    """demo --device cuda without CUDA (or a device name it does not know) printed the model's header line before
    the error; every command that takes --device refuses first: nothing on stdout, one line, exit 2."""
    import torch
    argv = [a.format(tmp=tmp_path) for a in argv]
    devices = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        code = main(argv + ["--device", device])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1 and "device" in err, (argv, device, out, err)
    assert os.listdir(tmp_path) == []


def test_options_that_nothing_would_use_are_refused(capsys, no_load):
    """bench --shape with --model ran the shape and ignored --model; --prompt-tokens without --shape was ignored
    (--image-sides with a model now sizes its test scenes: test_cli's test_scene_sides_for_a_model); calibrate
    --depth past the model's MoE layers was accepted."""
    _error(capsys, ["bench", "--shape", "tiny-qwen3", "--model", "x"], "--shape and --model name two workloads")
    _error(capsys, ["bench", "--prompt-tokens", "512"], "--prompt-tokens is for --shape workloads")
    _error(capsys, ["calibrate", "--depth", "8", "--out", "unused.npz"], "--depth 8: the model has 8 MoE layers")


def test_outputs_get_the_mode_a_plain_create_gives(tmp_path):
    """Files and folders written through a temporary name kept tempfile's 0600 / 0700 whatever the umask."""
    from vismmoe.paths import atomic_dir, atomic_file
    old = os.umask(0o022)
    try:
        with atomic_file(str(tmp_path / "t.npz")) as tmp:
            with open(tmp, "w") as f:
                f.write("x")
        with atomic_dir(str(tmp_path / "d")) as tmp:
            pass
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "t.npz").st_mode & 0o777) == 0o644
    assert (os.stat(tmp_path / "d").st_mode & 0o777) == 0o755


def test_writers_refuse_contradicting_or_out_of_range_options(capsys, tiny_dirs, tmp_path, monkeypatch):
    """Each was a traceback, an option silently overridden, or an error naming a fix that is refused too: a seed
    torch cannot take (make-tiny, make-shape), --shape with --model (calibrate-rates measured the shape, ignoring
    --model), --rounding against the format's rounding= knob (the flag won), a knob given twice (the later won),
    make-shape's bf16 fix naming --dtype bfloat16 (not one of its choices), unknown formats answered with
    generate's --expert-format and names the command refuses, and int4 groups offered that do not divide."""
    tiny = tiny_dirs["qwen3_vl_moe"]
    capsys.readouterr()                         # the fixture's own output
    for cmd in (["make-tiny", "--family", "qwen3_vl_moe"], ["make-shape", "--shape", "tiny-qwen3"]):
        for seed in ("99999999999999999999", "-1"):
            _error(capsys, cmd + ["--out", str(tmp_path / "o"), "--seed", seed], f"--seed {seed} is out of range")
    assert not (tmp_path / "o").exists()
    _error(capsys, ["calibrate-rates", "--shape", "qwen3-30b-a3b", "--model", tiny], "--shape and --model")
    q = ["quantize", "--model", tiny, "--out", str(tmp_path / "q")]
    _error(capsys, q + ["--format", "int4:group=16,rounding=rtn", "--rounding", "hqq"], "name two roundings")
    _error(capsys, q + ["--format", "fp8", "--rounding", "rtn"], "applies to int4 only")
    _error(capsys, q + ["--format", "int4:group=16,group=32"], "knob 'group' given twice")
    err = _error(capsys, q + ["--format", "nope"], "--format 'nope'")
    assert "--expert-format" not in err and "fp8, int4" in err and "dense" not in err
    s = ["make-shape", "--shape", "tiny-qwen3", "--out", str(tmp_path / "s")]
    assert "--dtype bf16 " in _error(capsys, s + ["--format", "bf16"], "writes nothing new")
    err = _error(capsys, s + ["--format", "nope"], "--format 'nope'")
    assert "--expert-format" not in err and "bf16" not in err
    err = _error(capsys, s + ["--format", "int4:group=32"], "multiples of the group")   # hidden 64, intermediate 48
    assert "use group=16 (" in err and "32" not in err.split("use ")[-1]
    assert "--formats 'nope'" in _error(capsys, ["calibrate-rates", "--formats", "dense,nope"], "unknown expert format")
    assert not (tmp_path / "q").exists() and not (tmp_path / "s").exists()


def test_calibrate_rates_takes_formats_with_several_knobs(capsys, tiny_dirs, monkeypatch):
    """`--formats int4:group=16,sym=0,fp8` split at every comma, so an int4 spec with two knobs was refused."""
    import vismmoe.cpu.rates as rates
    seen = []

    class Reached(Exception):
        pass

    def measure(dev, layouts):
        seen.extend(lay.spec() for lay in layouts)
        raise Reached()                         # the specs reached the measurement: stop there
    monkeypatch.setattr(rates, "calibrate", measure)
    with pytest.raises(Reached):
        main(["calibrate-rates", "--model", tiny_dirs["qwen3_vl_moe"], "--formats", "int4:group=16,sym=0,fp8"])
    assert seen == ["int4:group=16,sym=0", "fp8"], seen


def test_generate_refuses_visual_token_options_without_an_image(capsys, tiny_dirs, no_load):
    """--compress and --visual-top-k act on an image's visual tokens: without --image they were accepted and the
    request ran as if they were not given."""
    tiny = tiny_dirs["qwen3_vl_moe"]
    capsys.readouterr()
    base = ["generate", "--model", tiny, "--prompt", "What is it?"]
    _error(capsys, base + ["--visual-top-k", "1"], "--visual-top-k acts on the visual tokens of an image")
    _error(capsys, base + ["--compress", "pool", "--keep-ratio", "0.5"], "no --image is given")
