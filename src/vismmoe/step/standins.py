"""Module stand-ins for the fast decode step's body: submodules of transformers' model replaced while the body runs
(its warm-up, its capture, and every step where it is not replayed), the originals back after.

    StandIns(entries, cleanup)   entries: (parent module, child name, original, stand-in)
    with stand_ins.swapped():    the stand-ins in place; on leaving (also on an error) the originals again and each
                                 `cleanup` called
    stand_ins.reset()            each `cleanup` called (the body calls it before each run)
    a + b                        both sets

Who makes them: fused_proj.py (stacked sibling projections), router_topk.py (the router's tail in one kernel);
graphs.StepGraphs swaps them in `active`. Prefill, the eager step and the CPU's native step never see them.
"""

from __future__ import annotations

from contextlib import contextmanager


class StandIns:
    """A set of stand-ins (module docstring)."""

    def __init__(self, entries: list | None = None, cleanup: list | None = None):
        self.entries = list(entries or [])
        self.cleanup = list(cleanup or [])

    def __len__(self) -> int:
        return len(self.entries)

    def __add__(self, other: StandIns) -> StandIns:
        return StandIns(self.entries + other.entries, self.cleanup + other.cleanup)

    @contextmanager
    def swapped(self):
        for parent, name, _, stand_in in self.entries:
            parent._modules[name] = stand_in
        try:
            yield self
        finally:
            for parent, name, original, _ in self.entries:
                parent._modules[name] = original
            self.reset()

    def reset(self) -> None:
        for f in self.cleanup:
            f()
