"""Every public verb works on every kind of experts and every sensible chain, on every architecture.

Chains that cannot make sense fail with a clear error before any work is done (the model
is left as it was).
"""

import pytest
import torch

import camera_pl
from camera_pl import apply_odp, collect_stats, compress_experts, moe_layers, prune, quantize
from camera_pl import recover
from camera_pl.testing import tiny_moe
from conftest import make_batch

BATCHES = [make_batch(seed) for seed in range(2)]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCHES[0]).logits


@pytest.mark.parametrize("allocation", ["layer", "expert", "global"])
def test_prune_quantize_recover_save_load(arch, allocation, tmp_path):
    model = tiny_moe(arch)
    prune(model, collect_stats(model, BATCHES), 0.4, allocation=allocation)
    quantize(model, collect_stats(model, BATCHES), avg_bits=2.5, group_size=16)
    assert all(layer.experts.kind == "quantized" for layer in moe_layers(model))
    before = logits(model)
    model = recover(model, BATCHES, steps=2, lr=1e-3, rank=2, experts=False, accelerator="cpu")
    after = logits(model)
    assert not torch.equal(before, after)  # attention adapters were trained and merged
    loaded = camera_pl.load(camera_pl.save(model, tmp_path / "m"))
    torch.testing.assert_close(logits(loaded), after, rtol=0, atol=0)


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_prune_collect_stats_prune_further(arch, allocation):
    model = tiny_moe(arch)
    prune(model, collect_stats(model, BATCHES), 0.3, allocation=allocation)
    stats = collect_stats(model, BATCHES)
    widths = {layer.index: layer.experts.widths().clone() for layer in moe_layers(model)}
    for index, entry in stats.layers.items():  # pruned micro-experts see no activation
        layer = next(layer for layer in moe_layers(model) if layer.index == index)
        present = torch.zeros_like(entry["act_sq_sum"], dtype=torch.bool)
        for e in range(layer.num_experts):
            present[e, layer.experts.channels(e)] = True
        assert float(entry["act_sq_sum"][~present].abs().sum()) == 0.0
    prune(model, stats, 0.6, allocation=allocation)
    for layer in moe_layers(model):
        assert bool((layer.experts.widths() <= widths[layer.index]).all())
        assert int(layer.experts.widths().sum()) < int(widths[layer.index].sum())
    assert torch.isfinite(logits(model)).all()


def test_quantize_then_odp(arch):
    model = tiny_moe(arch)
    stats = collect_stats(model, BATCHES)
    quantize(model, stats, avg_bits=3, group_size=16)
    full = logits(model)
    handle = apply_odp(model, collect_stats(model, BATCHES), protect_ratio=0.0, thresholds=1.0)
    dropped = logits(model)
    assert handle.skipped_fraction() > 0
    handle.remove()
    torch.testing.assert_close(logits(model), full, rtol=0, atol=0)
    assert not torch.equal(dropped, full)


def test_compress_experts_then_collect_stats(arch):
    model = tiny_moe(arch)
    if not moe_layers(model)[0].experts.layout.has_gate:
        pytest.skip("compressed experts need gated experts")
    compress_experts(model)
    stats = collect_stats(model, BATCHES)
    assert stats.tokens > 0
    for entry in stats.layers.values():
        assert float(entry["act_sq_sum"].sum()) > 0 and torch.isfinite(entry["sq_sum"]).all()
    scores = stats.scores("camera")
    assert all(torch.isfinite(s.routed).all() for s in scores.values())


def test_quantized_model_collects_stats(arch):
    model = tiny_moe(arch)
    quantize(model, collect_stats(model, BATCHES), avg_bits=4, group_size=16)
    stats = collect_stats(model, BATCHES)
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in BATCHES)
    assert all(float(entry["count"].sum()) > 0 for entry in stats.layers.values())


def test_chains_that_cannot_work_fail_before_any_work():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, BATCHES)
    quantize(model, stats, avg_bits=3, group_size=16)
    before = logits(model)
    with pytest.raises(TypeError, match="prune before quantizing"):
        prune(model, stats, 0.3)
    with pytest.raises(ValueError, match="already holds quantized experts"):
        quantize(model, stats, avg_bits=3)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    pruned = tiny_moe("qwen3_moe")
    prune(pruned, collect_stats(pruned, BATCHES), 0.4, allocation="layer")
    with pytest.raises(ValueError, match="method='camera', 'pmq' or 'uniform'"):
        quantize(pruned, collect_stats(pruned, BATCHES), method="channel", avg_bits=3)
