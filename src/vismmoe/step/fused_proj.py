"""The fast decode step's stacked projections: sibling linear layers that read the same input computed as one
matrix product.

At a few rows a decode step is launch-bound on the GPU: an attention's k and v projections are GEMVs of a few MiB
that take a launch each, as long as a much larger one (the H100 kernel profile in docs/fast-step.md). Stacking the
siblings' weights makes one GEMV over the same bytes:

    groups (names of siblings in one module; a group needs two or more present, all exactly `nn.Linear` with the
    same input width, dtype and device, and biases on all or none):
        q_proj, k_proj, v_proj                               attention (every family)
        in_proj_qkv, in_proj_z, in_proj_b, in_proj_a         Qwen3.5's Gated-DeltaNet layers
        gate_proj, up_proj                                   dense MLPs and shared experts (DeepSeek-OCR-2)

    stacked_of(model_part) -> StandIns
                                     the siblings' weights copied once into one [sum out, in] tensor; each
                                     sibling's weight (and bias) becomes a view of its rows, so no byte is held
                                     twice and every other path (prefill, eager decode, the CPU) reads the same
                                     values in the same layout as before; once per model
    with stacked.swapped():          each sibling is replaced in its module by a `StackedLinear` (standins.py: the
                                     decode body); the originals come back after

A `StackedLinear` computes the whole product when its input is not the tensor its group last saw, keeps it in the
group, and returns its own columns; a sibling called with the same tensor slices what is kept. Called in any order,
or with different inputs, each still returns exactly its own projection of its own input. Under torch.compile one
graph serves every layer and the product appears once; torch.compile guards that a layer's group holds no input
when the layer starts, so the body forgets every group's input before each run (`StandIns.reset`).

Stacking changes where the weights live, never their values or layout: graphs.StepGraphs stacks a model on CUDA
whether the step fuses or not, before any graph is captured, so no captured graph of the model reads a freed
weight. (The CPU's native step keeps copies of its own where it reads another dtype, so there, with `--fuse-kernels
on`, a stacked weight and the native step's copy both exist.)

Numerics: each output is the same dot product over the same input and weights, but the stacked product may sum in
another order than separate ones (another GEMM kernel), so a fused step equals an unfused one to rounding, not bit
for bit. Cache, policies and prefetch stay exact against the same step with every expert resident (both stacked).
`--fuse-kernels off` keeps the separate products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .standins import StandIns

GROUPS = (("q_proj", "k_proj", "v_proj"),
          ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
          ("gate_proj", "up_proj"))


class _Group:
    """One stacked product: the stacked weight [sum out, in] and bias, and the last input and its product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.x = self.y = None

    def clear(self) -> None:
        self.x = self.y = None


class StackedLinear(nn.Module):
    """Stands in for one sibling: columns [lo, hi) of its group's stacked product (module docstring)."""

    def __init__(self, group: _Group, lo: int, hi: int, original: nn.Linear):
        super().__init__()
        self.group, self.lo, self.hi = group, lo, hi
        self.in_features, self.out_features = original.in_features, original.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g.x is not x:
            g.x, g.y = x, F.linear(x, g.weight, g.bias)
        return g.y[..., self.lo:self.hi]


def _siblings(module: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The present siblings of a group, in the group's order, when they can be stacked (module docstring); else []."""
    parts = [(n, module._modules.get(n)) for n in names]
    parts = [(n, m) for n, m in parts if m is not None]
    if len(parts) < 2 or any(type(m) is not nn.Linear for _, m in parts):
        return []
    w0 = parts[0][1].weight
    if any(m.in_features != parts[0][1].in_features or m.weight.dtype != w0.dtype or m.weight.device != w0.device
           or (m.bias is None) != (parts[0][1].bias is None) for _, m in parts):
        return []
    return parts


@torch.no_grad()
def stack(root: nn.Module) -> StandIns:
    """Stack every group of sibling projections under `root` (module docstring). The siblings' parameters keep
    their objects; their data become views of the stacked tensors. Leaving `swapped()` forgets each group's last
    input and product (they hold device memory). `stacked_of` stacks a model part once."""
    entries, cleanup = [], []
    for module in root.modules():
        for names in GROUPS:
            parts = _siblings(module, names)
            if not parts:
                continue
            mods = [m for _, m in parts]
            weight = torch.cat([m.weight for m in mods])
            bias = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
            group, lo = _Group(weight, bias), 0
            for name, m in parts:
                hi = lo + m.out_features
                m.weight.data = weight[lo:hi]
                if bias is not None:
                    m.bias.data = bias[lo:hi]
                entries.append((module, name, m, StackedLinear(group, lo, hi, m)))
                lo = hi
            cleanup.append(group.clear)
    return StandIns(entries, cleanup)


def stacked_of(root: nn.Module) -> StandIns:
    """`stack(root)`, once per module (kept on it: every step graph of a model shares its stacked weights)."""
    st = root.__dict__.get("_vismmoe_stacked")
    if st is None:
        st = root.__dict__["_vismmoe_stacked"] = stack(root)
    return st
