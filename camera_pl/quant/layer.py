"""Quantizing one MoE layer once its allocation is known: routed experts, shared experts, plain linears.

GPTQ Hessians of routed experts come from each expert's own routed calibration tokens:
``Σ x xᵀ`` for gate/up and ``Σ a aᵀ`` for down, where ``a`` are the activations computed
with the already quantized gate/up (as GPTQ does inside an MLP). **Rarely routed
experts**: an expert with fewer than ``min_tokens`` routed tokens would get a singular,
noisy Hessian, so it uses *all* of the layer's calibration tokens instead (as if every
token were routed to it) — never skipped, never NaN. Such experts are listed in the report.

GPTQ runs on chunks of experts of equal width at once (:func:`camera_pl.quant.quantizers.gptq_batched`;
chunk sizes from :func:`~camera_pl.quant.quantizers.gptq_chunk_size` keep memory bounded), and an
expert's gate and up projections, which share their input and Hessian, are quantized as one matrix
``[2W, H]`` (GPTQ treats rows independently, so this equals quantizing them apart).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer
from camera_pl.quant.allocation import LayerBits
from camera_pl.quant.calibration import LayerInputs
from camera_pl.experts.base import ExpertWeights
from camera_pl.host_memory import release_freed_host_memory
from camera_pl.quant.quantizers import QuantizedRows, gptq, gptq_batched, gptq_chunk_size, rtn


RowsSink = Callable[[str, int, QuantizedRows], None]
"""Receives each quantized matrix of a layer's routed experts as soon as it exists: ``sink(m, e, rows)``
(e.g. :meth:`QuantizedExperts.write_rows <camera_pl.experts.quantized.QuantizedExperts.write_rows>`, or a
:class:`WriteBack`), so that a layer's unpacked codes are never all held at once."""


def _row_bits(bits: LayerBits, m: str, e: int, channels: torch.Tensor) -> torch.Tensor:
    """Bits of expert ``e``'s stored rows of matrix ``m`` (kept micro-experts only)."""
    per = getattr(bits, m)[e]
    return per if m == "down" and bits.down_axis == "out" else per[channels.to(per.device)]


def stored_row_bits(layer: MoELayer, bits: LayerBits) -> dict[str, torch.Tensor]:
    """``{m: bits of every row quantize_routed stores, expert after expert}``: what the packed module is built for."""
    experts = layer.experts
    return {m: torch.cat([_row_bits(bits, m, e, experts.channels(e)) for e in range(layer.num_experts)])
            for m in bits.rows()}


def quantize_routed(layer: MoELayer, bits: LayerBits, quantizer: str, inputs: LayerInputs | None, group_size: int,
                    sink: RowsSink, damp: float = 0.01, act_order: bool = False, min_tokens: int = 32) -> list[int]:
    """Quantize every routed matrix, handing each expert's to ``sink`` as it is done; returns the experts that used
    the fallback Hessian.

    Rows are expert ``e``'s kept micro-experts (gate/up rows, and down columns with
    ``down_axis="in"``) or its down rows (``"out"``). Weights are read before ``sink`` sees them,
    so a sink may overwrite the expert it receives.
    """
    if quantizer == "rtn":
        _rtn_routed(layer, bits, group_size, sink)
        return []
    return _gptq_routed(layer, bits, inputs, group_size, sink, damp, act_order, min_tokens)


def _rtn_routed(layer: MoELayer, bits: LayerBits, group_size: int, sink: RowsSink) -> None:
    experts = layer.experts
    for e in range(layer.num_experts):
        w, ch = experts.weights(e), experts.channels(e)
        down_rows = w.down.t() if bits.down_axis == "in" else w.down
        quantized = {"gate": rtn(w.gate, _row_bits(bits, "gate", e, ch), group_size)} if w.gate is not None else {}
        quantized["up"] = rtn(w.up, _row_bits(bits, "up", e, ch), group_size)
        quantized["down"] = rtn(down_rows, _row_bits(bits, "down", e, ch), group_size)
        for m, q in quantized.items():
            sink(m, e, q)
        release_freed_host_memory()


def _chunks(members: list[int], size: int) -> list[list[int]]:
    return [members[i:i + size] for i in range(0, len(members), size)]


def _gptq_routed(layer: MoELayer, bits: LayerBits, inputs: LayerInputs, group_size: int, sink: RowsSink,
                 damp: float, act_order: bool, min_tokens: int) -> list[int]:
    """GPTQ of all routed experts, chunk by chunk of experts of equal width: a chunk's gate/up, then its down
    projections (whose inputs are the activations of the quantized gate/up), so that only one chunk's
    gate/up codes are held."""
    experts = layer.experts
    hidden = inputs.hidden
    routed = [inputs.routed(e)[0] for e in range(layer.num_experts)]
    fallback = [e for e, tok in enumerate(routed) if tok.numel() < min_tokens]
    all_tokens = hidden.float().t() @ hidden.float() if fallback else None

    def tokens(e: int) -> torch.Tensor:
        return hidden if e in fallback else hidden[routed[e]]

    def hessian(e: int) -> torch.Tensor:
        if e in fallback:
            return all_tokens
        x = tokens(e).float()
        return x.t() @ x

    gated = experts.layout.has_gate
    matrices = ("gate", "up") if gated else ("up",)
    options = dict(damp=damp, act_order=act_order)
    widths = experts.widths().tolist()
    for width in sorted(set(widths)):
        members = [e for e, w in enumerate(widths) if w == width]
        rows = 2 * width if gated else width
        gate_up_size, down_size = gptq_chunk_size(rows, experts.hidden_size), gptq_chunk_size(experts.hidden_size, width)
        for outer in _chunks(members, max(gate_up_size, down_size)):
            done: dict[int, dict[str, QuantizedRows]] = {}
            for chunk in _chunks(outer, gate_up_size):
                weights = [experts.weights(e) for e in chunk]
                w = torch.stack([torch.cat([we.gate, we.up]) if gated else we.up for we in weights])
                b = torch.stack([torch.cat([_row_bits(bits, m, e, experts.channels(e)) for m in matrices])
                                 for e in chunk])
                for e, q in zip(chunk, gptq_batched(w, torch.stack([hessian(e) for e in chunk]), b, group_size,
                                                    **options)):
                    done[e] = {"gate": q.select_rows(0, width), "up": q.select_rows(width, rows)} if gated else {"up": q}
                release_freed_host_memory()
            for chunk in _chunks(outer, down_size):
                hessians = []
                for e in chunk:  # the down projections' inputs: activations of the quantized gate/up
                    w, x = experts.weights(e), tokens(e)
                    q = ExpertWeights(done[e]["gate"].dequantize(x.dtype) if gated else None,
                                      done[e]["up"].dequantize(x.dtype), w.down, w.gate_bias, w.up_bias, w.down_bias)
                    a = experts.activation(e, x, q).float()
                    hessians.append(a.t() @ a)
                w = torch.stack([experts.weights(e).down for e in chunk])
                b = torch.stack([_row_bits(bits, "down", e, experts.channels(e)) for e in chunk])
                results = gptq_batched(w, torch.stack(hessians), b, group_size, axis=bits.down_axis, **options)
                for e, q in zip(chunk, results):
                    for m in matrices:
                        sink(m, e, done[e].pop(m))
                    sink("down", e, q)
                release_freed_host_memory()
    return fallback


class WriteBack:
    """A :data:`RowsSink` for fake quantization: once all of an expert's matrices are quantized, its weights are
    overwritten with their dequantized values (until then its quantized matrices are held)."""

    def __init__(self, layer: MoELayer, bits: LayerBits):
        self._experts, self._matrices, self._down_axis = layer.experts, tuple(bits.rows()), bits.down_axis
        self._pending: dict[int, dict[str, QuantizedRows]] = {}

    def __call__(self, m: str, e: int, rows: QuantizedRows) -> None:
        got = self._pending.setdefault(e, {})
        got[m] = rows
        if len(got) < len(self._matrices):
            return
        del self._pending[e]
        dtype = self._experts.weights(e).up.dtype
        gate = got["gate"].dequantize(dtype) if "gate" in got else None
        down = got["down"].dequantize(dtype)
        self._experts.write(e, ExpertWeights(gate, got["up"].dequantize(dtype),
                                             down.t() if self._down_axis == "in" else down))


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
