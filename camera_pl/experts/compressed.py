"""Compressed experts (arXiv 2503.00634, METHODS §5): auxiliary experts become learned vectors.

Per token the router's top-k experts are sorted by routing weight. The first ``k_main`` run in
full; each of the remaining ``k_a = k − k_main`` *auxiliary* experts ``i`` is replaced by three
learned vectors ``θ_i = (θ1_i [H], θ2_i [I], θ3_i [H])``, initialised to ones. The token's
auxiliary vectors are averaged with the auxiliary routing weights renormalised to sum to 1,
``θ = Σ α'_i θ_i``, and modulate every main expert IA³-style:
``f_e(x; θ) = down((act(gate(x ⊙ θ1)) ⊙ up(x ⊙ θ3)) ⊙ θ2)``. A token with no auxiliary expert
(``k_main = k``, or auxiliary slots dropped as ``num_experts`` sentinels by ODP) uses ``θ = 1``.

Main experts keep their original routing weights (no renormalisation over the main slots), so
with ``θ = 1`` the layer computes exactly the top-``k_main`` part of the original mixture —
the "naive top-k_main" baseline — and with ``k_main = k`` it computes the original layer.

:class:`CompressedExperts` replaces a layer's experts module of any kind (fused, ragged after
CAMERA-P pruning, quantized) and keeps it as ``.base``; it reads the base only through the
experts interface, so statistics, saving and loading work as for every other kind.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.experts.base import ExpertWeights, as_experts
from camera_pl.experts.forward import SortedRouting, per_expert, report
from camera_pl.experts.module import WrappingExperts, describe

class CompressedExperts(WrappingExperts):
    """A layer's routed experts where each token's auxiliary experts act as IA³ vectors on its main experts."""

    kind = "compressed"

    def __init__(self, base: nn.Module, top_k: int, k_main: int):
        view = as_experts(base)
        if isinstance(base, CompressedExperts):
            raise ValueError("These experts are already compressed.")
        if not view.layout.has_gate:
            raise TypeError("Compressed experts need gated experts (gate and up projections); this layer's experts "
                            "have no gate projection.")
        if not 1 <= k_main <= top_k:
            raise ValueError(f"k_main must lie in [1, top_k={top_k}], got {k_main}.")
        super().__init__(base)
        self.top_k = top_k
        self.k_main = k_main
        kw = dict(dtype=view.dtype, device=view.device)
        self.theta_gate = nn.Parameter(torch.ones(self.num_experts, self.hidden_size, **kw))  # θ1: gate input scale
        self.theta_inner = nn.Parameter(torch.ones(self.num_experts, self.intermediate_size, **kw))  # θ2
        self.theta_up = nn.Parameter(torch.ones(self.num_experts, self.hidden_size, **kw))  # θ3: up input scale

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        return self.base_experts.weights(e, dtype)

    # ---- computation ------------------------------------------------------------------------
    def _aggregate(self, mix: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``Σ_i α'_i θ_i`` per token from the mixing matrix ``mix [T, E]`` (rows sum to 1, or to 0: ones)."""
        return 1 + mix.to(theta.dtype) @ (theta - 1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Experts-interface forward: ``hidden_states [T, H]``, routing ``[T, k]`` -> ``[T, H]``."""
        num_tokens, top_k = top_k_index.shape
        present = top_k_index < self.num_experts  # ODP's dropped slots carry the sentinel num_experts
        order = top_k_weights.masked_fill(~present, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        index, weights, present = top_k_index.gather(1, order), top_k_weights.gather(1, order), present.gather(1, order)
        k_main = min(self.k_main, top_k)
        aux_w = (weights[:, k_main:] * present[:, k_main:]).float()
        alpha = aux_w / aux_w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        mix = alpha.new_zeros(num_tokens, self.num_experts).scatter_add_(
            1, index[:, k_main:].clamp(max=self.num_experts - 1), alpha)
        theta_gate, theta_inner, theta_up = (self._aggregate(mix, t) for t in
                                             (self.theta_gate, self.theta_inner, self.theta_up))
        main_weights = weights[:, :k_main].contiguous()
        routing = SortedRouting.of(index[:, :k_main].contiguous(), main_weights, self.num_experts)
        observer = self.__dict__.get("_camera_observer")
        base, full = self.base_experts, self.full_width
        x_all = hidden_states[routing.token_ids]

        def run(e: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            tok, x = routing.token_ids[rows], x_all[rows]
            w = base.weights(e, x.dtype)
            a = base.activation(e, x * theta_gate[tok].to(x.dtype), w, up_input=x * theta_up[tok].to(x.dtype))
            scale = theta_inner[tok] if full else theta_inner[tok][:, base.channels(e)]
            a = a * scale.to(a.dtype)
            return a, base.output(e, a, w)

        acts, out = per_expert(self, routing, observer is not None, hidden_states, run)
        report(observer, routing, acts, out, top_k_weights)
        return routing.combine(out, hidden_states, main_weights)

    # ---- description ------------------------------------------------------------------------
    def vectors(self) -> list[nn.Parameter]:
        """The learned vectors θ1, θ2, θ3 (``[E, H]``, ``[E, I]``, ``[E, H]``)."""
        return [self.theta_gate, self.theta_inner, self.theta_up]

    def parameters_per_token(self) -> float:
        """Routed weight elements one token activates: ``k_main`` experts of mean width plus ``k_a`` vector triples."""
        triple = 2 * self.hidden_size + self.intermediate_size
        return self.k_main * self.parameter_counts().mean().item() + (self.top_k - self.k_main) * triple

    def spec(self) -> dict:
        return {"top_k": self.top_k, "k_main": self.k_main, "base": describe(self.base)}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, k_main={self.k_main}"


def build_compressed(spec: dict, replaced) -> CompressedExperts:
    """Empty :class:`CompressedExperts` of the recorded shape around ``replaced`` (its base, already rebuilt)."""
    return CompressedExperts(replaced.module, spec["top_k"], spec["k_main"])
