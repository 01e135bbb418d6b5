"""Start and end a fake-quantized (straight-through) phase on a model's routed experts."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.experts.fake_quant import FakeQuantExperts
from camera_pl.quant.allocation import LayerBits
from camera_pl.quant.methods import present_channels


def fake_quantize(model: nn.Module, allocation: Mapping[int, LayerBits], group_size: int = 128) -> None:
    """Wrap every MoE layer's experts in :class:`FakeQuantExperts` at the given allocation (in place)."""
    for layer in moe_layers(model):
        bits = allocation[layer.index]
        layer.replace_experts(FakeQuantExperts(layer.module, bits.gate, bits.up, bits.down, bits.down_axis, group_size))


def fake_allocation(model: nn.Module) -> dict[int, LayerBits] | None:
    """The allocation of a fake-quantized model (read back from its experts), or None if it is not fake-quantized."""
    out = {}
    for layer in moe_layers(model):
        module = layer.module
        if not isinstance(module, FakeQuantExperts):
            return None
        gate = None if module.gate_bits is None else module.gate_bits.long().cpu()
        out[layer.index] = LayerBits(gate, module.up_bits.long().cpu(), module.down_bits.long().cpu(), module.down_axis,
                                     layer.hidden_size, present_channels(layer))
    return out


def end_fake_quantization(model: nn.Module) -> None:
    """Put back the latent full-precision experts of every fake-quantized MoE layer (in place)."""
    for layer in moe_layers(model):
        if isinstance(layer.module, FakeQuantExperts):
            layer.replace_experts(layer.module.base)
