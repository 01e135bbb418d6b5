"""Per-layer allocation methods: CAMERA-Q, matrix, channel, PMQ and uniform (see :mod:`.allocation`)."""

from __future__ import annotations

import torch

from camera_pl.arch.adapters import MoELayer
from camera_pl.quant.allocation import LayerBits, pmq_bits, rank_groups, row_errors, solve_budget, uniform_bits
from camera_pl.quant.calibration import LayerInputs
from camera_pl.experts.quantized import run_expert
from camera_pl.quant.quantizers import rtn


def _matrices(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Routed weights as stacks of quantized rows: gate/up ``[E, I, H]``, down columns ``[E, I, H]``."""
    gate, up, down = layer.stacked_weights()
    out = {"up": up, "down": down.transpose(1, 2)}
    return {"gate": gate, **out} if gate is not None else out


def _relative_errors(layer: MoELayer, choices: tuple[int, ...], group_size: int,
                     with_down: bool = True) -> dict[str, torch.Tensor]:
    """``‖ΔW_row‖² / ‖W_row‖²`` at each bit choice for every micro-expert row: ``{m: [E, I, K]}``."""
    out = {}
    for m, w in _matrices(layer).items():
        if m == "down" and not with_down:
            continue
        rows = w.reshape(-1, w.shape[-1])
        norms = rows.float().pow(2).sum(1).double().clamp_min(1e-30)
        out[m] = (row_errors(rows, choices, group_size) / norms[:, None]).reshape(*w.shape[:2], -1).cpu()
    return out


def _bits_for(layer: MoELayer, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, axis: str = "in") -> LayerBits:
    return LayerBits(gate if layer.has_gate else None, up, down, axis, layer.hidden_size)


def camera_allocation(layer: MoELayer, score: torch.Tensor, avg_bits: float | None,
                      groups: tuple[tuple[int, float], ...] | None, choices: tuple[int, ...],
                      group_size: int) -> LayerBits:
    """CAMERA-Q: one bit-width per micro-expert, by score-rank groups or under an ``avg_bits`` budget."""
    if avg_bits is None:
        bits = rank_groups(score.cpu(), groups)
    else:
        rel = sum(_relative_errors(layer, choices, group_size).values())
        cost = score.cpu().double()[..., None] * rel
        bits = solve_budget(cost.reshape(-1, len(choices)), torch.ones(cost.shape[0] * cost.shape[1]), choices,
                            avg_bits).reshape(score.shape)
    return _bits_for(layer, bits.clone(), bits.clone(), bits.clone())


def _down_row_costs(layer: MoELayer, energy: torch.Tensor, choices: tuple[int, ...], group_size: int) -> torch.Tensor:
    """Cost of each down output row ``h`` at each bit choice, ``Σ_j E[(g a_j)²]·ΔW[h, j]²``: ``[E, H, K]``."""
    _, _, down = layer.stacked_weights()
    num_experts, hidden, inter = down.shape
    weight = energy.to(down.device)[:, None, :].expand(num_experts, hidden, inter).reshape(-1, inter)
    return row_errors(down.reshape(-1, inter), choices, group_size, weight).cpu().reshape(num_experts, hidden, -1)


def matrix_allocation(layer: MoELayer, score: torch.Tensor, energy: torch.Tensor, avg_bits: float,
                      choices: tuple[int, ...], group_size: int) -> LayerBits:
    """One bit-width per weight matrix of each expert (down in the standard per-output-row layout)."""
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


def channel_allocation(layer: MoELayer, score: torch.Tensor, energy: torch.Tensor, avg_bits: float,
                       choices: tuple[int, ...], group_size: int) -> LayerBits:
    """Per output channel of each matrix: gate/up rows and down rows, allocated independently."""
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


def pmq_errors(layer: MoELayer, inputs: LayerInputs, choices: tuple[int, ...], group_size: int) -> torch.Tensor:
    """MC's ``ε_ij = ‖Y − Y[e_i → RTN(e_i, j bits)]‖_F`` on calibration tokens: ``[E, K]``."""
    gate, up, down = layer.stacked_weights()
    eps = torch.zeros(layer.num_experts, len(choices), dtype=torch.float64)
    with torch.no_grad():
        for e in range(layer.num_experts):
            tok, slot = inputs.routed(e)
            if tok.numel() == 0:
                continue
            x, g = inputs.hidden[tok], inputs.weights[tok, slot, None].float()
            y = run_expert(layer.experts, e, x, None if gate is None else gate[e], up[e], down[e]).float()
            for k, b in enumerate(choices):
                qg = None if gate is None else rtn(gate[e], b, group_size).dequantize(gate.dtype)
                yq = run_expert(layer.experts, e, x, qg, rtn(up[e], b, group_size).dequantize(up.dtype),
                                rtn(down[e], b, group_size).dequantize(down.dtype)).float()
                eps[e, k] = torch.linalg.vector_norm(g * (y - yq)).double().cpu()
    return eps


def pmq_allocation(layer: MoELayer, count: torch.Tensor, prob_sum: torch.Tensor, inputs: LayerInputs,
                   avg_bits: float, choices: tuple[int, ...], group_size: int,
                   exponents: tuple[float, float, float]) -> LayerBits:
    """PMQ: expert bits from ``min Σ φ^α w^β ε^γ`` (φ frequency, w mean router probability, both summing to 1)."""
    alpha, beta, gamma = exponents
    phi = count.double().cpu() / count.double().sum().clamp_min(1e-30)
    w = prob_sum.double().cpu() / prob_sum.double().sum().clamp_min(1e-30)
    eps = pmq_errors(layer, inputs, choices, group_size)
    bits = pmq_bits(phi[:, None] ** alpha * w[:, None] ** beta * eps**gamma, choices, avg_bits)
    rows = bits[:, None].expand(layer.num_experts, layer.intermediate_size)
    return _bits_for(layer, rows.clone(), rows.clone(), bits[:, None].expand(-1, layer.hidden_size).clone(), axis="out")


def uniform_allocation(layer: MoELayer, bits: int) -> LayerBits:
    """Every routed row at ``bits`` (down in the standard per-output-row layout)."""
    return uniform_bits(bits, layer.num_experts, layer.intermediate_size, layer.hidden_size, layer.has_gate)
