"""Which micro-experts CAMERA-P removes and how many bits CAMERA-Q gives, checked against the scores.

Public API only. The expected selections are recomputed here from ``stats.scores("camera")``
with the documented rules, so an inverted or shuffled ranking fails. ``kept_channels`` is
the only function that reads the pruned model's structure.
"""

import math
from collections import Counter

import pytest
import torch

from camera_pl import allocate, collect_stats, prune
from camera_pl.testing import tiny_moe

from conftest import make_batch


def kept_channels(model, original) -> set[tuple]:
    """Micro-experts still in ``model``, in ``original``'s indices: ``(layer, expert, j)`` and ``(layer, "shared", j)``.

    Found by matching down-projection columns against the unpruned ``original`` (fused and ragged
    layouts alike). The only place that touches the layer accessors.
    """
    from camera_pl.arch.adapters import moe_layers

    def columns(before, after):  # [H, I] and [H, I'] -> indices j of before's columns present in after
        return (before.t()[:, None, :] == after.t()[None]).all(-1).any(1).nonzero().flatten().tolist()

    kept = set()
    for layer, ref in zip(moe_layers(model), moe_layers(original)):
        for e in range(ref.num_experts):
            kept |= {(layer.index, e, j) for j in columns(ref.experts.weights(e).down, layer.experts.weights(e).down)}
        if ref.shared is not None:
            shared = columns(ref.shared.down_proj.weight, layer.shared.down_proj.weight)
            kept |= {(layer.index, "shared", j) for j in shared}
    return kept


def calibration():
    """Enough tokens that every expert is routed: no ties among scores (ties would make the order arbitrary)."""
    return [make_batch(seed=i, batch=4, seq=32, pad_from=None) for i in range(4)]


def micro_scores(scores) -> dict[int, dict[tuple, float]]:
    """``{layer: {(layer, expert | "shared", j): score}}``, all distinct (checked)."""
    out = {}
    for index, s in scores.items():
        num_experts, width = s.routed.shape
        entries = {(index, e, j): float(s.routed[e, j]) for e in range(num_experts) for j in range(width)}
        if s.shared is not None:
            entries.update({(index, "shared", j): float(v) for j, v in enumerate(s.shared.tolist())})
        assert len(set(entries.values())) == len(entries), f"layer {index}: tied scores, the test needs more tokens"
        out[index] = entries
    return out


def expected_layer_allocation(scores, ratio: float) -> set[tuple]:
    """Per layer, routed and shared ranked together; the lowest floor(ratio·N) go, except that every
    expert (and the shared MLP) keeps its last channel, the next lowest going instead."""
    kept = set()
    for entries in micro_scores(scores).values():
        n_remove = math.floor(ratio * len(entries))
        left = Counter(key[1] for key in entries)
        removed = set()
        for key in sorted(entries, key=entries.get):
            if len(removed) == n_remove:
                break
            if left[key[1]] > 1:
                removed.add(key)
                left[key[1]] -= 1
        kept |= set(entries) - removed
    return kept


def expected_expert_allocation(scores, ratio: float, width_multiple: int = 8) -> set[tuple]:
    """Every expert keeps its highest ``I - floor(ratio·I)`` channels, rounded up to a multiple of
    ``width_multiple``; the shared MLP drops its lowest floor(ratio·I_s)."""
    kept = set()
    for entries in micro_scores(scores).values():
        owners = Counter(key[1] for key in entries)
        for owner, width in owners.items():
            own = sorted((key for key in entries if key[1] == owner), key=entries.get, reverse=True)
            if owner == "shared":
                keep = width - math.floor(ratio * width)
            else:
                keep = min(width, width_multiple * math.ceil((width - math.floor(ratio * width)) / width_multiple))
            kept |= set(own[:keep])
    return kept


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("allocation, ratio", [("layer", 0.5), ("layer", 0.9), ("expert", 0.6)])
def test_prune_removes_the_lowest_camera_scores(arch, allocation, ratio):
    model, original = tiny_moe(arch), tiny_moe(arch)
    stats = collect_stats(model, calibration())
    scores = stats.scores("camera")
    prune(model, stats, ratio, method="camera", allocation=allocation)
    expected = (expected_layer_allocation if allocation == "layer" else expected_expert_allocation)(scores, ratio)
    kept = kept_channels(model, original)
    assert kept == expected, f"kept but expected removed: {sorted(kept - expected, key=str)[:5]}, " \
                             f"removed but expected kept: {sorted(expected - kept, key=str)[:5]}"
    total = sum(len(entries) for entries in micro_scores(scores).values())
    assert 0 < total - len(kept) <= math.floor(ratio * total) + 1


def _mean_score_by_bits(model, stats, **allocate_kwargs) -> list[tuple[int, float, int]]:
    """``[(bits, mean CAMERA score, count)]`` over all layers' routed micro-experts, ascending bits."""
    scores = stats.scores("camera")
    allocation = allocate(model, stats, method="camera", **allocate_kwargs)
    by_bits: dict[int, list[torch.Tensor]] = {}
    for index, layer_bits in allocation.items():
        bits, score = layer_bits.up, scores[index].routed
        assert bits.shape == score.shape
        # one bit-width per micro-expert: gate row j, up row j and down column j together
        assert layer_bits.down_axis == "in" and torch.equal(layer_bits.down, bits)
        if layer_bits.gate is not None:
            assert torch.equal(layer_bits.gate, bits)
        # normalise per layer so that no one layer's scale dominates the pooled means
        score = score / score.mean()
        for b in bits.unique().tolist():
            by_bits.setdefault(b, []).append(score[bits == b])
    return [(b, float(torch.cat(v).mean()), int(sum(t.numel() for t in v))) for b, v in sorted(by_bits.items())]


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_camera_q_gives_more_bits_to_higher_scores(arch):
    model = tiny_moe(arch)
    stats = collect_stats(model, calibration())
    scores = stats.scores("camera")

    groups = ((8, 0.1), (4, 0.3), (2, 0.6))
    allocation = allocate(model, stats, method="camera", groups=groups)
    for index, layer_bits in allocation.items():
        bits, score = layer_bits.up, scores[index].routed
        for (high, _), (low, _) in zip(groups, groups[1:]):
            # rank groups: every micro-expert at more bits outscores every one at fewer
            assert score[bits == high].min() > score[bits == low].max()
    means = _mean_score_by_bits(model, stats, groups=groups)
    assert [b for b, _, _ in means] == [2, 4, 8]
    assert all(lo[1] < hi[1] for lo, hi in zip(means, means[1:])), means

    allocation = allocate(model, stats, method="camera", avg_bits=2.5)
    for layer_bits in allocation.values():
        assert layer_bits.avg_bits() <= 2.5 + 1e-9
    means = _mean_score_by_bits(model, stats, avg_bits=2.5)
    assert len(means) >= 2, means  # a budget between choices must mix bit-widths
    assert all(lo[1] < hi[1] for lo, hi in zip(means, means[1:])), means
