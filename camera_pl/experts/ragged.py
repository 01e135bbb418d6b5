"""Experts of unequal width: what CAMERA-P's layer-wise allocation leaves behind.

transformers' fused ``[E, 2I, H]`` tensors need every expert to keep the same width.
:class:`RaggedExperts` stores the kept micro-experts of all experts compactly — one
``[ΣI_e, H]`` gate, up and one ``[H, ΣI_e]`` down parameter plus the original channel
index of each kept micro-expert — and runs the experts-interface forward over per-expert
slices. Gating (including custom ``_apply_gate`` such as GPT-OSS's clamped SwiGLU with
interleaved layout) is delegated to the original experts module, kept as a weightless
template, so semantics match transformers for any interface flags.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.arch.forward import camera_experts_forward


def _strip_weights(experts: nn.Module) -> nn.Module:
    """The original experts module without its (large) tensors: only its gating behaviour remains."""
    for name in list(experts._parameters):
        experts._parameters[name] = None
    return experts


class RaggedExperts(nn.Module):
    """Routed experts where expert ``e`` keeps ``widths[e]`` of its original micro-experts."""

    kind = "ragged"

    def __init__(self, template: nn.Module, channels: list[torch.Tensor], hidden_size: int, intermediate_size: int,
                 has_bias: bool, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts = len(channels)
        self.intermediate_size = intermediate_size
        self.hidden_size = hidden_size
        self.has_gate = bool(getattr(template, "has_gate", True))
        self.has_bias = has_bias
        self.is_concatenated = bool(getattr(template, "is_concatenated", True))
        total = int(sum(len(c) for c in channels))
        kw = dict(dtype=dtype, device=device)
        self.up = nn.Parameter(torch.empty(total, hidden_size, **kw))
        self.gate = nn.Parameter(torch.empty(total, hidden_size, **kw)) if self.has_gate else None
        self.down = nn.Parameter(torch.empty(hidden_size, total, **kw))
        self.up_bias = nn.Parameter(torch.empty(total, **kw)) if has_bias else None
        self.gate_bias = nn.Parameter(torch.empty(total, **kw)) if has_bias and self.has_gate else None
        self.down_bias = nn.Parameter(torch.empty(self.num_experts, hidden_size, **kw)) if has_bias else None
        widths = torch.tensor([len(c) for c in channels], dtype=torch.long)
        self.register_buffer("widths", widths)
        self.register_buffer("channels", torch.cat([c.long().cpu() for c in channels]) if total else torch.zeros(0, dtype=torch.long))
        self._offsets = [0] + torch.cumsum(widths, 0).tolist()
        object.__setattr__(self, "template", _strip_weights(template))  # not a submodule: no state

    # ---- layout ---------------------------------------------------------------------------
    def _slice(self, e: int) -> slice:
        return slice(self._offsets[e], self._offsets[e + 1])

    def expert_channels(self, e: int) -> torch.Tensor:
        """Original channel indices of expert ``e``'s kept micro-experts."""
        return self.channels[self._slice(e)]

    def gate_up(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        s = self._slice(e)
        return (self.gate[s] if self.gate is not None else None), self.up[s]

    def down_weight(self, e: int) -> torch.Tensor:
        return self.down[:, self._slice(e)]

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        if not self.has_bias:
            return None
        s = self._slice(e)
        return (self.gate_bias[s] if self.gate_bias is not None else None), self.up_bias[s], self.down_bias[e]

    # ---- computation ------------------------------------------------------------------------
    def expert_activation(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e)
        b = self.biases(e)
        u = nn.functional.linear(x, up, None if b is None else b[1])
        if gate is None:
            return self.template.act_fn(u)
        g = nn.functional.linear(x, gate, None if b is None else b[0])
        packed = torch.cat([g, u], dim=-1) if self.is_concatenated else torch.stack([g, u], dim=-1).flatten(-2)
        return self.template._apply_gate(packed)

    def expert_output(self, e: int, a: torch.Tensor) -> torch.Tensor:
        b = self.biases(e)
        return nn.functional.linear(a, self.down_weight(e), None if b is None else b[2])

    def grouped_weights(self) -> tuple:
        """Zero-padded per-expert weights for grouped GEMMs (widths padded to a multiple of 8).

        Returns ``(w_up [E, H, 2W], w_down [E, W, H], up_bias [E, 2W] | None, down_bias | None,
        channel_map [E, W])`` in the original module's gate layout; padded channels have zero
        weights and biases, so they contribute nothing. Built per call (differentiable), trading
        a weight copy for two large kernels instead of one small matmul pair per expert.
        """
        width = max(8, -(-int(self.widths.max()) // 8) * 8)
        rows = torch.repeat_interleave(torch.arange(self.num_experts, device=self.up.device), self.widths)
        slots = torch.arange(rows.numel(), device=rows.device) - torch.tensor(
            self._offsets[:-1], device=rows.device)[rows]
        shape = (self.num_experts, width)

        def pad(t: torch.Tensor) -> torch.Tensor:  # [ΣI, ...] -> [E, W, ...]
            out = t.new_zeros(*shape, *t.shape[1:])
            return out.index_put((rows, slots), t)

        def pack(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return torch.cat([g, u], dim=1) if self.is_concatenated else torch.stack([g, u], dim=2).flatten(1, 2)

        w_up = pack(pad(self.gate), pad(self.up)).transpose(1, 2)
        w_down = pad(self.down.t())
        up_bias = pack(pad(self.gate_bias), pad(self.up_bias)) if self.has_bias else None
        channel_map = torch.full(shape, self.intermediate_size, dtype=torch.long, device=rows.device)
        channel_map[rows, slots] = self.channels
        return w_up, w_down, up_bias, self.down_bias, channel_map

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return camera_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def spec(self) -> dict:
        """What :func:`build_ragged` needs to rebuild an empty module of this shape."""
        return {"widths": self.widths.tolist(), "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "has_bias": self.has_bias}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, widths={self.widths.tolist()}, of={self.intermediate_size}"


def build_ragged(spec: dict, original: nn.Module) -> RaggedExperts:
    """Empty :class:`RaggedExperts` of the recorded widths (weights and channels come from the state dict)."""
    channels = [torch.zeros(w, dtype=torch.long) for w in spec["widths"]]
    dtype = next((p.dtype for p in original.parameters()), torch.float32)
    return RaggedExperts(original, channels, spec["hidden_size"], spec["intermediate_size"], spec["has_bias"], dtype)
