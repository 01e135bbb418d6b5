"""Who stays: prune allocations, a registry of pure functions over scores.

An allocation maps ``{layer: LayerScores}`` (micro level, original indices) and the
micro-experts still present to keep-masks ``{layer: (routed [E, I], shared [I_s] | None)}``.
Register a new one with :func:`register_prune_allocation`; ``prune(..., allocation=name)``
then accepts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from camera_pl.stats.scores import LayerScores


class AllocationOptions(Protocol):
    """The options allocations read (a :class:`~camera_pl.pruning.config.PruneConfig`)."""

    ratio: float
    allow_expert_removal: bool
    max_layer_ratio: float
    width_multiple: int


Keep = tuple[torch.Tensor, torch.Tensor | None]
AllocationFn = Callable[[dict[int, LayerScores], dict[int, torch.Tensor], AllocationOptions], dict[int, Keep]]


@dataclass(frozen=True)
class PruneAllocation:
    """A registered allocation: the function, whether it keeps equal widths (fused layout), whether it ranks
    across layers (then it cannot run layer by layer in sequential calibration)."""

    fn: AllocationFn
    fused: bool = False
    cross_layer: bool = False


ALLOCATIONS: dict[str, PruneAllocation] = {}


def register_prune_allocation(name: str, *, fused: bool = False,
                              cross_layer: bool = False) -> Callable[[AllocationFn], AllocationFn]:
    """Decorator registering ``fn(scores, presents, config) -> {layer: (keep, shared_keep)}`` as ``name``."""

    def add(fn: AllocationFn) -> AllocationFn:
        ALLOCATIONS[name] = PruneAllocation(fn, fused, cross_layer)
        return fn

    return add


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` lowest entries (ties broken by index, deterministic)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    if n > 0:
        out[torch.sort(scores.flatten().double().cpu(), stable=True).indices[:n]] = True
    return out.view_as(scores)


def _layer_keep(index: int, scores: LayerScores, present: torch.Tensor, ratio: float,
                allow_expert_removal: bool) -> Keep:
    """One layer of the ``layer`` allocation (see :func:`layer_allocation`)."""
    routed = scores.routed.double().cpu().masked_fill(~present, -math.inf)
    shared = None if scores.shared is None else scores.shared.double().cpu()
    flat = routed.flatten() if shared is None else torch.cat([routed.flatten(), shared])
    n_remove = int(math.floor(ratio * flat.numel()))
    must_keep = (0 if allow_expert_removal else routed.shape[0]) + (shared is not None)
    if n_remove > flat.numel() - must_keep:
        most = (flat.numel() - must_keep) / flat.numel()
        raise ValueError(f"MoE layer {index}: removing {ratio:.4g} of its {flat.numel()} micro-experts would empty "
                         f"experts; with at least one micro-expert kept per expert the ratio can be at most "
                         f"{most:.4g}. Lower the ratio, or pass allow_expert_removal=True to remove whole experts.")
    protected = torch.zeros_like(flat, dtype=torch.bool)
    while True:
        remove = _lowest(flat.masked_fill(protected, math.inf), n_remove)
        keep = ~remove
        routed_keep = keep[: routed.numel()].view_as(routed)
        emptied = (routed_keep.sum(1) == 0).nonzero().squeeze(1)
        shared_empty = shared is not None and not bool(keep[routed.numel():].any())
        if allow_expert_removal:
            emptied = emptied[:0]
        if emptied.numel() == 0 and not shared_empty:
            break
        for e in emptied.tolist():  # keep the expert's best remaining channel, remove the next lowest instead
            best = routed[e].argmax()
            protected[e * routed.shape[1] + best] = True
        if shared_empty:
            protected[routed.numel() + int(shared.argmax())] = True
    shared_keep = None if shared is None else keep[routed.numel():]
    return routed_keep, shared_keep


@register_prune_allocation("layer")
def layer_allocation(all_scores: dict[int, LayerScores], presents: dict[int, torch.Tensor],
                     config: AllocationOptions) -> dict[int, Keep]:
    """CAMERA-P's allocation: per layer, one ranking of routed + shared micro-experts; widths become unequal.

    Every expert keeps at least one micro-expert (unless ``allow_expert_removal``).
    """
    return {i: _layer_keep(i, s, presents[i], config.ratio, config.allow_expert_removal) for i, s in all_scores.items()}


def _expert_width_keep(scores: LayerScores, present: torch.Tensor, ratio: float, width_multiple: int) -> Keep:
    """One layer of the ``expert`` allocation (see :func:`expert_allocation`)."""
    routed = scores.routed.double().cpu().masked_fill(~present, -math.inf)
    width = routed.shape[1]
    kept = width - int(math.floor(ratio * width))
    kept = min(width, width_multiple * math.ceil(kept / width_multiple))
    n = width - kept
    keep = torch.stack([~_lowest(row, n) for row in routed])
    shared_keep = None
    if scores.shared is not None:
        n_shared = int(math.floor(ratio * scores.shared.numel()))
        shared_keep = ~_lowest(scores.shared.double().cpu(), n_shared)
    return keep, shared_keep


@register_prune_allocation("expert", fused=True)
def expert_allocation(all_scores: dict[int, LayerScores], presents: dict[int, torch.Tensor],
                      config: AllocationOptions) -> dict[int, Keep]:
    """The same fraction from every expert (each picks its own micro-experts): the fused layout survives.

    The kept width is rounded up to a multiple of ``width_multiple`` (grouped GEMMs need
    16-byte aligned strides).
    """
    return {i: _expert_width_keep(s, presents[i], config.ratio, config.width_multiple) for i, s in all_scores.items()}


@register_prune_allocation("global", cross_layer=True)
def global_allocation(all_scores: dict[int, LayerScores], presents: dict[int, torch.Tensor],
                      config: AllocationOptions) -> dict[int, Keep]:
    """One ranking of every micro-expert of every layer; a layer loses at most ``max_layer_ratio``."""
    ratio, max_layer_ratio = config.ratio, config.max_layer_ratio
    flats, owners = [], []
    for index, s in all_scores.items():
        routed = s.routed.double().cpu().masked_fill(~presents[index], -math.inf).flatten()
        flat = routed if s.shared is None else torch.cat([routed, s.shared.double().cpu()])
        flats.append(flat)
        owners.append(torch.full((flat.numel(),), index))
    flat, owner = torch.cat(flats), torch.cat(owners)
    order = torch.sort(flat, stable=True).indices
    owner_sorted = owner[order]
    rank = torch.empty_like(order)  # position of each entry within its own layer's ascending order
    cap = torch.empty_like(order)
    for index, f in zip(all_scores, flats):
        in_layer = owner_sorted == index
        rank[in_layer] = torch.arange(int(in_layer.sum()))
        cap[in_layer] = int(math.floor(max_layer_ratio * f.numel()))
    budget = int(math.floor(ratio * flat.numel()))
    remove = torch.zeros_like(flat, dtype=torch.bool)
    remove[order[rank < cap][:budget]] = True  # lowest first, skipping layers at their cap
    out, start = {}, 0
    for index, f in zip(all_scores, flats):
        keep = ~remove[start : start + f.numel()]
        start += f.numel()
        n_routed = presents[index].numel()
        routed_keep = keep[:n_routed].view_as(presents[index])
        for e in (routed_keep.sum(1) == 0).nonzero().squeeze(1).tolist():
            routed_keep[e, int(all_scores[index].routed[e].argmax())] = True
        shared_keep = None if all_scores[index].shared is None else keep[n_routed:]
        if shared_keep is not None and not bool(shared_keep.any()):
            shared_keep[int(all_scores[index].shared.argmax())] = True
        out[index] = (routed_keep, shared_keep)
    return out


def expert_level_keep(scores: LayerScores, ratio: float) -> torch.Tensor:
    """Expert-level methods: keep-mask ``[E]`` removing the ``round(ratio · E)`` lowest-scored experts."""
    n = int(round(ratio * scores.routed.numel()))
    return ~_lowest(scores.routed.double().cpu(), n)
