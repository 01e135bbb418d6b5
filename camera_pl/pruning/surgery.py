"""Structural edits of an MoE layer: remove micro-experts or whole experts for real.

Each function takes a :class:`MoELayer` and boolean keep-masks and rewrites the layer's
modules so pruned weights are gone from memory (new, smaller tensors; the old ones are
released). Which micro-experts to keep is decided elsewhere (:mod:`camera_pl.pruning.api`).
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer
from camera_pl.experts.base import FusedExperts
from camera_pl.experts.modulelist import ModuleListExperts
from camera_pl.experts.ragged import RaggedExperts


def shrink_fused(layer: MoELayer, keep: torch.Tensor) -> None:
    """Keep ``keep [E, I]`` channels (the same count in every expert) of fused experts: fused layout preserved."""
    experts = layer.experts
    if not isinstance(experts, FusedExperts):
        raise TypeError(f"Layer {layer.index}: shrink_fused edits transformers' fused experts, not {experts.kind!r} ones.")
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("shrink_fused needs the same number of kept channels in every expert; use to_ragged.")
    width = int(counts[0])
    layout, module = experts.layout, experts.module
    idx = torch.stack([row.nonzero().squeeze(1) for row in keep]).to(experts.device)  # [E, I']
    w = experts.stacked()
    take = idx[..., None].expand(-1, -1, w.up.shape[-1])
    new_up = layout.pack(None if w.gate is None else w.gate.gather(1, take), w.up.gather(1, take), 1)  # [E, P', H]
    new_down = w.down.gather(2, idx[:, None, :].expand(-1, w.down.shape[1], -1))  # [E, H, I']
    name = layout.up_name
    with torch.no_grad():
        old_up = getattr(module, name)
        setattr(module, name, nn.Parameter(layout.as_stored(new_up).contiguous(), requires_grad=old_up.requires_grad))
        module.down_proj = nn.Parameter(layout.as_stored(new_down).contiguous(),
                                        requires_grad=module.down_proj.requires_grad)
        if layout.has_bias:
            new_b = layout.pack(None if w.gate_bias is None else w.gate_bias.gather(1, idx), w.up_bias.gather(1, idx), 1)
            setattr(module, f"{name}_bias", nn.Parameter(new_b.contiguous()))
    for attr in ("intermediate_dim", "intermediate_size"):
        if hasattr(module, attr):
            setattr(module, attr, width)


def to_ragged(layer: MoELayer, keep: torch.Tensor, experts_kept: list[int] | None = None) -> RaggedExperts:
    """Replace the layer's experts with a :class:`RaggedExperts` keeping ``keep [E, I]`` (original indices).

    ``experts_kept`` lists the experts that stay (default all); the router is not touched here.
    """
    new = RaggedExperts.from_experts(layer.experts, keep, experts_kept)
    layer.replace_experts(new)
    return new


def shrink_shared(layer: MoELayer, keep: torch.Tensor) -> None:
    """Keep ``keep [I_s]`` channels of the shared expert MLP (new, smaller Linear modules)."""
    shared = layer.shared
    idx = keep.nonzero().squeeze(1).to(shared.down_proj.weight.device)

    def sliced(linear: nn.Linear, rows: bool) -> nn.Linear:
        w = linear.weight[idx] if rows else linear.weight[:, idx]
        new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            new.weight.copy_(w)
            if linear.bias is not None:
                new.bias.copy_(linear.bias[idx] if rows else linear.bias)
        return new

    shared.gate_proj = sliced(shared.gate_proj, rows=True)
    shared.up_proj = sliced(shared.up_proj, rows=True)
    shared.down_proj = sliced(shared.down_proj, rows=False)
    if hasattr(shared, "intermediate_size"):
        shared.intermediate_size = int(idx.numel())


def check_expert_count(layer: MoELayer, kept: int) -> None:
    """Raise unless the router can still route with ``kept`` experts (top-k, group-limited routing)."""
    top_k = layer.top_k
    if kept < top_k:
        raise ValueError(f"Layer {layer.index}: keeping {kept} experts leaves fewer than top_k={top_k}; lower the "
                         "ratio.")
    groups = layer.expert_groups
    if groups > 1 and kept % groups:
        raise ValueError(
            f"Layer {layer.index}: group-limited routing needs the expert count divisible by n_group={groups}; "
            f"{kept} experts would remain. Remove a multiple of {groups} experts per layer.")


def remove_experts(layer: MoELayer, keep: torch.Tensor) -> None:
    """Remove whole experts (``keep [E]`` False) together with their router rows.

    The router keeps its remaining rows unchanged and the model's own routing then runs over
    the remaining experts only: where it normalises scores over all experts before top-k
    (softmax-then-top-k without renormalisation: Qwen2-MoE, DeepSeek-MoE v1), the removed
    experts leave that normalisation too, so the kept experts' weights grow by the removed
    share. Where it renormalises the top-k weights (or takes the softmax over the top-k only)
    nothing changes for tokens whose top-k experts all stay.
    """
    kept = keep.nonzero().squeeze(1).tolist()
    check_expert_count(layer, len(kept))
    if isinstance(layer.experts, ModuleListExperts):
        layer.experts.keep_experts(kept)
    elif not isinstance(layer.experts, FusedExperts):
        everything = torch.ones(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
        to_ragged(layer, everything, experts_kept=kept)
    else:
        experts = layer.module
        with torch.no_grad():
            for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
                t = getattr(experts, name, None)
                if isinstance(t, nn.Parameter):
                    sel = torch.tensor(kept, device=t.device)
                    setattr(experts, name, nn.Parameter(t[sel].clone(), requires_grad=t.requires_grad))
    layer.keep_router_rows(kept)
