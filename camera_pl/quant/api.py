"""``quantize(model, stats, ...)``: mixed-precision weight-only quantization of an MoE model's experts.

Per MoE layer, in depth order: allocate bits (:mod:`camera_pl.quant.methods`), quantize
the routed experts with RTN or GPTQ, and either replace the fused experts module by a
bit-packed :class:`~camera_pl.quant.packed.QuantizedExperts` (``pack=True``) or write the
dequantized weights back into it (fake quantization, ``pack=False``). With GPTQ or PMQ the
calibration inputs of each layer are captured after the layers before it were quantized.

Shared experts are quantized with uniform bits — by default the budget rounded half up
(``avg_bits`` or, with rank groups, the groups' average) — and kept dense in the model's
dtype (fake-quantized in place): the serialization format only replaces routed experts
modules. Other linear layers of the decoder (attention, dense MLPs) can optionally be
fake-quantized with RTN at ``other_bits``; embeddings, the LM head, routers and the
shared-expert gate stay in full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.quant import methods
from camera_pl.quant.allocation import DEFAULT_CHOICES, DEFAULT_GROUPS, LayerBits, check_groups
from camera_pl.quant.calibration import capture_layer_inputs
from camera_pl.quant.layer import quantize_linear, quantize_routed, quantize_shared, write_back
from camera_pl.experts.quantized import QuantizedExperts
from camera_pl.quant.quantizers import check_bits

METHODS = ("camera", "pmq", "uniform", "matrix", "channel")
QUANTIZERS = ("rtn", "gptq")
PMQ_CHOICES = (1, 2, 3)


@dataclass
class LayerReport:
    """What one MoE layer's routed experts became.

    ``avg_bits`` counts code bits per routed weight; ``bits_per_param`` adds float16 scales,
    uint8 zeros and the per-row bit map of the packed storage.
    """

    index: int
    histogram: dict[int, float]
    avg_bits: float
    bits_per_param: float
    expert_bytes: int
    params: int
    shared_bits: int | None = None
    shared_bytes: int = 0
    gptq_fallback: list[int] = field(default_factory=list)


@dataclass
class QuantReport:
    """Per-layer allocation summaries and totals of one :func:`quantize` call."""

    method: str
    quantizer: str
    group_size: int
    packed: bool
    layers: list[LayerReport]
    other_bits: int | None = None

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def avg_bits(self) -> float:
        """Code bits per routed expert weight, over all layers."""
        return sum(r.avg_bits * r.params for r in self.layers) / self.params

    @property
    def bits_per_param(self) -> float:
        """Stored bits per routed expert weight, scales/zeros/bit maps included."""
        return 8 * self.expert_bytes / self.params

    @property
    def expert_bytes(self) -> int:
        """Bytes of packed routed-expert weights (as stored with ``pack=True``)."""
        return sum(r.expert_bytes for r in self.layers)

    def to_markdown(self) -> str:
        """A Markdown table: one row per layer and a total."""
        lines = [f"{self.method} / {self.quantizer}, group size {self.group_size}, "
                 f"{'packed' if self.packed else 'fake-quantized'}",
                 "", "| layer | bits (fraction of weights) | avg bits | bits/param | expert bytes | shared bits |",
                 "|---|---|---|---|---|---|"]
        for r in self.layers:
            hist = ", ".join(f"{b}: {f:.2f}" for b, f in r.histogram.items())
            lines.append(f"| {r.index} | {hist} | {r.avg_bits:.3f} | {r.bits_per_param:.3f} | {r.expert_bytes} | "
                         f"{r.shared_bits if r.shared_bits is not None else '-'} |")
        lines.append(f"| all | | {self.avg_bits:.3f} | {self.bits_per_param:.3f} | {self.expert_bytes} | |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _check_arguments(method: str, quantizer: str, avg_bits: float | None, groups, stats, calib_dataloader,
                     bit_choices: tuple[int, ...], group_size: int, need_stats: bool = True) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if quantizer not in QUANTIZERS:
        raise ValueError(f"Unknown quantizer {quantizer!r}; choose 'rtn' (round-to-nearest) or 'gptq'.")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size}.")
    check_bits(torch.tensor(bit_choices), "bit_choices")
    if groups is not None and (method != "camera" or avg_bits is not None):
        raise ValueError("groups (rank fractions per bit-width) apply to method='camera' without avg_bits; "
                         "pass either groups or avg_bits.")
    if groups is not None:
        check_groups(groups)
    if avg_bits is None and method != "camera":
        raise ValueError(f"method={method!r} needs an average bit budget: pass avg_bits (e.g. 2.5).")
    if avg_bits is not None:
        choices = PMQ_CHOICES if method == "pmq" else bit_choices
        if method == "uniform" and float(avg_bits) != int(avg_bits):
            raise ValueError(f"uniform quantization needs whole bits; avg_bits={avg_bits}. Use another method for "
                             "fractional budgets.")
        if method == "uniform":
            check_bits(int(avg_bits), "avg_bits")
        elif not min(choices) <= avg_bits <= max(choices):
            raise ValueError(f"avg_bits={avg_bits} is infeasible for method={method!r} with bit choices {choices}: "
                             f"it must lie in [{min(choices)}, {max(choices)}].")
    if need_stats and method != "uniform" and stats is None:
        raise ValueError(f"method={method!r} needs micro-expert statistics: stats = camera_pl.collect_stats(model, "
                         "dataloader) (or MicroExpertStatsCallback.stats).")
    if (quantizer == "gptq" or (method == "pmq" and need_stats)) and calib_dataloader is None:
        what = "GPTQ Hessians" if quantizer == "gptq" else "PMQ's output errors"
        raise ValueError(f"{what} need calibration data: pass calib_dataloader (a re-iterable of dicts with input_ids).")
    if calib_dataloader is not None and iter(calib_dataloader) is calib_dataloader:
        raise ValueError("calib_dataloader is a one-shot iterator, but it is read once per layer; pass a list or "
                         "a DataLoader.")


def _check_pmq_budget(layers: list, method: str, avg_bits: float | None, allocating: bool) -> None:
    """PMQ needs one expert at 3 bits, one at 2 and the rest at >= 1: fail before touching the model."""
    if method != "pmq" or not allocating:
        return
    n = min(layer.num_experts for layer in layers)
    if n < 2 or n * avg_bits < PMQ_CHOICES[-1] + PMQ_CHOICES[-2] + (n - 2) * PMQ_CHOICES[0]:
        raise ValueError(f"avg_bits={avg_bits} is infeasible for PMQ with {n} experts per layer (one expert at 3 bits "
                         f"and one at 2 are required, so at least {(n + 3) / n:.3f} bits). Raise avg_bits.")


def quantize(model: nn.Module, stats=None, method: str = "camera", avg_bits: float | None = None,
             groups: tuple[tuple[int, float], ...] | None = None, quantizer: str = "rtn",
             calib_dataloader: Iterable | None = None, group_size: int = 128, pack: bool = True, *,
             bit_choices: tuple[int, ...] = DEFAULT_CHOICES, reduce_ratio: float = 0.9, damp: float = 0.01,
             act_order: bool = False, min_tokens: int = 32, max_calib_tokens: int | None = None,
             pmq_exponents: tuple[float, float, float] = (1.0, 1.5, 2.0), shared_bits: int | None = None,
             other_bits: int | None = None, allocation: Mapping[int, LayerBits] | None = None) -> QuantReport:
    """Quantize the routed experts of every MoE layer of ``model`` in place.

    Args:
        stats: :class:`camera_pl.MicroExpertStats` of this model (all methods but ``uniform``).
        method: ``camera`` | ``pmq`` | ``uniform`` | ``matrix`` | ``channel`` (see :mod:`camera_pl.quant.allocation`).
        avg_bits: average code bits per routed weight (required except for ``camera`` with groups).
        groups: CAMERA-Q rank groups ``((bits, fraction), ...)``, best-scored first;
            default ``((8, 0.1), (4, 0.3), (2, 0.6))`` when neither groups nor avg_bits is given.
        quantizer: ``rtn`` or ``gptq`` (needs ``calib_dataloader``; ``damp``, ``act_order``,
            ``min_tokens`` as in :mod:`camera_pl.quant.layer`).
        calib_dataloader: re-iterable of dicts with ``input_ids`` (+ ``attention_mask``), for GPTQ and PMQ.
        group_size: weights per scale/zero group along each row (the row length where smaller).
        pack: replace experts modules by bit-packed ones (else fake-quantize in place).
        bit_choices: bit-widths the budgeted allocations may use (PMQ uses MC's 1/2/3).
        reduce_ratio: CAMERA score's peak/total energy mix.
        pmq_exponents: PMQ's ``(α, β, γ)``.
        shared_bits: bits of shared experts (default: the budget rounded half up).
        other_bits: if set, RTN fake-quantize the decoder's other linear layers at these bits.
        allocation: bits per layer from :func:`allocate` (e.g. kept from a fake-quantized
            finetuning phase); replaces the allocation ``method`` would compute.
    """
    _check_arguments(method, quantizer, avg_bits, groups, stats, calib_dataloader, bit_choices, group_size,
                     need_stats=allocation is None)
    layers = moe_layers(model)
    if any(getattr(layer.experts, "kind", None) is not None for layer in layers):
        raise ValueError("This model already holds camera_pl experts modules (quantized or ragged); quantize the "
                         "original model.")
    _check_pmq_budget(layers, method, avg_bits, allocation is None)
    missing = [layer.index for layer in layers if allocation is not None and layer.index not in allocation]
    if missing:
        raise ValueError(f"allocation has no bits for MoE layers {missing}; compute it with camera_pl.quant.allocate "
                         "on this model.")
    scores, energy = _scores(model, stats, method, reduce_ratio) if allocation is None else (None, None)
    groups = groups or (DEFAULT_GROUPS if method == "camera" and avg_bits is None else None)
    if other_bits is not None:
        check_bits(other_bits, "other_bits")
    was_training = model.training
    model.eval()
    reports = []
    try:
        for layer in layers:
            inputs = None
            if quantizer == "gptq" or (method == "pmq" and allocation is None):
                inputs = capture_layer_inputs(model, layer, calib_dataloader, max_calib_tokens)
            with torch.no_grad():
                bits = allocation[layer.index] if allocation is not None else _allocate(
                    method, layer, scores, energy, stats, inputs, avg_bits, groups, bit_choices, group_size,
                    pmq_exponents)
                reports.append(_quantize_layer(layer, bits, quantizer, inputs if quantizer == "gptq" else None,
                                               group_size, damp, act_order, min_tokens, pack, shared_bits, avg_bits))
        if other_bits is not None:
            _quantize_other(model, layers, other_bits, group_size)
    finally:
        model.train(was_training)
    return QuantReport(method, quantizer, group_size, pack, reports, other_bits)


def allocate(model: nn.Module, stats=None, method: str = "camera", avg_bits: float | None = None,
             groups: tuple[tuple[int, float], ...] | None = None, calib_dataloader: Iterable | None = None,
             group_size: int = 128, *, bit_choices: tuple[int, ...] = DEFAULT_CHOICES, reduce_ratio: float = 0.9,
             max_calib_tokens: int | None = None,
             pmq_exponents: tuple[float, float, float] = (1.0, 1.5, 2.0)) -> dict[int, LayerBits]:
    """The bits :func:`quantize` would give every layer (same arguments), without changing the model.

    PMQ's errors are measured on the unquantized model here (not sequentially).
    """
    _check_arguments(method, "rtn", avg_bits, groups, stats, calib_dataloader, bit_choices, group_size)
    layers = moe_layers(model)
    _check_pmq_budget(layers, method, avg_bits, True)
    scores, energy = _scores(model, stats, method, reduce_ratio)
    groups = groups or (DEFAULT_GROUPS if method == "camera" and avg_bits is None else None)
    out = {}
    for layer in layers:
        inputs = capture_layer_inputs(model, layer, calib_dataloader, max_calib_tokens) if method == "pmq" else None
        with torch.no_grad():
            out[layer.index] = _allocate(method, layer, scores, energy, stats, inputs, avg_bits, groups, bit_choices,
                                         group_size, pmq_exponents)
    return out


def _scores(model: nn.Module, stats, method: str, reduce_ratio: float) -> tuple[dict | None, dict | None]:
    """CAMERA scores ``{layer: LayerScores}`` and energies ``{layer: [E, I]}`` (None for uniform)."""
    if method == "uniform":
        return None, None
    stats.check_compatible(model)
    energy = {i: (1 - reduce_ratio) * s["sq_sum"] + reduce_ratio * s["sq_max"] for i, s in stats.layers.items()}
    return stats.scores("camera", reduce_ratio=reduce_ratio), energy


def _allocate(method, layer, scores, energy, stats, inputs, avg_bits, groups, choices, group_size,
              exponents) -> LayerBits:
    if method == "uniform":
        return methods.uniform_allocation(layer, int(avg_bits))
    score = scores[layer.index].routed
    if method == "camera":
        return methods.camera_allocation(layer, score, avg_bits, groups, choices, group_size)
    if method == "matrix":
        return methods.matrix_allocation(layer, score, energy[layer.index], avg_bits, choices, group_size)
    if method == "channel":
        return methods.channel_allocation(layer, score, energy[layer.index], avg_bits, choices, group_size)
    s = stats.layers[layer.index]
    return methods.pmq_allocation(layer, s["count"], s["prob_sum"], inputs, avg_bits, PMQ_CHOICES, group_size, exponents)


def _quantize_layer(layer, bits: LayerBits, quantizer, inputs, group_size, damp, act_order, min_tokens, pack,
                    shared_bits, avg_bits) -> LayerReport:
    matrices, fallback = quantize_routed(layer, bits, quantizer, inputs, group_size, damp, act_order, min_tokens)
    packed = QuantizedExperts.from_rows(layer.experts, matrices, bits.down_axis)
    memory = packed.memory()
    if pack:
        setattr(layer.block, layer.spec.experts, packed)
    else:
        write_back(layer, matrices, bits.down_axis)
    sbits, sbytes = None, 0
    if layer.shared is not None:
        sbits = shared_bits if shared_bits is not None else max(1, _round_half_up(avg_bits or bits.avg_bits()))
        sbytes = quantize_shared(layer, int(check_bits(sbits, "shared_bits")), group_size, inputs, damp, act_order) // 8
    return LayerReport(layer.index, bits.histogram(), bits.avg_bits(), memory["bits_per_param"],
                       int(memory["weight_bytes"]), int(memory["params"]), sbits, sbytes, fallback)


def _quantize_other(model: nn.Module, layers, bits: int, group_size: int) -> None:
    """RTN fake-quantization of decoder linears outside MoE blocks (attention, dense MLPs)."""
    blocks = {id(layer.block) for layer in layers}
    skip = {name for name, m in model.named_modules() if id(m) in blocks}
    for name, module in model.named_modules():
        inside_moe = any(name.startswith(prefix + ".") for prefix in skip)
        if isinstance(module, nn.Linear) and ".layers." in f".{name}" and not inside_moe:
            quantize_linear(module, bits, group_size)
