"""Experts of unequal width: what CAMERA-P's layer-wise and global allocations leave behind.

transformers' fused ``[E, 2I, H]`` tensors need every expert to keep the same width.
:class:`RaggedExperts` stores the kept micro-experts of all experts compactly — one
``[ΣW_e, H]`` gate and up and one ``[H, ΣW_e]`` down parameter plus the original channel
index of each kept micro-expert — and answers the experts interface per expert slice.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.experts.base import Experts, ExpertWeights, GroupedWeights, cast, grouped_mm_supported
from camera_pl.experts.module import CameraExperts


class RaggedExperts(CameraExperts):
    """Routed experts where expert ``e`` keeps ``widths[e]`` of its original micro-experts."""

    kind = "ragged"

    def __init__(self, replaced: Experts, widths: list[int], dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__(replaced, len(widths))
        total, hidden = int(sum(widths)), self.hidden_size
        kw = dict(dtype=dtype, device=device)
        has_gate, has_bias = self.layout.has_gate, self.layout.has_bias
        self.up = nn.Parameter(torch.empty(total, hidden, **kw))
        self.gate = nn.Parameter(torch.empty(total, hidden, **kw)) if has_gate else None
        self.down = nn.Parameter(torch.empty(hidden, total, **kw))
        self.up_bias = nn.Parameter(torch.empty(total, **kw)) if has_bias else None
        self.gate_bias = nn.Parameter(torch.empty(total, **kw)) if has_bias and has_gate else None
        self.down_bias = nn.Parameter(torch.empty(self.num_experts, hidden, **kw)) if has_bias else None
        self.register_buffer("channel_index", torch.zeros(total, dtype=torch.long, device=device))
        self._widths = torch.tensor(widths, dtype=torch.long)
        self._offsets = [0] + torch.cumsum(self._widths, 0).tolist()

    @classmethod
    def from_experts(cls, source: Experts, keep: torch.Tensor, experts_kept: list[int] | None = None
                     ) -> "RaggedExperts":
        """Keep ``keep [E, I]`` (original indices) of ``source``'s experts ``experts_kept`` (default all)."""
        kept = range(source.num_experts) if experts_kept is None else experts_kept
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("gate", "up", "down", "gate_bias", "up_bias",
                                                                "down_bias", "channels")}
        for e in kept:
            present = source.channels(e)
            local = keep[e, present.to(keep.device)].nonzero().squeeze(1).to(present.device)
            w = source.weights(e)
            parts["channels"].append(present[local])
            for name in ("gate", "up", "gate_bias", "up_bias"):
                t = getattr(w, name)
                if t is not None:
                    parts[name].append(t[local])
            parts["down"].append(w.down[:, local])
            if w.down_bias is not None:
                parts["down_bias"].append(w.down_bias)
        ref = parts["up"][0]
        new = cls(source, [len(c) for c in parts["channels"]], ref.dtype, ref.device)
        with torch.no_grad():
            new.channel_index.copy_(torch.cat(parts["channels"]))
            for name, dim in (("gate", 0), ("up", 0), ("down", 1), ("gate_bias", 0), ("up_bias", 0)):
                if getattr(new, name) is not None:
                    getattr(new, name).copy_(torch.cat(parts[name], dim=dim))
            if new.down_bias is not None:
                new.down_bias.copy_(torch.stack(parts["down_bias"]))
        new.train(source.module.training)
        return new

    # ---- the experts interface -------------------------------------------------------------
    def _slice(self, e: int) -> slice:
        return slice(self._offsets[e], self._offsets[e + 1])

    def widths(self) -> torch.Tensor:
        return self._widths.clone()

    def channels(self, e: int) -> torch.Tensor:
        return self.channel_index[self._slice(e)]

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        s = self._slice(e)
        w = ExpertWeights(None if self.gate is None else self.gate[s], self.up[s], self.down[:, s],
                          None if self.gate_bias is None else self.gate_bias[s],
                          None if self.up_bias is None else self.up_bias[s],
                          None if self.down_bias is None else self.down_bias[e])
        return w if dtype is None else cast(w, dtype)

    def write(self, e: int, w: ExpertWeights) -> None:
        """Overwrite expert ``e``'s weights in place (fake quantization)."""
        mine = self.weights(e)
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                if getattr(mine, name) is not None:
                    getattr(mine, name).copy_(getattr(w, name))

    def weight_parameters(self) -> list[str]:
        return [name for name in ("gate", "up", "down") if getattr(self, name) is not None]

    @property
    def device(self) -> torch.device:
        return self.up.device

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    def grouped_weights(self, x: torch.Tensor) -> GroupedWeights | None:
        """Zero-padded weights for grouped GEMMs (CUDA bf16 only; on a CPU the per-expert loop is faster).

        Widths are padded to a multiple of 8; padded channels have zero weights and biases, so
        they contribute nothing. Built per call (differentiable).
        """
        if not self.layout.has_gate or self.layout.post_norm or not grouped_mm_supported(x, on_cpu=False):
            return None
        if self.up.dtype != x.dtype:
            return None
        return self.padded()

    def padded(self) -> GroupedWeights:
        """All experts zero-padded to one width (a multiple of 8), in the grouped-GEMM orientation."""
        width = max(8, -(-int(self._widths.max()) // 8) * 8)
        device = self.up.device
        rows = torch.repeat_interleave(torch.arange(self.num_experts, device=device), self._widths.to(device))
        slots = torch.arange(rows.numel(), device=device) - torch.tensor(self._offsets[:-1], device=device)[rows]
        shape = (self.num_experts, width)

        def pad(t: torch.Tensor) -> torch.Tensor:  # [ΣW, ...] -> [E, width, ...]
            return t.new_zeros(*shape, *t.shape[1:]).index_put((rows, slots), t)

        up = self.layout.pack(None if self.gate is None else pad(self.gate), pad(self.up), 1).transpose(1, 2)
        up_bias = None
        if self.up_bias is not None:
            up_bias = self.layout.pack(None if self.gate_bias is None else pad(self.gate_bias), pad(self.up_bias), 1)
        channels = torch.full(shape, self.intermediate_size, dtype=torch.long, device=device)
        channels[rows, slots] = self.channel_index
        return GroupedWeights(up, pad(self.down.t()), up_bias, self.down_bias, channels)

    # ---- description -------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"widths": self._widths.tolist()}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, widths={self._widths.tolist()}, of={self.intermediate_size}"


def build_ragged(spec: dict, replaced: Experts) -> RaggedExperts:
    """Empty :class:`RaggedExperts` of the recorded widths (weights and channels come from the state dict)."""
    return RaggedExperts(replaced, spec["widths"], replaced.dtype, replaced.device)
