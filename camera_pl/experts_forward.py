"""camera_pl's experts implementation, registered in transformers' experts interface.

transformers 5 dispatches every fused experts module through ``ALL_EXPERTS_FUNCTIONS``
(``model.set_experts_implementation(name)``). camera_pl registers ``"camera_pl"``: a
per-expert forward that computes exactly what the model's experts compute, honouring the
interface flags (concatenated/interleaved gate_up, transposed weights, biases, gate-less
experts, the module's own ``_apply_gate`` such as GPT-OSS's clamped SwiGLU), and hands
the micro-expert activations it already computed to an observer when one is attached.
Statistics therefore cost no second expert matmul, and output with and without an
observer is bit-identical (the observer only reads).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

IMPLEMENTATION = "camera_pl"


class ExpertsObserver(Protocol):
    """Receives what one experts forward computed, for all (token, slot) pairs at once."""

    def observe(
        self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, acts: torch.Tensor, out_norms: torch.Tensor
    ) -> None: ...


def expert_activation(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Micro-expert activations ``a_e(x) [T, I]``: the input of expert ``e``'s down projection."""
    if hasattr(experts, "expert_activation"):  # camera_pl experts modules (ragged, quantized)
        return experts.expert_activation(e, x)
    has_gate = getattr(experts, "has_gate", True)
    w = (experts.gate_up_proj if has_gate else experts.up_proj)[e]
    proj = x @ w if getattr(experts, "is_transposed", False) else nn.functional.linear(x, w)
    if getattr(experts, "has_bias", False):
        proj = proj + (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)[e]
    return experts._apply_gate(proj) if has_gate else experts.act_fn(proj)


def expert_output(experts: nn.Module, e: int, a: torch.Tensor) -> torch.Tensor:
    """``f_e(x) [T, H]`` from expert ``e``'s activations (routing weight not applied)."""
    if hasattr(experts, "expert_output"):
        return experts.expert_output(e, a)
    w = experts.down_proj[e]
    out = a @ w if getattr(experts, "is_transposed", False) else nn.functional.linear(a, w)
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[e]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def camera_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Routed experts, one matmul pair per hit expert; reports activations to ``self._camera_observer``.

    Per-slot outputs are weighted and summed over the top-k slots in the same order and dtype
    as transformers' batched/grouped implementations, so logits agree with them to float
    rounding of the matmul kernels (~1e-6 in fp32).
    """
    observer: ExpertsObserver | None = getattr(self, "_camera_observer", None)
    num_tokens, top_k = top_k_index.shape
    out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
    slots = hidden_states.new_zeros(num_tokens, top_k, hidden_states.shape[-1], dtype=out_dtype)
    acts = norms = None
    for e in torch.unique(top_k_index).tolist():
        if e >= self.num_experts:  # expert-parallel sentinel: not a local expert
            continue
        tok, slot = torch.where(top_k_index == e)
        a = expert_activation(self, e, hidden_states[tok])
        out = expert_output(self, e, a)
        slots[tok, slot] = out * top_k_weights[tok, slot, None]
        if observer is not None:
            if acts is None:
                acts = a.new_zeros(num_tokens, top_k, observer.layer.intermediate_size)
                norms = out.new_zeros(num_tokens, top_k, dtype=torch.float32)
            if hasattr(self, "expert_channels"):  # pruned expert: scatter back to original channel indices
                acts[tok[:, None], slot[:, None], self.expert_channels(e)[None, :]] = a
            else:
                acts[tok, slot] = a
            norms[tok, slot] = torch.linalg.vector_norm(out.float(), dim=-1)
    if observer is not None and acts is not None:
        observer.observe(top_k_index, top_k_weights, acts, norms)
    return slots.sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, camera_experts_forward)
