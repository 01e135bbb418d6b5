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
    """Receives what one experts forward computed, for all (token, slot) pairs sorted by expert."""

    def observe(self, expert_ids: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor, acts: torch.Tensor,
                out_norms: torch.Tensor, top_k_weights: torch.Tensor) -> None: ...


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

    (token, slot) pairs are sorted by expert so each expert reads one contiguous block; per-slot
    outputs are weighted and summed over the top-k slots in the same order and dtype as
    transformers' batched/grouped implementations, so logits agree with them to float rounding
    of the matmul kernels (~1e-6 in fp32). Expert ids >= num_experts (expert-parallel
    sentinels, or slots switched off by dynamic pruning) are skipped.
    """
    observer: ExpertsObserver | None = getattr(self, "_camera_observer", None)
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_ids = flat[order]
    token_ids = order // top_k
    weights = top_k_weights.reshape(-1)[order]
    x = hidden_states[token_ids]
    out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
    out_sorted = x.new_zeros(flat.numel(), hidden_states.shape[-1], dtype=out_dtype)
    counts = torch.bincount(expert_ids.clamp(max=self.num_experts), minlength=self.num_experts + 1)
    ends = counts.cumsum(0).tolist()  # the one host sync
    acts = norms = None
    if observer is not None:
        acts = x.new_zeros(flat.numel(), observer.layer.intermediate_size)
        norms = x.new_zeros(flat.numel(), dtype=torch.float32)
    start = 0
    for e in range(self.num_experts):
        end = ends[e]
        if end == start:
            continue
        a = expert_activation(self, e, x[start:end])
        out = expert_output(self, e, a)
        out_sorted[start:end] = out * weights[start:end, None]
        if observer is not None:
            if hasattr(self, "expert_channels"):  # pruned expert: back to original channel indices
                acts[start:end, self.expert_channels(e)] = a
            else:
                acts[start:end] = a
            norms[start:end] = torch.linalg.vector_norm(out.float(), dim=-1)
        start = end
    if observer is not None:
        valid = slice(0, ends[self.num_experts - 1])
        observer.observe(expert_ids[valid], token_ids[valid], weights[valid], acts[valid], norms[valid], top_k_weights)
    slots = torch.empty_like(out_sorted)
    slots[order] = out_sorted
    return slots.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, camera_experts_forward)
