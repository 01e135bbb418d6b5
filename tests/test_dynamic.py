"""ODP (MC's online dynamic pruning): weight rule, token protection, measurements, composition."""

import pytest
import torch

from camera_pl import collect_stats, moe_layers, prune
from camera_pl.odp import apply_odp, attention_received
from camera_pl.testing import tiny_moe

from conftest import make_batch

TIE_FREE = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]  # phimoe's sparsemixer ties weights


def record_routing(model):
    """Per MoE layer: router input and (original) output, and what its experts module actually received."""
    seen = {"router_in": {}, "router_out": {}, "experts": {}}
    hooks = []
    for layer in moe_layers(model):
        def router_hook(mod, args, out, i=layer.index):
            seen["router_in"][i] = args[0].reshape(-1, args[0].shape[-1])
            seen["router_out"][i] = out

        def experts_hook(mod, args, i=layer.index):
            seen["experts"][i] = (args[1], args[2])

        hooks.append(layer.router.register_forward_hook(router_hook))
        hooks.append(layer.module.register_forward_pre_hook(experts_hook))
    return seen, hooks


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_mu_zero_changes_nothing(model):
    batch = make_batch()
    original = model.config._experts_implementation
    model.set_experts_implementation("camera_pl")  # ODP runs camera_pl's experts (it honours sentinels)
    reference = logits(model, batch)
    model.set_experts_implementation(original)
    handle = apply_odp(model, None, protect_ratio=0.2, thresholds=0.0)
    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=1e-6)
    assert handle.skipped_fraction() == 0.0
    active, full = handle.activated_params_per_token()
    assert active == full > 0
    handle.remove()
    assert model.config._experts_implementation == original
    assert not any(hasattr(m, "_camera_odp") for m in model.modules())
    torch.testing.assert_close(logits(model, batch), logits(tiny_moe(model.config.model_type), batch), rtol=0, atol=0)


def test_mu_one_computes_only_the_top_expert(model):
    seen, hooks = record_routing(model)  # registered first: sees the router's original output
    handle = apply_odp(model, None, protect_ratio=0.0, thresholds=1.0)
    logits(model, make_batch(pad_from=None))
    slots = skipped = 0
    for layer in moe_layers(model):
        _, weights, index = seen["router_out"][layer.index][:3]
        got_index, got_weights = seen["experts"][layer.index]
        top = weights >= weights.max(-1, keepdim=True).values
        assert torch.equal(got_index < layer.num_experts, top)
        assert torch.equal(got_index[top], index[top])
        assert (got_weights[~top] == 0).all()
        torch.testing.assert_close(got_weights.sum(-1), weights.sum(-1))  # kept weights renormalised to the total
        slots += index.numel()
        skipped += int((~top).sum())
    assert handle.skipped_fraction() == pytest.approx(skipped / slots)
    if model.config.model_type in TIE_FREE:
        k = model.config.num_experts_per_tok
        assert handle.skipped_fraction() == pytest.approx((k - 1) / k)
    for h in hooks:
        h.remove()
    handle.remove()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_protected_tokens_keep_all_experts(arch):
    """Protected = top protect_ratio by I_j = ‖t_j‖₁ · mean attention received, from eager attention probs."""
    model = tiny_moe(arch)
    model.set_attn_implementation("eager")  # ODP then delegates to eager, which returns the attention probabilities
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):  # GPT-OSS: sinks strong enough to change which tokens rank highest
                param.normal_(2.0, 2.0, generator=torch.Generator().manual_seed(0))
    ratio, batch = 0.25, make_batch(batch=2, seq=12, pad_from=8)
    handle = apply_odp(model, None, protect_ratio=ratio, thresholds=1.0)
    seen, hooks = record_routing(model)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    valid = batch["attention_mask"].bool()
    length = valid.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    expected_protected = 0
    for layer in moe_layers(model):
        probs = out.attentions[layer.index].float().mean(1)  # [B, L, L] over heads
        allowed = causal & valid[:, None, :] & valid[:, :, None]
        received = (probs * valid[:, :, None]).sum(1) / allowed.sum(1).clamp_min(1)
        importance = seen["router_in"][layer.index].float().abs().sum(-1).reshape(valid.shape) * received
        importance = importance.masked_fill(~valid, float("-inf"))
        protected = torch.zeros_like(valid)
        for b, n in enumerate((valid.sum(1) * ratio).floor().long().tolist()):
            protected[b, importance[b].topk(n).indices] = True
            expected_protected += n
        index = seen["experts"][layer.index][0]
        computed = (index < layer.num_experts).sum(-1).reshape(valid.shape)
        k = index.shape[1]
        assert torch.equal(computed[valid], torch.where(protected, k, 1)[valid])
    assert sum(u.protected for u in handle.usage().values()) == expected_protected > 0
    for h in hooks:
        h.remove()
    handle.remove()
    assert model.config._attn_implementation == "eager"


def test_attention_received_matches_full_matrix():
    """Chunked column sums (GQA, padding, sinks, KV offset) equal the explicit attention matrix's."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, past, dim = 2, 4, 2, 7, 3, 8
    keys = past + length
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    sinks = torch.randn(heads, generator=gen)
    pos_q = torch.arange(past, keys)
    allowed = (torch.arange(keys)[None, :] <= pos_q[:, None])[None].repeat(batch, 1, 1)
    allowed[1, :, keys - 2:] = False  # the last two tokens of sequence 1 are padding
    mask = torch.zeros(batch, 1, length, keys).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    scores = q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.3 + mask
    sink = sinks[None, :, None, None].expand(batch, -1, length, 1)
    probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    valid = allowed[:, torch.arange(length), pos_q]
    received = (probs.mean(1) * valid[:, :, None]).sum(1) / (allowed & valid[:, :, None]).sum(1).clamp_min(1)
    for chunk in (1, 10**6):
        got, got_valid = attention_received(q, k, mask, 0.3, sinks, chunk_elements=chunk)
        assert torch.equal(got_valid, valid)
        torch.testing.assert_close(got, received[:, past:])
    bool_got, _ = attention_received(q, k, allowed[:, None], 0.3, sinks)
    torch.testing.assert_close(bool_got, received[:, past:])


def test_default_thresholds_and_measured_counts():
    model = tiny_moe("olmoe")  # top-3
    batch = make_batch(pad_from=None)
    stats = collect_stats(model, [batch])
    seen, hooks = record_routing(model)
    handle = apply_odp(model, stats, protect_ratio=0.0)
    assert handle.thresholds == {layer.index: stats.ratio_median(layer.index) for layer in moe_layers(model)}
    logits(model, batch)
    slots = skipped = 0
    active = full = 0.0
    for layer in moe_layers(model):
        index = seen["experts"][layer.index][0]
        original = seen["router_out"][layer.index][2]
        counts = layer.experts.parameter_counts()
        kept = index < layer.num_experts
        slots, skipped = slots + index.numel(), skipped + int((~kept).sum())
        active += float(counts[original][kept].sum()) / index.shape[0]
        full += float(counts[original].sum()) / index.shape[0]
    assert 0 < skipped < slots
    assert handle.skipped_fraction() == pytest.approx(skipped / slots)
    assert handle.activated_params_per_token() == pytest.approx((active, full))
    handle.reset()
    with pytest.raises(ValueError, match="measured nothing"):
        handle.skipped_fraction()
    for h in hooks:
        h.remove()
    handle.remove()


def test_decode_steps_use_the_weight_rule_only():
    model = tiny_moe("qwen3_moe")
    prompt = make_batch(batch=1, seq=10, pad_from=None)
    handle = apply_odp(model, None, protect_ratio=0.2, thresholds=1.0)
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for usage in handle.usage().values():
        assert usage.tokens == 10 + 3  # prefill, then one token per decode step
        assert usage.protected == 2  # floor(0.2 · 10) at prefill only
        assert usage.skipped == usage.tokens - usage.protected  # top-2 -> top-1 elsewhere
    handle.remove()


def test_composes_with_pruned_experts():
    model = tiny_moe("qwen3_moe")
    batch = make_batch()
    stats = collect_stats(model, [batch])
    prune(model, stats, 0.4, allocation="layer")
    assert all(layer.experts.kind == "ragged" for layer in moe_layers(model))
    reference = logits(model, batch)
    handle = apply_odp(model, stats, protect_ratio=0.1, thresholds=0.0)
    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=1e-6)
    handle.remove()
    seen, hooks = record_routing(model)
    handle = apply_odp(model, stats, protect_ratio=0.0, thresholds=1.0)
    logits(model, batch)
    expected = 0.0
    for layer in moe_layers(model):
        index = seen["experts"][layer.index][0]
        widths = layer.experts.widths()
        expected += float(3 * layer.hidden_size * widths[index[index < layer.num_experts]].sum()) / index.shape[0]
    assert handle.activated_params_per_token()[0] == pytest.approx(expected)
    for h in hooks:
        h.remove()
    handle.remove()


def test_bfloat16_keeps_dtypes():
    model = tiny_moe("mixtral", dtype=torch.bfloat16)
    seen, hooks = record_routing(model)
    handle = apply_odp(model, None, protect_ratio=0.2, thresholds=0.5)
    out = logits(model, make_batch())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    for layer in moe_layers(model):
        assert seen["experts"][layer.index][1].dtype == seen["router_out"][layer.index][1].dtype
    for h in hooks:
        h.remove()
    handle.remove()


def test_bad_inputs():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="No ODP threshold"):
        apply_odp(model, None)
    with pytest.raises(ValueError, match=r"thresholds=1.5: must lie in \[0.0, 1.0\]"):
        apply_odp(model, None, thresholds=1.5)
    with pytest.raises(ValueError, match="expected a number"):
        apply_odp(model, None, thresholds=True)
    with pytest.raises(ValueError, match=r"MoE layers \[7\]"):
        apply_odp(model, None, thresholds={7: 0.5})
    with pytest.raises(ValueError, match="Did you mean 'protect_ratio'"):
        apply_odp(model, None, protect_ration=0.1)
    with pytest.raises(ValueError, match="protect_ratio"):
        apply_odp(model, None, protect_ratio=2.0, thresholds=0.5)
    handle = apply_odp(model, None, thresholds={0: 0.5, 1: 0.2})
    with pytest.raises(RuntimeError, match="already installed"):
        apply_odp(model, None, thresholds=0.5)
    handle.remove()
    top1 = tiny_moe("qwen3_moe", num_experts_per_tok=1)
    with pytest.raises(ValueError, match="thresholds="):
        apply_odp(top1, collect_stats(top1, [make_batch()]))


def test_layer_subset_leaves_other_layers_untouched():
    """MC runs ODP on chosen layers: the others see their full top-k, and thresholds are needed only for the chosen."""
    model = tiny_moe("qwen3_moe")
    indices = [layer.index for layer in moe_layers(model)]
    seen, hooks = record_routing(model)
    handle = apply_odp(model, None, protect_ratio=0.0, thresholds={indices[0]: 1.0}, layers=[indices[0]])
    logits(model, make_batch(pad_from=None))
    assert handle.thresholds == {indices[0]: 1.0} and handle.skipped_fraction() > 0
    for layer in moe_layers(model):
        received = seen["experts"][layer.index][0]
        dropped = (received >= layer.num_experts).any()  # skipped slots arrive as sentinel ids
        assert bool(dropped) == (layer.index == indices[0])
    handle.remove()
    for hook in hooks:
        hook.remove()
    with pytest.raises(ValueError, match=r"OdpConfig.layers names MoE layers \[9\]"):
        apply_odp(model, None, thresholds=0.5, layers=[9])
    with pytest.raises(ValueError, match="non-empty list"):
        apply_odp(model, None, thresholds=0.5, layers="0")


def test_layer_count_picks_the_least_harmful_layers():
    """layers=k: the k MoE layers where ODP alone raises the calibration loss least (MC's selection)."""
    from camera_pl.odp import rank_layers

    model = tiny_moe("qwen3_moe")
    batches = [make_batch(seed) for seed in range(2)]
    stats = collect_stats(model, batches)
    ranked = rank_layers(model, stats, batches)
    assert sorted(i for i, _ in ranked) == [layer.index for layer in moe_layers(model)]
    assert [cost for _, cost in ranked] == sorted(cost for _, cost in ranked)
    handle = apply_odp(model, stats, layers=1, calib_dataloader=batches)
    assert list(handle.thresholds) == [ranked[0][0]]
    handle.remove()
    with pytest.raises(ValueError, match="pass calib_dataloader"):
        apply_odp(model, stats, layers=1)
    with pytest.raises(ValueError, match="MoE layers"):
        apply_odp(model, stats, layers=9, calib_dataloader=batches)
