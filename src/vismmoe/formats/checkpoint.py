"""What a checkpoint says of its own quantization, and the expert format a run uses.

    config.json `quantization_config`        -> the stored expert format (None: dense)
      quant_method fp8, fmt e4m3, dynamic activations, weight_block_size [128, 128]     -> fp8
      quant_method compressed-tensors, format pack-quantized, int4 group weights, no activation quantization
                                                                                         -> int4:group=g,sym=s
      quant_method awq, bits 4, zero_point true, version gemm (AutoAWQ's GEMM layout, formats/awq.py)
                                                                                         -> int4:group=g,sym=0
    --expert-format (auto | dense | fp8 | int4[:knobs]) + the stored format -> the run's format
      a dense checkpoint: any format (quantized while loading, round to nearest)
      a quantized checkpoint: its own format only (re-quantizing quantized weights would compound their error)

Each checkpoint layout is a row of `LAYOUTS`: its config's parser, and the reader of its experts into the
format's blobs where the format does not read the layout itself (`expert_source`: AWQ's).

Non-expert weights that a quantized checkpoint stores quantized (Qwen's FP8 releases quantize the attention
linears too, and AWQ releases theirs) are dequantized once at load into the model's dtype (`dequantized_tensors`):
they are read once and stay resident, so their format saves no link bytes. Anything this module cannot read is a
one-line UserError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import UserError
from . import awq
from .base import ExpertFormat, QuantizeOnRead, cdiv
from .fp8 import F8, block_dequantize
from .int4 import GROUPS

_FIX = "vismmoe reads fp8 (e4m3, 128x128 blocks, dynamic activations), compressed-tensors pack-quantized int4 " \
       "(group 16/32/64/128) and AWQ (gemm, 4-bit, zero points) checkpoints"


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _fp8_spec(qc) -> str:
    fmt, act = _get(qc, "fmt", "e4m3"), _get(qc, "activation_scheme", "dynamic")
    block = list(_get(qc, "weight_block_size") or [])
    if fmt != "e4m3":
        raise UserError(f"fp8 checkpoint with fmt {fmt!r} is not supported", _FIX)
    if act != "dynamic":
        raise UserError(f"fp8 checkpoint with activation_scheme {act!r} is not supported", _FIX)
    if block != [128, 128]:
        raise UserError(f"fp8 checkpoint with weight_block_size {block or None} is not supported", _FIX)
    return "fp8"


def _ct_spec(qc) -> str:
    form = _get(qc, "format")
    groups = _get(qc, "config_groups") or {}
    if form != "pack-quantized" or not groups:
        raise UserError(f"compressed-tensors checkpoint in format {form!r} is not supported", _FIX)
    specs = set()
    for name, group in groups.items():
        w = _get(group, "weights") or {}
        bits, kind, strategy = _get(w, "num_bits"), _get(w, "type", "int"), _get(w, "strategy")
        size, sym = _get(w, "group_size"), _get(w, "symmetric", True)
        if bits != 4 or kind != "int":
            raise UserError(f"compressed-tensors group {name}: {bits}-bit {kind} weights are not supported", _FIX)
        if strategy != "group" or size not in GROUPS:
            raise UserError(f"compressed-tensors group {name}: strategy {strategy!r} with group size {size} is "
                            "not supported", _FIX)
        if _get(group, "input_activations"):
            raise UserError(f"compressed-tensors group {name} quantizes activations (only w4a16 is supported)",
                            _FIX)
        specs.add(f"int4:group={size},sym={int(bool(sym))}")
    if len(specs) > 1:
        raise UserError(f"compressed-tensors checkpoint mixes weight schemes ({', '.join(sorted(specs))})", _FIX)
    return specs.pop()


# The checkpoint layouts read: quant_method -> (its config -> the expert format spec, the reader of its experts
# into that format's blobs; None: the format's own `read`)
LAYOUTS: dict[str, tuple[Callable, Callable | None]] = {
    "fp8": (_fp8_spec, None),
    "compressed-tensors": (_ct_spec, None),
    "awq": (awq.stored_spec, awq.AwqExperts),
}


def _quantization_config(config):
    return _get(config, "quantization_config") or \
        _get(_get(config, "text_config", {}) or {}, "quantization_config")


def stored_format(config) -> str | None:
    """The expert format spec a checkpoint's `quantization_config` declares (None: not quantized). UserError for a
    quantization this runtime cannot read (the method, bit width, group or block size named)."""
    qc = _quantization_config(config)
    if not qc:
        return None
    method = _get(qc, "quant_method")
    if method not in LAYOUTS:
        raise UserError(f"quantization method {method!r} is not supported", _FIX)
    return LAYOUTS[method][0](qc)


def expert_source(config, fmt: ExpertFormat):
    """What reads the checkpoint's routed experts into blobs of the run's format `fmt` (`check` and `read` as
    ExpertFormat has them): the format itself for a dense checkpoint run dense and for the layouts it reads
    (fp8, compressed-tensors), the layout's own reader (AWQ), or a quantization while loading (a dense checkpoint,
    a quantized `fmt`)."""
    qc = _quantization_config(config)
    if not qc:
        return fmt if fmt.name == "dense" else QuantizeOnRead(fmt)
    reader = LAYOUTS[_get(qc, "quant_method")][1]
    return fmt if reader is None else reader(fmt)


def run_format(asked: str | None, stored: str | None) -> str:
    """The format spec of a run from --expert-format (`asked`; None or "auto": the checkpoint's) and the
    checkpoint's own (`stored`)."""
    if asked in (None, "", "auto"):
        return stored or "dense"
    if stored is not None and asked.partition(":")[0] != stored.partition(":")[0]:
        raise UserError(f"--expert-format {asked} given for a checkpoint already quantized as {stored}",
                        f"drop --expert-format (the experts run as {stored}), or start from the dense checkpoint")
    return stored or asked


def dequantized_tensors(reader, stored: str | None, keys) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the checkpoint tensors `keys` with quantized linears of a quantized checkpoint turned
    back into `{name}.weight` (float32); their scale, zero-point and shape tensors are consumed."""
    keys = list(keys)
    present = set(keys)
    for key in keys:
        if stored == "fp8" and key.endswith(".weight_scale_inv"):
            continue
        if stored == "fp8" and key.endswith(".weight") and key + "_scale_inv" in present and \
                reader.dtype_name(key) == "F8_E4M3":
            q = reader.tensor(key).view(F8)
            s = reader.tensor(key + "_scale_inv").float()
            if s.shape != (cdiv(q.shape[0], 128), cdiv(q.shape[1], 128)) or not torch.isfinite(s).all():
                raise UserError(f"{key}_scale_inv has shape {list(s.shape)} or non-finite values",
                                "the checkpoint's scales are damaged; restore it")
            yield key, block_dequantize(q[None], s[None], 128, torch.float32)[0]
            continue
        if stored and stored.startswith("int4") and key.rpartition(".")[2] in \
                ("weight_scale", "weight_zero_point", "weight_shape"):
            continue
        if stored and stored.startswith("int4") and key.endswith(".weight_packed"):
            yield from _ct_dense(reader, key[: -len(".weight_packed")], stored, present)
            continue
        base, _, last = key.rpartition(".")
        if stored and stored.startswith("int4") and (last in ("qweight", "qzeros") or (
                last == "scales" and ({f"{base}.qweight", f"{base}.qzeros"} & present))):
            # AWQ GEMM linears (compressed-tensors names no tensor .qweight or .qzeros)
            missing = [f"{base}.{t}" for t in ("qweight", "qzeros", "scales") if f"{base}.{t}" not in present]
            if missing:
                raise UserError(f"the checkpoint has no tensor {missing[0]} beside {key}", "restore the checkpoint")
            if last == "qweight":
                w = awq.dequantize_linear(base, reader.tensor(key), reader.tensor(f"{base}.qzeros"),
                                          reader.tensor(f"{base}.scales"), awq.group_of(stored))
                yield f"{base}.weight", w
            continue
        yield key, reader.tensor(key)


def _ct_dense(reader, base: str, stored: str, present: set) -> Iterator[tuple[str, torch.Tensor]]:
    from .int4 import _ct
    _, unpack_from_int32, _, _, _ = _ct()
    knobs = dict(kv.split("=") for kv in stored.partition(":")[2].split(","))
    group = int(knobs["group"])
    shape = tuple(int(x) for x in reader.tensor(base + ".weight_shape").tolist())
    q = unpack_from_int32(reader.tensor(base + ".weight_packed"), 4, torch.Size(shape)).float()
    s = reader.tensor(base + ".weight_scale").float()
    if base + ".weight_zero_point" in present:
        z = unpack_from_int32(reader.tensor(base + ".weight_zero_point"), 4, torch.Size(s.shape), packed_dim=0).float()
    else:
        z = torch.zeros_like(s)
    if s.shape != (shape[0], cdiv(shape[1], group)) or not torch.isfinite(s).all():
        raise UserError(f"{base}.weight_scale has shape {list(s.shape)} or non-finite values",
                        "the checkpoint's scales are damaged; restore it")
    C = shape[1]
    w = (q - z.repeat_interleave(group, dim=1)[:, :C]) * s.repeat_interleave(group, dim=1)[:, :C]
    yield base + ".weight", w
