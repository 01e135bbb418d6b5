"""``CameraExperts``: the base class of camera_pl's own experts modules (ragged, quantized, compressed)."""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.experts.base import Experts, as_experts, weightless
from camera_pl.experts.forward import experts_forward


class CameraExperts(nn.Module, Experts):
    """Base of camera_pl's own experts modules (ragged, quantized, compressed).

    Keeps the module it replaced as a weightless ``template`` (not a submodule, so it has no
    state): the activation uses the template's own gating function and constants
    (e.g. GPT-OSS's clamped SwiGLU), so semantics match transformers for any layout. A
    post-expert norm, which has weights, is kept as a real submodule. The forward is
    camera_pl's experts forward, the same for every kind, with observation.
    """

    kind = "camera"

    def __init__(self, replaced: Experts, num_experts: int):
        super().__init__()
        self.layout = replaced.layout
        self.num_experts = int(num_experts)
        self.hidden_size = int(replaced.hidden_size)
        self.intermediate_size = int(replaced.intermediate_size)
        object.__setattr__(self, "_template", weightless(replaced.template))
        if self.layout.post_norm:
            self.post_expert_norm = replaced.template.post_expert_norm

    @property
    def module(self) -> nn.Module:
        return self

    @property
    def template(self) -> nn.Module:
        return self._template

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Experts-interface forward: ``hidden_states [T, H]``, routing ``[T, k]`` -> ``[T, H]``."""
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def spec(self) -> dict:
        """JSON-able description from which the kind's builder makes an empty module of this shape."""
        raise NotImplementedError


class WrappingExperts(CameraExperts):
    """A camera_pl experts module around another experts module (``base``), whose micro-experts it keeps.

    Sizes, kept channels, device and dtype are the base's; the spec records the base's kind
    so that loading rebuilds it first.
    """

    def __init__(self, base: nn.Module):
        view = as_experts(base)
        super().__init__(view, view.num_experts)
        self.base = base

    @property
    def base_experts(self) -> Experts:
        return as_experts(self.base)

    def widths(self) -> torch.Tensor:
        return self.base_experts.widths()

    def channels(self, e: int) -> torch.Tensor:
        return self.base_experts.channels(e)

    @property
    def device(self) -> torch.device:
        return self.base_experts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_experts.dtype


def describe(module: nn.Module) -> dict | None:
    """``{"kind", "spec"}`` of a camera_pl experts module; None for transformers' own experts."""
    if isinstance(module, CameraExperts):
        return {"kind": module.kind, "spec": module.spec()}
    return None
