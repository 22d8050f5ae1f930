"""The virtual device clock: how long a request would have taken on a device profile's device.

Everything still runs for real on this machine (tokens and routing are real); only time is emulated. The clock
owns one number, the device's compute time `t` (seconds since it was made), and moves it:

    span (attention of a layer, router, vision encoder, lm_head): the FLOPs and memory bytes its operators really
        did (counted per operator from their shapes by a dispatch mode: torch's FLOP formulas, bytes = every
        operand and result of a non-view operator) -> profile.span_seconds(class, flops, bytes, operators)
    experts (each grouped call of the runtime): pairs x 6 H I FLOPs, the distinct experts' bytes plus the pairs'
        activations, from shapes (the runtime's own gathers are not the device's work)
    everything else (norms, residuals, embeddings, sampling): the "other" class, charged when the next span starts
    copies: booked on a serial virtual link (offload/links.LinkClock) at the profile's tier rate and latency, at
        the clock's time of the request; a layer that needs them waits: t = max(t, arrival) (the stall); each
        copy also costs the compute timeline the profile's `miss_s` (class "copy": the CPU's per-copy host work)
    when a copy has landed: the clock alone says (offload/transfer.Ticket.done), never the real copy thread, so
        identical requests get identical emulated schedules and times

So the overlap and the dependencies are the real schedule's: copies queued while a layer computes arrive
behind it, and compute waits exactly where the runtime waits. Spans begin and end at module hooks (the modules
tools/timeline.py also marks), on the model only during a request of the engine with the clock (`span_hooks`);
a span inside another (attention inside the vision tower) counts to the outer one.
Not emulated: host-side preprocessing (image processing, tokenizing), the CPU work of a GPU host beyond one
fixed cost per operator (`op_s`), contention of copies with compute for memory bandwidth.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ..offload.links import LinkClock

def _sdpa_flops(args, out) -> int:
    q, k = args[0], args[1]                 # [B, heads, Lq, D], [B, kv_heads, Lk, D]
    return 4 * q.numel() * k.shape[-2]


def _linear_flops(args, out) -> int:
    x, w = args[0], args[1]                 # [..., in], [out, in]
    return 2 * (x.numel() // max(x.shape[-1], 1)) * w.numel()


def _matmul_flops(args, out) -> int:
    a = args[0]
    return 2 * out.numel() * a.shape[-1] if isinstance(out, torch.Tensor) and a.dim() > 0 else 0


def _conv_flops(args, out) -> int:
    w = args[1]                             # [out_ch, in_ch / groups, *kernel]
    return 2 * out.numel() * (w.numel() // max(w.shape[0], 1))


# composite operators that inference mode hands to the dispatch mode whole (torch's registry has their parts)
_FORMULAS = {"scaled_dot_product_attention": _sdpa_flops, "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
             "linear": _linear_flops, "matmul": _matmul_flops, "conv1d": _conv_flops, "conv2d": _conv_flops,
             "conv3d": _conv_flops}


class _Counter(TorchDispatchMode):
    """Counts each aten operator's FLOPs and bytes into the clock's open span (thread-local: the copy threads'
    memcpy is not counted)."""

    def __init__(self, clock: DeviceClock):
        super().__init__()
        self.clock = clock

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        flops = 0
        if packet in flop_registry:
            try:
                flops = flop_registry[packet](*args, **kwargs, out_val=out)
            except Exception:           # a formula that does not take this overload: count bytes only
                flops = 0
        elif packet.__name__ in _FORMULAS:
            flops = _FORMULAS[packet.__name__](args, out)
        nbytes = 0
        if not func.is_view:
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    nbytes += t.numel() * t.element_size()
        self.clock.count(flops, nbytes)
        return out


class _Acc:
    __slots__ = ("kind", "flops", "bytes", "ops", "nested")

    def __init__(self, kind: str, nested: bool = False):
        self.kind, self.flops, self.bytes, self.ops, self.nested = kind, 0, 0, 0, nested


class DeviceClock:
    """Virtual time of one engine on `profile` (see the module docstring). `now()` is the device's time in
    seconds; `split` the seconds per kernel class, `stall_s` the seconds compute waited for copies."""

    def __init__(self, profile, *, dtype: str, hidden: int, inter: int, expert_bytes: int, act_bytes: int):
        self.profile = profile
        self.dtype = dtype
        self.hidden, self.inter = hidden, inter
        self.expert_bytes, self.act_bytes = expert_bytes, act_bytes
        self.t = 0.0
        self.stall_s = 0.0
        self.split: dict[str, float] = {}
        self.counts: dict[str, list] = {}       # class -> [flops, bytes, ops] (for calibration and reports)
        self._stack: list[_Acc] = []
        self._other = _Acc("other")
        self._owner = None                      # the thread whose operators are counted
        self.phase: str | None = None           # "prefill" | "decode": set by the engine (profile values per phase)
        self.on_request: list = []              # called as each request starts (state that must not carry over)

    # ---- time ------------------------------------------------------------------------------------------------
    def _advance(self, kind: str, flops: float, nbytes: float, ops: int) -> None:
        dt = self.profile.span_seconds(kind, flops, nbytes, ops, self.dtype, self.phase)
        self.t += dt
        self.split[kind] = self.split.get(kind, 0.0) + dt
        c = self.counts.setdefault(kind, [0, 0, 0])
        c[0] += flops
        c[1] += nbytes
        c[2] += ops

    def _flush_other(self) -> None:
        o = self._other
        if o.ops:
            self._advance("other", o.flops, o.bytes, o.ops)
            self._other = _Acc("other")

    def now(self) -> float:
        """The device's time: what was done so far charged (an open experts span's operators included)."""
        if not self._stack:
            self._flush_other()
        elif self._stack[-1].kind == "experts":
            acc = self._stack[-1]
            if acc.ops:
                self._advance("experts", 0, 0, acc.ops)
                acc.ops = 0
        return self.t

    def copy_cost(self) -> None:
        """One expert copy was started: the profile's per-copy compute cost (`miss_s`), class "copy"."""
        if self.profile.miss_s > 0 and threading.get_ident() == self._owner:
            self.now()
            self.t += self.profile.miss_s
            self.split["copy"] = self.split.get("copy", 0.0) + self.profile.miss_s
            self.counts.setdefault("copy", [0, 0, 0])[2] += 1

    def wait_until(self, ready: float) -> float:
        """Compute waits for data arriving at device time `ready`: returns the stall (seconds)."""
        now = self.now()
        stall = max(0.0, ready - now)
        self.t = max(now, ready)
        self.stall_s += stall
        return stall

    # ---- counting --------------------------------------------------------------------------------------------
    def count(self, flops: int, nbytes: int) -> None:
        acc = self._stack[-1] if self._stack else self._other
        acc.ops += 1
        if acc.kind != "experts":           # experts: counted from shapes (experts()), operators only here
            acc.flops += flops
            acc.bytes += nbytes

    def begin(self, kind: str) -> None:
        if threading.get_ident() != self._owner:
            return
        if self._stack:
            self._stack.append(_Acc(kind, nested=True))
            return
        self._flush_other()
        self._stack.append(_Acc(kind))

    def end(self, kind: str) -> None:
        if threading.get_ident() != self._owner or not self._stack:
            return
        acc = self._stack.pop()
        if acc.nested:                      # its counts go to the span it is in (by that span's rule)
            outer = self._stack[-1]
            outer.ops += acc.ops
            if outer.kind != "experts":
                outer.flops += acc.flops
                outer.bytes += acc.bytes
            return
        self._advance(acc.kind, acc.flops, acc.bytes, acc.ops)

    def experts(self, pairs: int, experts: int) -> None:
        """One grouped experts call: `pairs` (token, expert) pairs over `experts` distinct experts."""
        if threading.get_ident() != self._owner:
            return
        H, I = self.hidden, self.inter
        flops = pairs * 6 * H * I                               # gate_up [2I, H] and down [H, I] per pair
        nbytes = experts * self.expert_bytes + pairs * (2 * H + 3 * I) * self.act_bytes
        ops = 0
        if self._stack and self._stack[-1].kind == "experts":
            ops, self._stack[-1].ops = self._stack[-1].ops, 0
        self._advance("experts", flops, nbytes, ops)

    @contextmanager
    def request(self):
        """Count the operators of this thread while inside (one request's generation)."""
        prev = self._owner
        self._owner = threading.get_ident()
        for reset in self.on_request:
            reset()
        try:
            with _Counter(self):
                yield self
        finally:
            self.now()
            self._stack.clear()
            self._owner = prev

    def stats(self) -> dict:
        return {"time_source": self.profile.label(), "device_profile": self.profile.name,
                "emulated_split_s": dict(self.split), "emulated_stall_s": self.stall_s}


class VirtualLink(LinkClock):
    """The serial virtual link on the device clock's time: copies are booked at `clock.now()`, and a wait moves the
    clock instead of sleeping."""

    virtual = True

    def __init__(self, profile, clock: DeviceClock):
        super().__init__(profile)
        self.device_clock = clock

    def now(self) -> float:
        return self.device_clock.now()

    def book(self, nbytes: int, now: float | None = None) -> float:
        ready = super().book(nbytes, self.device_clock.now() if now is None else now)
        self.device_clock.copy_cost()
        return ready

    def wait_until(self, ready: float) -> float:
        return self.device_clock.wait_until(ready)


# ---- wiring into an engine ---------------------------------------------------------------------------------------
def _vision_module(model):
    inner = getattr(model, "model", model)
    for name in ("visual", "vision_tower", "vision_model", "vision"):
        m = getattr(inner, name, None) or getattr(model, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def _spans(engine) -> list[tuple[torch.nn.Module, str]]:
    """(module, kernel class) of every span the clock marks."""
    model, family, geo = engine.model, engine.family, engine.geometry
    out = []
    vision = _vision_module(model)
    if vision is not None:
        out.append((vision, "vision"))
    vis_ids = {id(m) for m in vision.modules()} if vision is not None else set()
    for m in model.modules():
        name = type(m).__name__
        if id(m) not in vis_ids and name.endswith("Attention") and \
                not any(type(c).__name__.endswith("Attention") for c in m.children()):
            out.append((m, "attention"))
    for layer in geo.moe_layers:
        try:
            out.append((family.router(model, layer), "router"))
        except (AttributeError, NotImplementedError, IndexError):
            pass
        out.append((family.moe_block(model, layer).experts, "experts"))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        out.append((head, "lm_head"))
    return out


@contextmanager
def span_hooks(engine, clock):
    """Span hooks on the model's modules that tell `clock` (a DeviceClock, or calibrate.HostTimer) where each span
    begins and ends, for as long as inside: one request of an engine with a clock. Forks share the model, and a
    request of a fork without a clock (the real side of a validation) must not pay for hooks it does not use."""
    model = engine.model
    spans = model.__dict__.get("_vismmoe_spans")
    if spans is None:
        spans = model.__dict__["_vismmoe_spans"] = _spans(engine)
    handles = []
    try:
        for module, kind in spans:
            handles.append(module.register_forward_pre_hook(lambda mod, args, kind=kind: clock.begin(kind)))
            handles.append(module.register_forward_hook(lambda mod, args, out, kind=kind: clock.end(kind)))
        yield
    finally:
        for h in handles:
            h.remove()


def attach_profile(engine, profile) -> DeviceClock:
    """Put `engine` on `profile`'s virtual clock: its transfer engine books copies on the virtual link, its
    prefetcher's cost model reads device time, its runtime charges grouped expert calls. Returns the clock."""
    dtype = str(engine.dtype).replace("torch.", "")
    act = torch.empty((), dtype=engine.dtype).element_size()
    clock = DeviceClock(profile, dtype=dtype, hidden=engine.geometry.hidden, inter=engine.geometry.inter,
                        expert_bytes=engine.layout.nbytes, act_bytes=act)
    profile.peak(dtype)                                 # the profile has a rate for this dtype
    rt = engine.runtime
    rt.transfer.clock = VirtualLink(rt.transfer.clock.profile, clock)
    rt.clock = clock
    # the hits-first split rule reads an average of past grouped calls: each request starts from none, so the
    # emulated schedule of a request does not depend on the requests before it
    clock.on_request.append(lambda: setattr(rt, "_call_s", 0.0))
    if rt.prefetcher is not None:
        rt.prefetcher.now = clock.now
    return clock
