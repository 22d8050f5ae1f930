"""The dense expert format: weights in the activation dtype (bf16/fp16 on a GPU, fp32 on the CPU), no scales.

    blob [numel] of `dtype`:  gate_up [2I, H] (gate rows, then up rows) | down [H, I] | zero padding to 512 bytes

Every checkpoint layout the reader knows (fused, fused transposed, split per expert) is read into it, whatever the
stored float dtype. Its pool can be viewed as fused banks `gate_up [S, 2I, H]`, `down [S, H, I]` without a copy,
so the prefill's `grouped_mm` runs straight on the slots.
"""

from __future__ import annotations

from functools import cached_property

import torch

from .base import ALIGN_BYTES, no_more_knobs, pad_experts, register


class DenseFormat:
    name = "dense"
    kernel = 0
    plain = True

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, **knobs):
        no_more_knobs(self.name, knobs)
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.pool_dtype = dtype

    def spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DenseFormat(H={self.hidden}, I={self.inter}, {self.dtype})"

    @property
    def gate_up_numel(self) -> int:
        return 2 * self.inter * self.hidden

    @property
    def down_numel(self) -> int:
        return self.hidden * self.inter

    @cached_property
    def numel(self) -> int:
        per = ALIGN_BYTES // self.dtype.itemsize
        n = self.gate_up_numel + self.down_numel
        return -(-n // per) * per

    @cached_property
    def nbytes(self) -> int:                    # read per copy and per prefetch decision: computed once
        return self.numel * self.dtype.itemsize

    def views(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pool [N, numel]` -> (gate_up [N, 2I, H], down [N, H, I]) sharing its memory."""
        gu = pool[:, : self.gate_up_numel].unflatten(1, (2 * self.inter, self.hidden))
        dn = pool[:, self.gate_up_numel : self.gate_up_numel + self.down_numel].unflatten(1, (self.hidden, self.inter))
        return gu, dn

    def dequantize(self, blobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views(blobs)

    def quantize(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        gate_up, down = pad_experts(gate_up, down, self.inter)
        gu, dn = self.views(out)
        gu.copy_(gate_up)
        dn.copy_(down)
        out[:, self.gate_up_numel + self.down_numel:].zero_()
        return out

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One expert (gate_up [2i, H], down [H, i]) into the flat blob `out [numel]`."""
        self.quantize(gate_up[None], down[None], out[None])
        return out

    def check(self, reader, prefix: str, num_experts: int) -> None:
        reader.check_layer(prefix, num_experts)

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        gu, dn = reader.read(prefix, expert)
        return self.pack(gu, dn, out)


register("dense", DenseFormat)
