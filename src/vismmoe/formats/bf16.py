"""The bf16 expert format: dense weights stored in bfloat16, computed in the model's float32.

    blob [numel] of bfloat16:  gate_up [2I, H] (gate rows, then up rows) | down [H, I] | zero padding to 512 bytes

It is the dense layout in half of float32's bytes. It exists for models computed in float32, the CPU's dtype: a
bf16 checkpoint's experts (Qwen's releases, the bundled model) keep their exact values, and every slot, every miss
and every read of the CPU's expert kernel moves half the bytes of the float32 dense blob. Weights that are not
bfloat16 values (a float32 checkpoint) are rounded to the nearest one (ties to even): then it is a quantization
like fp8 and int4, exact against the same format with every expert resident.

Where the model computes in bfloat16 (the GPU's default dtype) the dense format already stores bf16: there
`make_format("bf16", ...)` returns the dense format itself. A float16 model is refused (its experts would be
rounded twice); so is CUDA with a float32 model (the Triton decode kernels read weights in the activation dtype).

Computed by the native CPU kernel (cpu/native/experts.c, its VM_BF16 rows: a bf16 is the high half of a float32)
and by torch through `dequantize` (exact: bf16 -> float32 loses nothing), in the eager and fast steps' CPU bodies
and the prefill.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import no_more_knobs, register
from .dense import DenseFormat


class Bf16Format:
    name = "bf16"
    kernel = -1                 # no Triton variant: CUDA runs a bf16 model's experts as the dense format
    plain = True                # the dense layout, in bfloat16

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype | None, **knobs):
        no_more_knobs(self.name, knobs)
        if dtype is not None and dtype != torch.float32:
            raise UserError(f"--expert-format bf16 stores experts for a float32 model, and this one computes in "
                            f"{str(dtype).replace('torch.', '')}",
                            "use --expert-format dense (or load the model in float32: --dtype float32)")
        self.hidden, self.inter, self.dtype = hidden, inter, dtype or torch.float32
        self.pool_dtype = torch.bfloat16
        self._dense = DenseFormat(hidden, inter, torch.bfloat16)    # the layout, in bfloat16
        self.numel, self.nbytes = self._dense.numel, self._dense.nbytes

    def spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Bf16Format(H={self.hidden}, I={self.inter}, computed in {self.dtype})"

    def quantize(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self._dense.quantize(gate_up, down, out)             # copy_ rounds to nearest even

    def dequantize(self, blobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blobs [N, numel] -> (gate_up [N, 2I, H], down [N, H, I]) in float32: copies, exact."""
        gu, dn = self._dense.views(blobs)
        return gu.to(self.dtype), dn.to(self.dtype)

    def check(self, reader, prefix: str, num_experts: int) -> None:
        reader.check_layer(prefix, num_experts)

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        return self._dense.read(reader, prefix, expert, out)


def make_bf16(hidden: int, inter: int, dtype: torch.dtype | None, **knobs):
    """`bf16`: the dense format where the model computes in bfloat16, Bf16Format otherwise."""
    if dtype == torch.bfloat16:
        no_more_knobs("bf16", knobs)
        return DenseFormat(hidden, inter, dtype)
    return Bf16Format(hidden, inter, dtype, **knobs)


register("bf16", make_bf16)
