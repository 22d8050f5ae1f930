"""The CPU expert executor: routed experts computed on the host's cores, straight from their host blobs.

    # T tokens, K experts per token, H hidden, I expert intermediate, C pairs routed to the experts computed here
    hidden [T, H], idx [T, K] (expert of each pair), weights [T, K]  -- on the host
    blob of expert e (formats/: dense, bf16, fp8, int4; read in place, never copied into a slot)
      -> per expert: x = hidden[its tokens] [t, H]
                     h = x @ gate_up^T [t, 2I] -> gate(h) [t, I] (the family's own gating, SiLU(gate) * up)
                     y = h @ down^T [t, H] * routing weight
      -> (pair index [C] into the flattened [T*K] pairs, rows [C, H])

The caller puts the rows where the device path puts its pair rows, so the layer's sum over each token's K pairs is
the same sum: a result differs from the device kernels only by the summation order inside the two matmuls.

Two kernels compute an expert, picked once per executor by `VISMMOE_CPU_KERNEL` (`kernel_mode`):

    native  cpu/native/: one C call per layer call's experts, fused: each weight read once per 4 tokens, dequantized in
            registers (bf16, fp8 e4m3 with its block scales, int4 with group scale and zero point), float32
            accumulation, the gate (SiLU or GELU-tanh), the down projection and the routing weight; OpenMP over
            output rows (up to torch's thread count). Built at first use with the system C compiler.
    torch   dense experts multiplied as stored (fp32 through MKL's sgemm; bf16 through oneDNN, which uses AMX /
            AVX512-BF16 where the processor has them); fp8 and int4 dequantized into a float32 scratch one expert
            at a time and multiplied in float32.

`auto` (the default) computes with native where it is had and pays: dense float32/bfloat16, fp8 and int4
experts, the family's gate one the kernel knows (SiLU, GELU-tanh), at most AUTO_MAX_TOKENS tokens per expert for
dense experts and AUTO_MAX_TOKENS_QUANTIZED for fp8 and int4 (more: a GEMM, torch's sgemm wins; a quantized
expert's torch path dequantizes the whole expert first, so native pays to more tokens: docs/cpu-experts.md,
"Prefill tokens on the native kernel"); torch otherwise, and everywhere when the library could not be built (no
compiler: one log line, never an error). `native` uses the kernel at any token count; `torch` never builds it.
Both give what the formats' references give up to float32 summation order (the native kernel keeps gate/up in
float32 where the torch path rounds them to bf16 for bf16 experts).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import native

KERNELS = ("torch", "native", "auto")       # VISMMOE_CPU_KERNEL values
# the native kernel's threads: one per this many multiply-adds of the call (3 H I t), at most torch's thread count;
# a smaller expert on more threads spends more on the team's fork and barriers than it saves (docs/cpu-experts.md)
WORK_PER_THREAD = 1 << 18
# auto: the native kernel up to this many tokens per expert, torch's GEMM beyond (the native kernel reads each
# weight once per 4 tokens; on the 2-core machine it was faster for every format up to 32 tokens and slower than
# MKL's sgemm for float32 at 64: docs/cpu-experts.md)
AUTO_MAX_TOKENS = 32
AUTO_MAX_TOKENS_QUANTIZED = 128
# the most token rows of one native call: its float32 scratch is rows x (3 I + H) (about 18 MB for a 30B expert
# shape), kept by the executor; a set with more rows goes in several calls
MAX_CALL_ROWS = 1024


def kernel_mode() -> str:
    """`VISMMOE_CPU_KERNEL` (torch | native | auto; unset or empty: auto). UserError for another value."""
    raw = os.environ.get("VISMMOE_CPU_KERNEL", "")
    mode = raw.strip().lower() or "auto"
    if mode not in KERNELS:
        raise UserError(f"VISMMOE_CPU_KERNEL={raw!r} is not a CPU expert kernel",
                        f"set it to one of {', '.join(KERNELS)}, or unset it (auto)")
    return mode


# every e4m3 byte's float32 value: a table lookup converts 2-3x faster than `.float()` on the CPU (measured,
# docs/cpu-experts.md) and gives the same values (NaN bytes stay NaN)
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """[t, 2I] (gate columns, then up columns) -> SiLU(gate) * up [t, I]: the default gating."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class CpuExecutor:
    """Computes routed experts of expert format `layout` (formats.ExpertFormat) on the host's cores.

    `gate`: the family's gating, [t, 2I] -> [t, I] (an experts module's `_apply_gate`); None: SiLU(gate) * up.
    `kernel`: torch | native | auto (None: `kernel_mode()`, from the environment). `kernel_key` names what runs
    (the rates are measured and cached per key). Thread-safe for one caller at a time (the runtime's worker
    thread)."""

    def __init__(self, layout, gate=None, kernel: str | None = None):
        self.layout = layout
        self.gate = gate or silu_gate
        self.dense = hasattr(layout, "views")
        self.mode = kernel or kernel_mode()
        if self.mode not in KERNELS:
            raise ValueError(f"CpuExecutor kernel {self.mode!r}")
        self._params, self.native, self.max_native_tokens, self.kernel_key = _choose(layout, self.mode)
        self._scratch = torch.empty(0)
        self._need: dict[int, int] = {}         # scratch elements per token count

    def weights(self, blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's blob [numel] -> (gate_up [2I, H], down [H, I]): views of the blob for dense experts,
        float32 dequantized copies for fp8 and int4."""
        if self.dense:
            gu, dn = self.layout.views(blob[None])
            return gu[0], dn[0]
        fast = getattr(self, f"_{self.layout.name}", None)
        if fast is not None:
            return fast(blob)
        gu, dn = self.layout.dequantize(blob[None])
        return gu[0].float(), dn[0].float()

    # The formats' own references (formats/) expand every scale to a full matrix with repeat_interleave; these
    # broadcast each scale over its block instead: the same float32 products, element by element.
    def _fp8(self, blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = self.layout
        qgu, qdn, sg, su, sd = fmt._parts(blob[None])
        I, H, B = fmt.inter, fmt.hidden, fmt.block
        if I % B or H % B:                              # partial blocks: the format's reference, in float32
            from ..formats.fp8 import block_dequantize  # (in its compute dtype it would round bf16 weights)
            gu = torch.cat([block_dequantize(qgu[:, :I], sg, B, torch.float32),
                            block_dequantize(qgu[:, I:], su, B, torch.float32)], dim=1)
            return gu[0], block_dequantize(qdn, sd, B, torch.float32)[0]

        def deq(q, s):                                  # q [R, C] e4m3, s [R/B, C/B] -> [R, C] float32
            R, C = q.shape
            v = torch.take(_E4M3, q.view(torch.uint8).long())         # e4m3 -> float32 by table: exact
            return (v.view(R // B, B, C // B, B) * s[:, None, :, None]).view(R, C)
        gu = torch.cat([deq(qgu[0, :I], sg[0]), deq(qgu[0, I:], su[0])])
        return gu, deq(qdn[0], sd[0])

    def _int4(self, blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = self.layout
        qgu, sgu, zgu, qdn, sdn, zdn = fmt._parts(blob[None])
        g = fmt.group

        def deq(q, s, z):                               # q [R, C/2] uint8, s, z [R, C/g] -> [R, C] float32
            R = q.shape[0]
            v = torch.stack((q & 0xF, q >> 4), dim=-1).view(R, -1, g).float()
            return ((v - z.float()[..., None]) * s[..., None]).view(R, -1)
        return deq(qgu[0], sgu[0], zgu[0]), deq(qdn[0], sdn[0], zdn[0])

    def expert(self, blob: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None = None, gate=None) -> torch.Tensor:
        """One expert for `x [t, H]` (any float dtype) -> y [t, H] float32, times `w [t]` (routing weights) when
        given; `gate` replaces the executor's gating for this call."""
        return self._expert(blob, x, w, gate or self.gate, self._activation(gate or self.gate))

    def _activation(self, gate) -> int | None:
        """The native kernel's id of `gate`, or None where the native kernel does not compute it."""
        return None if self.native is None else native.activation(gate, default=silu_gate)

    def _native_ok(self, blob, t: int, act) -> bool:
        """Whether the native kernel computes this expert at `t` tokens (`act`: the gate's kernel id or None)."""
        return act is not None and (self.max_native_tokens is None or t <= self.max_native_tokens) \
            and blob.device.type == "cpu" and blob.is_contiguous() \
            and blob.numel() * blob.element_size() >= self.layout.nbytes

    def _expert(self, blob, x, w, gate, act) -> torch.Tensor:
        if self._native_ok(blob, x.shape[0], act):
            return self._native_experts([blob], [0, x.shape[0]], x, w, act)
        gu, dn = self.weights(blob)
        x = x.to(gu.dtype)
        h = gate(F.linear(x, gu))                        # [t, I]
        y = F.linear(h.to(dn.dtype), dn).float()        # [t, H]
        return y if w is None else y * w.float().unsqueeze(-1)

    def _native_experts(self, blobs: list, off: list[int], x, w, act) -> torch.Tensor:
        """Experts `blobs` [n] on the native kernel in one call, expert e for rows off[e]:off[e + 1] of x [C, H]
        (w [C] or None) -> y [C, H] float32."""
        C, H = x.shape[0], self.layout.hidden
        # the torch path's input rounding: dense experts multiply x in their own dtype, quantized ones in float32
        xs = (x.to(self.layout.dtype) if self.dense else x).float().contiguous()
        ws = None if w is None else w.float().contiguous()
        need = self._need.get(C) or self._need.setdefault(C, self.native.scratch(self._params, C))
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        y = torch.empty(C, H)
        threads = min(torch.get_num_threads(), max(1, 3 * H * self.layout.inter * C // WORK_PER_THREAD))
        self.native.experts(self._params, blobs, off, xs, ws, act, self._scratch, y, threads)
        return y

    def pairs(self, blobs, hidden: torch.Tensor, idx: np.ndarray, weights: torch.Tensor,
              experts: list[int], gate=None, release=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair of `idx [T, K]` routed to one of `experts`, computed from `blobs(e) -> blob [numel]` (a host
        blob, read in place; `release(blob)`, when given, is called after its use: the disk tier's staging ring, whose
        blobs are then taken one at a time); `hidden [T, H]`, `weights [T, K]` on the host; `gate` as in `expert`.
        Where the native kernel computes them, the experts go to it in one call (one parallel region for the set).

        Returns (pair [C] int64: index into the flattened T*K pairs, rows [C, H] float32, weighted), in the order
        of `experts`, then of the pairs' position."""
        K = idx.shape[1]
        gate = gate or self.gate
        act = self._activation(gate)
        flat = idx.reshape(-1)
        w = weights.reshape(-1)
        none = torch.empty(0, dtype=torch.long), hidden.new_empty(0, hidden.shape[-1], dtype=torch.float32)
        if not experts:
            return none
        rank = np.full(max(int(flat.max(initial=0)), max(experts)) + 1, -1, dtype=np.int64)
        rank[experts] = np.arange(len(experts))
        r = rank[flat]
        p = np.flatnonzero(r >= 0)
        p = p[np.argsort(r[p], kind="stable")]              # pairs grouped by expert, in the order of `experts`
        counts = np.bincount(r[p], minlength=len(experts))
        if p.size == 0:
            return none
        pt = torch.from_numpy(p)
        x, wp = hidden[pt // K], w[pt]
        rows: list[torch.Tensor] = []
        batch, off, segs = [], [0], []                      # the native kernel's share: (blob, rows) per expert
        at = 0
        for e, c in zip(experts, counts.tolist()):
            if c == 0:
                continue
            seg = slice(at, at + c)
            at += c
            blob = blobs(e)
            if release is None and self._native_ok(blob, c, act):
                batch.append(blob)
                off.append(off[-1] + c)
                segs.append(seg)
                continue
            try:
                rows.append((seg.start, self._expert(blob, x[seg], wp[seg], gate, act)))
            finally:
                if release is not None:
                    release(blob)
        if batch and not rows and off[-1] <= MAX_CALL_ROWS:   # the whole set in one call (decode's case)
            return pt, self._native_experts(batch, off, x, wp, act)
        i = 0
        while i < len(batch):                               # calls of at most MAX_CALL_ROWS rows (one expert's more)
            j = i + 1
            while j < len(batch) and off[j + 1] - off[i] <= MAX_CALL_ROWS:
                j += 1
            sel = torch.cat([torch.arange(s.start, s.stop) for s in segs[i:j]])
            y = self._native_experts(batch[i:j], [o - off[i] for o in off[i:j + 1]], x[sel], wp[sel], act)
            rows += [(s.start, y[o - off[i]:o - off[i] + s.stop - s.start]) for s, o in zip(segs[i:j], off[i:j])]
            i = j
        rows.sort(key=lambda r: r[0])
        return pt, torch.cat([r for _, r in rows])


def _choose(layout, mode: str):
    """(kernel params, native library, most tokens it takes (None: any), kernel key) for `layout` under `mode`."""
    params = native.params(layout) if mode != "torch" else None
    lib = native.kernel() if params is not None else None
    if lib is None:
        return None, None, None, "torch"
    most = None if mode == "native" else AUTO_MAX_TOKENS if hasattr(layout, "views") else AUTO_MAX_TOKENS_QUANTIZED
    return params, lib, most, f"native-{lib.source}" + ("" if most is None else f"-to{most}")


def kernel_key(layout) -> str:
    """What computes `layout`'s experts under the current `VISMMOE_CPU_KERNEL`: "torch", or "native-<source
    hash>[-to<N>]" (auto: native to N tokens per expert, torch beyond). The rates are kept apart per key."""
    return _choose(layout, kernel_mode())[3]
