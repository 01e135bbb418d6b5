"""``FakeQuantExperts``: experts whose forward sees round-to-nearest quantized weights, with straight-through gradients.

Quantization-aware finetuning keeps full-precision latent weights (the wrapped ``base``
module, fused or ragged, still trainable) and computes every forward with
``W + (RTN(W) − W).detach()`` at a fixed per-row allocation: the loss sees the quantized
model, the gradient reaches the latent weights unchanged. The allocation is stored as
buffers, so a checkpoint written during the fake-quantized phase rebuilds like any other
experts kind. :meth:`FakeQuantExperts.base` is what gets packed when the phase ends.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.experts.base import ExpertWeights, as_experts, cast
from camera_pl.experts.module import WrappingExperts, describe
from camera_pl.quant.quantizers import rtn


def _ste(weight: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` in the forward, its RTN quantization's values; identity in the backward."""
    quantized = rtn(weight.detach(), bits, group_size).dequantize(weight.dtype)
    return weight + (quantized - weight).detach()


class FakeQuantExperts(WrappingExperts):
    """A layer's routed experts (``base``) seen through straight-through fake quantization."""

    kind = "fake_quant"

    def __init__(self, base: nn.Module, gate_bits: torch.Tensor | None, up_bits: torch.Tensor,
                 down_bits: torch.Tensor, down_axis: str, group_size: int):
        view = as_experts(base)
        if view.kind == "list":
            raise ValueError("Fake quantization does not wrap experts kept as a list of MLPs (remote-code layouts); "
                             "quantize them with camera_pl.quantize.")
        if view.kind not in ("fused", "ragged"):
            raise ValueError(f"Fake quantization trains full-precision experts; these are {view.kind} experts.")
        if down_axis not in ("in", "out"):
            raise ValueError(f"down_axis must be 'in' or 'out', got {down_axis!r}.")
        super().__init__(base)
        self.down_axis = down_axis
        self.group_size = group_size
        kw = dict(dtype=torch.uint8, device=view.device)
        self.register_buffer("up_bits", up_bits.to(**kw).clone())
        self.register_buffer("down_bits", down_bits.to(**kw).clone())
        self.register_buffer("gate_bits", None if gate_bits is None else gate_bits.to(**kw).clone())

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        base = self.base_experts
        w, ch = base.weights(e), base.channels(e)
        gate = None if w.gate is None else _ste(w.gate, self.gate_bits[e, ch].long(), self.group_size)
        up = _ste(w.up, self.up_bits[e, ch].long(), self.group_size)
        if self.down_axis == "in":
            down = _ste(w.down.t(), self.down_bits[e, ch].long(), self.group_size).t()
        else:
            down = _ste(w.down, self.down_bits[e].long(), self.group_size)
        out = ExpertWeights(gate, up, down, w.gate_bias, w.up_bias, w.down_bias)
        return out if dtype is None else cast(out, dtype)

    def spec(self) -> dict:
        return {"down_axis": self.down_axis, "group_size": self.group_size, "has_gate": self.gate_bits is not None,
                "down_rows": int(self.down_bits.shape[1]), "base": describe(self.base)}


def build_fake_quant(spec: dict, replaced) -> FakeQuantExperts:
    """Empty :class:`FakeQuantExperts` around ``replaced`` (its base, already rebuilt); bits come from the state dict."""
    shape = (replaced.num_experts, replaced.intermediate_size)
    zeros = torch.ones(shape, dtype=torch.uint8)
    down = torch.ones(replaced.num_experts, spec["down_rows"], dtype=torch.uint8)
    return FakeQuantExperts(replaced.module, zeros if spec["has_gate"] else None, zeros, down, spec["down_axis"],
                            spec["group_size"])
