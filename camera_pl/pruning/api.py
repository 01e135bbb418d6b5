"""CAMERA-P and its baselines: choose micro-experts (or experts) to remove, then remove them.

``prune(model, stats, PruneConfig(...))`` ranks by a registered score
(:mod:`camera_pl.stats.scores`), chooses with a registered allocation
(:mod:`camera_pl.pruning.allocation`) and edits the model in place
(:mod:`camera_pl.pruning.surgery`):

* ``layer`` (CAMERA-P): per MoE layer, rank all routed and shared micro-experts together and
  drop the lowest ``ratio`` fraction — widths become unequal (:class:`RaggedExperts`);
* ``expert``: drop the same fraction from every expert (each picks its own channels), so the
  fused layout and plain ``from_pretrained`` loading survive;
* experts kept as a list of MLPs (remote-code layouts) have each expert's Linears narrowed under
  every allocation (:meth:`~camera_pl.experts.modulelist.ModuleListExperts.keep`); experts left
  without micro-experts (``allow_expert_removal``) leave the list with their router rows;
* ``global``: one ranking across layers, no layer losing more than ``max_layer_ratio``.

Expert-level methods (``frequency``, ``reap``, ``ean`` from statistics; ``naee`` from
``calib_dataloader``, see :mod:`camera_pl.pruning.naee`) remove ``round(ratio · E)`` whole experts
per layer with their router rows. Micro-experts already
removed by an earlier call count as removed (ratios refer to the original model), so
calling ``prune`` with rising ratios gives a gradual schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import math

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer, architecture_spec, moe_layers
from camera_pl.experts.base import FusedExperts
from camera_pl.experts.modulelist import ModuleListExperts
from camera_pl.pruning.allocation import ALLOCATIONS, expert_level_keep
from camera_pl.pruning.config import CALIBRATED_METHODS, PruneConfig
from camera_pl.arch.forward import use_camera_experts
from camera_pl.offload import LayerByLayer, OffloadConfig, as_offload
from camera_pl.pruning.naee import cache_layer_inputs, naee_keep, naee_keep_layerwise
from camera_pl.stats.container import MicroExpertStats, collect_stats, layer_entry
from camera_pl.stats.observation import StatsAccumulator, observe
from camera_pl.stats.scores import LayerScores, compute_scores
from camera_pl.pruning.surgery import check_expert_count, remove_experts, shrink_fused, shrink_shared, to_ragged


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
    modules: list[nn.Module] = [layer.module, layer.router] + [m for m in (layer.shared, layer.shared_gate) if m is not None]
    return sum(p.numel() for m in modules for p in m.parameters())


def _widths(layer: MoELayer) -> list[int]:
    return layer.experts.widths().tolist()


ORIGINAL_SIZES = "camera_pl_original_sizes"
"""Config key recording each MoE layer's original (expert width, shared width), so ratios stay relative to them."""


def _original_sizes(model: nn.Module, layers: list[MoELayer]) -> dict[int, tuple[int, int]]:
    """Each layer's original (expert width, shared width): as recorded in the config, or its current sizes."""
    recorded = getattr(model.config, ORIGINAL_SIZES, None) or {}
    return {layer.index: tuple(recorded.get(str(layer.index), (layer.intermediate_size,
                                                                layer.shared_intermediate_size)))
            for layer in layers}


def _in_original_sizes(layer: MoELayer, scores: LayerScores, original: tuple[int, int]
                       ) -> tuple[LayerScores, torch.Tensor]:
    """Scores and the presence mask padded to the original widths: micro-experts already removed from fused or shared
    experts reappear as absent (score -inf), so every allocation counts its ratio against the original model."""
    present = layer.experts.present_mask()
    width, shared_width = original
    missing = width - present.shape[1]
    routed = scores.routed
    if missing > 0:
        present = torch.nn.functional.pad(present, (0, missing), value=False)
        routed = torch.nn.functional.pad(routed.double(), (0, missing), value=-math.inf)
    shared = scores.shared
    if shared is not None and shared_width > shared.numel():
        shared = torch.nn.functional.pad(shared.double(), (0, shared_width - shared.numel()), value=-math.inf)
    return LayerScores(scores.level, routed, shared), present


def _current_part(layer: MoELayer, keep: torch.Tensor, shared_keep: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep-masks back in the layer's current index space (padding dropped)."""
    keep = keep[:, :layer.intermediate_size]
    return keep, None if shared_keep is None else shared_keep[:layer.shared_intermediate_size]


def _apply_micro(layer: MoELayer, keep: torch.Tensor, shared_keep: torch.Tensor | None, fused: bool) -> list[int]:
    """Edit the layer; returns the experts removed entirely (allowed only with allow_expert_removal)."""
    if shared_keep is not None and not bool(shared_keep.all()):
        shrink_shared(layer, shared_keep)
    experts = layer.experts
    kept_experts = (keep.sum(1) > 0).nonzero().squeeze(1).tolist()
    removed = [e for e in range(layer.num_experts) if e not in kept_experts]
    if isinstance(experts, ModuleListExperts):  # every kept expert's Linears narrow: any widths, the list stays
        if removed:
            remove_experts(layer, keep.sum(1) > 0)
        layer.experts.keep(keep[kept_experts])
        return removed
    if fused and not removed:
        shrink_fused(layer, keep)
        return removed
    to_ragged(layer, keep, experts_kept=kept_experts if removed else None)
    if removed:
        layer.keep_router_rows(kept_experts)
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
    if all(isinstance(layer.experts, FusedExperts) for layer in layers):
        widths = {layer.intermediate_size for layer in layers}
        if len(widths) == 1:
            setattr(config, spec.expert_size_key, widths.pop())
    shared = {layer.shared_intermediate_size for layer in layers if layer.shared is not None}
    if spec.shared_size_key and len(shared) == 1:
        setattr(config, spec.shared_size_key, shared.pop())


def prune(model: nn.Module, stats: MicroExpertStats | None = None, config: PruneConfig | float | None = None, *,
          calib_dataloader: Iterable | None = None, offload: OffloadConfig | str | torch.device | None = None,
          **options) -> PruneReport:
    """Prune ``model`` in place; see the module docstring and :class:`PruneConfig`. Returns a :class:`PruneReport`.

    ``config`` is a :class:`PruneConfig`, or the ratio; ``options`` are :class:`PruneConfig`
    fields (``prune(model, stats, 0.4, allocation="global")``). ``calib_dataloader`` feeds
    ``sequential`` calibration and ``naee``. With ``offload`` (an
    :class:`~camera_pl.offload.OffloadConfig` or the execution device) those run one decoder
    layer at a time on the execution device, the model staying on its home device
    (:mod:`camera_pl.offload`); ``sequential`` then prunes each layer before computing the
    next layer's inputs. Pruning from given statistics never runs the model, offloaded or not.
    """
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        config, options = None, {"ratio": float(config), **options}
    config = PruneConfig.build(config, **options)
    offload = as_offload(offload)
    if offload is not None and config.sequential and config.method == "heapr":
        raise ValueError("sequential heapr pruning collects gradient statistics, whose backward pass needs the whole "
                         "model; layer-by-layer execution (offload=...) cannot run it. Use another method, or "
                         "sequential=False with statistics collected in memory.")
    layers = moe_layers(model)
    for layer in layers:
        if layer.experts.kind not in ("fused", "ragged", "list"):
            raise TypeError(f"MoE layer {layer.index} holds {layer.experts.kind} experts; prune before quantizing or "
                            "compressing experts (pruning edits full-precision fused or already pruned experts).")
    needs_data = config.sequential or config.method in CALIBRATED_METHODS
    if needs_data and calib_dataloader is None:
        why = "sequential=True recollects statistics after each layer" if config.sequential else \
            f"method={config.method!r} measures each layer's output error directly"
        raise ValueError(f"prune needs calib_dataloader: {why}.")
    if not needs_data:
        if stats is None:
            raise ValueError("prune needs statistics: pass stats=camera_pl.collect_stats(model, dataloader), "
                             "or sequential=True with calib_dataloader.")
        stats.check_compatible(model)

    originals = _original_sizes(model, layers)
    reports = {layer.index: LayerPruneReport(layer.index, _widths(layer), _widths(layer), layer.shared_intermediate_size,
                                             layer.shared_intermediate_size, params_before=expert_params(layer))
               for layer in layers}
    if config.level == "expert":
        _prune_experts(model, layers, stats, config, calib_dataloader, reports, offload)
    elif config.sequential and offload is not None:
        _prune_sequential_layerwise(model, calib_dataloader, config, offload, originals, reports)
    else:
        groups = [[layer] for layer in layers] if config.sequential else [layers]
        for group in groups:
            if config.sequential:
                stats = collect_stats(model, calib_dataloader, max_tokens=config.max_tokens, **config.collect_kwargs())
            scores = stats.scores(config.method, model=model, **config.score_kwargs())
            _prune_group(group, scores, originals, config, reports)
    layers = moe_layers(model)
    for layer in layers:
        r = reports[layer.index]
        r.widths_after, r.shared_after, r.params_after = _widths(layer), layer.shared_intermediate_size, expert_params(layer)
    _update_config(model, layers)
    setattr(model.config, ORIGINAL_SIZES, {str(i): list(v) for i, v in originals.items()})
    return PruneReport(config.method, config.allocation, config.ratio, [reports[l.index] for l in layers])


def _prune_group(group: list[MoELayer], scores: dict[int, LayerScores], originals: dict[int, tuple[int, int]],
                 config: PruneConfig, reports: dict[int, LayerPruneReport]) -> None:
    """Choose the micro-experts to keep in ``group`` (one allocation over its layers) and remove the others."""
    allocation = ALLOCATIONS[config.allocation]
    padded = {l.index: _in_original_sizes(l, scores[l.index], originals[l.index]) for l in group}
    keeps = allocation.fn({i: v[0] for i, v in padded.items()}, {i: v[1] for i, v in padded.items()}, config)
    keeps = {l.index: _current_part(l, *keeps[l.index]) for l in group}
    for layer in group:  # every layer must stay routable (and fused widths aligned) before any is edited
        check_expert_count(layer, int((keeps[layer.index][0].sum(1) > 0).sum()))
        if allocation.fused and layer.experts.kind != "list":  # a list's Linears take any width
            _check_fused_width(layer, int(keeps[layer.index][0].sum(1).max()))
    for layer in group:
        reports[layer.index].experts_removed = _apply_micro(layer, *keeps[layer.index], fused=allocation.fused)


def _prune_sequential_layerwise(model: nn.Module, calib_dataloader: Iterable, config: PruneConfig,
                                offload: OffloadConfig, originals: dict[int, tuple[int, int]],
                                reports: dict[int, LayerPruneReport]) -> None:
    """``sequential`` one decoder layer at a time: observe the layer on the cached batches, prune it, then run
    the pruned layer to give the next one its inputs (what the in-memory path recollects the statistics for)."""
    run = LayerByLayer(model, calib_dataloader, offload, config.max_tokens)
    restore = use_camera_experts(model)  # the in-memory path runs every layer through camera_pl's forward
    try:
        for step in run:
            if step.moe is not None:
                acc = StatsAccumulator([step.moe])
                with observe(model, acc, layers=[step.moe], device=offload.device) as obs:
                    step.run(keep_outputs=False,
                             before_batch=lambda mask: obs.set_attention_mask(mask, mask, count=False))
                acc.update(torch.tensor(float(run.tokens)))
                entry = layer_entry(acc, step.moe)
                _prune_group([step.moe], compute_scores({step.index: entry}, config.method, **config.score_kwargs()),
                             originals, config, reports)
            if not step.last:
                step.run()
    finally:
        restore()


def _check_fused_width(layer: MoELayer, width: int) -> None:
    """Grouped GEMM kernels (transformers' default on CPU and CUDA) need 16-byte aligned expert widths."""
    size = torch.empty((), dtype=layer.experts.dtype).element_size()
    if (width * size) % 16:
        raise ValueError(f"MoE layer {layer.index}: experts {width} wide are not 16-byte aligned in "
                         f"{layer.experts.dtype}, which transformers' grouped GEMM kernels need; use a width_multiple "
                         f"of {16 // size} (the default 8 works for every dtype) or allocation='layer'.")


def _prune_experts(model: nn.Module, layers: list[MoELayer], stats: MicroExpertStats | None, config: PruneConfig,
                   calib_dataloader: Iterable | None, reports: dict[int, LayerPruneReport],
                   offload: OffloadConfig | None) -> None:
    """Expert-level methods: remove ``round(ratio · E)`` whole experts per layer with their router rows."""
    if config.method == "naee":
        n_remove = int(round(config.ratio * layers[0].num_experts))
        keeps = naee_keep_layerwise(model, calib_dataloader, config.max_tokens or 4096, n_remove, offload) \
            if offload is not None else \
            naee_keep(layers, cache_layer_inputs(model, layers, calib_dataloader, config.max_tokens or 4096), n_remove)
    else:
        scores = stats.scores(config.method, model=model, **config.score_kwargs())
        keeps = {layer.index: expert_level_keep(scores[layer.index], config.ratio) for layer in layers}
    for layer in layers:
        check_expert_count(layer, int(keeps[layer.index].sum()))
    for layer in layers:
        keep = keeps[layer.index]
        remove_experts(layer, keep)
        reports[layer.index].experts_removed = (~keep).nonzero().squeeze(1).tolist()
