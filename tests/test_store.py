"""The expert store reads every checkpoint layout the same way, one expert at a time, and the disk tier keeps
RAM bounded. Hub layouts are made from a `save_pretrained` checkpoint and cross-checked with transformers' own
loader, so the test cannot pass by converting both sides the same wrong way."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vismmoe import load
from vismmoe.families import get_family
from vismmoe.formats import DenseFormat
from vismmoe.offload.store import CheckpointReader, DiskStore


def _tensors(d):
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, transform, shards=2):
    """Copy checkpoint `src` to `dst` with expert tensors rewritten by `transform`, sharded with an index."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    sd = transform(_tensors(src))
    keys = sorted(sd)
    weight_map, per = {}, -(-len(keys) // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s * per:(s + 1) * per]}
        save_file(part, os.path.join(dst, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


def _fused_transposed(sd):
    return {k: (v.transpose(1, 2) if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v)
            for k, v in sd.items()}


def _split_per_expert(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len(".gate_up_proj")]
            I = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}.{e}.gate_proj.weight"] = v[e, :I].clone()
                out[f"{p}.{e}.up_proj.weight"] = v[e, I:].clone()
        elif k.endswith("experts.down_proj"):
            p = k[: -len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


LAYOUTS = {"qwen3_vl_moe": _fused_transposed, "glm4v_moe": _split_per_expert}


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm4v_moe"])
def test_hub_layout_reads_like_save_pretrained(family, tiny_dirs, image_file, tmp_path):
    src = tiny_dirs[family]
    hub = _rewrite(src, str(tmp_path / "hub"), LAYOUTS[family])
    fam = get_family(family)
    # transformers' own loader must read the rewritten files into the same model (the layout is the real hub one)
    a = fam.model_class.from_pretrained(src, experts_implementation="eager").eval()
    b = fam.model_class.from_pretrained(hub, experts_implementation="eager").eval()
    for layer in fam.geometry(a.config).moe_layers:
        ea, eb = fam.moe_block(a, layer).experts, fam.moe_block(b, layer).experts
        assert torch.equal(ea.gate_up_proj, eb.gate_up_proj) and torch.equal(ea.down_proj, eb.down_proj)
    # our reader returns identical experts from both
    geo = fam.geometry(a.config)
    ra, rb = CheckpointReader(src, geo.hidden, geo.inter), CheckpointReader(hub, geo.hidden, geo.inter)
    for layer in geo.moe_layers:
        for e in range(geo.num_experts):
            (ga, da), (gb, db) = ra.read(fam.expert_prefix(layer), e), rb.read(fam.expert_prefix(layer), e)
            assert torch.equal(ga, gb) and torch.equal(da, db)
            assert torch.equal(ga, fam.moe_block(a, layer).experts.gate_up_proj[e])
    # and the engine generates the same tokens from both
    t1 = load(src, expert_budget="25%").generate(image_file, "What is here?", max_new_tokens=6).token_ids
    t2 = load(hub, expert_budget="25%").generate(image_file, "What is here?", max_new_tokens=6).token_ids
    assert t1 == t2


def test_blob_layout_round_trip():
    lay = DenseFormat(hidden=24, inter=10, dtype=torch.float32)
    assert lay.nbytes % 512 == 0 and lay.numel >= 3 * 24 * 10
    pool = torch.full((3, lay.numel), float("nan"))
    gu, dn = torch.randn(20, 24), torch.randn(24, 10)
    lay.pack(gu, dn, pool[1])
    vg, vd = lay.views(pool)
    assert torch.equal(vg[1], gu) and torch.equal(vd[1], dn)
    assert torch.isnan(vg[0]).all()          # neighbours untouched


def test_disk_store_ring_bounds_ram(tiny_dirs):
    d = tiny_dirs["qwen3_vl_moe"]
    eng = load(d)
    geo, lay = eng.geometry, eng.layout
    reader = CheckpointReader(d, geo.hidden, geo.inter)
    prefixes = [eng.family.expert_prefix(l) for l in geo.moe_layers]
    store = DiskStore(reader, prefixes, lay, geo.num_experts, pin=False, staging=3)
    assert store.nbytes() == 3 * lay.nbytes                      # RAM held: the ring only
    blobs = [store.blob(0, e) for e in range(3)]
    for e, b in enumerate(blobs):
        assert torch.equal(b, eng.store.blob(0, e))               # same bytes as the host tier
    store.release(blobs[0])
    again = store.blob(1, 5)
    assert again.data_ptr() == blobs[0].data_ptr()                # reused staging memory
    assert torch.equal(again, eng.store.blob(1, 5))


def test_host_store_matches_model_weights(tiny_dirs):
    d = tiny_dirs["glm4v_moe"]
    fam = get_family("glm4v_moe")
    ref = fam.model_class.from_pretrained(d).eval()
    eng = load(d)
    for pos, layer in enumerate(eng.geometry.moe_layers):
        gu, dn = eng.layout.views(eng.store.buffers[pos])
        assert torch.equal(gu, fam.moe_block(ref, layer).experts.gate_up_proj)
        assert torch.equal(dn, fam.moe_block(ref, layer).experts.down_proj)
