"""The int4 expert format: 4-bit weights, one scale (and, asymmetric, one zero point) per group of `group` input
columns, as `compressed-tensors`' `pack-quantized` w4a16 layout stores them (what llm-compressor writes and vLLM
loads). Quantizing and packing use the `compressed-tensors` package itself, so a checkpoint this module writes is
one that package reads, and the other way round.

    # H hidden, I expert intermediate, g group size, ng(n) = ceil(n / g)
    blob [nbytes] uint8:
      q        gate_up [2I, H/2] | down [H, I/2]: two 4-bit values a byte, column 2j in the low nibble, 2j+1 in
               the high one (the byte order of compressed-tensors' int32 words on a little-endian host), stored
               unsigned (q + 8)
      scales   (16-byte boundary) float32: gate_up [2I, ng(H)] | down [H, ng(I)]
      zeros    uint8: gate_up [2I, ng(H)] | down [H, ng(I)], unsigned (zero point + 8; 8 when symmetric)
      padding  to 512 bytes
    w[r, c] = (q[r, c] - zero[r, c // g]) * scale[r, c // g]

Quantizing rounds to nearest by compressed-tensors' own rule, or with the knob `rounding=hqq` fits each group's
scale and zero point by half-quadratic optimisation (formats/hqq.py); the blob is the same either way.
Scales are kept in float32 whatever the checkpoint stores, so reading is exact.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import (ALIGN_BYTES, align, cdiv, check_stored, int_knob, kernels_knob, kernels_spec, no_more_knobs,
                   pad_experts, register)

# the decode kernels' default variant: on an H100 (python -m vismmoe.bench.quant_kernels --quick, 2026-12-07) int4's
# v3 kernels took 17.2 us a token (gate_up + down, top-8, H 2048, I 768) against 32.3 for v1 and 31.4 for dense
# (v2, since removed: docs/quantization.md)
KERNELS_DEFAULT = "v3"


GROUPS = (16, 32, 64, 128)      # group sizes (columns per scale) this format takes
ROUNDINGS = ("rtn", "hqq")      # round to nearest (compressed-tensors' rule), HQQ-style (formats/hqq.py)


def quantize_groups(w: torch.Tensor, group: int, sym: bool, rounding: str = "rtn"):
    """w [R, C] -> (q int8 [R, C] in [-8, 7], scale [R, ng(C)], zero int8 [R, ng(C)]) by `rounding`."""
    if rounding == "hqq":
        from .hqq import hqq_quantize
        return hqq_quantize(w, group, sym)
    return group_quantize(w, group, sym)


def _ct():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from compressed_tensors.quantization.utils.helpers import calculate_qparams
    except ImportError:                 # pragma: no cover - a dependency of the package
        raise UserError("the int4 expert format needs the compressed-tensors package",
                        "pip install compressed-tensors") from None
    return pack_to_int32, unpack_from_int32, QuantizationArgs, quantize, calculate_qparams


def ct_args(group: int, sym: bool):
    """compressed-tensors' QuantizationArgs of this format: int4 weights, group strategy."""
    return _ct()[2](num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group)


def group_quantize(w: torch.Tensor, group: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, C] -> (q [R, C] int8 in [-8, 7], scale [R, ng(C)] in w's dtype, zero [R, ng(C)] int8), by
    compressed-tensors' own min/max rule and rounding."""
    _, _, _, quantize, calculate_qparams = _ct()
    args = ct_args(group, sym)
    R, C = w.shape
    ng = cdiv(C, group)
    pad = torch.zeros(R, ng * group, dtype=w.dtype, device=w.device)
    pad[:, :C] = w
    g = pad.view(R, ng, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if C % group:                       # a partial last group: its padding must not widen the range
        tail = w[:, (ng - 1) * group:]
        lo[:, -1], hi[:, -1] = tail.amin(dim=-1), tail.amax(dim=-1)
    scale, zero = calculate_qparams(lo, hi, args)
    q = quantize(x=pad, scale=scale, zero_point=zero, args=args, dtype=torch.int8)[:, :C]
    return q, scale, zero.to(torch.int8)


class Int4Format:
    name = "int4"
    kernel = 2
    plain = False
    pool_dtype = torch.uint8

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, **knobs):
        self.group = int_knob(self.name, knobs, "group", 128, GROUPS)
        self.sym = bool(int_knob(self.name, knobs, "sym", 1, (0, 1)))
        self.rounding = knobs.pop("rounding", "rtn")
        if self.rounding not in ROUNDINGS:
            raise UserError(f"expert format int4: rounding={self.rounding} is not supported",
                            f"use rounding= one of {', '.join(ROUNDINGS)}")
        self.kernels = kernels_knob(self.name, knobs, KERNELS_DEFAULT)
        no_more_knobs(self.name, knobs)
        if hidden % self.group or inter % self.group:
            fit = [str(g) for g in GROUPS if not hidden % g and not inter % g]
            raise UserError(f"expert format int4 with group {self.group} needs hidden {hidden} and intermediate "
                            f"{inter} to be multiples of the group (compressed-tensors' rule)",
                            f"use group={' or group='.join(fit)} (the groups that divide both), or fp8" if fit else
                            f"no int4 group ({', '.join(str(g) for g in GROUPS)}) divides both: use fp8")
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        H, I, g = hidden, inter, self.group
        self.ngH, self.ngI = cdiv(H, g), cdiv(I, g)
        self.q_gu, self.q_dn = 2 * I * H // 2, H * I // 2                    # bytes
        self.n_gu, self.n_dn = 2 * I * self.ngH, H * self.ngI                 # groups
        self.s_off = align(self.q_gu + self.q_dn, 16)
        self.z_off = self.s_off + 4 * (self.n_gu + self.n_dn)
        self.nbytes = align(self.z_off + self.n_gu + self.n_dn, ALIGN_BYTES)
        self.numel = self.nbytes

    def spec(self) -> str:
        return f"{self.name}:group={self.group},sym={int(self.sym)}" + \
            (",rounding=hqq" if self.rounding == "hqq" else "") + kernels_spec(self.kernels, KERNELS_DEFAULT)

    def __repr__(self) -> str:
        return f"Int4Format(H={self.hidden}, I={self.inter}, group={self.group}, sym={self.sym}, compute {self.dtype})"

    def _parts(self, blobs: torch.Tensor):
        N, H, I = blobs.shape[0], self.hidden, self.inter
        qgu = blobs[:, : self.q_gu].view(N, 2 * I, H // 2)
        qdn = blobs[:, self.q_gu: self.q_gu + self.q_dn].view(N, H, I // 2)
        s = blobs[:, self.s_off: self.z_off].view(torch.float32)
        z = blobs[:, self.z_off: self.z_off + self.n_gu + self.n_dn]
        return (qgu, s[:, : self.n_gu].view(N, 2 * I, self.ngH), z[:, : self.n_gu].view(N, 2 * I, self.ngH),
                qdn, s[:, self.n_gu:].view(N, H, self.ngI), z[:, self.n_gu:].view(N, H, self.ngI))

    def _unpack(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """q [N, R, C/2] uint8, s, z [N, R, ng] -> w [N, R, C] in `dtype`; (q - z) * s in float32."""
        vals = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2).float()          # [N, R, C]
        C = vals.shape[-1]
        zs = z.float().repeat_interleave(self.group, dim=-1)[..., :C]
        ss = s.repeat_interleave(self.group, dim=-1)[..., :C]
        return ((vals - zs) * ss).to(self.dtype)

    def dequantize(self, blobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qgu, sgu, zgu, qdn, sdn, zdn = self._parts(blobs)
        return self._unpack(qgu, sgu, zgu), self._unpack(qdn, sdn, zdn)

    def _store(self, out: torch.Tensor, gu: tuple, dn: tuple) -> torch.Tensor:
        """(q int8 [N, R, C], scale [N, R, ng], zero int8 [N, R, ng]) of gate_up and down into `out`."""
        qgu, sgu, zgu, qdn, sdn, zdn = self._parts(out)
        out[:, self.q_gu + self.q_dn: self.s_off].zero_()
        out[:, self.z_off + self.n_gu + self.n_dn:].zero_()
        for (q, s, z), qd, sd, zd in ((gu, qgu, sgu, zgu), (dn, qdn, sdn, zdn)):
            u = (q.to(torch.int16) + 8).to(torch.uint8)
            qd.copy_(u[..., 0::2] | (u[..., 1::2] << 4))
            sd.copy_(s)
            zd.copy_((z.to(torch.int16) + 8).to(torch.uint8))
        return out

    def quantize(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        gate_up, down = pad_experts(gate_up, down, self.inter)
        N = gate_up.shape[0]
        parts = []
        for w in (gate_up, down):
            q, s, z = quantize_groups(w.reshape(-1, w.shape[-1]), self.group, self.sym, self.rounding)
            parts.append((q.view(w.shape), s.float().view(N, w.shape[1], -1), z.view(N, w.shape[1], -1)))
        return self._store(out, *parts)

    def stored(self) -> list[tuple[str, tuple[int, int], tuple[str, ...]]]:
        """(suffix, shape, dtypes) of each tensor of one expert in compressed-tensors' pack-quantized layout."""
        H, I, g = self.hidden, self.inter, self.group
        out = []
        for proj, (R, C) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            out += [(f"{proj}.weight_packed", (R, cdiv(C, 8)), ("I32",)),
                    (f"{proj}.weight_scale", (R, cdiv(C, g)), ("BF16", "F16", "F32"))]
            if not self.sym:
                out.append((f"{proj}.weight_zero_point", (cdiv(R, 8), cdiv(C, g)), ("I32",)))
        return out

    def check(self, reader, prefix: str, num_experts: int) -> None:
        check_stored(self, reader, prefix, num_experts)

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        """compressed-tensors pack-quantized: `{prefix}.{e}.{gate,up,down}_proj.weight_packed` I32 [out, in/8],
        `.weight_scale [out, ng(in)]`, `.weight_zero_point` I32 [ceil(out/8), ng(in)] (asymmetric only)."""
        _, unpack_from_int32, _, _, _ = _ct()
        H, I, g = self.hidden, self.inter, self.group
        per = 2 if self.sym else 3
        specs = self.stored()
        got = []
        for i, (R, C) in enumerate(((I, H), (I, H), (H, I))):
            mine = specs[i * per:(i + 1) * per]
            packed, s = (reader.expert_tensor(prefix, expert, *spec) for spec in mine[:2])
            s = s.float()
            if not torch.isfinite(s).all():
                raise UserError(f"{reader.expert_key(prefix, expert, mine[1][0])} has NaN or Inf values",
                                "the checkpoint's scales are damaged; restore it")
            q = unpack_from_int32(packed, 4, torch.Size((R, C)))
            if self.sym:
                z = torch.zeros(R, cdiv(C, g), dtype=torch.int8)
            else:
                zp = reader.expert_tensor(prefix, expert, *mine[2])
                z = unpack_from_int32(zp, 4, torch.Size((R, cdiv(C, g))), packed_dim=0)
            got.append((q, s, z))
        (qg, sg, zg), (qu, su, zu), dn = got
        gu = (torch.cat([qg, qu])[None], torch.cat([sg, su])[None], torch.cat([zg, zu])[None])
        return self._store(out[None], gu, tuple(t[None] for t in dn))[0]


register("int4", Int4Format)
