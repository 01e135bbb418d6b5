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

:class:`CompressedExperts` replaces a layer's experts module (transformers' fused experts, or
:class:`camera_pl.ragged.RaggedExperts` after CAMERA-P pruning) and keeps it as ``.base``. It
describes itself with ``kind``/:meth:`~CompressedExperts.spec` and :func:`build_compressed`
rebuilds it empty, so ``camera_pl.save``/``camera_pl.load`` round-trip it once
``register_experts_kind("compressed", build_compressed)`` is in effect.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from camera_pl.arch.adapters import ArchitectureSpec, MoELayer, moe_layers
from camera_pl.odp import expert_parameter_counts
from camera_pl.arch.forward import expert_output
from camera_pl.experts.ragged import RaggedExperts, build_ragged

KIND = "compressed"
TRAINABLE = ("all", "vectors")


def _base_view(base: nn.Module) -> MoELayer:
    """camera_pl's per-expert weight views of a bare experts module (fused or ragged)."""
    return MoELayer(-1, SimpleNamespace(experts=base, gate=None), ArchitectureSpec())


class CompressedExperts(nn.Module):
    """A layer's routed experts where each token's auxiliary experts act as IA³ vectors on its main experts."""

    kind = KIND

    def __init__(self, base: nn.Module, top_k: int, k_main: int):
        super().__init__()
        if getattr(base, "kind", None) not in (None, RaggedExperts.kind):
            raise TypeError(f"Compressed experts wrap fused or ragged (pruned) experts, not {base.kind!r} experts; "
                            "compress before quantizing.")
        if not getattr(base, "has_gate", True):
            raise TypeError("Compressed experts need gated experts (gate and up projections); this layer's experts "
                            "have no gate projection.")
        if not 1 <= k_main <= top_k:
            raise ValueError(f"k_main must lie in [1, top_k={top_k}], got {k_main}.")
        self.base = base
        self.top_k = top_k
        self.k_main = k_main
        self.num_experts = int(base.num_experts)
        self._view = _base_view(base)
        hidden, inner = self._view.hidden_size, self._view.intermediate_size
        weight = self._view.down(0)
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.theta_gate = nn.Parameter(torch.ones(self.num_experts, hidden, **kw))  # θ1: gate input scale
        self.theta_inner = nn.Parameter(torch.ones(self.num_experts, inner, **kw))  # θ2: activation scale
        self.theta_up = nn.Parameter(torch.ones(self.num_experts, hidden, **kw))  # θ3: up input scale

    # ---- computation ------------------------------------------------------------------------
    def _aggregate(self, mix: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``Σ_i α'_i θ_i`` per token from the mixing matrix ``mix [T, E]`` (rows sum to 1, or to 0: ones)."""
        return 1 + mix.to(theta.dtype) @ (theta - 1)

    def _activation(self, e: int, x: torch.Tensor, theta_gate: torch.Tensor, theta_up: torch.Tensor) -> torch.Tensor:
        view = self._view
        gate_w, up_w = view.gate_up(e)
        if view.is_ragged:
            biases, apply_gate = self.base.biases(e), self.base.template._apply_gate
        else:
            stacked = view.stacked_biases()
            biases = None if stacked is None else (stacked[0][e], stacked[1][e])
            apply_gate = self.base._apply_gate
        g = nn.functional.linear(x * theta_gate, gate_w, None if biases is None else biases[0])
        u = nn.functional.linear(x * theta_up, up_w, None if biases is None else biases[1])
        packed = torch.cat([g, u], dim=-1) if view.is_concatenated else torch.stack([g, u], dim=-1).flatten(-2)
        return apply_gate(packed)

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
        main = index[:, :k_main]
        out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        slots = hidden_states.new_zeros(num_tokens, k_main, hidden_states.shape[-1], dtype=out_dtype)
        for e in torch.unique(main).tolist():
            if e >= self.num_experts:
                continue
            tok, slot = torch.where(main == e)
            x = hidden_states[tok]
            a = self._activation(e, x, theta_gate[tok].to(x.dtype), theta_up[tok].to(x.dtype))
            scale = theta_inner[tok]
            if self._view.is_ragged:
                scale = scale[:, self.base.expert_channels(e)]
            out = expert_output(self.base, e, a * scale.to(a.dtype))
            slots[tok, slot] = out * weights[tok, slot, None]
        return slots.sum(dim=1).to(hidden_states.dtype)

    # ---- description ------------------------------------------------------------------------
    def vectors(self) -> list[nn.Parameter]:
        """The learned vectors θ1, θ2, θ3 (``[E, H]``, ``[E, I]``, ``[E, H]``)."""
        return [self.theta_gate, self.theta_inner, self.theta_up]

    def parameters_per_token(self) -> float:
        """Routed weight elements one token activates: ``k_main`` experts of mean width plus ``k_a`` vector triples."""
        triple = 2 * self._view.hidden_size + self._view.intermediate_size
        return self.k_main * expert_parameter_counts(self._view).mean().item() + (self.top_k - self.k_main) * triple

    def spec(self) -> dict:
        """What :func:`build_compressed` needs to rebuild an empty module of this shape (JSON-able)."""
        base = None if getattr(self.base, "kind", None) is None else {"kind": self.base.kind, "spec": self.base.spec()}
        return {"top_k": self.top_k, "k_main": self.k_main, "base": base}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, k_main={self.k_main}"


def build_compressed(spec: dict, original: nn.Module) -> CompressedExperts:
    """Empty :class:`CompressedExperts` of the recorded shape around ``original`` (weights come from the state dict)."""
    base = original
    if spec["base"] is not None:
        if spec["base"]["kind"] != RaggedExperts.kind:
            raise ValueError(f"Cannot rebuild compressed experts over {spec['base']['kind']!r} experts; "
                             "only fused and ragged bases exist.")
        base = build_ragged(spec["base"]["spec"], original)
    return CompressedExperts(base, spec["top_k"], spec["k_main"])


def compress_experts(model: nn.Module, k_main: int | None = None, trainable: str = "all") -> list[CompressedExperts]:
    """Replace every MoE layer's experts of ``model`` (in place) by :class:`CompressedExperts`.

    Args:
        model: a transformers MoE causal LM, fused or pruned (ragged) experts.
        k_main: main experts per token; default ``top_k // 2`` (at least 1), the paper's ``k/2``.
        trainable: ``"all"`` leaves every parameter's ``requires_grad`` as it is (the paper trains
            all parameters); ``"vectors"`` freezes everything except the θ vectors.

    Returns:
        The new modules, in layer order.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}.")
    top_k = getattr(model.config, "num_experts_per_tok", None)
    if top_k is None:
        raise ValueError(f"{type(model).__name__}'s config has no num_experts_per_tok; compressed experts need "
                         "top-k routing.")
    k_main = max(1, top_k // 2) if k_main is None else k_main
    layers = moe_layers(model)
    if any(isinstance(layer.experts, CompressedExperts) for layer in layers):
        raise ValueError("This model's experts are already compressed.")
    new = []
    for layer in layers:
        module = CompressedExperts(layer.experts, top_k, k_main)
        setattr(layer.block, layer.spec.experts, module)
        new.append(module)
    if trainable == "vectors":
        model.requires_grad_(False)
        for module in new:
            for theta in module.vectors():
                theta.requires_grad_(True)
    return new


def routed_parameters_per_token(model: nn.Module) -> float:
    """Routed-expert weight elements one token activates, summed over MoE layers (biases left out).

    Compressed layers count ``k_main`` experts plus ``k_a`` vector triples; other layers count
    ``num_experts_per_tok`` experts of mean width (exact for experts of equal width).
    """
    top_k = model.config.num_experts_per_tok
    return sum(layer.experts.parameters_per_token() if isinstance(layer.experts, CompressedExperts)
               else top_k * expert_parameter_counts(layer).mean().item() for layer in moe_layers(model))
