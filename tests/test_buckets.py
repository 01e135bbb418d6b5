"""Width buckets of ragged experts: the plan's bounds, and loading the former compact storage."""

import copy
import functools
import random

import pytest
import torch

from camera_pl import collect_stats, moe_layers, prune
from camera_pl.experts import ragged
from camera_pl.experts.buckets import plan_buckets, stored_width
from camera_pl.testing import tiny_moe

from conftest import make_batch


@pytest.mark.parametrize("width,experts", [(768, 128), (1408, 64), (2048, 8), (96, 16), (16, 8)])
def test_plan_pads_at_most_ten_percent_with_aligned_bucket_widths(width, experts):
    rng = random.Random(width + experts)
    widths = [rng.randint(width // 5, width) for _ in range(experts)] + [0]
    plan = plan_buckets(widths)
    members = sorted(e for m in plan.members for e in m)
    assert members == [e for e, w in enumerate(widths) if w > 0]  # every kept expert once; width 0 in none
    assert all(all(widths[e] <= w for e in m) for m, w in zip(plan.members, plan.widths))
    # grouped GEMMs need 16-byte strides (8 bf16 elements); tiny buckets are powers of two, padded per forward
    assert plan.align >= 8 and all(w % plan.align == 0 or w in (1, 2, 4) for w in plan.widths)
    rounding = sum(stored_width(w, plan.align) - w for w in widths if w)  # what rounding alone pads
    assert plan.padding(widths) <= max(0.10 * sum(widths), rounding)
    if width >= 96:
        assert plan.padding(widths) <= 0.10 * sum(widths)
    if width >= 768:
        assert plan.align >= 32 and len(plan.members) <= 8  # real widths: tile-friendly, a handful of GEMMs


def test_plan_is_deterministic_and_checks_its_budget():
    widths = [700, 512, 768, 300, 301, 640, 0, 128]
    assert plan_buckets(widths) == plan_buckets(list(widths))
    assert plan_buckets([1, 3, 5, 30]).widths == (1, 4, 8, 32)  # below 8: powers of two, not padded to 8
    assert len(plan_buckets([64] * 10).members) == 1 and plan_buckets([64] * 10).padding([64] * 10) == 0
    with pytest.raises(ValueError, match="max_padding"):
        plan_buckets(widths, max_padding=1.5)


def compact_state(experts) -> dict[str, torch.Tensor]:
    """The storage camera_pl 0.2 wrote for ragged experts: per-expert rows concatenated."""
    per = [experts.weights(e) for e in range(experts.num_experts)]
    state = {"up": torch.cat([w.up for w in per]), "down": torch.cat([w.down for w in per], dim=1),
             "channel_index": torch.cat([experts.channels(e) for e in range(experts.num_experts)])}
    if per[0].gate is not None:
        state["gate"] = torch.cat([w.gate for w in per])
    if per[0].up_bias is not None:
        state["up_bias"] = torch.cat([w.up_bias for w in per])
        state["down_bias"] = torch.stack([w.down_bias for w in per])
        if per[0].gate_bias is not None:
            state["gate_bias"] = torch.cat([w.gate_bias for w in per])
    return state


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_former_compact_storage_loads_into_buckets(arch):
    batch = make_batch()
    model = tiny_moe(arch)
    prune(model, collect_stats(model, [batch]), 0.5)
    with torch.no_grad():
        expected = model(**batch).logits
    for layer in moe_layers(model):
        module = layer.module
        legacy = compact_state(module)
        with torch.no_grad():
            for p in module.parameters():
                p.zero_()
        module.load_state_dict(legacy)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_buckets_planned_with_the_former_finer_alignments_load(arch, monkeypatch):
    batch = make_batch()
    model = tiny_moe(arch)
    stats = collect_stats(model, [batch])
    former = copy.deepcopy(model)
    with monkeypatch.context() as patch:  # a save of camera_pl before the alignment floor of 8
        patch.setattr(ragged, "plan_buckets", functools.partial(plan_buckets, former=True))
        prune(former, stats, 0.5)
    prune(model, stats, 0.5)
    state, current = former.state_dict(), model.state_dict()
    assert any(state.get(k) is None or state[k].shape != v.shape for k, v in current.items())  # other buckets
    with torch.no_grad():
        expected, reference = model(**batch).logits, former(**batch).logits
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
    torch.testing.assert_close(expected, reference, rtol=0, atol=1e-5)
