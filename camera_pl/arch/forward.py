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


def _grouped_mm_ok(experts: nn.Module, x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM can run these experts (else: one matmul pair per expert).

    Fused experts use it on CPU and on CUDA in bf16; ragged experts only on CUDA in bf16,
    through zero-padded weights (on a CPU, padding would cost more compute than it saves).
    """
    if not hasattr(nn.functional, "grouped_mm") or getattr(experts, "has_post_expert_norm", False):
        return False
    if not getattr(experts, "has_gate", True):
        return False
    ragged = hasattr(experts, "grouped_weights")
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or ragged:
        return False
    if hasattr(experts, "expert_activation") and not ragged:
        return False
    if ragged:
        return True
    size = x.element_size()
    return all(d * size % 16 == 0 for d in (*experts.gate_up_proj.shape[1:], *experts.down_proj.shape[1:]))


def _grouped_weights(experts: nn.Module) -> tuple:
    """``(w_up [E, H, 2I], w_down [E, I, H], up_bias, down_bias, channel_map)`` for grouped GEMMs."""
    if hasattr(experts, "grouped_weights"):
        return experts.grouped_weights()
    w_up = experts.gate_up_proj if experts.is_transposed else experts.gate_up_proj.transpose(1, 2)
    w_down = experts.down_proj if experts.is_transposed else experts.down_proj.transpose(1, 2)
    if experts.has_bias:
        return w_up, w_down, experts.gate_up_proj_bias, experts.down_proj_bias, None
    return w_up, w_down, None, None, None


def _sorted_activations(self: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                        ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[S, I]`` and outputs ``[S, H]`` of rows ``x`` sorted by expert (``ends``: cumulative counts)."""
    if _grouped_mm_ok(self, x):
        offsets = torch.tensor(ends[: self.num_experts], dtype=torch.int32, device=x.device)
        w_up, w_down, up_bias, down_bias, channel_map = _grouped_weights(self)
        proj = nn.functional.grouped_mm(x, w_up, offs=offsets)
        if up_bias is not None:
            proj = proj + up_bias[expert_ids]
        gate_fn = self.template._apply_gate if hasattr(self, "template") else self._apply_gate
        a = gate_fn(proj)
        out = nn.functional.grouped_mm(a, w_down, offs=offsets)
        if down_bias is not None:
            out = out + down_bias[expert_ids]
        if channel_map is not None:  # padded ragged layout -> original channel indices (pad -> dropped column)
            full = a.new_zeros(a.shape[0], self.intermediate_size + 1)
            a = full.scatter_(1, channel_map[expert_ids], a)[:, :-1]
        return a, out
    acts, outs, start = [], [], 0
    for e in range(self.num_experts):
        end = ends[e]
        if end > start:
            a = expert_activation(self, e, x[start:end])
            outs.append(expert_output(self, e, a))
            if hasattr(self, "expert_channels"):  # pruned expert: back to original channel indices
                full = a.new_zeros(end - start, self.intermediate_size)
                full[:, self.expert_channels(e)] = a
                a = full
            acts.append(a)
        start = end
    return torch.cat(acts), torch.cat(outs)


def camera_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Routed experts over (token, slot) pairs sorted by expert; reports activations to ``self._camera_observer``.

    Fused experts run torch's grouped GEMM where it applies (CPU, CUDA bf16), others one
    matmul pair per hit expert. Per-slot outputs are weighted and summed over the top-k slots
    in the same order and dtype as transformers' implementations, so logits agree with them
    to float rounding of the kernels (~1e-6 in fp32). Expert ids >= num_experts
    (expert-parallel sentinels, or slots switched off by dynamic pruning) are skipped.
    """
    observer: ExpertsObserver | None = getattr(self, "_camera_observer", None)
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_ids = flat[order]
    counts = torch.bincount(expert_ids.clamp(max=self.num_experts), minlength=self.num_experts + 1)
    ends = counts.cumsum(0).tolist()  # the one host sync
    valid = ends[self.num_experts - 1]
    order_v, expert_v = order[:valid], expert_ids[:valid]
    token_ids = order_v // top_k
    weights = top_k_weights.reshape(-1)[order_v]
    acts, out = _sorted_activations(self, hidden_states[token_ids], expert_v, ends)
    if observer is not None:
        norms = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
        observer.observe(expert_v, token_ids, weights, acts, norms, top_k_weights)
    out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
    slots = hidden_states.new_zeros(flat.numel(), hidden_states.shape[-1], dtype=out_dtype)
    slots[order_v] = out * weights[:, None]
    return slots.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, camera_experts_forward)
