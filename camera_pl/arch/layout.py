"""``ExpertsLayout``: how an experts module stores its gate, up and down projections.

transformers 5 describes every fused experts class with five flags set by
``use_experts_implementation`` (``integrations/moe.py``): gate and up packed into one
``gate_up_proj`` (``has_gate``) either concatenated ``[gate; up]`` or interleaved
``g0, u0, g1, u1, ...`` (``is_concatenated``), weights stored ``[E, in, out]`` instead of
``[E, out, in]`` (``is_transposed``), biases (``has_bias``) and a norm after each expert
(``has_post_expert_norm``). They are read here once, and this is the only module that
knows how gate and up are laid out: everything else asks the layout to split, pack or
orient a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertsLayout:
    """Storage flags of one experts module (transformers' experts-interface flags)."""

    has_gate: bool = True
    concatenated: bool = True
    transposed: bool = False
    has_bias: bool = False
    post_norm: bool = False

    @classmethod
    def of(cls, experts: nn.Module) -> "ExpertsLayout":
        """The layout an experts module declares (transformers' defaults where a flag is absent)."""
        layout = getattr(experts, "layout", None)
        if isinstance(layout, ExpertsLayout):
            return layout
        return cls(
            has_gate=bool(getattr(experts, "has_gate", True)),
            concatenated=bool(getattr(experts, "is_concatenated", True)),
            transposed=bool(getattr(experts, "is_transposed", False)),
            has_bias=bool(getattr(experts, "has_bias", False)),
            post_norm=bool(getattr(experts, "has_post_expert_norm", False)),
        )

    @property
    def up_name(self) -> str:
        """Name of the fused tensor holding the up (and gate) projection."""
        return "gate_up_proj" if self.has_gate else "up_proj"

    # ---- gate/up packing --------------------------------------------------------------------
    def split(self, packed: torch.Tensor, dim: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(gate or None, up)`` views of a packed gate/up tensor along ``dim``."""
        if not self.has_gate:
            return None, packed
        if self.concatenated:
            gate, up = packed.chunk(2, dim=dim)
            return gate, up
        pairs = packed.unflatten(dim % packed.dim(), (-1, 2))  # interleaved: g0, u0, g1, u1, ...
        return pairs.select(dim % packed.dim() + 1, 0), pairs.select(dim % packed.dim() + 1, 1)

    def pack(self, gate: torch.Tensor | None, up: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of :meth:`split`: one gate/up tensor in this layout (``up`` alone without a gate)."""
        if gate is None:
            return up
        if self.concatenated:
            return torch.cat([gate, up], dim=dim)
        dim = dim % gate.dim()
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)

    # ---- gating ---------------------------------------------------------------------------------
    def activate(self, template: nn.Module, proj: torch.Tensor) -> torch.Tensor:
        """Micro-expert activations from a packed gate/up projection, by the module's own gating.

        ``template`` is the experts module (or its weightless copy) whose ``_apply_gate`` (gated
        experts, e.g. GPT-OSS's clamped SwiGLU) or ``act_fn`` (gate-less experts) defines them.
        """
        return template._apply_gate(proj) if self.has_gate else template.act_fn(proj)

    # ---- orientation ------------------------------------------------------------------------
    def as_linear(self, stored: torch.Tensor) -> torch.Tensor:
        """A stored ``[..., a, b]`` weight in ``nn.Linear`` orientation ``[..., out, in]`` (a view)."""
        return stored.transpose(-1, -2) if self.transposed else stored

    def as_stored(self, linear: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`as_linear`."""
        return self.as_linear(linear)
