"""Where a fast decode step's device time goes: every kernel of `tokens` graph-replayed steps, from the torch
profiler (CUDA activity), per token. Used by bench/formats.py (the expert kernels' own time) and bench/families.py
(`--kernels`: each family's step, kernel by kernel)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def kernel_times(eng, inputs, teacher: list[int], tokens: int = 16) -> list[dict]:
    """The fast step's kernels over `tokens` decode steps of one request with every expert where the engine has it
    (callers preload), after a warm-up decode of the same request (compile and capture are not profiled).

    Returns rows sorted by time, each {"kernel": name, "calls": launches per token, "us": device microseconds per
    token}. `teacher`: at least `tokens` token ids to feed (teacher-forced). CUDA only."""
    from torch.profiler import ProfilerActivity, profile
    fs = eng.fast_step()
    eng.generate_ids(inputs, 2 * tokens, teacher_tokens=teacher)
    T = inputs["input_ids"].shape[1]
    b = fs.sg.bucket(1, T + 2 * tokens)
    b.pos.fill_(T)
    b.mask[:, T:] = False
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fs.decode(b, tokens, teacher[:tokens])
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key, "calls": e.count / tokens, "us": us / tokens})
    return sorted(rows, key=lambda r: -r["us"])
