"""CAMERA-P and its baselines: choose micro-experts (or experts) to remove, then remove them.

``prune(model, stats, ratio, method, allocation)`` ranks by a registered score
(:mod:`camera_pl.stats.scores`) and edits the model in place (:mod:`camera_pl.pruning.surgery`):

* ``layer`` (CAMERA-P): per MoE layer, rank all routed and shared micro-experts together and
  drop the lowest ``ratio`` fraction — widths become unequal (:class:`RaggedExperts`);
* ``expert``: drop the same fraction from every expert (each picks its own channels), so the
  fused layout and plain ``from_pretrained`` loading survive;
* ``global``: one ranking across layers, no layer losing more than ``max_layer_ratio``.

Expert-level methods (``frequency``, ``reap``, ``ean`` from statistics; ``naee`` from
``calib_dataloader``, see :mod:`camera_pl.pruning.naee`) remove ``round(ratio · E)`` whole experts
per layer with their router rows. Micro-experts already
removed by an earlier call count as removed (ratios refer to the original model), so
calling ``prune`` with rising ratios gives a gradual schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer, architecture_spec, moe_layers
from camera_pl.pruning.naee import cache_layer_inputs, naee_keep
from camera_pl.stats.scores import LayerScores, score_level
from camera_pl.stats.container import MicroExpertStats, collect_stats
from camera_pl.pruning.surgery import remove_experts, remove_router_rows, shrink_fused, shrink_shared, to_ragged

ALLOCATIONS = ("layer", "expert", "global")


@dataclass
class LayerPruneReport:
    index: int
    widths_before: list[int]
    widths_after: list[int]
    shared_before: int
    shared_after: int
    experts_removed: list[int] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


@dataclass
class PruneReport:
    """What ``prune`` did, per layer and in total (expert parameters: routed, shared, router rows)."""

    method: str
    allocation: str
    ratio: float
    layers: list[LayerPruneReport]

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def summary(self) -> str:
        lines = [f"prune method={self.method} allocation={self.allocation} ratio={self.ratio:.2f}: "
                 f"expert params {self.params_before:,} -> {self.params_after:,} (-{self.params_removed:,})"]
        for layer in self.layers:
            lines.append(f"  layer {layer.index}: widths {layer.widths_before} -> {layer.widths_after}, shared "
                         f"{layer.shared_before} -> {layer.shared_after}, experts removed {layer.experts_removed}")
        return "\n".join(lines)


def expert_params(layer: MoELayer) -> int:
    """Parameters of a layer's routed experts, shared experts and router."""
    modules: list[nn.Module] = [layer.experts, layer.router] + [m for m in (layer.shared, layer.shared_gate) if m is not None]
    return sum(p.numel() for m in modules for p in m.parameters())


def _widths(layer: MoELayer) -> list[int]:
    return [int(layer.expert_channels(e).numel()) for e in range(layer.num_experts)]


def _present(layer: MoELayer) -> torch.Tensor:
    mask = torch.zeros(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
    for e in range(layer.num_experts):
        mask[e, layer.expert_channels(e).cpu()] = True
    return mask


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` lowest entries (ties broken by index, deterministic)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    if n > 0:
        out[torch.sort(scores.flatten().double().cpu(), stable=True).indices[:n]] = True
    return out.view_as(scores)


def _micro_keep_layer(scores: LayerScores, present: torch.Tensor, ratio: float,
                      allow_expert_removal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer allocation: one ranking of routed + shared micro-experts; every expert keeps >= 1 channel."""
    routed = scores.routed.double().cpu().masked_fill(~present, -math.inf)
    shared = None if scores.shared is None else scores.shared.double().cpu()
    flat = routed.flatten() if shared is None else torch.cat([routed.flatten(), shared])
    n_remove = int(math.floor(ratio * flat.numel()))
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


def _micro_keep_expert(scores: LayerScores, present: torch.Tensor, ratio: float,
                       width_multiple: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expert allocation: every expert drops its own lowest channels, keeping a multiple of ``width_multiple``."""
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


def _micro_keep_global(all_scores: dict[int, LayerScores], presents: dict[int, torch.Tensor], ratio: float,
                       max_layer_ratio: float) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Global allocation: one ranking of every micro-expert; a layer loses at most ``max_layer_ratio``."""
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


def _apply_micro(layer: MoELayer, keep: torch.Tensor, shared_keep: torch.Tensor | None, fused: bool) -> list[int]:
    """Edit the layer; returns the experts removed entirely (allowed only with allow_expert_removal)."""
    if shared_keep is not None and not bool(shared_keep.all()):
        shrink_shared(layer, shared_keep)
    kept_experts = (keep.sum(1) > 0).nonzero().squeeze(1).tolist()
    removed = [e for e in range(layer.num_experts) if e not in kept_experts]
    if fused and not removed:
        shrink_fused(layer, keep)
        return removed
    to_ragged(layer, keep, experts_kept=kept_experts if removed else None)
    if removed:
        remove_router_rows(layer, kept_experts)
    return removed


def _update_config(model: nn.Module, layers: list[MoELayer]) -> None:
    """Keep config keys true where every MoE layer agrees (fused shapes / expert counts)."""
    spec = architecture_spec(model)
    config = model.config
    counts = {layer.num_experts for layer in layers}
    if len(counts) == 1:
        count = counts.pop()
        setattr(config, spec.num_experts_key, count)
        if hasattr(model, "num_experts"):  # the causal LM's router aux loss sizes its tensors by this
            model.num_experts = count
    if all(not layer.is_ragged for layer in layers):
        widths = {layer.intermediate_size for layer in layers}
        if len(widths) == 1:
            setattr(config, spec.expert_size_key, widths.pop())
    shared = {layer.shared_intermediate_size for layer in layers if layer.shared is not None}
    if spec.shared_size_key and len(shared) == 1:
        setattr(config, spec.shared_size_key, shared.pop())


def _expert_keep(scores: LayerScores, ratio: float) -> torch.Tensor:
    n = int(round(ratio * scores.routed.numel()))
    return ~_lowest(scores.routed.double().cpu(), n)


def prune(
    model: nn.Module,
    stats: MicroExpertStats | None,
    ratio: float,
    method: str = "camera",
    allocation: str = "layer",
    allow_expert_removal: bool = False,
    max_layer_ratio: float = 0.9,
    width_multiple: int = 8,
    sequential: bool = False,
    calib_dataloader: Iterable | None = None,
    max_tokens: int | None = None,
    **score_kwargs,
) -> PruneReport:
    """Prune ``model`` in place; see the module docstring. Returns a :class:`PruneReport`.

    With ``allocation="expert"`` the kept width is rounded up to a multiple of ``width_multiple``
    (default 8): fused grouped-matmul kernels need 16-byte aligned strides.

    ``sequential=True`` (the public CAMERA code's mode) prunes layer by layer, collecting the
    statistics of layer l+1 on the model already pruned at layers <= l from
    ``calib_dataloader`` (``stats`` may then be None).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}; it is the fraction of micro-experts to remove.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    level = "expert" if method == "naee" else score_level(method)
    layers = moe_layers(model)
    if method == "naee":
        if calib_dataloader is None:
            raise ValueError("method='naee' needs calib_dataloader: it measures each layer's output error directly.")
    elif sequential:
        if calib_dataloader is None:
            raise ValueError("sequential=True needs calib_dataloader: statistics are recollected after each layer.")
        if allocation == "global" or level == "expert":
            raise ValueError("sequential calibration supports micro-level methods with 'layer' or 'expert' allocation.")
    elif stats is None:
        raise ValueError("prune needs statistics: pass stats=camera_pl.collect_stats(model, dataloader), "
                         "or sequential=True with calib_dataloader.")
    else:
        stats.check_compatible(model)

    reports = {layer.index: LayerPruneReport(layer.index, _widths(layer), _widths(layer), layer.shared_intermediate_size,
                                             layer.shared_intermediate_size, params_before=expert_params(layer))
               for layer in layers}
    if level == "expert":
        if method == "naee":
            inputs = cache_layer_inputs(model, layers, calib_dataloader, max_tokens or 4096)
            keeps = naee_keep(layers, inputs, int(round(ratio * layers[0].num_experts)))
        else:
            scores = stats.scores(method, **score_kwargs)
            keeps = {layer.index: _expert_keep(scores[layer.index], ratio) for layer in layers}
        for layer in layers:
            keep = keeps[layer.index]
            remove_experts(layer, keep)
            reports[layer.index].experts_removed = (~keep).nonzero().squeeze(1).tolist()
    elif allocation == "global":
        scores = stats.scores(method, **score_kwargs)
        keeps = _micro_keep_global(scores, {l.index: _present(l) for l in layers}, ratio, max_layer_ratio)
        for layer in layers:
            reports[layer.index].experts_removed = _apply_micro(layer, *keeps[layer.index], fused=False)
    else:
        for layer in layers:
            if sequential:
                stats = collect_stats(model, calib_dataloader, max_tokens=max_tokens)
            s = stats.scores(method, **score_kwargs)[layer.index]
            if allocation == "layer":
                keep, shared_keep = _micro_keep_layer(s, _present(layer), ratio, allow_expert_removal)
            else:
                keep, shared_keep = _micro_keep_expert(s, _present(layer), ratio, width_multiple)
            reports[layer.index].experts_removed = _apply_micro(layer, keep, shared_keep, fused=allocation == "expert")
    layers = moe_layers(model)
    for layer in layers:
        r = reports[layer.index]
        r.widths_after, r.shared_after, r.params_after = _widths(layer), layer.shared_intermediate_size, expert_params(layer)
    _update_config(model, layers)
    return PruneReport(method, allocation, ratio, [reports[l.index] for l in layers])
