"""Placement: which of a layer call's missing experts the CPU computes and which are fetched to the device.

A cost model over measured rates (rates.py), not a rule:

    fetch(e)   = one expert's bytes over the link (plus the link's queue ahead of this layer's copies)
    cpu(e, t)  = the executor's measured seconds for one expert at t tokens (t = pairs routed to e this call),
                 plus one hand-off to the worker thread when the CPU gets anything

Device and CPU work at the same time (hits stay on the device and run meanwhile), so the layer waits for the later
of the two: the misses are placed to make `max(link finish, CPU finish)` smallest. Greedy list scheduling: every
miss starts on the link; misses move to the CPU cheapest first while a move shortens that maximum. Where the CPU
and the "device" are the same cores (a CPU-only run) nothing overlaps: a fetch costs its copy plus the compute
that follows it on the same cores, and a miss moves when the CPU alone is cheaper (it always is there: the copy is
the whole difference).

Decode (one token per expert) mostly lands on the CPU, prefill (tens or hundreds of tokens per expert) mostly on
the link, as the rates say for this machine and shape. What it ignores: that a fetched expert stays resident and
may hit later (a CPU-computed one enters the cache only behind decode-sized calls on CUDA: cpu/hybrid.py).

The calibrated CPU rates are taken alone, on an idle process; inside a running engine the CPU side shares the
cores and the interpreter with the device path. `observe` corrects them by what the CPU side's jobs really took
there (`scale`, a running mean of observed / predicted seconds), so a CPU that is slower in place than in its
calibration is given fewer misses (measured on the H100 machine, 2026-12-06: a job took about 3x its calibrated
time, and the uncorrected placement decoded slower than fetch-only; docs/cpu-experts.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Placement:
    """`fetch_s`: seconds one expert takes over the link; `cpu_s(t)`: seconds the CPU takes for one expert at t
    tokens; `handoff_s`: fixed cost of using the CPU side in a layer call; `shared`: CPU side and device are the
    same cores (device compute of a fetched expert then costs `cpu_s` too)."""

    fetch_s: float
    cpu_s: Callable[[int], float]
    handoff_s: float = 0.0
    shared: bool = False
    scale: float = 1.0              # observed / calibrated CPU seconds in this process (`observe`)

    def predict(self, experts: list[int], tokens) -> float:
        """Seconds the CPU side is expected to take for `experts` (hand-off included), before `scale`."""
        return self.handoff_s + sum(self.cpu_s(int(tokens[e])) for e in experts)

    def observe(self, predicted_s: float, observed_s: float, weight: float = 0.2) -> None:
        """Fold one job's observed wall seconds (hand-off to result) against its `predict` into `scale` (an
        exponential mean with `weight`, kept in [0.5, 100])."""
        if predicted_s > 0 and observed_s > 0:
            self.scale = min(100.0, max(0.5, (1 - weight) * self.scale + weight * observed_s / predicted_s))

    def choose(self, misses: list[int], tokens, backlog_s: float = 0.0) -> list[int]:
        """The misses (expert ids) the CPU computes; `tokens[e]`: pairs routed to expert e this call; `backlog_s`:
        seconds of copies already queued on the link ahead of these."""
        cost = {e: self.cpu_s(int(tokens[e])) * self.scale for e in misses}
        order = sorted(misses, key=lambda e: (cost[e], e))
        cpu: list[int] = []
        if self.shared:
            for e in order:
                extra = 0.0 if cpu else self.handoff_s * self.scale
                if cost[e] + extra < self.fetch_s + cost[e]:
                    cpu.append(e)
            return cpu
        link_t = backlog_s + self.fetch_s * len(misses)
        cpu_t = 0.0
        for e in order:
            new_cpu = cpu_t + cost[e] + (0.0 if cpu else self.handoff_s * self.scale)
            new_link = link_t - self.fetch_s
            if max(new_cpu, new_link) < max(cpu_t, link_t):
                cpu.append(e)
                cpu_t, link_t = new_cpu, new_link
        return cpu


@dataclass
class SplitRule:
    """Whether the next fast decode step runs split (step/split_step.py): a host round trip at every MoE layer
    buys computing that layer's misses on the CPU and over the link at the same time. A cost model, per step of n
    MoE layers with m misses expected (a running mean of the last steps': decode misses come in runs):

        fetch-only step  ~ clean + m fetch_s          the kernels read each miss over the link, one after another
        split step       ~ clean + n (boundary_s + layer(m / n))
                           layer(j): a layer's j misses shared between CPU and link at once, the best split of
                           whole experts (`layer_s`; one miss costs min(fetch_s, cpu_s), not a share of both)

    A step splits when the second is smaller. boundary_s is measured on split steps (what one took beyond a clean
    step and its host work, per boundary, at most `BOUNDARY_MAX_S`; the clean step measured, else the fit's
    intercept, `clean_s`; a step that compiled or captured graphs is not a measurement); between split steps it
    drifts back toward the prior `BOUNDARY_S`, so one dear measurement cannot stop splitting for good.

    `cpu_s`: () -> seconds the CPU takes for one expert of one token (the placement's rate times its in-place
    correction); `always`: every step splits (--cpu-experts on); `shared`: the device is the CPU itself. There a
    one-graph step reads a miss from the host store with no copy on its path, so splitting saves nothing and only
    adds its boundaries: no step splits (measured on the 2-core machine: docs/cpu-experts.md).

    fetch_s starts at the link's figure (one expert's bytes over its rate) and is then measured: a one-graph
    step's kernels read its misses over the link from inside the step, which may cost more per expert than a copy
    at the link's rate. One-graph steps' device seconds are fitted against their misses, `dev ~ clean + m fetch`,
    over running means, per bucket rows; the slope becomes fetch_s once `FIT_STEPS` steps were seen whose misses
    vary by about one or more, kept within [1/2, 4] times the link's figure. (What it does not separate: the KV
    length grows while the cache warms, so within a long request the slope leans low.) Not under an emulated
    link, whose cost the step sleeps outside its device time."""

    fetch_s: float
    cpu_s: Callable[[], float]
    boundaries: int
    always: bool = False
    shared: bool = False
    misses: float = 0.0             # running mean of misses (distinct (layer, expert) pairs) per step
    boundary_s: float = 0.0         # measured seconds per boundary (0: `BOUNDARY_S` until measured)
    BOUNDARY_S = 40e-6              # a segment's host round trip: the wait's wake-up, the next replay's launch
    BOUNDARY_MAX_S = 1e-3           # the most one measurement may say a boundary costs
    DRIFT = 0.02                    # per step without a split: the share boundary_s moves back toward the prior
    FIT_STEPS = 8                   # one-graph steps (of one bucket's rows) before the fitted fetch_s is used
    FIT_WEIGHT = 0.1                # the running means' weight of one step

    def __post_init__(self):
        self.link_s = self.fetch_s                      # the link's figure: the prior and the fit's bounds
        self._fit = [0, 0.0, 0.0, 0.0, 0.0]             # steps, mean m, mean dev, mean m^2, mean m * dev
        self._fit_rows = 1                              # the bucket rows of the fit's steps
        self._clamped = False                           # the fit's slope was outside the bounds

    def layer_s(self, j: float) -> float:
        """Seconds a layer with `j` misses (a mean: interpolated between whole numbers) waits when CPU and link
        share them: min over k on the CPU of max(k cpu_s, (j - k) fetch_s)."""
        cpu = max(self.cpu_s(), 1e-9)

        def whole(n: int) -> float:
            return min(max(k * cpu, (n - k) * self.fetch_s) for k in range(n + 1))
        lo = int(j)
        return whole(lo) + (j - lo) * (whole(lo + 1) - whole(lo))

    def want(self) -> bool:
        if self.always:
            return True
        if self.shared or self.misses <= 0:
            return False
        n = max(self.boundaries, 1)
        split = n * ((self.boundary_s or self.BOUNDARY_S) + self.layer_s(self.misses / n))
        return split < self.misses * self.fetch_s

    def observe_step(self, misses: int, split: bool = False, dev_s: float | None = None, rows: int = 1) -> None:
        """A step (split or not) had `misses` experts not in a slot; `dev_s`: a one-graph step's device seconds
        (a point of the fetch_s fit; None: not a measurement, e.g. a step that captured graphs); `rows`: its
        bucket's rows. A clean step's time grows with the rows, so the fit starts again when they change."""
        self.misses = 0.5 * self.misses + 0.5 * misses
        if not split and self.boundary_s:
            self.boundary_s += self.DRIFT * (self.BOUNDARY_S - self.boundary_s)
        if not split and dev_s is not None:
            if rows != self._fit_rows:
                self._fit_rows, self._fit, self._clamped = rows, [0, 0.0, 0.0, 0.0, 0.0], False
            self._observe_fetch(float(misses), dev_s)

    def clean_s(self, rows: int = 1) -> float | None:
        """A one-graph step's seconds without misses as the fit of `rows`-row steps puts them (its intercept), or
        None where it says nothing sure: before the fit is used, for other rows, when its slope was clamped (the
        line through the means is then not the fit), when its misses vary too little for the line to reach m = 0
        (spread under a tenth of their mean), or when the intercept is not positive. What a split step's
        boundaries are measured against where no step is clean."""
        f = self._fit
        var = f[3] - f[1] * f[1]
        if rows != self._fit_rows or f[0] < self.FIT_STEPS or var < max(1.0, (0.1 * f[1]) ** 2) or self._clamped:
            return None
        clean = f[2] - self.fetch_s * f[1]
        return clean if clean > 0 else None

    def _observe_fetch(self, m: float, dev: float) -> None:
        f = self._fit
        a = 1.0 / (f[0] + 1) if f[0] < 1 / self.FIT_WEIGHT else self.FIT_WEIGHT   # a plain mean at first
        f[0] += 1
        for i, v in enumerate((m, dev, m * m, m * dev), start=1):
            f[i] += a * (v - f[i])
        var = f[3] - f[1] * f[1]
        if f[0] >= self.FIT_STEPS and var >= 1.0:                       # misses vary by about one or more
            slope = (f[4] - f[1] * f[2]) / var
            self.fetch_s = min(4 * self.link_s, max(0.5 * self.link_s, slope))
            self._clamped = self.fetch_s != slope

    def observe_split(self, beyond_s: float) -> None:
        """A split step took `beyond_s` seconds more than a clean step plus its host work with misses."""
        per = min(max(0.0, beyond_s) / max(self.boundaries, 1), self.BOUNDARY_MAX_S)
        self.boundary_s = per if self.boundary_s == 0 else 0.7 * self.boundary_s + 0.3 * per
