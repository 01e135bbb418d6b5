"""camera_pl's experts implementation, registered in transformers' experts interface.

transformers 5 dispatches every fused experts module through ``ALL_EXPERTS_FUNCTIONS``
(``model.set_experts_implementation(name)``). camera_pl registers ``"camera_pl"``: the
fused module is read through the experts interface (:class:`FusedExperts`) and runs
camera_pl's experts forward (:func:`camera_pl.experts.forward.experts_forward`), which
honours the layout flags and the module's own ``_apply_gate`` and feeds observers. Blocks
that loop over a list of experts themselves are run by camera_pl instead (:mod:`camera_pl.arch.blocks`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from camera_pl.arch.adapters import architecture_spec, moe_layers
from camera_pl.arch.blocks import release, run_by_camera
from camera_pl.experts.base import FusedExperts
from camera_pl.experts.forward import experts_forward

IMPLEMENTATION = "camera_pl"


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The registered implementation: transformers' fused experts through the experts interface."""
    return experts_forward(FusedExperts(self), hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _fused_forward)


def run_looping_blocks(model: nn.Module) -> Callable[[], None]:
    """Run MoE blocks that loop over their experts themselves through camera_pl; returns a function undoing it."""
    spec = architecture_spec(model)
    if spec.routing is None:
        return lambda: None
    blocks = [layer.block for layer in moe_layers(model)]
    for block in blocks:
        run_by_camera(block, spec)

    def restore() -> None:
        for block in blocks:
            release(block, spec)

    return restore


def use_camera_experts(model: nn.Module) -> Callable[[], None]:
    """Switch ``model``'s experts to camera_pl's forward; returns a function restoring the previous one."""
    previous = model.config._experts_implementation
    model.set_experts_implementation(IMPLEMENTATION)
    restore_blocks = run_looping_blocks(model)

    def restore() -> None:
        restore_blocks()
        model.set_experts_implementation(previous)

    return restore
