"""Width buckets: how experts of unequal width are stored so that a forward is a few grouped GEMMs.

Experts pruned to different widths cannot share one ``[E, W, H]`` stack without padding every
expert to the widest. Grouping experts of similar width into a few *buckets*, each stored as
one stack padded to the bucket's widest member (rounded up to an alignment the GEMM kernels
like), bounds the padding while keeping the number of GEMMs small. :func:`plan_buckets`
chooses the fewest buckets whose padding stays within a budget; it is a pure function of the
widths, so a saved model's buckets are planned again identically on load.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGNMENTS = (64, 32, 16, 8)
"""Candidate bucket-width multiples, preferred first: 64 suits tensor-core tiles; torch's grouped GEMM
(CPU and CUDA) needs 16-byte strides, 8 elements in bf16 and fp16 (4 in fp32), so 8 is the floor:
finer multiples would send a forward to the per-expert loop, much slower for many small experts.
Buckets of widths below 8 are stored at a power of two (1, 2, 4) instead — padding those to 8 would
grow a model with many nearly removed experts by several percent — and padded per forward."""

FORMER_ALIGNMENTS = (64, 32, 16, 8, 4, 2, 1)
"""The candidates of camera_pl before the floor of 8 (no power-of-two widths): a saved model's buckets
were planned with them when their shapes differ from today's plan (``plan_buckets(..., former=True)``,
see :meth:`RaggedExperts._load_from_state_dict`)."""


@dataclass(frozen=True)
class BucketPlan:
    """Experts grouped into buckets: ``members[b]`` (ascending expert ids) stored at width ``widths[b]``."""

    members: tuple[tuple[int, ...], ...]
    widths: tuple[int, ...]
    align: int

    def padding(self, expert_widths: list[int]) -> int:
        """Padded micro-experts in total (stored slots that hold no micro-expert)."""
        return sum(w * len(m) - sum(expert_widths[e] for e in m) for m, w in zip(self.members, self.widths))


def stored_width(width: int, align: int, former: bool = False) -> int:
    """The bucket width that holds experts of up to ``width`` kept micro-experts: ``width`` rounded up to
    ``align``, or below :data:`ALIGNMENTS`' floor to a power of two (``former``: always to ``align``)."""
    if width < ALIGNMENTS[-1] and not former:
        return 1 << (width - 1).bit_length()
    return -(-width // align) * align


def choose_alignment(widths: list[int], max_padding: float, former: bool = False) -> int:
    """The largest candidate alignment whose rounding alone pads at most half the budget (else the finest)."""
    kept, alignments = sum(widths), FORMER_ALIGNMENTS if former else ALIGNMENTS
    for align in alignments:
        if sum(stored_width(w, align, former) - w for w in widths if w) <= 0.5 * max_padding * kept:
            return align
    return alignments[-1]


def plan_buckets(widths: list[int], max_padding: float = 0.10, former: bool = False) -> BucketPlan:
    """The fewest width buckets whose padding is at most ``max_padding`` of the kept micro-experts.

    Experts of width 0 belong to no bucket. Buckets are contiguous runs of the experts sorted by
    width (an optimal partition has this form); for each bucket count a dynamic program finds
    the least padding, and the first count within budget wins (at worst one bucket per distinct
    stored width, where only the rounding pads). ``former``: the plan of camera_pl before the
    alignment floor (:data:`FORMER_ALIGNMENTS`), to read older saves.
    """
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}.")
    align = choose_alignment(widths, max_padding, former)
    order = sorted((e for e, w in enumerate(widths) if w > 0), key=lambda e: (widths[e], e))
    if not order:
        return BucketPlan((), (), align)
    sizes = [widths[e] for e in order]
    n = len(sizes)
    prefix = [0]
    for w in sizes:
        prefix.append(prefix[-1] + w)

    def cost(i: int, j: int) -> int:  # padding of one bucket holding sorted experts i..j-1
        return stored_width(sizes[j - 1], align, former) * (j - i) - (prefix[j] - prefix[i])

    budget = max(max_padding * prefix[n], sum(stored_width(w, align, former) - w for w in sizes))
    best = [cost(0, j) if j else 0 for j in range(n + 1)]  # least padding of the first j experts in k buckets
    cuts = [[0] for _ in range(n + 1)]
    distinct = len({stored_width(w, align, former) for w in sizes})
    for k in range(1, distinct + 1):
        if k > 1:
            new, new_cuts = best[:], [c[:] for c in cuts]
            for j in range(k, n + 1):
                i = min(range(k - 1, j), key=lambda i: best[i] + cost(i, j))
                if best[i] + cost(i, j) < new[j]:
                    new[j], new_cuts[j] = best[i] + cost(i, j), cuts[i] + [i]
            best, cuts = new, new_cuts
        if best[n] <= budget + 1e-9 or k == distinct:
            break
    bounds = cuts[n] + [n]
    members = tuple(tuple(sorted(order[a:b])) for a, b in zip(bounds, bounds[1:]) if b > a)
    bucket_widths = tuple(stored_width(max(widths[e] for e in m), align, former) for m in members)
    return BucketPlan(members, bucket_widths, align)
