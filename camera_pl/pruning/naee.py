"""NAEE expert pruning: remove the expert subset that perturbs each layer's output least.

Per MoE layer, on cached layer inputs X (padding excluded), choose the set R of experts
whose removal — router rows included, so tokens are re-routed among the remaining
experts — minimises ‖Y − Ŷ_R‖_F. Exhaustive over all subsets for layers with at most
``exhaustive_max`` experts, greedy (one expert at a time) beyond (METHODS §6). Each
candidate is evaluated by really removing the experts from a copy of the block, so the
routing semantics are the model's own.
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer
from camera_pl.offload import LayerByLayer, OffloadConfig
from camera_pl.pruning.surgery import remove_experts


def cache_layer_inputs(model: nn.Module, layers: list[MoELayer], dataloader: Iterable,
                       max_tokens: int = 4096) -> dict[int, torch.Tensor]:
    """Unpadded inputs ``[1, T, H]`` of every MoE block, up to ``max_tokens`` tokens."""
    cached: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    mask_box: list[torch.Tensor] = []

    def hook(module, args, index):
        x = args[0].detach()
        cached[index].append(x.reshape(-1, x.shape[-1])[mask_box[0]])

    handles = [layer.block.register_forward_pre_hook(lambda m, a, i=layer.index: hook(m, a, i)) for layer in layers]
    device = next(model.parameters()).device
    seen = 0
    try:
        with torch.no_grad():
            for batch in dataloader:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                mask_box[:] = [mask.reshape(-1).bool()]
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                seen += int(mask.sum())
                if seen >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("NAEE saw no tokens: the calibration dataloader is empty.")
    return {i: torch.cat(xs)[:max_tokens][None] for i, xs in cached.items()}


def naee_keep_layerwise(model: nn.Module, dataloader: Iterable, max_tokens: int, n_remove: int,
                        offload: OffloadConfig) -> dict[int, torch.Tensor]:
    """:func:`naee_keep` one decoder layer at a time (:mod:`camera_pl.offload`): each MoE block's unpadded inputs
    are captured while its layer runs the cached batches of the unpruned model, and its experts are chosen while
    it is on the execution device. Nothing is removed here."""
    run = LayerByLayer(model, dataloader, offload, max_tokens)
    keeps: dict[int, torch.Tensor] = {}
    for step in run:
        if step.moe is None:
            step.run()
            continue
        inputs: list[torch.Tensor] = []
        mask: list[torch.Tensor] = []

        def declare(batch_mask: torch.Tensor) -> None:
            mask[:] = [batch_mask.reshape(-1)]

        def record(module: nn.Module, args: tuple) -> None:
            inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])[mask[0]])

        handle = step.moe.block.register_forward_pre_hook(record)
        try:
            step.run(before_batch=declare)
        finally:
            handle.remove()
        keeps.update(naee_keep([step.moe], {step.index: torch.cat(inputs)[:max_tokens][None]}, n_remove))
    return keeps


def _block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return (out[0] if isinstance(out, tuple) else out).float()


def _removal_error(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, removed: tuple[int, ...]) -> float:
    block = copy.deepcopy(layer.block)
    keep = torch.ones(layer.num_experts, dtype=torch.bool)
    keep[list(removed)] = False
    remove_experts(MoELayer(layer.index, block, layer.spec), keep)
    with torch.no_grad():
        return float((y - _block_output(block, x)).norm())


def naee_keep(layers: list[MoELayer], inputs: dict[int, torch.Tensor], n_remove: int,
              exhaustive_max: int = 8) -> dict[int, torch.Tensor]:
    """Per layer, a keep-mask ``[E]`` removing the ``n_remove`` experts chosen by NAEE."""
    keeps = {}
    for layer in layers:
        x = inputs[layer.index]
        with torch.no_grad():
            y = _block_output(layer.block, x)
        experts = range(layer.num_experts)
        if layer.num_experts <= exhaustive_max:
            removed = min(itertools.combinations(experts, n_remove), key=lambda r: _removal_error(layer, x, y, r))
        else:
            removed = ()
            for _ in range(n_remove):
                best = min((e for e in experts if e not in removed),
                           key=lambda e: _removal_error(layer, x, y, removed + (e,)))
                removed = removed + (best,)
        keep = torch.ones(layer.num_experts, dtype=torch.bool)
        keep[list(removed)] = False
        keeps[layer.index] = keep
    return keeps
