"""The expert format seam: how one routed expert is stored as bytes, read from a checkpoint, and computed.

    ExpertFormat (protocol)      one per (format, hidden H, intermediate I, activation dtype)
      blob                       ONE contiguous, 512-byte aligned row of `numel` elements of `pool_dtype`
                                 (packed weights, then scales and zero points): a miss is one copy, a slot one
                                 row of the pool `[S, numel]`
      quantize(gate_up, down)    dense weights [N, 2I, H], [N, H, I] -> blobs [N, numel] (round to nearest)
      dequantize(blobs)          blobs [N, numel] -> (gate_up [N, 2I, H], down [N, H, I]) in the activation
                                 dtype: the torch reference every kernel is tested against, and the prefill's
                                 input to `grouped_mm`
      read(reader, prefix, e)    one expert of a checkpoint stored in this format -> its blob
      kernel                     the id of its variant in moe_kernel's Triton kernels (decode over the address
                                 table; prefill dequantizes the wave's slots, then `grouped_mm`)

The cache, transfer engine, policies, prefetch and link emulation deal in blobs, bytes and slots only: they never
look inside a blob. Adding a format is one module with a class matching `ExpertFormat`, a `register` line, and a
kernel variant in moe_kernel.py (for the GPU) and in cpu/native/ (`params`, for the native CPU kernel); a format
without a GPU variant (`kernel = -1`, bf16) is refused on CUDA at load.

Formats are named by a spec `name[:knob=value,...]` (config.split_spec's grammar): `dense`, `fp8`, `int4`,
`int4:group=64,sym=0`; the quantized ones take `kernels=v1|v3` (which variant of their decode kernels runs, to time
one against another: same blob, same values up to summation order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ..config import split_spec
from ..errors import UserError

ALIGN_BYTES = 512           # every blob is padded to a multiple of this many bytes: the CUDA caching
                            # allocator rounds blocks to 512 B, so a pool of whole blobs takes exactly its bytes


def align(n: int, to: int = ALIGN_BYTES) -> int:
    return -(-n // to) * to


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@runtime_checkable
class ExpertFormat(Protocol):
    name: str                   # registry name ("dense", "fp8", "int4")
    kernel: int                 # variant id of moe_kernel's Triton kernels (-1: none, the CPU only: bf16)
    plain: bool                 # the blob is the weights themselves in pool_dtype (gate_up | down, no scales):
                                # scanned as they are for NaN/Inf, read by the native kernel as float rows
    hidden: int                 # H
    inter: int                  # I (an expert narrower than I is zero-padded: ERNIE's vision bank)
    dtype: torch.dtype          # activation / compute dtype (dense weights are stored in it)
    pool_dtype: torch.dtype     # element type of blobs: the dtype of the pool, host buffers and staging ring
    numel: int                  # elements of pool_dtype per blob
    nbytes: int                 # bytes per blob (numel * pool_dtype.itemsize)

    def spec(self) -> str:
        """The spec string that names this format with its knobs (`int4:group=128,sym=1`)."""

    def quantize(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Dense experts gate_up [N, 2I, H], down [N, H, I] (any float dtype; narrower i < I zero-padded) ->
        `out [N, numel]` filled and returned."""

    def dequantize(self, blobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blobs [N, numel] -> (gate_up [N, 2I, H], down [N, H, I]) in `dtype` (views for the dense format)."""

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        """One expert of `prefix` as a checkpoint stores it (a UserError when the stored tensors do not belong
        to this format) -> `out [numel]` filled and returned."""

    def check(self, reader, prefix: str, num_experts: int) -> None:
        """Every expert of layer `prefix` is stored as `read` needs it (file headers only); UserError naming the
        first tensor that is missing or misshapen."""


_FORMATS: dict[str, Callable[..., ExpertFormat]] = {}


def register(name: str, factory: Callable[..., ExpertFormat]) -> None:
    """Make `factory(hidden, inter, dtype, **knobs)` available as format `name`."""
    _FORMATS[name] = factory


def names() -> list[str]:
    return sorted(_FORMATS)


def make_format(spec: str, hidden: int, inter: int, dtype: torch.dtype) -> ExpertFormat:
    """The format a spec names, for experts of hidden size `hidden` and intermediate size `inter`.
    UserError for an unknown name or knob, or a knob value the format cannot take."""
    name, items = split_spec(spec or "dense")
    factory = _FORMATS.get(name)
    if factory is None:
        raise UserError(f"unknown expert format {name!r}", f"use --expert-format one of {', '.join(names())}")
    knobs = {}
    for key, value, item in items:
        if not key or not value:
            raise UserError(f"bad expert format knob {item!r} in {spec!r}", "write knobs as name:knob=value,...")
        if key in knobs:                # the later value silently won
            raise UserError(f"expert format knob {key!r} given twice in {spec!r}", "give each knob once")
        knobs[key] = value
    return factory(hidden, inter, dtype, **knobs)


def int_knob(fmt: str, knobs: dict, key: str, default: int, allowed: tuple[int, ...]) -> int:
    """Knob `key` of format `fmt` as an int among `allowed`; UserError otherwise."""
    raw = knobs.pop(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value not in allowed:
        raise UserError(f"expert format {fmt}: {key}={raw} is not supported",
                        f"use {key} one of {', '.join(map(str, allowed))}")
    return value


KERNELS = ("v1", "v3")          # the decode kernels' variants of a quantized format (step/quant_kernels.py)


def kernels_knob(fmt: str, knobs: dict, default: str) -> str:
    """Knob `kernels` of a quantized format: which variant of its decode kernels runs (`KERNELS`; `default` is the
    one that measured fastest for the format, docs/quantization.md); the blob is the same."""
    value = knobs.pop("kernels", default)
    if value not in KERNELS:
        raise UserError(f"expert format {fmt}: kernels={value} is not supported",
                        "use " + " or ".join(f"kernels={k}" for k in KERNELS))
    return value


def kernels_spec(kernels: str, default: str, first: bool = False) -> str:
    """The spec suffix naming a non-default kernels knob ("" for the default)."""
    return "" if kernels == default else ("," if not first else ":") + f"kernels={kernels}"


def no_more_knobs(fmt: str, knobs: dict) -> None:
    if knobs:
        raise UserError(f"expert format {fmt} has no knob {next(iter(knobs))!r}",
                        f"see `vismmoe generate --help` for the knobs of {fmt}")


def pad_experts(gate_up: torch.Tensor, down: torch.Tensor, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts narrower than the slot (i < I: ERNIE's vision bank beside its text bank) zero-padded to I: gate
    rows [0, i), up rows [I, I + i), down columns [0, i). Padded rows give gate = up = 0, SiLU(0) * 0 = 0, and zero
    down columns add nothing: it computes what the narrow expert computes. gate_up [N, 2i, H], down [N, H, i]."""
    i = gate_up.shape[-2] // 2
    if i == inter:
        return gate_up, down
    N, H = gate_up.shape[0], gate_up.shape[-1]
    gu = gate_up.new_zeros(N, 2 * inter, H)
    dn = down.new_zeros(N, H, inter)
    gu[:, :i] = gate_up[:, :i]
    gu[:, inter:inter + i] = gate_up[:, i:]
    dn[:, :, :i] = down
    return gu, dn


def check_stored(fmt, reader, prefix: str, num_experts: int) -> None:
    """`check` of a quantized format stored split per expert: every tensor of `fmt.stored(...)` in the headers."""
    if reader._inter(prefix) != fmt.inter:
        raise UserError(f"{prefix}: experts of intermediate size {reader._inter(prefix)} beside {fmt.inter} "
                        f"(two banks of different widths) are not read from {fmt.name} checkpoints",
                        "quantize while loading instead: give the dense checkpoint and --expert-format")
    for e in range(num_experts):
        for suffix, shape, dtypes in fmt.stored():
            reader.expert_header(prefix, e, suffix, shape, dtypes)


class QuantizeOnRead:
    """The source of a run whose checkpoint is dense and whose format is not (`--expert-format` on a dense
    checkpoint): each expert is read dense and quantized into `fmt`'s blob, in the dtype it is stored in (the rule
    `vismmoe quantize` writes files by, so both give the same blobs)."""

    def __init__(self, fmt: ExpertFormat):
        self.fmt = fmt

    def check(self, reader, prefix: str, num_experts: int) -> None:
        reader.check_layer(prefix, num_experts)

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        gu, dn = reader.read(prefix, expert)
        return self.fmt.quantize(gu[None], dn[None], out[None])[0]
