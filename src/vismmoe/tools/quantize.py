"""`vismmoe quantize`: a dense checkpoint written again with its routed experts quantized, in the layouts the hub
publishes, so users and tests have real quantized files.

    fp8    Qwen's FP8 releases: `quantization_config {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
           weight_block_size: [128, 128]}`; per expert `{prefix}.{e}.{gate,up,down}_proj.weight` F8_E4M3 and
           `.weight_scale_inv [ceil(out/128), ceil(in/128)]` float32 (a multiplier)
    int4   compressed-tensors `pack-quantized` w4a16 (what llm-compressor writes): `weight_packed` int32
           [out, in/8], `weight_scale [out, in/g]` (the weights' dtype), `weight_zero_point` int32 packed along
           dim 0 (asymmetric only), `weight_shape`; the config written by compressed-tensors' own classes
    int4 with `--layout awq`: AutoAWQ's GEMM layout (formats/awq.py), `quantization_config {quant_method: awq,
           bits: 4, group_size: g, zero_point: true, version: gemm}`; per linear `qweight` int32 [in, out/8],
           `qzeros` int32 [in/g, out/8], `scales` fp16 [in/g, out]; asymmetric, quantized from the fp16 weights

The experts are quantized by the format's own `quantize` (round to nearest, the rule `--expert-format` uses while
loading), so a checkpoint written here loads into the very blobs a load-time quantization makes. `--all-linears`
also quantizes the decoder's attention projections, as the published releases do (they are dequantized once at
load). Routers, norms, embeddings, lm_head and the vision tower stay as they are. Everything is written into a
temporary folder beside `--out` and renamed into place at the end (paths.atomic_dir), so an interrupted run leaves
nothing half written; an `--out` that exists and is not empty is refused unless `--force` (paths.new_dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..formats import make_format
from ..formats.awq import awq_tensors
from ..formats.checkpoint import stored_format
from ..paths import atomic_dir, new_dir

SHARD_BYTES = 2 * 1024**3
_ATTENTION = re.compile(r"layers\.\d+\.(self_attn|linear_attn)\.(q|k|v|o)_proj\.weight$")
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "chat_template.json", "preprocessor_config.json", "generation_config.json", "calibration.npz",
         "processor_config.json", "vocab.json", "merges.txt")


def _fp8_tensors(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    from ..formats.fp8 import block_quantize
    q, s = block_quantize(w.float()[None], 128)
    return {f"{name}.weight": q[0].contiguous(), f"{name}.weight_scale_inv": s[0].contiguous()}


def _int4_tensors(name: str, w: torch.Tensor, group: int, sym: bool, rounding: str = "rtn") -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from ..formats.int4 import quantize_groups
    q, s, z = quantize_groups(w, group, sym, rounding)
    out = {f"{name}.weight_packed": pack_to_int32(q.contiguous(), 4), f"{name}.weight_scale": s.contiguous(),
           f"{name}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
    if not sym:
        out[f"{name}.weight_zero_point"] = pack_to_int32(z.contiguous(), 4, packed_dim=0)
    return out


LAYOUTS = {"fp8": ("fp8",), "int4": ("compressed-tensors", "awq")}     # format -> the layouts it is written in


def _layout(spec: str, layout: str | None) -> tuple[str, str | None]:
    """(spec, layout) to write: `layout` None is the format's first; `awq` makes int4 asymmetric unless the spec
    says otherwise (AWQ stores zero points). UserError for a layout the format is not written in."""
    name = spec.partition(":")[0]
    if name not in LAYOUTS:             # dense or unknown: refused by the caller's own checks
        return spec, layout
    if layout is None:
        return spec, LAYOUTS[name][0]
    if layout not in LAYOUTS[name]:
        raise UserError(f"--layout {layout} does not hold --format {name} experts",
                        "use --layout awq or compressed-tensors with --format int4 (fp8 has one layout: drop "
                        "--layout)")
    if layout == "awq" and "sym=" not in spec:
        spec += ("," if ":" in spec else ":") + "sym=0"
    return spec, layout


def _awq_config(fmt, all_linears: bool) -> dict:
    # modules_to_not_convert: substrings of the module names left unquantized (transformers' rule)
    keep = ["lm_head", "visual", "vision", "mlp.gate", "mlp.up_proj", "mlp.down_proj", "shared_expert",
            "linear_attn"] + ([] if all_linears else ["self_attn"])
    return {"quant_method": "awq", "bits": 4, "group_size": fmt.group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": keep}


def _quantization_config(fmt, ignore: list[str], targets: list[str]) -> dict:
    if fmt.name == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128], "modules_to_not_convert": ignore}
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from ..formats.int4 import ct_args
    scheme = QuantizationScheme(targets=targets, weights=ct_args(fmt.group, fmt.sym))
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format=CompressionFormat.pack_quantized.value,
                             quantization_status="compressed", ignore=ignore)
    out = cfg.model_dump(exclude_none=True)
    out["quant_method"] = "compressed-tensors"
    return out


def quantize_checkpoint(model_dir: str, spec: str, out_dir: str, *, all_linears: bool = False, force: bool = False,
                        progress=None, layout: str | None = None) -> dict:
    """Write `model_dir` (a dense checkpoint) to `out_dir` with its routed experts in format `spec` (fp8, int4,
    int4:group=..,sym=..), in checkpoint layout `layout` (None: the format's own; int4: compressed-tensors or
    awq); see the module docstring. Returns a summary (files, bytes before and after)."""
    from ..engine.loading import read_config, read_model_type, skeleton
    from ..families import get_family
    from ..offload.store import CheckpointReader
    family = get_family(read_model_type(model_dir))
    config = read_config(model_dir)
    if stored_format(config) is not None:
        raise UserError(f"{model_dir} is already quantized ({stored_format(config)})",
                        "quantize the dense checkpoint it was made from")
    geo = family.geometry(config)
    spec, layout = _layout(spec, layout)
    fmt = make_format(spec, geo.hidden, geo.inter, torch.float32)
    if fmt.plain:                          # dense, bf16 (a dense checkpoint in bfloat16, how hub checkpoints come)
        raise UserError(f"--format {fmt.name} writes nothing new (a dense checkpoint is what it reads)",
                        "use --format fp8 or int4 (--expert-format bf16 stores a checkpoint's experts in bf16 "
                        "while loading)")
    if layout == "awq" and fmt.sym:
        raise UserError("--layout awq stores zero points (asymmetric int4), not sym=1",
                        "drop sym=1 (--layout awq writes int4:sym=0)")
    if family.expert_banks(config):
        raise UserError(f"{family.model_type} keeps experts of two widths; quantized checkpoints of it are not "
                        "written", "load the dense checkpoint with --expert-format instead")
    new_dir(out_dir, "--out", force, inputs={"--model": model_dir})
    model = skeleton(family, config)
    reader = CheckpointReader(model_dir, geo.hidden, geo.inter, rename=family.checkpoint_renamer(model))
    prefixes = [family.expert_prefix(l) for l in geo.moe_layers]
    for prefix in prefixes:
        reader.check_layer(prefix, geo.num_experts)

    def convert(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if fmt.name == "fp8":
            return _fp8_tensors(name, w)
        if layout == "awq":
            return awq_tensors(name, w, fmt.group, fmt.rounding)
        return _int4_tensors(name, w, fmt.group, fmt.sym, fmt.rounding)

    with atomic_dir(out_dir) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = [0]

        def put(tensors: dict[str, torch.Tensor]) -> None:
            for k, t in tensors.items():
                nb = t.numel() * t.element_size()
                if size[0] + nb > SHARD_BYTES and shards[-1]:
                    shards.append({})
                    size[0] = 0
                shards[-1][k] = t
                size[0] += nb

        expert_pfx = tuple(p + "." for p in prefixes)
        quantized = []
        for key in reader.keys():
            if key.startswith(expert_pfx) or (key in [p + ".gate_up_proj" for p in prefixes]) or \
                    (key in [p + ".down_proj" for p in prefixes]):
                continue
            t = reader.tensor(key)
            if all_linears and _ATTENTION.search(key) and t.dim() == 2:
                put(convert(key[: -len(".weight")], t))
                quantized.append(key[: -len(".weight")])
            else:
                put({key: t})
        stored_bytes = 0
        for prefix in prefixes:
            for e in range(geo.num_experts):
                gu, dn = reader.read(prefix, e)
                stored_bytes = gu.element_size()
                I = gu.shape[0] // 2
                for proj, w in (("gate_proj", gu[:I]), ("up_proj", gu[I:]), ("down_proj", dn)):
                    put(convert(f"{prefix}.{e}.{proj}", w.contiguous()))
            if progress is not None:
                progress()
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        ignore = ["lm_head", "re:.*mlp.gate$", "re:.*visual.*", "re:.*vision.*"]
        targets = [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"] + \
            ([r"re:.*self_attn\.(q|k|v|o)_proj$"] if all_linears else [])
        cfg["quantization_config"] = _awq_config(fmt, all_linears) if layout == "awq" else \
            _quantization_config(fmt, ignore, targets)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for name in _COPY:
            src = os.path.join(model_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    return {"out": out_dir, "format": fmt.spec(), "layout": layout, "files": sorted(os.listdir(out_dir)),
            "bytes": total,
            "expert_bytes": len(prefixes) * geo.num_experts * fmt.nbytes,
            "dense_expert_bytes": len(prefixes) * geo.num_experts * 3 * geo.hidden * geo.inter * stored_bytes,
            "attention_quantized": len(quantized)}
