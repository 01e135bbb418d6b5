"""Structural edits of an MoE layer: remove micro-experts or whole experts for real.

Each function takes a :class:`MoELayer` and boolean keep-masks and rewrites the layer's
modules so pruned weights are gone from memory (new, smaller tensors; the old ones are
released). Which micro-experts to keep is decided elsewhere (:mod:`camera_pl.pruning.api`).
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer
from camera_pl.experts.ragged import RaggedExperts


def _fuse(gate: torch.Tensor | None, up: torch.Tensor, layer: MoELayer, dim: int) -> torch.Tensor:
    """Pack per-channel gate/up tensors back into the module's gate_up layout along ``dim``."""
    if gate is None:
        return up
    if layer.is_concatenated:
        return torch.cat([gate, up], dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def shrink_fused(layer: MoELayer, keep: torch.Tensor) -> None:
    """Keep ``keep [E, I]`` channels (the same count in every expert): fused layout preserved."""
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("shrink_fused needs the same number of kept channels in every expert; use to_ragged.")
    width = int(counts[0])
    idx = torch.stack([row.nonzero().squeeze(1) for row in keep]).to(layer.down(0).device)  # [E, I']
    gate, up, down = layer.stacked_weights()
    take = idx[..., None].expand(-1, -1, up.shape[-1])
    new_gate_up = _fuse(None if gate is None else gate.gather(1, take), up.gather(1, take), layer, 1)  # [E, 2I', H]
    new_down = down.gather(2, idx[:, None, :].expand(-1, down.shape[1], -1))  # [E, H, I']
    experts = layer.experts
    if layer.is_transposed:
        new_gate_up, new_down = new_gate_up.transpose(1, 2), new_down.transpose(1, 2)
    name = "gate_up_proj" if layer.has_gate else "up_proj"
    biases = layer.stacked_biases()
    with torch.no_grad():
        setattr(experts, name, nn.Parameter(new_gate_up.contiguous(), requires_grad=getattr(experts, name).requires_grad))
        experts.down_proj = nn.Parameter(new_down.contiguous(), requires_grad=experts.down_proj.requires_grad)
        if biases is not None:
            g_b, u_b, _ = biases
            new_b = _fuse(None if g_b is None else g_b.gather(1, idx), u_b.gather(1, idx), layer, 1)
            setattr(experts, f"{name}_bias", nn.Parameter(new_b.contiguous()))
    for attr in ("intermediate_dim", "intermediate_size"):
        if hasattr(experts, attr):
            setattr(experts, attr, width)


def to_ragged(layer: MoELayer, keep: torch.Tensor, experts_kept: list[int] | None = None) -> RaggedExperts:
    """Replace the layer's experts with a :class:`RaggedExperts` keeping ``keep [E, I]`` (original indices).

    ``experts_kept`` lists the experts that stay (default all); the router is not touched here.
    """
    experts = layer.experts
    channels, gates, ups, downs, g_bs, u_bs, d_bs = [], [], [], [], [], [], []
    for e in range(layer.num_experts) if experts_kept is None else experts_kept:
        present = layer.expert_channels(e)
        local = keep[e, present.to(keep.device)].nonzero().squeeze(1).to(present.device)  # positions among present
        gate, up = layer.gate_up(e)
        channels.append(present[local].cpu())
        ups.append(up[local])
        gates.append(None if gate is None else gate[local])
        downs.append(layer.down(e)[:, local])
        b = layer.experts.biases(e) if layer.is_ragged else _fused_biases(layer, e)
        if b is not None:
            g_bs.append(None if b[0] is None else b[0][local])
            u_bs.append(b[1][local])
            d_bs.append(b[2])
    ref = ups[0]
    template = experts.template if layer.is_ragged else experts
    new = RaggedExperts(template, channels, layer.hidden_size, layer.intermediate_size, layer.has_bias,
                        dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        new.up.copy_(torch.cat(ups))
        new.down.copy_(torch.cat(downs, dim=1))
        if new.gate is not None:
            new.gate.copy_(torch.cat(gates))
        if layer.has_bias:
            new.up_bias.copy_(torch.cat(u_bs))
            new.down_bias.copy_(torch.stack(d_bs))
            if new.gate_bias is not None:
                new.gate_bias.copy_(torch.cat(g_bs))
    new.channels = new.channels.to(ref.device)
    new.widths = new.widths.to(ref.device)
    new.train(experts.training)
    setattr(layer.block, layer.spec.experts, new)
    layer.experts = new
    return new


def _fused_biases(layer: MoELayer, e: int) -> tuple | None:
    biases = layer.stacked_biases()
    return None if biases is None else tuple(None if b is None else b[e] for b in biases)


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


def remove_router_rows(layer: MoELayer, kept: list[int]) -> None:
    """Keep only router rows ``kept`` (weight, bias, DeepSeek correction bias) and update expert counts."""
    router = layer.router
    idx = torch.tensor(kept, dtype=torch.long)
    with torch.no_grad():
        for name in ("weight", "bias", "e_score_correction_bias"):
            t = getattr(router, name, None)
            if isinstance(t, torch.Tensor):
                new = t[idx.to(t.device)].clone()
                setattr(router, name, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
    for module in (router, layer.experts):
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)
    if isinstance(router, nn.Linear):
        router.out_features = len(kept)


def remove_experts(layer: MoELayer, keep: torch.Tensor) -> None:
    """Remove whole experts (``keep [E]`` False) together with their router rows."""
    kept = keep.nonzero().squeeze(1).tolist()
    top_k = getattr(layer.router, "top_k", 1)
    if len(kept) < top_k:
        raise ValueError(f"Layer {layer.index}: keeping {len(kept)} experts leaves fewer than top_k={top_k}.")
    groups = getattr(layer.router, "num_group", None) or 1
    if groups > 1 and len(kept) % groups:
        raise ValueError(
            f"Layer {layer.index}: group-limited routing needs the expert count divisible by n_group={groups}; "
            f"{len(kept)} experts would remain. Remove a multiple of {groups} experts per layer.")
    if layer.is_ragged:
        everything = torch.ones(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
        to_ragged(layer, everything, experts_kept=kept)
    else:
        experts = layer.experts
        with torch.no_grad():
            for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
                t = getattr(experts, name, None)
                if isinstance(t, nn.Parameter):
                    sel = torch.tensor(kept, device=t.device)
                    setattr(experts, name, nn.Parameter(t[sel].clone(), requires_grad=t.requires_grad))
    remove_router_rows(layer, kept)
