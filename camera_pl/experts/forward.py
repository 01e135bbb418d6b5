"""camera_pl's experts forward: one implementation for every kind of experts, with observation.

The (token, slot) pairs of a forward are sorted by expert and each hit expert runs once —
through grouped GEMMs where the kind offers stacked weights
(:meth:`~camera_pl.experts.base.Experts.grouped_weights`; kinds that build them per call
build only the hit experts', in batches of bounded size), else one matmul pair per hit
expert. The micro-expert activations it computed are handed to an observer when one is
attached (``module._camera_observer``), in original micro-expert indices, so statistics
cost no second expert matmul and output with and without an observer is bit-identical
(the observer only reads). Expert ids ``>= num_experts`` (expert-parallel sentinels, or
slots switched off by dynamic pruning) are skipped. transformers' fused experts reach this
forward through the experts implementation registered in :mod:`camera_pl.arch.forward`;
camera_pl's own experts modules call it from their ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from camera_pl.experts.base import Experts, GroupedWeights, WeightGroups


class ExpertsObserver(Protocol):
    """Receives what one experts forward computed, for all (token, slot) pairs sorted by expert."""

    def observe(self, expert_ids: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor, acts: torch.Tensor,
                out_norms: torch.Tensor, top_k_weights: torch.Tensor) -> None: ...

    def watch_output(self, routing: "SortedRouting", out: torch.Tensor, num_tokens: int) -> None:
        """Called when the per-slot outputs ``out [S, H]`` (sorted rows, before the routing weight) require
        gradients: the observer may hook them to read the loss gradient at each expert's output."""


def segment_ends(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative row counts ``[E]`` of sorted ``expert_ids`` (ids ``>= num_experts`` not counted), without a host sync."""
    return torch.searchsorted(expert_ids, torch.arange(1, num_experts + 1, device=expert_ids.device))


@dataclass
class SortedRouting:
    """The routed (token, slot) pairs of one forward, sorted by expert, sentinels dropped."""

    order: torch.Tensor  # positions in the flattened [T·k] slots
    expert_ids: torch.Tensor
    token_ids: torch.Tensor
    weights: torch.Tensor
    ends: list[int]  # cumulative row counts per expert

    def counts(self) -> list[int]:
        """Rows of every expert (host-side: no sync)."""
        return [end - start for start, end in zip([0, *self.ends], self.ends)]

    def hit(self) -> list[int]:
        """Ascending ids of the experts with at least one row (host-side: no sync)."""
        return [e for e, n in enumerate(self.counts()) if n]

    @classmethod
    def of(cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> "SortedRouting":
        expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
        ends = segment_ends(expert_ids, num_experts).tolist()  # the one host sync (bincount on CUDA adds two)
        valid = ends[-1]  # sentinels (ids >= num_experts) sort last and are dropped
        order = order[:valid]
        return cls(order, expert_ids[:valid], order // top_k_index.shape[1], top_k_weights.reshape(-1)[order], ends)

    def combine(self, out: torch.Tensor, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                perm: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of the per-slot outputs ``out [S, H]`` back to tokens, in transformers' order and dtype.

        ``perm``: ``out``'s rows are the sorted rows taken in this order (None: the sorted order itself).
        """
        num_tokens, top_k = top_k_weights.shape
        order = self.order if perm is None else self.order[perm]
        shape = (num_tokens * top_k, hidden_states.shape[-1])
        if len(order) == shape[0]:  # every slot routed: gather by the inverse order (twice as fast as scattering on a CPU)
            inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=order.device))
            slots = out[inverse] * top_k_weights.reshape(-1, 1)
        else:  # sentinels were dropped: their slots stay zero
            weights = self.weights if perm is None else self.weights[perm]
            out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
            slots = hidden_states.new_zeros(shape, dtype=out_dtype).index_copy_(0, order, out * weights[:, None])
        return slots.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def to_original_channels(a: torch.Tensor, channels: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Activations of kept micro-experts ``[S, W]`` scattered to original indices ``[S, I]`` (zeros elsewhere).

    ``channels`` is ``[W]`` or per row ``[S, W]``; the index ``intermediate_size`` marks padding.
    """
    full = a.new_zeros(a.shape[0], intermediate_size + 1)
    index = channels.expand(a.shape[0], -1) if channels.dim() == 1 else channels
    return full.scatter_(1, index, a)[:, :-1]


def per_expert(experts: Experts, routing: SortedRouting, observed: bool, like: torch.Tensor,
               run: Callable[[int, slice], tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Activations ``[S, I]`` (original indices; only when ``observed``) and outputs ``[S, H]``, one hit expert at a time.

    ``run(e, rows)`` computes expert ``e``'s activations ``[n, W_e]`` and outputs ``[n, H]`` for the
    sorted rows ``rows``; ``like`` gives dtype and device of the empty result when no expert is hit.
    """
    acts, outs, start = [], [], 0
    full = experts.full_width
    for e, end in enumerate(routing.ends):
        if end > start:
            a, out = run(e, slice(start, end))
            outs.append(out)
            if observed:
                acts.append(a if full else to_original_channels(a, experts.channels(e), experts.intermediate_size))
        start = end
    if not outs:
        return like.new_zeros(0, experts.intermediate_size), like.new_zeros(0, experts.hidden_size)
    return (torch.cat(acts) if observed else None), torch.cat(outs)


GROUPED_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 27}
"""Weight entries of the experts one :meth:`~camera_pl.experts.base.Experts.grouped_weights` call builds, for
kinds that build them per call (:attr:`~camera_pl.experts.base.Experts.grouped_subsets`): the hit experts
run in batches of about this size, which bounds the built stacks and the GEMM temporaries (peak memory).
On a CPU the blocks stay below glibc's 32 MiB mmap ceiling, so the allocator reuses them instead of
page-faulting fresh memory in for every batch; on CUDA larger batches keep the kernel launches few."""


def _batches(experts: Experts, hit: list[int], device: torch.device) -> list[list[int]]:
    """The hit experts in ascending runs whose weights fit :data:`GROUPED_BUDGET` (at least one expert each)."""
    budget = GROUPED_BUDGET["cpu" if device.type == "cpu" else "cuda"]
    counts = experts.parameter_counts().tolist()
    batches, size = [[]], 0
    for e in hit:
        if batches[-1] and size + counts[e] > budget:
            batches.append([])
            size = 0
        batches[-1].append(e)
        size += counts[e]
    return batches


def projected_rows(experts: Experts, x: torch.Tensor, up: Callable[[torch.Tensor], torch.Tensor],
                   down: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor, observed: bool,
                   biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                   channels: torch.Tensor | None = None, widths: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The experts' math around two projections of rows ``x`` sorted by expert: ``up`` (to the packed gate/up
    projection), the biases, the activation, ``down``; ``index`` is each row's index into the (up, down)
    ``biases``, ``channels`` and ``widths`` (see :class:`~camera_pl.experts.base.GroupedWeights`)."""
    up_bias, down_bias = biases
    proj = up(x)
    if up_bias is not None:
        proj = proj + up_bias[index]
    a = experts.act_packed(proj)
    if widths is not None:  # padded slots: zero whatever their weights hold
        a = a.masked_fill(torch.arange(a.shape[1], device=a.device) >= widths[index][:, None], 0)
    out = down(a)
    if down_bias is not None:
        out = out + down_bias[index]
    if observed and channels is not None:
        a = to_original_channels(a, channels[index], experts.intermediate_size)
    return (a if observed else None), out


def grouped_rows(experts: Experts, x: torch.Tensor, offsets: torch.Tensor, weights: GroupedWeights,
                 index: torch.Tensor, observed: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Two grouped GEMMs over rows ``x`` sorted by expert; ``offsets`` (int32) ends each stacked expert's rows.

    ``index`` is each row's index into the biases, ``channels`` and ``widths`` of ``weights``.
    """
    return projected_rows(experts, x, lambda t: nn.functional.grouped_mm(t, weights.up, offs=offsets),
                          lambda t: nn.functional.grouped_mm(t, weights.down, offs=offsets), index, observed,
                          (weights.up_bias, weights.down_bias), weights.channels, weights.widths)


def stacked_rows(experts: Experts, x: torch.Tensor, routing: SortedRouting, weights: GroupedWeights,
                 observed: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sorted rows of the experts one stack holds (all, or the ascending run ``weights.experts``)."""
    ids = weights.experts
    if ids is None:
        offsets = segment_ends(routing.expert_ids, len(routing.ends)).int()  # on device: no H2D copy and sync
        return grouped_rows(experts, x, offsets, weights, routing.expert_ids, observed)
    first = 0 if ids[0] == 0 else routing.ends[ids[0] - 1]
    ends = [routing.ends[e] - first for e in ids]
    rows = slice(first, first + ends[-1])
    offsets = torch.tensor(ends, dtype=torch.int32, device=x.device)
    return grouped_rows(experts, x[rows], offsets, weights, routing.expert_ids[rows], observed)


def bucketed_rows(experts: Experts, hidden_states: torch.Tensor, routing: SortedRouting, buckets: WeightGroups,
                  observed: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Grouped GEMMs per group of experts over the rows regrouped by group (one gather from ``hidden_states``).

    Returns activations, outputs and the order of their rows (see :meth:`SortedRouting.combine`): the
    regrouped one, so no scatter back is paid — except when ``observed``, where observers need the
    sorted order and the results are put back (one scatter).
    """
    counts = routing.counts()
    perm = torch.argsort(buckets.group_of[routing.expert_ids], stable=True)  # by group, then by expert
    xs, acts, outs, start = hidden_states[routing.token_ids[perm]], [], [], 0
    for members, weights in zip(buckets.members, buckets.groups):
        rows = [counts[e] for e in members]
        n = sum(rows)
        if n:
            counts_b = torch.tensor(rows, device=xs.device)
            local = torch.repeat_interleave(torch.arange(len(members), device=xs.device), counts_b, output_size=n)
            offsets = counts_b.cumsum(0).to(torch.int32)
            a, out = grouped_rows(experts, xs[start:start + n], offsets, weights, local, observed)
            acts.append(a)
            outs.append(out)
        start += n
    if not observed:  # rows of width-0 experts (past ``start``) output zeros
        tail = [xs.new_zeros(xs.shape[0] - start, experts.hidden_size)] if start < xs.shape[0] or not outs else []
        return None, torch.cat(outs + tail), perm
    out = xs.new_zeros(xs.shape[0], experts.hidden_size)
    full = xs.new_zeros(xs.shape[0], experts.intermediate_size)
    if outs:
        out[perm[:start]] = torch.cat(outs)
        full[perm[:start]] = torch.cat(acts)
    return full, out, None


def sorted_activations(experts: Experts, hidden_states: torch.Tensor, routing: SortedRouting, observed: bool
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Activations ``[S, I]`` (original indices; only when ``observed``) and outputs ``[S, H]`` of the routed rows.

    The kind's own kernels where it has them (:meth:`~camera_pl.experts.base.Experts.kernel_rows`),
    else grouped GEMMs where it offers stacks (one stack, width buckets, or per-call stacks of
    the hit experts in bounded batches), else one expert at a time. The third result orders the
    rows as :meth:`SortedRouting.combine` takes it: None where they are the sorted rows.
    """
    hit = routing.hit()
    grouped = experts.grouped_weights(hidden_states) if hit and not experts.grouped_subsets else None
    if isinstance(grouped, WeightGroups):
        return bucketed_rows(experts, hidden_states, routing, grouped, observed)
    x = hidden_states[routing.token_ids]
    direct = experts.kernel_rows(x, routing, observed) if hit else None
    if direct is not None:
        return (*direct, None)
    if hit and experts.grouped_subsets:
        parts = []
        for batch in _batches(experts, hit, x.device):
            grouped = experts.grouped_weights(x, batch)
            if grouped is None:  # no grouped weights for x's device and dtype: the per-expert loop
                break
            parts.append(stacked_rows(experts, x, routing, grouped, observed))
        else:
            acts, outs = zip(*parts)
            if len(parts) == 1:
                return acts[0], outs[0], None
            return (torch.cat(acts) if observed else None), torch.cat(outs), None
    elif grouped is not None:
        return (*stacked_rows(experts, x, routing, grouped, observed), None)

    def run(e: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        w = experts.weights(e, x.dtype)
        a = experts.activation(e, x[rows], w)
        return a, experts.output(e, a, w)

    return (*per_expert(experts, routing, observed, x, run), None)


CPU_NORM_ROWS = 512
"""Rows whose float32 norms a CPU computes at once: the float32 copy stays in cache (at 32768 rows of 2048 in
bf16, 6x faster than all rows at once)."""


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """Float32 Euclidean norms of the rows of ``t [S, H]`` (in chunks of :data:`CPU_NORM_ROWS` on a CPU)."""
    if t.device.type != "cpu" or t.shape[0] <= CPU_NORM_ROWS:
        return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)
    norms = t.new_empty(t.shape[0], dtype=torch.float32)
    for start in range(0, t.shape[0], CPU_NORM_ROWS):
        part = slice(start, start + CPU_NORM_ROWS)
        torch.linalg.vector_norm(t[part], dim=-1, dtype=torch.float32, out=norms[part])
    return norms


def report(observer: ExpertsObserver | None, routing: SortedRouting, acts: torch.Tensor | None, out: torch.Tensor,
           top_k_weights: torch.Tensor) -> None:
    """Hand what a forward computed to ``observer`` (if any): activations, routing and output norms (detached:
    statistics never enter the autograd graph), and the outputs themselves when they require gradients."""
    if observer is not None:
        norms = row_norms(out.detach())
        observer.observe(routing.expert_ids, routing.token_ids, routing.weights.detach(),
                         None if acts is None else acts.detach(), norms, top_k_weights.detach())
        if out.requires_grad:
            observer.watch_output(routing, out, top_k_weights.shape[0])


def experts_forward(experts: Experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """Routed experts over (token, slot) pairs sorted by expert; reports to ``experts.module._camera_observer``.

    Per-slot outputs are weighted and summed over the top-k slots in the same order and dtype
    as transformers' implementations, so logits agree with them to float rounding of the
    kernels (~1e-6 in fp32).
    """
    observer: ExpertsObserver | None = experts.module.__dict__.get("_camera_observer")
    routing = SortedRouting.of(top_k_index, top_k_weights, experts.num_experts)
    acts, out, perm = sorted_activations(experts, hidden_states, routing, observer is not None)
    report(observer, routing, acts, out, top_k_weights)
    return routing.combine(out, hidden_states, top_k_weights, perm)
