"""``quantize(model, stats, QuantizeConfig(...))``: mixed-precision weight-only quantization of an MoE model's experts.

Per MoE layer, in depth order: allocate bits (:mod:`camera_pl.quant.methods`), quantize
the routed experts (fused, or ragged after pruning) with RTN or GPTQ, and either replace them by a
bit-packed :class:`~camera_pl.experts.quantized.QuantizedExperts` (``pack=True``) or write the
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

from camera_pl.arch.adapters import decoder_layers, moe_layers
from camera_pl.experts.quantized import QuantizedExperts
from camera_pl.host_memory import release_freed_host_memory
from camera_pl.quant.allocation import LayerBits
from camera_pl.offload import LayerByLayer, OffloadConfig, as_offload, home_device, onloaded
from camera_pl.quant.calibration import capture_layer_inputs, capture_step_inputs
from camera_pl.quant.config import QuantizeConfig
from camera_pl.quant.layer import WriteBack, quantize_linear, quantize_routed, quantize_shared, stored_row_bits
from camera_pl.quant.methods import BIT_ALLOCATIONS, PMQ_CHOICES, AllocationContext
from camera_pl.quant.quantizers import check_bits
from camera_pl.stats.scores import score_options


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


def _check_data(config: QuantizeConfig, stats, calib_dataloader, allocating: bool) -> None:
    """The statistics and calibration data ``config`` needs are there (checked before any work)."""
    if allocating and config.needs_stats and stats is None:
        raise ValueError(f"method={config.method!r} needs micro-expert statistics: stats = camera_pl.collect_stats("
                         "model, dataloader) (or MicroExpertStatsCallback.stats).")
    needs_inputs = allocating and config.needs_inputs
    if (config.quantizer == "gptq" or needs_inputs) and calib_dataloader is None:
        what = "GPTQ Hessians" if config.quantizer == "gptq" else f"{config.method}'s measured output errors"
        raise ValueError(f"{what} need calibration data: pass calib_dataloader (a re-iterable of dicts with input_ids).")
    if calib_dataloader is not None and iter(calib_dataloader) is calib_dataloader:
        raise ValueError("calib_dataloader is a one-shot iterator, but it is read once per layer; pass a list or "
                         "a DataLoader.")


def _check_quantizable(layers: list, config: QuantizeConfig) -> None:
    """Quantization reads full-precision fused or pruned (ragged) experts; fail before any work otherwise."""
    for layer in layers:
        kind = layer.experts.kind
        if kind not in ("fused", "ragged", "list"):
            raise ValueError(f"MoE layer {layer.index} already holds {kind} experts; quantize full-precision experts "
                             "once, after pruning and before compressing experts.")
        if BIT_ALLOCATIONS[config.method].equal_widths and not layer.experts.full_width:
            raise ValueError(f"method={config.method!r} allocates bits per output row of each down projection, whose "
                             f"length differs between the experts of MoE layer {layer.index} after layer/global "
                             "pruning. Use method='camera', 'pmq' or 'uniform', or prune with allocation='expert'.")


def _check_pmq_budget(layers: list, config: QuantizeConfig) -> None:
    """PMQ needs one expert at 3 bits, one at 2 and the rest at >= 1: fail before touching the model."""
    if config.method != "pmq":
        return
    n = min(layer.num_experts for layer in layers)
    choices = PMQ_CHOICES
    if n < 2 or n * config.avg_bits < choices[-1] + choices[-2] + (n - 2) * choices[0]:
        raise ValueError(f"avg_bits={config.avg_bits} is infeasible for PMQ with {n} experts per layer (one expert at "
                         f"3 bits and one at 2 are required, so at least {(n + 3) / n:.3f} bits). Raise avg_bits.")


def _resolve(config: QuantizeConfig | str | None, options: dict) -> QuantizeConfig:
    if isinstance(config, str):  # quantize(model, stats, "camera", ...): the method
        config, options = None, {"method": config, **options}
    return QuantizeConfig.build(config, **options)


def quantize(model: nn.Module, stats=None, config: QuantizeConfig | str | None = None, *,
             calib_dataloader: Iterable | None = None, allocation: Mapping[int, LayerBits] | None = None,
             offload: OffloadConfig | str | torch.device | None = None, **options) -> QuantReport:
    """Quantize the routed experts of every MoE layer of ``model`` in place.

    Args:
        stats: :class:`camera_pl.MicroExpertStats` of this model (all methods but ``uniform``).
        config: a :class:`QuantizeConfig` (or its ``method``); ``options`` are its fields
            (``quantize(model, stats, avg_bits=2.5, quantizer="gptq", ...)``).
        calib_dataloader: re-iterable of dicts with ``input_ids`` (+ ``attention_mask``), for GPTQ and PMQ.
        allocation: bits per layer from :func:`allocate` (e.g. kept from a fake-quantized
            finetuning phase); replaces the allocation ``config.method`` would compute.
        offload: an :class:`~camera_pl.offload.OffloadConfig` or the execution device: the model stays
            on its home device (CPU) and each decoder layer is quantized on the execution device, GPTQ
            and PMQ calibrating it on the cached outputs of the layers quantized before it
            (:mod:`camera_pl.offload`); the result is the in-memory one.
    """
    config = _resolve(config, options)
    offload = as_offload(offload)
    _check_data(config, stats, calib_dataloader, allocating=allocation is None)
    layers = moe_layers(model)
    _check_quantizable(layers, config)
    if allocation is None:
        _check_pmq_budget(layers, config)
    missing = [layer.index for layer in layers if allocation is not None and layer.index not in allocation]
    if missing:
        raise ValueError(f"allocation has no bits for MoE layers {missing}; compute it with camera_pl.allocate "
                         "on this model.")
    scores, energy = _scores(model, stats, config) if allocation is None else (None, None)
    was_training = model.training
    model.eval()
    reports = []
    measured = allocation is None and config.measures_output(calib_dataloader is not None)
    calibrated = config.quantizer == "gptq" or measured

    def quantize_one(layer, inputs) -> None:
        release_freed_host_memory(force=True)  # what earlier work (and the layer before) freed, before this layer's
        with torch.no_grad():
            bits = allocation[layer.index] if allocation is not None else \
                _allocate(layer, config, stats, scores, energy, inputs)
            reports.append(_quantize_layer(layer, bits, config, inputs if config.quantizer == "gptq" else None))

    try:
        if offload is None:
            for layer in layers:
                quantize_one(layer, capture_layer_inputs(model, layer, calib_dataloader, config.max_calib_tokens)
                             if calibrated else None)
        elif calibrated:
            for step in LayerByLayer(model, calib_dataloader, offload, config.max_calib_tokens):
                if step.moe is not None:
                    quantize_one(step.moe, capture_step_inputs(step))
                if not step.last:
                    step.run()  # the quantized layer's outputs: the next layer's calibration inputs
        else:
            home = home_device(model)
            stack = decoder_layers(model)
            for layer in layers:
                with onloaded(stack[layer.index], offload, home):
                    quantize_one(layer, None)
        if config.other_bits is not None:
            _quantize_other(model, layers, config.other_bits, config.group_size)
    finally:
        model.train(was_training)
        release_freed_host_memory(force=True)
    return QuantReport(config.method, config.quantizer, config.group_size, config.pack, reports, config.other_bits)


def allocate(model: nn.Module, stats=None, config: QuantizeConfig | str | None = None, *,
             calib_dataloader: Iterable | None = None, offload: OffloadConfig | str | torch.device | None = None,
             **options) -> dict[int, LayerBits]:
    """The bits :func:`quantize` would give every layer (same config), without changing the model.

    Methods that measure output errors (PMQ) measure them on the unquantized model here (not sequentially),
    one decoder layer at a time on the execution device with ``offload`` (as :func:`quantize`).
    """
    config = _resolve(config, options)
    offload = as_offload(offload)
    _check_data(config, stats, calib_dataloader if config.needs_inputs else [], True)
    layers = moe_layers(model)
    _check_quantizable(layers, config)
    _check_pmq_budget(layers, config)
    scores, energy = _scores(model, stats, config)
    out = {}
    measured = config.measures_output(calib_dataloader is not None)
    if offload is not None and measured:
        for step in LayerByLayer(model, calib_dataloader, offload, config.max_calib_tokens):
            if step.moe is not None:
                with torch.no_grad():
                    out[step.index] = _allocate(step.moe, config, stats, scores, energy, capture_step_inputs(step))
            if not step.last:
                step.run()
        return out
    for layer in layers:
        inputs = None
        if measured:
            inputs = capture_layer_inputs(model, layer, calib_dataloader, config.max_calib_tokens)
        with torch.no_grad():
            out[layer.index] = _allocate(layer, config, stats, scores, energy, inputs)
    return out


def _scores(model: nn.Module, stats, config: QuantizeConfig) -> tuple[dict | None, dict | None]:
    """Scores ``{layer: LayerScores}`` by ``config.score`` and CAMERA energies ``{layer: [E, I]}`` (None without
    statistics)."""
    if stats is None or not config.needs_stats:
        return None, None
    stats.check_compatible(model)
    r = config.reduce_ratio
    energy = {i: (1 - r) * s["sq_sum"] + r * s["sq_max"] for i, s in stats.layers.items()}
    options = {name: getattr(config, name) for name in score_options(config.score) if hasattr(config, name)}
    return stats.scores(config.score, model=model, **options), energy


def _allocate(layer, config: QuantizeConfig, stats, scores, energy, inputs) -> LayerBits:
    """The layer's bits by ``config.method``, from statistics moved to the layer's device (offloaded layers run
    on the execution device while statistics stay home)."""
    device = layer.experts.device
    ctx = AllocationContext(layer, config, None if scores is None else scores[layer.index].routed.to(device),
                            None if energy is None else energy[layer.index].to(device),
                            None if stats is None else {n: t.to(device) for n, t in stats.layers[layer.index].items()},
                            inputs)
    return BIT_ALLOCATIONS[config.method].fn(ctx)


def _quantize_layer(layer, bits: LayerBits, config: QuantizeConfig, inputs) -> LayerReport:
    """Quantize one layer's routed experts (packed as they are quantized, or written back) and shared experts."""
    group_size, damp, act_order = config.group_size, config.damp, config.act_order
    packed = QuantizedExperts.for_bits(layer.experts, stored_row_bits(layer, bits), group_size, bits.down_axis)
    sink = packed.write_rows if config.pack else WriteBack(layer, bits)
    fallback = quantize_routed(layer, bits, config.quantizer, inputs, group_size, sink, damp, act_order,
                               config.min_tokens)
    memory = packed.memory()  # what the packed storage takes (also reported when fake-quantizing)
    if config.pack:
        layer.replace_experts(packed)
    sbits, sbytes = None, 0
    if layer.shared is not None:
        avg = config.avg_bits or bits.avg_bits()
        sbits = config.shared_bits if config.shared_bits is not None else max(1, _round_half_up(avg))
        sbytes = quantize_shared(layer, int(check_bits(sbits, "shared_bits")), group_size, inputs, damp, act_order) // 8
    return LayerReport(layer.index, bits.histogram(), bits.avg_bits(), memory["bits_per_param"],
                       int(memory["weight_bytes"]), int(memory["params"]), sbits, sbytes, fallback)


def _quantize_other(model: nn.Module, layers, bits: int, group_size: int) -> None:
    """RTN fake-quantization of decoder linears outside MoE blocks (attention, dense MLPs)."""
    blocks = {id(layer.block) for layer in layers}
    inside_moe = {id(m) for layer in layers for m in layer.block.modules()}
    for decoder_layer in decoder_layers(model):
        for module in decoder_layer.modules():
            if isinstance(module, nn.Linear) and id(module) not in inside_moe and id(module) not in blocks:
                quantize_linear(module, bits, group_size)
