"""A checkpoint whose experts are missing, misshapen or quantized is one clear error naming the file and tensor
(at load, for both tiers); a read that fails during a request on the disk tier reaches the caller as that error
from the I/O thread, gives its staging slot back, and leaves the engine usable (it used to hang once the ring ran
dry)."""

from __future__ import annotations


import pytest
import torch

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.errors import UserError

from .conftest import in_thread
from .test_store import _rewrite

EXPERTS = "model.language_model.layers.{}.mlp.experts"


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _change(key, fn):
    return lambda sd: {k: (fn(v) if k == key else v) for k, v in sd.items()}


CASES = {
    "fused_missing": ("qwen3_vl_moe", _drop(EXPERTS.format(1) + ".gate_up_proj"),
                      f"has no tensor {EXPERTS.format(1)}.gate_up_proj"),
    "fused_shape": ("qwen3_vl_moe", _change(EXPERTS.format(2) + ".gate_up_proj", lambda v: v[:, :, :-2]),
                    f"{EXPERTS.format(2)}.gate_up_proj in "),
    "fused_float8": ("qwen3_vl_moe", _change(EXPERTS.format(0) + ".down_proj", lambda v: v.to(torch.float8_e4m3fn)),
                     "stored as F8_E4M3"),
    "split_missing": ("glm4v_moe", _drop(EXPERTS.format(2) + ".3.up_proj.weight"),
                      f"has no tensor {EXPERTS.format(2)}.3.up_proj.weight"),
    "split_shape": ("glm4v_moe", _change(EXPERTS.format(1) + ".5.down_proj.weight", lambda v: v.t()),
                    f"{EXPERTS.format(1)}.5.down_proj.weight in "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_expert_tensors_are_one_line_errors_at_load(tiny_dirs, image_file, tmp_path, capsys, case):
    family, transform, needle = CASES[case]
    model = _rewrite(tiny_dirs[family], str(tmp_path / case), transform, shards=1)
    for tier in ("disk", "host"):
        code = main(["generate", "--model", model, "--image", image_file, "--prompt", "hi", "--max-new-tokens", "2",
                     "--expert-tier", tier])
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert needle in err, err
        if "shape" in case:
            assert "model-00001-of-00001.safetensors has shape" in err, err


def test_read_failure_during_a_request_reaches_the_caller_and_frees_the_ring(tiny_dirs, image_file):
    eng = load(tiny_dirs["glm4v_moe"], expert_budget="25%", expert_tier="disk")
    store, reader = eng.store, eng.store.reader
    broken = store.prefixes[0]
    read = reader.read

    def failing(prefix, expert):
        if prefix == broken:
            raise UserError(f"cannot read tensor {prefix}.{expert}.up_proj.weight from shard.safetensors (damaged)",
                            "restore the checkpoint")
        return read(prefix, expert)

    reader.read = failing
    ring = store.ring.shape[0]
    for _ in range(ring + 2):                         # more failures than staging slots: the ring must not run dry
        out = in_thread(lambda: eng.generate(image_file, "hi", max_new_tokens=2))
        assert isinstance(out.get("error"), UserError), out
        assert f"cannot read tensor {broken}." in str(out["error"])
    assert in_thread(lambda: sorted(store._free))["value"] == list(range(ring))
    reader.read = read                                # the file is readable again
    # no cache.clear(): the experts whose reads failed left the cache when the error was raised
    out = in_thread(lambda: eng.generate(image_file, "hi", max_new_tokens=2))
    assert "error" not in out, out
    assert out["value"].token_ids


def test_shard_truncated_while_the_engine_runs_is_an_error_not_sigbus(tiny_dirs, image_file, tmp_path):
    """A disk-tier engine whose shard is cut short after loading: the next read is one clear error (experts are
    read with positioned reads, not through a memory map, whose pages past the end would raise SIGBUS). Run in a
    child process so that a regression kills the child, not the test session."""
    import shutil
    import subprocess
    import sys
    d = str(tmp_path / "ckpt")
    shutil.copytree(tiny_dirs["glm4v_moe"], d)
    script = f"""
import os
from vismmoe import load
from vismmoe.errors import UserError
eng = load({d!r}, expert_budget="25%", expert_tier="disk")
shard = [f for f in os.listdir({d!r}) if f.endswith(".safetensors")][0]
os.truncate(os.path.join({d!r}, shard), os.path.getsize(os.path.join({d!r}, shard)) // 2)
try:
    eng.generate({image_file!r}, "What is in the picture?", max_new_tokens=2)
except UserError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    assert "ERROR cannot read tensor" in out.stdout and "ends" in out.stdout, out.stdout
