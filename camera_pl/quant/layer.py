"""Quantizing one MoE layer once its allocation is known: routed experts, shared experts, plain linears.

GPTQ Hessians of routed experts come from each expert's own routed calibration tokens:
``Σ x xᵀ`` for gate/up and ``Σ a aᵀ`` for down, where ``a`` are the activations computed
with the already quantized gate/up (as GPTQ does inside an MLP). **Rarely routed
experts**: an expert with fewer than ``min_tokens`` routed tokens would get a singular,
noisy Hessian, so it uses *all* of the layer's calibration tokens instead (as if every
token were routed to it) — never skipped, never NaN. Such experts are listed in the report.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer
from camera_pl.quant.allocation import LayerBits
from camera_pl.quant.calibration import LayerInputs
from camera_pl.experts.quantized import expert_act
from camera_pl.quant.quantizers import QuantizedRows, gptq, rtn


def quantize_routed(layer: MoELayer, bits: LayerBits, quantizer: str, inputs: LayerInputs | None, group_size: int,
                    damp: float = 0.01, act_order: bool = False, min_tokens: int = 32
                    ) -> tuple[dict[str, list[QuantizedRows]], list[int]]:
    """Quantized rows of every routed matrix (``{m: [per expert]}``) and the experts that used the fallback Hessian."""
    gate, up, down = layer.stacked_weights()
    rows = bits.rows()
    out: dict[str, list[QuantizedRows]] = {m: [] for m in rows}
    fallback: list[int] = []
    if quantizer == "rtn":
        for e in range(layer.num_experts):
            if gate is not None:
                out["gate"].append(rtn(gate[e], bits.gate[e], group_size))
            out["up"].append(rtn(up[e], bits.up[e], group_size))
            out["down"].append(rtn(down[e].t() if bits.down_axis == "in" else down[e], bits.down[e], group_size))
        return out, fallback
    everything = inputs.hidden
    all_tokens = everything.float().t() @ everything.float()
    for e in range(layer.num_experts):
        tok, _ = inputs.routed(e)
        if tok.numel() >= min_tokens:
            x = everything[tok]
            hessian = x.float().t() @ x.float()
        else:
            x, hessian = everything, all_tokens
            fallback.append(e)
        qg = None
        if gate is not None:
            qg = gptq(gate[e], hessian, bits.gate[e], group_size, damp=damp, act_order=act_order)
            out["gate"].append(qg)
        qu = gptq(up[e], hessian, bits.up[e], group_size, damp=damp, act_order=act_order)
        out["up"].append(qu)
        with torch.no_grad():
            a = expert_act(layer.experts, e, x, None if qg is None else qg.dequantize(x.dtype), qu.dequantize(x.dtype))
        a = a.float()
        out["down"].append(gptq(down[e], a.t() @ a, bits.down[e], group_size, axis=bits.down_axis, damp=damp,
                                act_order=act_order))
    return out, fallback


def write_back(layer: MoELayer, matrices: dict[str, list[QuantizedRows]], down_axis: str) -> None:
    """Fake quantization: overwrite the fused expert weights with their dequantized values."""
    gate, up, down = layer.stacked_weights()
    with torch.no_grad():
        for e in range(layer.num_experts):
            if gate is not None:
                gate[e].copy_(matrices["gate"][e].dequantize(gate.dtype))
            up[e].copy_(matrices["up"][e].dequantize(up.dtype))
            d = matrices["down"][e].dequantize(down.dtype)
            down[e].copy_(d.t() if down_axis == "in" else d)


def quantize_linear(linear: nn.Linear, bits: int, group_size: int, hessian: torch.Tensor | None = None,
                    damp: float = 0.01, act_order: bool = False) -> QuantizedRows:
    """Fake-quantize an ``nn.Linear`` in place (GPTQ when ``hessian`` is given, else RTN)."""
    w = linear.weight
    if hessian is None:
        q = rtn(w, bits, group_size)
    else:
        q = gptq(w, hessian, bits, group_size, damp=damp, act_order=act_order)
    with torch.no_grad():
        w.copy_(q.dequantize(w.dtype))
    return q


def quantize_shared(layer: MoELayer, bits: int, group_size: int, inputs: LayerInputs | None,
                    damp: float = 0.01, act_order: bool = False) -> int:
    """Shared experts at uniform ``bits``, fake-quantized in place (GPTQ with ``inputs``).

    Returns the bits their packed storage would take (codes, scales, zeros).
    """
    shared = layer.shared
    if inputs is None:
        return sum(quantize_linear(getattr(shared, n), bits, group_size).storage_bits()
                   for n in ("gate_proj", "up_proj", "down_proj"))
    x = inputs.hidden
    hx = x.float().t() @ x.float()
    total = sum(quantize_linear(getattr(shared, n), bits, group_size, hx, damp, act_order).storage_bits()
                for n in ("gate_proj", "up_proj"))
    seen: list[torch.Tensor] = []
    handle = shared.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().float()))
    with torch.no_grad():
        shared(x)
    handle.remove()
    a = seen[0].reshape(-1, seen[0].shape[-1])
    return total + quantize_linear(shared.down_proj, bits, group_size, a.t() @ a, damp, act_order).storage_bits()
