"""Per-layer bit-allocation methods, a registry: CAMERA-Q, matrix, channel, PMQ and uniform (see :mod:`.allocation`).

Each method is one registered function ``fn(ctx: AllocationContext) -> LayerBits``; a new
method is one more :func:`register_bit_allocation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from camera_pl.arch.adapters import MoELayer
from camera_pl.experts.base import ExpertWeights
from camera_pl.quant.allocation import ROW_CHUNK, LayerBits, pmq_bits, rank_groups, row_errors, solve_budget, uniform_bits
from camera_pl.quant.calibration import LayerInputs
from camera_pl.quant.quantizers import fake_quantized, rtn

PMQ_CHOICES = (1, 2, 3)
"""MC's bit choices for PMQ."""


class BitOptions(Protocol):
    """The options bit allocations read (a :class:`~camera_pl.quant.config.QuantizeConfig`)."""

    avg_bits: float | None
    rank_groups: tuple[tuple[int, float], ...] | None
    bit_choices: tuple[int, ...]
    group_size: int
    pmq_exponents: tuple[float, float, float]
    cost: str

    def measures_output(self, calibrated: bool) -> bool: ...


@dataclass
class AllocationContext:
    """What a bit-allocation method may read for one layer.

    ``score`` is the micro-level score ``[E, I]`` (``QuantizeConfig.score``: CAMERA unless chosen) and
    ``energy`` the routed activation energy ``[E, I]``; ``stats`` the layer's statistics; ``inputs``
    its calibration inputs (for methods registered with ``needs_inputs``).
    """

    layer: MoELayer
    config: BitOptions
    score: torch.Tensor | None = None
    energy: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] | None = None
    inputs: LayerInputs | None = None


@dataclass(frozen=True)
class BitAllocation:
    """A registered method: the function and what it needs."""

    fn: Callable[[AllocationContext], LayerBits]
    needs_stats: bool = True
    needs_inputs: bool = False
    equal_widths: bool = False
    choices: tuple[int, ...] | None = None  # fixed bit choices (else the config's bit_choices)


BIT_ALLOCATIONS: dict[str, BitAllocation] = {}


def register_bit_allocation(name: str, *, needs_stats: bool = True, needs_inputs: bool = False,
                            equal_widths: bool = False, choices: tuple[int, ...] | None = None
                            ) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn(ctx) -> LayerBits`` as bit-allocation method ``name``.

    ``equal_widths``: the method needs experts of equal width (it allocates per down output row).
    """

    def add(fn: Callable[[AllocationContext], LayerBits]) -> Callable[[AllocationContext], LayerBits]:
        BIT_ALLOCATIONS[name] = BitAllocation(fn, needs_stats, needs_inputs, equal_widths, choices)
        return fn

    return add


def present_channels(layer: MoELayer) -> torch.Tensor | None:
    """``[E, I]`` mask of the micro-experts each expert still has (None when every expert has full width)."""
    experts = layer.experts
    return None if experts.full_width else experts.present_mask()


def stacked_weights(layer: MoELayer) -> ExpertWeights:
    """All experts' weights ``[E, ...]`` in original micro-expert indices (zeros where pruned)."""
    experts = layer.experts
    if experts.full_width:
        return experts.stacked()
    num, inter, hidden = layer.num_experts, layer.intermediate_size, layer.hidden_size
    w0 = experts.weights(0)
    kw = dict(dtype=w0.up.dtype, device=w0.up.device)
    out = ExpertWeights(None if w0.gate is None else torch.zeros(num, inter, hidden, **kw),
                        torch.zeros(num, inter, hidden, **kw), torch.zeros(num, hidden, inter, **kw))
    for e in range(num):
        w, ch = experts.weights(e), experts.channels(e)
        if out.gate is not None:
            out.gate[e, ch] = w.gate
        out.up[e, ch] = w.up
        out.down[e][:, ch] = w.down
    return out


def _matrices(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Routed weights as stacks of quantized rows: gate/up ``[E, I, H]``, down columns ``[E, I, H]``."""
    w = stacked_weights(layer)
    out = {"up": w.up, "down": w.down.transpose(1, 2)}
    return {"gate": w.gate, **out} if w.gate is not None else out


def _relative_errors(layer: MoELayer, choices: tuple[int, ...], group_size: int,
                     with_down: bool = True) -> dict[str, torch.Tensor]:
    """``‖ΔW_row‖² / ‖W_row‖²`` at each bit choice for every micro-expert row: ``{m: [E, I, K]}``.

    Experts are read in blocks of about ``ROW_CHUNK`` weights, so only one block's float copy exists at a time.
    """
    out = {}
    for m, w in _matrices(layer).items():
        if m == "down" and not with_down:
            continue
        per_block = max(1, ROW_CHUNK // (w.shape[1] * w.shape[2]))
        parts = []
        for block in w.split(per_block):
            rows = block.reshape(-1, w.shape[-1])
            norms = rows.float().pow(2).sum(1).double().clamp_min(1e-30)
            parts.append((row_errors(rows, choices, group_size) / norms[:, None]).reshape(*block.shape[:2], -1).cpu())
        out[m] = torch.cat(parts)
    return out


def _bits_for(layer: MoELayer, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, axis: str = "in") -> LayerBits:
    return LayerBits(gate if layer.experts.layout.has_gate else None, up, down, axis, layer.hidden_size,
                     present_channels(layer))


@torch.no_grad()
def micro_output_errors(layer: MoELayer, inputs: LayerInputs, choices: tuple[int, ...], group_size: int,
                        curvature: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Measured error of every micro-expert at each bit choice: ``[E, I, K]`` (float64, CPU).

    Micro-expert j of expert e has its gate row, up row and down column RTN-rounded together to
    ``b`` bits and everything else exact; over the calibration tokens t routed to e its change
    of the expert's output is ``Δf_t = d̂_j·â_j(x_t) − d_j·a_j(x_t)``. The error is

    * without ``curvature``: ``Σ_t g_t² ‖Δf_t‖²``, what it adds to the layer output (``g`` the routing weight);
    * with HEAPr's ``curvature`` (``Σ_t ∇f ∇fᵀ [E, H, H]`` at each expert's output, or its
      diagonal ``[E, H]``; ``counts [E]`` its tokens): ``Σ_t Δf_tᵀ M̄_e Δf_t`` with ``M̄_e`` the
      per-token mean — the second-order change of the loss, the gradients' covariance standing
      in for each token's own gradient (which already carries the routing weight).

    Cross terms between micro-experts are left out. Unlike the proxy cost (score × relative
    weight error) this sees the inputs each row gets and the gating non-linearity: a gate row
    rounded to 1 bit can open a channel that was nearly shut. Unrouted micro-experts cost nothing.
    """
    experts = layer.experts
    if experts.layout.post_norm:
        raise ValueError(f"MoE layer {layer.index} normalises each expert's output after its down projection, so "
                         "micro-experts' output errors do not add up; use cost='proxy'.")
    width = len(choices)
    cost = torch.zeros(layer.num_experts, layer.intermediate_size, width, dtype=torch.float64)
    for e in range(layer.num_experts):
        tok, slot = inputs.routed(e)
        if tok.numel() == 0 or (curvature is not None and int(counts[e]) == 0):
            continue
        x = inputs.hidden[tok].float()
        w = experts.weights(e, torch.float32)
        a = experts.activation(e, x, w)
        down_cols = w.down.t()
        if curvature is None:
            token_weight = inputs.weights[tok, slot].float().square()[:, None]
            metric = None
        else:
            token_weight = torch.ones(1, 1, device=a.device)
            metric = (curvature[e].double() / float(counts[e])).float().to(a.device)

        def inner(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Row-wise ``uᵀ M v`` (``M`` the metric; the identity without curvature)."""
            if metric is None:
                return (u * v).sum(1)
            return ((u @ metric) * v).sum(1) if metric.dim() == 2 else (u * metric * v).sum(1)

        exact = (token_weight * a * a).sum(0) * inner(down_cols, down_cols)
        rows = torch.cat([m for m in (w.gate, w.up, down_cols) if m is not None])
        per_expert = torch.empty(a.shape[1], width, dtype=torch.float64, device=a.device)
        for k, deq in fake_quantized(rows, choices, group_size):
            *gate_up, dq = deq.split(a.shape[1])
            q = ExpertWeights(gate_up[0] if w.gate is not None else None, gate_up[-1], dq.t(),
                              w.gate_bias, w.up_bias, w.down_bias)
            aq = experts.activation(e, x, q)
            err = (inner(dq, dq) * (token_weight * aq * aq).sum(0)
                   - 2 * inner(dq, down_cols) * (token_weight * aq * a).sum(0) + exact)
            per_expert[:, k] = err.double().clamp_min(0)
        cost[e, experts.channels(e).cpu()] = per_expert.cpu()
    return cost


def _curvature(stats: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """HEAPr's per-expert output curvature (full or diagonal) and token counts in ``stats``, or Nones."""
    if stats is None:
        return None, None
    curvature = stats.get("heapr_m", stats.get("heapr_diag"))
    return (None, None) if curvature is None else (curvature, stats["count"])


@register_bit_allocation("camera")
def camera_allocation(ctx: AllocationContext) -> LayerBits:
    """CAMERA-Q: one bit-width per micro-expert, by score-rank groups or under an ``avg_bits`` budget.

    The budget is spent by the cost ``ctx.config.cost`` names: ``proxy`` (score × relative RTN
    error of the micro-expert's rows, from statistics alone), ``output`` (its measured output
    error on calibration tokens) or ``loss`` (that error in the metric of HEAPr's loss curvature),
    see :func:`micro_output_errors`; ``auto`` measures whenever the layer's calibration inputs
    were captured, in the loss metric when the statistics hold HEAPr's curvature.
    """
    layer, score, avg_bits = ctx.layer, ctx.score, ctx.config.avg_bits
    groups, choices, group_size = ctx.config.rank_groups, ctx.config.bit_choices, ctx.config.group_size
    if avg_bits is None:
        bits = rank_groups(score.cpu(), groups)
    else:
        if ctx.config.measures_output(ctx.inputs is not None):
            curvature, counts = _curvature(ctx.stats)
            if ctx.config.cost == "loss" and curvature is None:
                raise ValueError("cost='loss' weighs output errors by HEAPr's loss curvature, which these statistics "
                                 "lack: collect them with camera_pl.collect_stats(..., heapr_mode='auto').")
            if ctx.config.cost == "output":
                curvature = None
            cost = micro_output_errors(layer, ctx.inputs, choices, group_size, curvature, counts)
        else:
            cost = score.cpu().double()[..., None] * sum(_relative_errors(layer, choices, group_size).values())
        present = present_channels(layer)
        size = torch.ones(score.shape) if present is None else present.double()
        bits = solve_budget(cost.reshape(-1, len(choices)), size.flatten(), choices, avg_bits).reshape(score.shape)
    return _bits_for(layer, bits.clone(), bits.clone(), bits.clone())


def _down_row_costs(layer: MoELayer, energy: torch.Tensor, choices: tuple[int, ...], group_size: int) -> torch.Tensor:
    """Cost of each down output row ``h`` at each bit choice, ``Σ_j E[(g a_j)²]·ΔW[h, j]²``: ``[E, H, K]``."""
    down = stacked_weights(layer).down
    num_experts, hidden, inter = down.shape
    energy = energy.to(down.device)
    per_block = max(1, ROW_CHUNK // (hidden * inter))
    parts = []
    for start in range(0, num_experts, per_block):
        block = down[start:start + per_block]
        weight = energy[start:start + per_block, None, :].expand(block.shape).reshape(-1, inter)
        parts.append(row_errors(block.reshape(-1, inter), choices, group_size, weight).cpu().reshape(*block.shape[:2], -1))
    return torch.cat(parts)


@register_bit_allocation("matrix", equal_widths=True)
def matrix_allocation(ctx: AllocationContext) -> LayerBits:
    """One bit-width per weight matrix of each expert (down in the standard per-output-row layout)."""
    layer, score, energy, avg_bits = ctx.layer, ctx.score, ctx.energy, ctx.config.avg_bits
    choices, group_size = ctx.config.bit_choices, ctx.config.group_size
    rel = _relative_errors(layer, choices, group_size, with_down=False)
    costs = {m: (score.cpu().double()[..., None] * r).sum(1) for m, r in rel.items()}
    costs["down"] = _down_row_costs(layer, energy, choices, group_size).sum(1)
    names = list(costs)
    cost = torch.stack([costs[m] for m in names], dim=1)  # [E, M, K]
    bits = solve_budget(cost.reshape(-1, len(choices)), torch.ones(cost.shape[0] * cost.shape[1]), choices, avg_bits)
    bits = bits.reshape(cost.shape[:2])
    per = {m: bits[:, i, None].expand(-1, layer.hidden_size if m == "down" else layer.intermediate_size).clone()
           for i, m in enumerate(names)}
    return _bits_for(layer, per.get("gate"), per["up"], per["down"], axis="out")


@register_bit_allocation("channel", equal_widths=True)
def channel_allocation(ctx: AllocationContext) -> LayerBits:
    """Per output channel of each matrix: gate/up rows and down rows, allocated independently."""
    layer, score, energy, avg_bits = ctx.layer, ctx.score, ctx.energy, ctx.config.avg_bits
    choices, group_size = ctx.config.bit_choices, ctx.config.group_size
    rel = _relative_errors(layer, choices, group_size, with_down=False)
    parts = {m: score.cpu().double()[..., None] * r for m, r in rel.items()}
    parts["down"] = _down_row_costs(layer, energy, choices, group_size)
    hidden, inter = layer.hidden_size, layer.intermediate_size
    sizes = {m: torch.full(p.shape[:2], float(hidden if m != "down" else inter)) for m, p in parts.items()}
    cost = torch.cat([p.reshape(-1, len(choices)) for p in parts.values()])
    bits = solve_budget(cost, torch.cat([s.flatten() for s in sizes.values()]), choices, avg_bits)
    per, start = {}, 0
    for m, p in parts.items():
        n = p.shape[0] * p.shape[1]
        per[m] = bits[start:start + n].reshape(p.shape[:2])
        start += n
    return _bits_for(layer, per.get("gate"), per["up"], per["down"], axis="out")


def pmq_errors(layer: MoELayer, inputs: LayerInputs, choices: tuple[int, ...], group_size: int,
               down_axis: str = "out") -> torch.Tensor:
    """MC's ``ε_ij = ‖Y − Y[e_i → RTN(e_i, j bits)]‖_F`` on calibration tokens: ``[E, K]``.

    The down projection is quantized along ``down_axis`` as it will be stored.
    """
    experts = layer.experts
    eps = torch.zeros(layer.num_experts, len(choices), dtype=torch.float64)
    with torch.no_grad():
        for e in range(layer.num_experts):
            tok, slot = inputs.routed(e)
            if tok.numel() == 0:
                continue
            x, g = inputs.hidden[tok], inputs.weights[tok, slot, None].float()
            w = experts.weights(e, x.dtype)
            y = experts.output(e, experts.activation(e, x, w), w).float()
            for k, b in enumerate(choices):
                q = ExpertWeights(None if w.gate is None else rtn(w.gate, b, group_size).dequantize(x.dtype),
                                  rtn(w.up, b, group_size).dequantize(x.dtype),
                                  rtn(w.down, b, group_size).dequantize(x.dtype) if down_axis == "out" else
                                  rtn(w.down.t(), b, group_size).dequantize(x.dtype).t(),
                                  w.gate_bias, w.up_bias, w.down_bias)
                yq = experts.output(e, experts.activation(e, x, q), q).float()
                eps[e, k] = torch.linalg.vector_norm(g * (y - yq)).double().cpu()
    return eps


@register_bit_allocation("pmq", needs_inputs=True, choices=PMQ_CHOICES)
def pmq_allocation(ctx: AllocationContext) -> LayerBits:
    """PMQ: expert bits from ``min Σ φ^α w^β ε^γ`` (φ frequency, w router probability mass, both summing to 1)."""
    layer, inputs, avg_bits, group_size = ctx.layer, ctx.inputs, ctx.config.avg_bits, ctx.config.group_size
    weight = "prob_sum" if ctx.config.pmq_weight == "all" else "selected_prob_sum"
    if weight not in ctx.stats:
        raise ValueError(f"pmq_weight={ctx.config.pmq_weight!r} needs the statistic {weight!r}, which these statistics "
                         "(collected by an earlier camera_pl) lack; collect them again with camera_pl.collect_stats.")
    count, prob_sum, choices = ctx.stats["count"], ctx.stats[weight], PMQ_CHOICES
    alpha, beta, gamma = ctx.config.pmq_exponents
    phi = count.double().cpu() / count.double().sum().clamp_min(1e-30)
    w = prob_sum.double().cpu() / prob_sum.double().sum().clamp_min(1e-30)
    axis = "out" if layer.experts.full_width else "in"
    eps = pmq_errors(layer, inputs, choices, group_size, axis)
    bits = pmq_bits(phi[:, None] ** alpha * w[:, None] ** beta * eps**gamma, choices, avg_bits)
    rows = bits[:, None].expand(layer.num_experts, layer.intermediate_size)
    down = rows if axis == "in" else bits[:, None].expand(-1, layer.hidden_size)
    return _bits_for(layer, rows.clone(), rows.clone(), down.clone(), axis=axis)


@register_bit_allocation("uniform", needs_stats=False)
def uniform_allocation(ctx: AllocationContext) -> LayerBits:
    """Every routed row at ``avg_bits`` (down in the standard per-output-row layout)."""
    layer = ctx.layer
    return uniform_bits(int(ctx.config.avg_bits), layer.num_experts, layer.intermediate_size, layer.hidden_size,
                        layer.experts.layout.has_gate, present_channels(layer))
