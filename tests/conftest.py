"""Shared fixtures: tiny random checkpoints of each family (built once per session, no downloads)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("VISMMOE_QUIET", "1")
if not torch.cuda.is_available():       # the Triton kernels run in Triton's interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# VISMMOE_TEST_THREADS=1 on a machine whose cores are busy with other work: tiny models gain nothing from
# intra-op threads, and threads that wait on a busy core make every matmul many times slower
torch.set_num_threads(int(os.environ.get("VISMMOE_TEST_THREADS", min(4, os.cpu_count() or 1))))

# a test of a Triton kernel on CPU tensors: in the interpreter only
INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                                 reason="needs triton, run under TRITON_INTERPRET=1 (set here where no GPU is visible)")

FAMILIES = ("qwen3_vl_moe", "glm4v_moe")      # every runtime test runs on these (M-RoPE, the fast step)
# families with a test file of their own (tests/test_family_exactness.py and the like), not in every runtime test
MORE_FAMILIES = ("internvl", "qwen3_5_moe", "deepseek_ocr2", "gemma4", "ernie4_5_vl_moe")
# text-only families (no vision tower): tests/test_family_exactness.py runs them on text prompts, and
# tests/test_family_text.py covers what is theirs (image refusals, the fast step, make-shape)
TEXT_FAMILIES = ("qwen3_moe", "glm4_moe")


class _TinyDirs(dict):
    """family -> its tiny checkpoint directory, made on first use (a test run pays only for the families it
    touches)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        from vismmoe.tools.tiny import make_tiny
        self[family] = make_tiny(family, str(self.root / family), layers=4, experts=8, top_k=2)
        return self[family]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    return _TinyDirs(tmp_path_factory.mktemp("tiny"))


def _noise_png(tmp_path_factory, seed: int, h: int, w: int) -> str:
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("img") / f"noise{seed}.png"
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="session")
def bundled_engine():
    """The bundled model at 25% of experts: the server tests share one."""
    from vismmoe import load
    return load(None, expert_budget="25%")


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> str:
    return _noise_png(tmp_path_factory, 0, 96, 128)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def big_image(tmp_path_factory) -> str:
    """A 224 px noise image: enough visual tokens for compression tests."""
    return _noise_png(tmp_path_factory, 1, 224, 224)


def prune_every_third(eng, inputs):
    """(encoded prompt, kept visual indices, the engine's pruned prompt keeping every third visual token, the kept
    sequence order [T'] of row 0, the compressor that keeps them): what the hand-built pruning references start
    from."""
    from vismmoe.engine.compress import Selection
    enc = eng.family.encode(eng.model, inputs)
    keep = torch.arange(0, int(enc.visual.sum()), 3)

    class Every3:
        name = "every3"

        def select(self, ctx):
            return Selection(keep)

    pruned = eng.pruned_prompt(inputs, Every3(), 0.34)
    vis_pos = torch.nonzero(enc.visual[0]).flatten()
    order = torch.cat([torch.nonzero(~enc.visual[0]).flatten(), vis_pos[keep]]).sort().values
    return enc, keep, pruned, order, Every3()


def in_thread(fn, timeout: float = 120.0) -> dict:
    """fn() on a thread: {"value": result} or {"error": exception}; fails the test if fn has not returned by
    `timeout` seconds (a hang)."""
    import threading
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:          # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    return out


POISON_TEMPERATURE = 0.777


def poison_sampling(monkeypatch) -> None:
    """Rows sampled at temperature POISON_TEMPERATURE get a NaN logit (broken weights, as the sampler sees them):
    what the one-row-fails-alone tests of the engine and the server inject."""
    from vismmoe.engine.sampling import Sampler
    pick = Sampler.pick

    def poisoned(self, logits):
        for r, p in enumerate(self.params):
            if p.temperature == POISON_TEMPERATURE:
                logits[r, 3] = float("nan")
        return pick(self, logits)

    monkeypatch.setattr(Sampler, "pick", poisoned)


POLICIES = ("lru", "lfu", "lfru", "predictive", "none")     # every runtime eviction policy


def quarter_and_smallest(model_dir: str) -> list[str]:
    """The budgets exactness tests run at: 25% of the experts and the smallest legal one (one layer's top-k)."""
    from vismmoe import load
    eng = load(model_dir)
    return ["25%", str(eng.geometry.top_k * eng.layout.nbytes)]


class InlineExecutor:
    """An executor that runs each job at once in the caller's thread: a CPU engine's expert copies
    (offload/transfer.py) then land before the next step starts, so tests whose outcome depends on when copies land
    (bytes moved, landing) are deterministic. `inline_copies(engine)` puts one in."""

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future
        fut = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:          # noqa: BLE001 - the future carries it, as a pool's would
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        pass


def inline_copies(engine):
    """`engine` with its CPU copies run inline (`InlineExecutor`); returns it."""
    engine.runtime.transfer.worker = InlineExecutor()
    return engine


def fast_step_logits(eng, inputs, new: int, teacher: list[int] | None = None) -> tuple[list, list, dict]:
    """Decode `new` tokens of `inputs` on `eng`'s fast step (`fast` or `native`), teacher-forced with `teacher`:
    (token ids per row, each step's logits [rows, V] as float32, stats); the expert budget is checked."""
    fs = eng.fast_step()
    logits, advance, ahead = [], fs.advance, fs.step_ahead
    fs.step_ahead = False               # a step launched ahead would overwrite the bucket's logits before they are read

    def recording(b, *a, **k):
        fl = advance(b, *a, **k)
        logits.append(b.logits[:b.rows].float().clone())
        return fl
    fs.advance = recording
    try:
        ids, stats = eng.generate_ids(inputs, new, teacher_tokens=teacher)
    finally:
        fs.advance, fs.step_ahead = advance, ahead
    assert stats["expert_bytes_peak"] <= stats["expert_budget_bytes"]
    return ids, logits, stats
