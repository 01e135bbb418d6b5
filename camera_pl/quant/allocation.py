"""Bit allocations for a layer's routed experts: who gets how many bits.

An allocation (:class:`LayerBits`) gives a bit-width to every quantized row of the layer
(gate rows, up rows, down rows of ``down.T`` or of ``down``, see
:mod:`camera_pl.experts.quantized`). The methods differ in granularity:

* ``camera`` (CAMERA-Q, METHODS §3): per micro-expert — gate row j, up row j and down column
  j share one bit-width. Either rank groups (top 10% at 8 bits, next 30% at 4, rest at 2 by
  CAMERA score) or, given ``avg_bits``, a budgeted allocation (below).
* ``matrix``: one bit-width per weight matrix of each expert.
* ``channel``: per output channel of each matrix independently (gate/up rows, down rows).
* ``pmq`` (MC, METHODS §4a): one bit-width per expert from an integer program.
* ``uniform``: every row at the same bit-width.

Only ``camera`` stores down by columns (grids along the output dimension, so a
micro-expert is quantized as a unit); all others use the standard per-output-row layout.

Budgeted allocations (camera with ``avg_bits``, matrix, channel) share one cost model, so
they differ only in granularity: a unit's cost at ``b`` bits is its importance times its
round-to-nearest error. For a micro-expert that is ``S_ej · Σ_m ‖ΔW_m‖²/‖W_m‖²`` over its
gate row, up row and down column (``S`` = CAMERA score: with ``S = ‖d_j‖²·E[(g a_j)²]`` the
down-column term is exactly the output energy of the rounding error); a matrix sums its
micro-experts' gate/up terms; a down output row ``h`` costs ``Σ_j E[(g a_j)²] ΔW[h, j]²``
(a down matrix: the sum over its rows). The
budget counts code bits per weight (scales and zeros are reported separately); it is met
by a Lagrangian relaxation followed by greedy upgrades.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from camera_pl.host_memory import release_freed_host_memory
from camera_pl.quant.quantizers import check_bits, squared_errors

DEFAULT_GROUPS = ((8, 0.1), (4, 0.3), (2, 0.6))
DEFAULT_CHOICES = (1, 2, 3, 4, 8)


@dataclass
class LayerBits:
    """Bit-widths of one layer's routed rows.

    Attributes:
        gate, up: ``[E, I]`` bits of gate/up rows (``gate`` None for gate-less experts).
        down: ``[E, I]`` bits of down columns (``down_axis="in"``) or ``[E, H]`` of down rows (``"out"``).
        hidden_size: ``H``, the length of gate/up rows.
        present: ``[E, I]`` micro-experts that exist (None: all); entries of pruned ones are ignored.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    down_axis: str
    hidden_size: int
    present: torch.Tensor | None = None

    def rows(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``{matrix: (bits [E, R], row length)}``."""
        inter = self.up.shape[1]
        out = {"up": (self.up, self.hidden_size),
               "down": (self.down, self.hidden_size if self.down_axis == "in" else inter)}
        if self.gate is not None:
            out = {"gate": (self.gate, self.hidden_size), **out}
        return out

    def histogram(self) -> dict[int, float]:
        """Fraction of routed weights at each bit-width."""
        counts: dict[int, int] = {}
        for m, (bits, length) in self.rows().items():
            if self.present is not None and not (m == "down" and self.down_axis == "out"):
                bits = bits[self.present.to(bits.device)]
            for b, n in zip(*torch.unique(bits, return_counts=True)):
                counts[int(b)] = counts.get(int(b), 0) + int(n) * length
        total = sum(counts.values())
        return {b: n / total for b, n in sorted(counts.items())}

    def avg_bits(self) -> float:
        """Average code bits per routed weight."""
        return sum(b * f for b, f in self.histogram().items())


def uniform_bits(bits: int, num_experts: int, inter: int, hidden: int, has_gate: bool,
                 present: torch.Tensor | None = None) -> LayerBits:
    """Every row at ``bits``; down stored by output rows (the standard layout, exportable) unless
    experts have unequal widths (``present`` given), where down columns are quantized instead."""
    rows = torch.full((num_experts, inter), int(check_bits(bits)))
    if present is not None:
        return LayerBits(rows.clone() if has_gate else None, rows.clone(), rows.clone(), "in", hidden, present)
    return LayerBits(rows.clone() if has_gate else None, rows.clone(), torch.full((num_experts, hidden), int(bits)),
                     "out", hidden)


def check_groups(groups: tuple[tuple[int, float], ...]) -> None:
    """Validate ``((bits, fraction), ...)``: bits in 1..8, fractions positive and summing to 1."""
    if not groups:
        raise ValueError("groups must list (bits, fraction) pairs, e.g. ((8, 0.1), (4, 0.3), (2, 0.6)).")
    check_bits(torch.tensor([b for b, _ in groups]), "group bit-widths")
    fractions = [f for _, f in groups]
    if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"group fractions must be non-negative and sum to 1; got {fractions} "
                         f"(sum {sum(fractions):.4f}).")


def rank_groups(scores: torch.Tensor, groups: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Bits by score rank: the first group (highest scores) gets ``groups[0][0]`` bits, and so on."""
    check_groups(groups)
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    bits = torch.empty_like(order)
    start, acc = 0, 0.0
    for i, (b, fraction) in enumerate(groups):
        acc += fraction
        end = flat.numel() if i == len(groups) - 1 else round(acc * flat.numel())
        bits[order[start:end]] = b
        start = end
    return bits.reshape(scores.shape)


ROW_CHUNK = 1 << 22
"""Weights quantized at once when measuring errors: bounds the float temporaries (a few x 4 bytes each)."""


def row_errors(rows: torch.Tensor, choices: tuple[int, ...], group_size: int,
               column_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared RTN error of every row ``[N, C]`` at each bit choice -> ``[N, K]`` (float64).

    With ``column_weight`` (broadcastable to ``rows``) the squared errors are weighted per
    entry. Rows are processed in chunks of about :data:`ROW_CHUNK` weights.
    """
    step = max(1, ROW_CHUNK // max(1, rows.shape[1]))
    per_row = column_weight is not None and column_weight.dim() == 2 and column_weight.shape[0] == rows.shape[0] > 1
    parts = []
    for i in range(0, rows.shape[0], step):
        parts.append(squared_errors(rows[i:i + step], choices, group_size,
                                    column_weight[i:i + step] if per_row else column_weight).double())
        release_freed_host_memory()
    return torch.cat(parts) if parts else torch.zeros(0, len(choices), dtype=torch.float64)


def solve_budget(cost: torch.Tensor, size: torch.Tensor, choices: tuple[int, ...], avg_bits: float) -> torch.Tensor:
    """Bits per unit minimising ``Σ cost[u, b_u]`` subject to ``Σ size_u·b_u ≤ avg_bits·Σ size_u``.

    A multiple-choice knapsack: the Lagrangian ``cost + λ·size·b`` is minimised per unit with
    ``λ`` bisected to the budget, then the leftover budget is spent on the upgrades with the
    best cost decrease per bit. ``cost [U, K]`` for the ascending bit ``choices``.
    """
    c = torch.tensor(choices, dtype=torch.float64)
    if sorted(choices) != list(choices) or len(set(choices)) != len(choices):
        raise ValueError(f"bit choices must be strictly ascending, got {choices}.")
    if not choices[0] <= avg_bits <= choices[-1]:
        raise ValueError(f"avg_bits={avg_bits} cannot be met with bit choices {choices}: it must lie in "
                         f"[{choices[0]}, {choices[-1]}]. Change avg_bits or bit_choices.")
    cost = cost.double() / cost.max().clamp_min(1e-300)
    size = size.double()
    budget = avg_bits * size.sum() * (1 + 1e-12)

    def pick(lam: float) -> torch.Tensor:
        return torch.argmin(cost + lam * size[:, None] * c[None] / size.mean(), dim=1)

    def used(idx: torch.Tensor) -> float:
        return float((size * c[idx]).sum())

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget and hi < 1e30:
        lo, hi = hi, hi * 10
    if used(pick(lo)) <= budget:
        hi = lo
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(pick(mid)) <= budget else (mid, hi)
    idx = pick(hi)
    for _ in range(len(choices)):  # greedy fill of what the relaxation left
        remaining = budget - used(idx)
        extra = size[:, None] * (c[None] - c[idx][:, None])
        gain = cost.gather(1, idx[:, None]) - cost
        ratio = torch.where((extra > 0) & (gain > 0) & (extra <= remaining), gain / extra.clamp_min(1e-300), -1.0)
        best_ratio, best = ratio.max(dim=1)
        order = torch.argsort(best_ratio, descending=True)
        order = order[best_ratio[order] > 0]
        step = extra[order, best[order]]
        take = order[torch.cumsum(step, 0) <= remaining]
        if take.numel() == 0:
            break
        idx[take] = best[take]
    return c[idx].long()


def pmq_bits(coef: torch.Tensor, choices: tuple[int, ...], avg_bits: float) -> torch.Tensor:
    """MC's PMQ integer program for one layer, solved exactly: bits per expert ``[E]``.

    Minimises ``Σ_i coef[i, choice_i]`` with one choice per expert, ``Σ bits ≤ E·avg_bits`` and at
    least one expert at each of the two largest choices (MC: one at 3 and one at 2 bits). A
    dynamic program over (experts so far, bits used, has-largest, has-second) — ``E × E·max(bits) × 4``
    states — finds the optimum exactly and deterministically (a MILP solver stops within a
    relative gap and may return a slightly worse allocation); equal costs go to fewer bits.
    """
    n, k = coef.shape
    c = [int(b) for b in choices]
    need = c[-1] + c[-2] + (n - 2) * c[0]
    if n < 2 or need > n * avg_bits + 1e-9:
        raise ValueError(f"PMQ is infeasible for {n} experts at avg_bits={avg_bits}: one expert at {choices[-1]} bits, "
                         f"one at {choices[-2]} and the rest at {choices[0]} already need {need / max(n, 1):.3f} bits "
                         "on average. Raise avg_bits or use another method.")
    budget = int(math.floor(n * avg_bits + 1e-9))
    cost = coef.double().cpu()
    flag = [(2 if j == k - 1 else 0) | (1 if j == k - 2 else 0) for j in range(k)]  # bit 2: largest, bit 1: second
    inf = float("inf")
    # best[b, f]: least (cost, bits) of the experts so far using exactly b bits with flags f
    best = torch.full((budget + 1, 4), inf, dtype=torch.float64)
    best[0, 0] = 0.0
    picks = torch.zeros(n, budget + 1, 4, dtype=torch.int8)
    for i in range(n):
        new = torch.full_like(best, inf)
        for j in range(k):
            shifted = torch.full_like(best, inf)
            shifted[c[j]:] = best[: budget + 1 - c[j]] + cost[i, j]
            for f in range(4):  # OR this choice's flag into every state
                target = f | flag[j]
                better = shifted[:, f] < new[:, target]  # strict: the lower choice (fewer bits) wins ties
                new[:, target] = torch.where(better, shifted[:, f], new[:, target])
                picks[i, :, target] = torch.where(better, torch.full_like(picks[i, :, target], j * 4 + f),
                                                  picks[i, :, target])
        best = new
    b = int(torch.argmin(best[:, 3]))  # the least cost with both flags; among equal costs the fewest bits
    bits, f = [0] * n, 3
    for i in reversed(range(n)):
        j, f_prev = divmod(int(picks[i, b, f]), 4)
        bits[i], b, f = c[j], b - c[j], f_prev
    return torch.tensor(bits, dtype=torch.long)
