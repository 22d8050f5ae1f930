"""The fp8 expert format: e4m3 weights with one float scale per 128 x 128 block, as Qwen's official FP8 releases
store them (`quant_method: fp8`, `fmt: e4m3`, `weight_block_size: [128, 128]`, per-expert `weight` in F8_E4M3
with `weight_scale_inv [ceil(out/128), ceil(in/128)]`, which is a multiplier: w = q * s).

    # H hidden, I expert intermediate, B = 128, nb(n) = ceil(n / B)
    blob [nbytes] uint8:
      q        gate_up [2I, H] e4m3 (gate rows, then up rows) | down [H, I] e4m3
      scales   (at a 16-byte boundary) float32: gate [nb(I), nb(H)] | up [nb(I), nb(H)] | down [nb(H), nb(I)]
      padding  to 512 bytes
    w[r, c] = float(q[r, c]) * scale[r // B, c // B]   (up rows: r - I)

Scales are kept in float32 whatever the checkpoint stores (bf16 in Qwen3.5/3.6, f32 in DeepSeek-style files), so
reading them is exact. Quantizing a dense expert rounds to nearest with s = amax(block) / 448 (e4m3's largest
finite value); an all-zero block gets s = 1.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import (ALIGN_BYTES, align, cdiv, check_stored, int_knob, kernels_knob, kernels_spec, no_more_knobs,
                   pad_experts, register)

E4M3_MAX = 448.0
F8 = torch.float8_e4m3fn

# the decode kernels' default variant: on an H100 (python -m vismmoe.bench.quant_kernels --quick, 2026-12-07) fp8's
# v3 kernels took 17.0 us a token (gate_up + down, top-8, H 2048, I 768) against 24.7 for v2 (since removed) and
# 31.4 for dense
KERNELS_DEFAULT = "v3"


def block_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, R, C] float -> (q [N, R, C] e4m3, scale [N, nb(R), nb(C)] float32), round to nearest per block."""
    N, R, C = w.shape
    nr, nc = cdiv(R, block), cdiv(C, block)
    pad = torch.zeros(N, nr * block, nc * block, dtype=torch.float32, device=w.device)
    pad[:, :R, :C] = w
    blocks = pad.view(N, nr, block, nc, block)
    amax = blocks.abs().amax(dim=(2, 4))                                     # [N, nr, nc]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(F8)
    return q.view(N, nr * block, nc * block)[:, :R, :C], scale


def block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """q [N, R, C] e4m3, scale [N, nb(R), nb(C)] -> w [N, R, C] in `dtype` (products in float32)."""
    R, C = q.shape[-2:]
    s = scale.repeat_interleave(block, dim=-2)[..., :R, :].repeat_interleave(block, dim=-1)[..., :C]
    return (q.float() * s).to(dtype)


class Fp8Format:
    name = "fp8"
    kernel = 1
    plain = False
    pool_dtype = torch.uint8

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, **knobs):
        self.block = int_knob(self.name, knobs, "block", 128, (128,))
        self.kernels = kernels_knob(self.name, knobs, KERNELS_DEFAULT)
        no_more_knobs(self.name, knobs)
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        H, I, B = hidden, inter, self.block
        self.nbH, self.nbI = cdiv(H, B), cdiv(I, B)
        self.q_gu, self.q_dn = 2 * I * H, H * I                              # bytes
        self.s_off = align(self.q_gu + self.q_dn, 16)                        # float32 scales from here
        self.s_gate = self.nbI * self.nbH                                    # elements each
        self.s_down = self.nbH * self.nbI
        self.nbytes = align(self.s_off + 4 * (2 * self.s_gate + self.s_down), ALIGN_BYTES)
        self.numel = self.nbytes

    def spec(self) -> str:
        return self.name + kernels_spec(self.kernels, KERNELS_DEFAULT, first=True)

    def __repr__(self) -> str:
        return f"Fp8Format(H={self.hidden}, I={self.inter}, block={self.block}, compute {self.dtype})"

    # ---- views into blobs [N, nbytes] --------------------------------------------------------------------------
    def _parts(self, blobs: torch.Tensor):
        N, H, I = blobs.shape[0], self.hidden, self.inter
        qgu = blobs[:, : self.q_gu].view(F8).view(N, 2 * I, H)
        qdn = blobs[:, self.q_gu: self.q_gu + self.q_dn].view(F8).view(N, H, I)
        s = blobs[:, self.s_off: self.s_off + 4 * (2 * self.s_gate + self.s_down)].view(torch.float32)
        sg = s[:, : self.s_gate].view(N, self.nbI, self.nbH)
        su = s[:, self.s_gate: 2 * self.s_gate].view(N, self.nbI, self.nbH)
        sd = s[:, 2 * self.s_gate:].view(N, self.nbH, self.nbI)
        return qgu, qdn, sg, su, sd

    def dequantize(self, blobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qgu, qdn, sg, su, sd = self._parts(blobs)
        I, B = self.inter, self.block
        gate = block_dequantize(qgu[:, :I], sg, B, self.dtype)
        up = block_dequantize(qgu[:, I:], su, B, self.dtype)
        return torch.cat([gate, up], dim=1), block_dequantize(qdn, sd, B, self.dtype)

    def _store(self, out, gate, up, down):
        """Write ((q, scale) of gate, up and down) into blobs `out [N, nbytes]`."""
        qgu, qdn, sg, su, sd = self._parts(out)
        I = self.inter
        out[:, self.q_gu + self.q_dn: self.s_off].zero_()
        out[:, self.s_off + 4 * (2 * self.s_gate + self.s_down):].zero_()
        for (q, s), qdst, sdst in ((gate, qgu[:, :I], sg), (up, qgu[:, I:], su), (down, qdn, sd)):
            qdst.copy_(q)
            sdst.copy_(s)
        return out

    def quantize(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        gate_up, down = pad_experts(gate_up, down, self.inter)
        I, B = self.inter, self.block
        return self._store(out, block_quantize(gate_up[:, :I], B), block_quantize(gate_up[:, I:], B),
                           block_quantize(down, B))

    _SCALES = ("BF16", "F16", "F32")

    def stored(self) -> list[tuple[str, tuple[int, int], tuple[str, ...]]]:
        """(suffix, shape, dtypes) of each tensor of one expert in Qwen's FP8 layout."""
        H, I, B = self.hidden, self.inter, self.block
        out = []
        for proj, (R, C) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            out += [(f"{proj}.weight", (R, C), ("F8_E4M3",)),
                    (f"{proj}.weight_scale_inv", (cdiv(R, B), cdiv(C, B)), self._SCALES)]
        return out

    def check(self, reader, prefix: str, num_experts: int) -> None:
        check_stored(self, reader, prefix, num_experts)

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        """Qwen's FP8 layout: `{prefix}.{e}.{gate,up,down}_proj.weight` F8_E4M3 and `.weight_scale_inv`."""
        t = [reader.expert_tensor(prefix, expert, *spec) for spec in self.stored()]
        parts = []
        for (suffix, _, _), w, s in zip(self.stored()[1::2], t[0::2], t[1::2]):
            s = s.float()
            if not torch.isfinite(s).all():
                raise UserError(f"{reader.expert_key(prefix, expert, suffix)} has NaN or Inf values",
                                "the checkpoint's scales are damaged; restore it")
            parts.append((w.view(F8)[None], s[None]))
        return self._store(out[None], *parts)[0]


register("fp8", Fp8Format)
