"""MoE blocks that loop over their experts themselves (remote-code MoEs), run through camera_pl.

transformers 5 blocks call one experts module with the routing, so camera_pl swaps the
experts implementation and the block stays the model's own. Remote-code blocks such as
DeepSeek-MoE (v1)'s call a router with its own signature and then ``experts[e]`` expert by
expert. For those (``ArchitectureSpec.routing`` set) camera_pl runs the block itself,
with the same math — router, routed experts through camera_pl's experts forward (so
observers and dropped slots work), plus shared experts — while it observes or drops
experts, and for good once the experts are a camera_pl module the block's own loop cannot
index (quantized, compressed). The block's own forward comes back when camera_pl is done
and the experts are still the model's list.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from camera_pl.experts.base import as_experts, unwrap
from camera_pl.experts.forward import experts_forward
from camera_pl.experts.modulelist import is_expert_list

if TYPE_CHECKING:
    from camera_pl.arch.adapters import ArchitectureSpec

RouteFn = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


def topk_gate_route(router: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-MoE (v1)-style gates: ``gate([B, S, H]) -> (topk_idx, topk_weight, aux_loss)`` with a ``weight [E, H]``.

    The gate itself chooses and weights the experts (its scoring, top-k and normalisation);
    its logits, which it does not return, are recomputed from its weight for the statistics.
    """
    index, weights = router(hidden.unsqueeze(0))[:2]
    return nn.functional.linear(hidden, router.weight), weights, index


class Routing(nn.Module):
    """A looping block's router called as transformers 5 routers are: ``hidden [T, H] -> (logits, weights, index)``.

    camera_pl's router hooks (statistics, ODP) attach here. It is kept on the block outside
    its submodules, so it adds no state-dict keys.
    """

    def __init__(self, router: nn.Module, route: RouteFn):
        super().__init__()
        object.__setattr__(self, "router", router)  # not a submodule: the block owns it
        self.route = route

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.route(self.router, hidden)


def routing_of(block: nn.Module, spec: "ArchitectureSpec") -> Routing:
    """The block's :class:`Routing` (made once, so hooks on it last as long as the block)."""
    routing = block.__dict__.get("_camera_routing")
    if routing is None or routing.router is not getattr(block, spec.router):
        routing = Routing(getattr(block, spec.router), spec.routing)
        block.__dict__["_camera_routing"] = routing
    return routing


def run_block(block: nn.Module, spec: "ArchitectureSpec", hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The block's math with camera_pl's experts forward: routed experts + (gated) shared experts."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    _, weights, index = routing_of(block, spec)(x)
    experts = getattr(block, spec.experts)
    if is_expert_list(unwrap(experts)):
        out = experts_forward(as_experts(experts), x, index, weights)
    else:
        out = experts(x, index, weights)
    if spec.shared is not None:
        shared = getattr(block, spec.shared)(x)
        if spec.shared_gate is not None:
            shared = torch.sigmoid(getattr(block, spec.shared_gate)(x)) * shared
        out = out + shared
    return out.view(shape)


def run_by_camera(block: nn.Module, spec: "ArchitectureSpec") -> None:
    """Make :func:`run_block` the block's forward (idempotent)."""
    block.__dict__["forward"] = partial(run_block, block, spec)


def release(block: nn.Module, spec: "ArchitectureSpec") -> None:
    """Give the block its own forward back, where its own loop can run its experts (still the model's list)."""
    if is_expert_list(unwrap(getattr(block, spec.experts))):
        block.__dict__.pop("forward", None)
