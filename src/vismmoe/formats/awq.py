"""AutoAWQ's GEMM checkpoint layout: 4-bit linears read into the int4 expert format (formats/int4.py) and written
from it. This module owns the layout (config, packing, tensor names and shapes), not a format: its experts run as
`int4:group=g,sym=0`, the blob compressed-tensors checkpoints are read into.

    quantization_config  {quant_method: awq, bits: 4, group_size: g, zero_point: true, version: gemm}
    per linear {name} of in_features C, out_features R (AWQ keeps nn.Linear's weight TRANSPOSED, [in, out]):
      {name}.qweight   int32 [C, R/8]      8 unsigned nibbles a word, interleaved: nibble i (bits 4i..4i+3) of
                                           word c holds column 8c + AWQ_ORDER[i]
      {name}.qzeros    int32 [C/g, R/8]    the zero points, packed the same way
      {name}.scales    fp16 [C/g, R]
      w[c, r] = (q[c, r] - z[c // g, r]) * s[c // g, r]
    experts: `{prefix}.{e}.{gate,up,down}_proj.{qweight,qzeros,scales}` (the names compressed-tensors checkpoints
    use for `.weight_packed`), the routers, norms, embeddings, lm_head and vision tower unquantized
    (`modules_to_not_convert`)

Reading is exact, with nothing to round: the int4 blob keeps each weight as an unsigned nibble and each zero point
as a uint8, w = (q - z) * s with s in float32, and AWQ's q and z are the same unsigned 4-bit numbers (compressed-
tensors' signed q and z are stored in the blob offset by 8, so both layouts meet in one blob), while an fp16 (or
bf16) scale is exactly a float32. Only a non-finite scale is refused. `zero_point: false` is refused: AutoAWQ's
GEMM packer asserts zero points (its symmetric quantizer has none to pack), so no such GEMM checkpoint exists to
define what its nibbles would mean. Linears outside the experts (attention, in the published releases) are
dequantized once at load (`dequantize_linear`, called by checkpoint.dequantized_tensors).

Writing (`vismmoe quantize --format int4 --layout awq`) quantizes each linear from its fp16 values, as AutoAWQ
quantizes an fp16 model, by the int4 format's own rule (round to nearest or HQQ, asymmetric): the file holds fp16
scales, and an fp16 checkpoint's AWQ file loads into the very blobs `--expert-format int4:sym=0` makes from it. It
writes the layout, not AWQ's activation-aware scale search (which needs calibration data).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import check_stored

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)        # nibble i of a word holds column 8c + AWQ_ORDER[i] (AutoAWQ's pack)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)      # column 8c + j sits in nibble AWQ_REVERSE[j] (its unpack)
_VERSIONS = {"gemv": "AutoAWQ's GEMV layout", "gemv_fast": "AutoAWQ's fast GEMV layout",
             "exllama": "the ExLlama layout", "marlin": "the Marlin layout", "ipex": "the IPEX layout"}
_FIX = "vismmoe reads AutoAWQ checkpoints of version gemm, bits 4, zero_point true, group size 16/32/64/128"
SCALE_DTYPES = ("F16", "BF16", "F32")
_DTYPES = {"I32": torch.int32, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def stored_spec(qc) -> str:
    """The int4 spec of an AWQ `quantization_config` (`int4:group=g,sym=0`); UserError naming what is not the
    GEMM layout of 4-bit weights with zero points in a group size the int4 format takes."""
    from .int4 import GROUPS
    bits = _get(qc, "bits", _get(qc, "w_bit"))
    group = _get(qc, "group_size", _get(qc, "q_group_size"))
    version = str(_get(qc, "version", "gemm") or "gemm").lower()
    if version != "gemm":
        what = _VERSIONS.get(version, f"version {version!r}")
        raise UserError(f"AWQ checkpoint in {what} (version {version}) is not supported", _FIX)
    if bits != 4:
        raise UserError(f"AWQ checkpoint with {bits}-bit weights is not supported", _FIX)
    if group not in GROUPS:
        raise UserError(f"AWQ checkpoint with group size {group} is not supported", _FIX)
    if not _get(qc, "zero_point", True):
        raise UserError("AWQ checkpoint with zero_point false is not supported (AutoAWQ's GEMM layout always "
                        "stores zero points)", _FIX)
    return f"int4:group={group},sym=0"


def group_of(spec: str) -> int:
    """The group size of an int4 spec (`int4:group=128,sym=0` -> 128)."""
    knobs = dict(kv.split("=") for kv in spec.partition(":")[2].split(",") if "=" in kv)
    return int(knobs.get("group", 128))


# ---- packing ---------------------------------------------------------------------------------------------------
def pack(v: torch.Tensor) -> torch.Tensor:
    """v [R, C] integers in 0..15 (C a multiple of 8) -> int32 [R, C/8] in AWQ's interleaved nibble order."""
    R, C = v.shape
    cols = v.to(torch.int64).view(R, C // 8, 8)[..., list(AWQ_ORDER)]          # nibble i <- column AWQ_ORDER[i]
    word = (cols << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)          # < 2^32
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack(p: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] packed by `pack` -> uint8 [R, 8W] in 0..15, columns in their natural order."""
    shifts = 4 * torch.tensor(AWQ_REVERSE, dtype=torch.int64)                  # column j <- nibble AWQ_REVERSE[j]
    return ((p.to(torch.int64)[..., None] >> shifts) & 0xF).to(torch.uint8).flatten(-2)


# ---- one linear ------------------------------------------------------------------------------------------------
def linear_shapes(R: int, C: int, group: int) -> list[tuple[str, tuple[int, int], tuple[str, ...]]]:
    """(suffix, shape, dtypes) of a linear of out_features R and in_features C in the GEMM layout."""
    return [("qweight", (C, R // 8), ("I32",)), ("qzeros", (C // group, R // 8), ("I32",)),
            ("scales", (C // group, R), SCALE_DTYPES)]


def _checked(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int):
    """(q uint8 [R, C], z uint8 [R, C/g], s float32 [R, C/g]) of one linear in nn.Linear's orientation; UserError
    naming the tensor whose dtype, shape or values do not fit."""
    if scales.dim() != 2 or qweight.dim() != 2 or qzeros.dim() != 2:
        raise UserError(f"{name}: AWQ tensors qweight, qzeros, scales must be 2-D", "the checkpoint is damaged; "
                        "restore it")
    R = scales.shape[1]
    C = qweight.shape[0]
    for suffix, t, (_, shape, dtypes) in zip(("qweight", "qzeros", "scales"), (qweight, qzeros, scales),
                                             linear_shapes(R, C, group)):
        if R % 8 or C % group or tuple(t.shape) != shape or t.dtype not in [_DTYPES[d] for d in dtypes]:
            raise UserError(f"{name}.{suffix} has shape {list(t.shape)} ({t.dtype}) where AWQ's GEMM layout with "
                            f"group {group} needs {list(shape)}", "the checkpoint is damaged or not AWQ GEMM; "
                            "restore it")
    s = scales.float()
    if not torch.isfinite(s).all():
        raise UserError(f"{name}.scales has NaN or Inf values", "the checkpoint's scales are damaged; restore it")
    return unpack(qweight).t(), unpack(qzeros).t(), s.t()


def dequantize_linear(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group: int) -> torch.Tensor:
    """One AWQ linear -> its weight [out, in] float32, w = (q - z) * s. UserError naming the tensor of a wrong
    shape or dtype, or scales with NaN/Inf."""
    q, z, s = _checked(name, qweight, qzeros, scales, group)
    return (q.float() - z.float().repeat_interleave(group, dim=1)) * s.repeat_interleave(group, dim=1)


def awq_tensors(name: str, w: torch.Tensor, group: int, rounding: str = "rtn") -> dict[str, torch.Tensor]:
    """Weight w [out R, in C] of linear `name` quantized (asymmetric, from its fp16 values) into the GEMM layout's
    tensors. UserError when R is not a multiple of 8, C not one of `group`, or a weight does not fit fp16."""
    from .int4 import quantize_groups
    R, C = w.shape
    if R % 8 or C % group:
        raise UserError(f"{name}: {R} x {C} does not fit AWQ's GEMM layout with group {group} (out a multiple "
                        f"of 8, in a multiple of the group)", "use a group that divides the sizes, or --layout "
                        "compressed-tensors")
    h = w.to(torch.float16)
    if not torch.isfinite(h).all():
        raise UserError(f"{name} holds values beyond fp16's range, which AWQ's fp16 scales cannot hold",
                        "use --layout compressed-tensors")
    q, s, z = quantize_groups(h, group, False, rounding)          # signed [-8, 7], fp16, signed zero points
    return {f"{name}.qweight": pack((q.to(torch.int16) + 8).t().contiguous()),
            f"{name}.qzeros": pack((z.to(torch.int16) + 8).t().contiguous()),
            f"{name}.scales": s.to(torch.float16).t().contiguous()}


# ---- experts ---------------------------------------------------------------------------------------------------
class AwqExperts:
    """Reads experts stored in AWQ's GEMM layout into blobs of `fmt` (an asymmetric Int4Format): the `source` of a
    store (store.HostStore.from_checkpoint, store.DiskStore), as the format itself is for compressed-tensors."""

    def __init__(self, fmt):
        if fmt.name != "int4" or fmt.sym:
            raise UserError(f"an AWQ checkpoint's experts run as int4 with zero points, not {fmt.spec()}",
                            "drop --expert-format")
        self.fmt = fmt
        self.name = "AWQ"
        self.inter = fmt.inter

    def stored(self) -> list[tuple[str, tuple[int, int], tuple[str, ...]]]:
        """(suffix, shape, dtypes) of each tensor of one expert: gate_proj, up_proj, down_proj in that order."""
        H, I, g = self.fmt.hidden, self.fmt.inter, self.fmt.group
        out = []
        for proj, (R, C) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            out += [(f"{proj}.{suffix}", shape, dtypes) for suffix, shape, dtypes in linear_shapes(R, C, g)]
        return out

    def check(self, reader, prefix: str, num_experts: int) -> None:
        """Every expert of layer `prefix` stored as `read` needs it (headers only); UserError naming the first
        tensor that is missing or misshapen."""
        check_stored(self, reader, prefix, num_experts)

    def read(self, reader, prefix: str, expert: int, out: torch.Tensor) -> torch.Tensor:
        """One expert's `{gate,up,down}_proj.{qweight,qzeros,scales}` -> `out [numel]`, the int4 blob whose
        dequantized weights equal AWQ's (q - z) * s bit for bit in float32."""
        specs = self.stored()
        got = []
        for i in range(3):
            qw, qz, s = (reader.expert_tensor(prefix, expert, *spec) for spec in specs[3 * i:3 * i + 3])
            name = reader.expert_key(prefix, expert, specs[3 * i][0]).removesuffix(".qweight")
            q, z, s = _checked(name, qw, qz, s, self.fmt.group)
            got.append(((q.to(torch.int16) - 8).to(torch.int8), s.contiguous(), (z.to(torch.int16) - 8).to(torch.int8)))
        (qg, sg, zg), (qu, su, zu), dn = got
        gu = (torch.cat([qg, qu])[None], torch.cat([sg, su])[None], torch.cat([zg, zu])[None])
        return self.fmt._store(out[None], gu, tuple(t[None] for t in dn))[0]
