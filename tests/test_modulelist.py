"""Routed experts kept as an nn.ModuleList of MLPs (DeepSeek-MoE v1 and other remote-code MoEs).

The model is the tests' own stand-in for DeepSeek-MoE's remote code (:mod:`deepseek_moe_v1`):
softmax top-k routing without renormalisation, shared experts without a gate, a block that
loops over its experts itself.
"""

import copy

import pytest
import torch
from torch import nn

import camera_pl
from camera_pl import apply_odp, collect_stats, compress_experts, moe_layers, prune, quantize
from camera_pl.experts.base import as_experts
from camera_pl.lightning.module import CausalLMModule
from camera_pl.lora import LoRAConfig, add_lora, expert_module_targets, merge_lora
from camera_pl.stats.observation import observe

from conftest import make_batch
from deepseek_moe_v1 import DeepseekForCausalLM, tiny_deepseek_v1
from reference_math import capture_block_inputs, dense_layer
from test_stats import brute_force_stats

BATCHES = [make_batch(seed) for seed in range(2)]


def logits(model, batch=BATCHES[0]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def own_forward(model) -> bool:
    """Every MoE block runs the model's own forward (no camera_pl forward installed)."""
    return all("forward" not in layer.block.__dict__ for layer in moe_layers(model))


def test_adapter_reads_the_list_as_views():
    model = tiny_deepseek_v1()
    layers = moe_layers(model)
    assert [layer.index for layer in layers] == [1, 2]  # first_k_dense_replace=1
    layer = layers[0]
    experts = layer.experts
    assert (experts.kind, experts.num_experts, experts.intermediate_size, layer.top_k) == ("list", 8, 16, 2)
    assert layer.shared_intermediate_size == 16 and layer.shared_gate is None
    w = experts.weights(3)
    assert w.gate.data_ptr() == layer.block.experts[3].gate_proj.weight.data_ptr()
    assert w.down.data_ptr() == layer.block.experts[3].down_proj.weight.data_ptr()


def test_stats_equal_brute_force_and_routing_reproduces_the_block():
    model = tiny_deepseek_v1()
    batch = BATCHES[0]
    layers = moe_layers(model)
    inputs, outputs = capture_block_inputs(model, layers, batch)
    for layer in layers:  # the brute force's routing and math are the model's own
        torch.testing.assert_close(dense_layer(layer, inputs[layer.index])["y"].float(), outputs[layer.index],
                                   rtol=0, atol=1e-5)
    stats = collect_stats(model, [batch])
    expected = brute_force_stats(model, batch)
    for index, exp in expected.items():
        for name, value in exp.items():
            if name not in ("ratios", "down_norm_sq", "shared_down_norm_sq"):
                torch.testing.assert_close(stats.layers[index][name].double(), value, rtol=1e-5, atol=1e-7,
                                           msg=f"layer {index} {name}")
        assert abs(stats.ratio_median(index) - exp["ratios"].median().item()) < 2e-3
    assert own_forward(model)


def test_observation_leaves_logits_unchanged():
    model = tiny_deepseek_v1()
    own = logits(model)
    with torch.no_grad(), observe(model) as obs:
        obs.set_attention_mask(BATCHES[0]["attention_mask"], BATCHES[0]["input_ids"])
        observed = model(**BATCHES[0]).logits
    torch.testing.assert_close(observed, own, rtol=0, atol=1e-5)
    assert own_forward(model)


def _shared_kept(before: nn.Module, after: nn.Module) -> torch.Tensor:
    """Indices of the shared expert's original channels still present (matched by their down columns)."""
    old, new = before.down_proj.weight, after.down_proj.weight
    return torch.tensor([int((old - new[:, [j]]).abs().sum(0).argmin()) for j in range(new.shape[1])], dtype=torch.long)


@pytest.mark.parametrize("allocation", ["layer", "expert", "global"])
def test_prune_narrows_linears_and_equals_zeroing(allocation):
    model = tiny_deepseek_v1()
    original = copy.deepcopy(model)
    keys = set(model.state_dict())
    prune(model, collect_stats(model, BATCHES), 0.5, allocation=allocation)
    assert set(model.state_dict()) == keys  # per-expert Linears got narrower, names unchanged
    zeroed = copy.deepcopy(original)
    for layer, ref, zero in zip(moe_layers(model), moe_layers(original), moe_layers(zeroed)):
        assert int(layer.experts.widths().sum()) < 8 * 16
        drop = ~layer.experts.present_mask()
        shared_drop = torch.ones(ref.shared_intermediate_size, dtype=torch.bool)
        shared_drop[_shared_kept(ref.shared, layer.shared)] = False
        with torch.no_grad():
            for e, mlp in enumerate(zero.block.experts):
                mlp.gate_proj.weight[drop[e]] = 0
                mlp.up_proj.weight[drop[e]] = 0
                mlp.down_proj.weight[:, drop[e]] = 0
            zero.shared.down_proj.weight[:, shared_drop] = 0
    torch.testing.assert_close(logits(model), logits(zeroed), rtol=0, atol=1e-5)


def test_save_load_rebuilds_the_models_own_classes(tmp_path):
    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.4, allocation="layer")
    stats = collect_stats(model, BATCHES)
    loaded = camera_pl.load(camera_pl.save(model, tmp_path / "pruned"))
    assert type(loaded) is DeepseekForCausalLM and set(loaded.state_dict()) == set(model.state_dict())
    assert torch.equal(logits(loaded), logits(model))
    for a, b in zip(moe_layers(model), moe_layers(loaded)):  # kept micro-experts keep their original indices
        assert torch.equal(a.experts.present_mask(), b.experts.present_mask())
    stats.check_compatible(loaded)
    with pytest.raises(OSError):  # unequal widths: plain loading fails rather than building wrong shapes
        DeepseekForCausalLM.from_pretrained(tmp_path / "pruned")
    plain = tiny_deepseek_v1()
    camera_pl.save(plain, tmp_path / "plain")
    assert torch.equal(logits(DeepseekForCausalLM.from_pretrained(tmp_path / "plain")), logits(plain))


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_quantize_equals_fake_quantization_and_reloads(quantizer, tmp_path):
    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.3, allocation="layer")
    fake = copy.deepcopy(model)
    stats = collect_stats(model, BATCHES)
    options = dict(method="camera", avg_bits=2.5, group_size=16, quantizer=quantizer, calib_dataloader=BATCHES,
                   min_tokens=1)
    quantize(model, stats, **options)
    quantize(fake, stats, pack=False, **options)
    assert all(layer.experts.kind == "quantized" for layer in moe_layers(model))
    assert all(layer.experts.kind == "list" for layer in moe_layers(fake)) and own_forward(fake)
    torch.testing.assert_close(logits(model), logits(fake), rtol=0, atol=1e-5)
    loaded = camera_pl.load(camera_pl.save(model, tmp_path / "q"))
    assert torch.equal(logits(loaded), logits(model))


def test_odp_drops_slots_and_restores_the_block():
    model = tiny_deepseek_v1()
    full = logits(model)
    handle = apply_odp(model, collect_stats(model, BATCHES), protect_ratio=0.0, thresholds=1.0)
    dropped = logits(model)
    assert handle.skipped_fraction() > 0 and not torch.allclose(dropped, full)
    handle.remove()
    assert own_forward(model) and torch.equal(logits(model), full)
    handle = apply_odp(model, collect_stats(model, BATCHES), protect_ratio=0.5)  # token protection taps attention
    logits(model)
    assert handle.usage()[1].protected > 0
    handle.remove()


def brute_force_logits(model, kept: dict[int, list[int]], batch=BATCHES[0]) -> torch.Tensor:
    """``model``'s logits with each MoE block recomputed token by token from its weights, routing over experts ``kept``
    only: their router rows, a softmax over those, top-k, the top-k weights as they are (DeepSeek-MoE v1 does not
    renormalise them), plus the shared expert."""
    model = copy.deepcopy(model)
    for layer in moe_layers(model):
        block, keep = layer.block, kept[layer.index]

        def forward(x, block=block, keep=keep):
            flat = x.reshape(-1, x.shape[-1])
            weights, slots = torch.softmax(flat @ block.gate.weight[keep].T, dim=-1).topk(block.gate.top_k, dim=-1)
            out = block.shared_experts(flat)
            for t in range(flat.shape[0]):
                for w, s in zip(weights[t], slots[t]):
                    out[t] += w * block.experts[keep[int(s)]](flat[t])
            return out.view(x.shape)

        block.forward = forward
    return logits(model, batch)


@pytest.mark.parametrize("method", ["frequency", "reap", "ean", "naee"])
def test_expert_level_removal_matches_brute_force_and_loads_with_the_models_own_class(method, tmp_path):
    model = tiny_deepseek_v1()
    original = copy.deepcopy(model)
    report = prune(model, collect_stats(model, BATCHES), 0.25, method=method, calib_dataloader=BATCHES)
    kept = {r.index: [e for e in range(8) if e not in r.experts_removed] for r in report.layers}
    assert all(len(k) == 6 for k in kept.values()) and model.config.n_routed_experts == 6
    for layer, ref in zip(moe_layers(model), moe_layers(original)):
        assert len(layer.block.experts) == 6 and layer.router.n_routed_experts == 6
        assert torch.equal(layer.router.weight, ref.router.weight[kept[layer.index]])
        for new, e in zip(layer.block.experts, kept[layer.index]):  # the kept experts, untouched, in order
            assert torch.equal(new.down_proj.weight, ref.block.experts[e].down_proj.weight)
    assert own_forward(model)
    expected = brute_force_logits(original, kept)
    assert not torch.allclose(expected, logits(original))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    camera_pl.save(model, tmp_path / "m")
    assert torch.equal(logits(DeepseekForCausalLM.from_pretrained(tmp_path / "m")), logits(model))
    assert torch.equal(logits(camera_pl.load(tmp_path / "m")), logits(model))


def test_micro_pruning_with_expert_removal_drops_emptied_experts(tmp_path):
    model = tiny_deepseek_v1()
    original = copy.deepcopy(model)
    report = prune(model, collect_stats(model, BATCHES), 0.85, allocation="layer", allow_expert_removal=True)
    removed = {r.index: r.experts_removed for r in report.layers}
    assert any(removed.values())  # the chosen ratio empties some experts of this model
    kept = {i: [e for e in range(8) if e not in r] for i, r in removed.items()}
    zeroed = copy.deepcopy(original)  # the pruned micro-experts zeroed in the original, routing over the kept experts
    for layer, ref, zero in zip(moe_layers(model), moe_layers(original), moe_layers(zeroed)):
        assert len(layer.block.experts) == len(kept[layer.index]) == layer.router.weight.shape[0]
        present = torch.zeros(8, 16, dtype=torch.bool)
        present[kept[layer.index]] = layer.experts.present_mask()
        shared_drop = torch.ones(ref.shared_intermediate_size, dtype=torch.bool)
        shared_drop[_shared_kept(ref.shared, layer.shared)] = False
        with torch.no_grad():
            for e, mlp in enumerate(zero.block.experts):
                mlp.down_proj.weight[:, ~present[e]] = 0
            zero.shared.down_proj.weight[:, shared_drop] = 0
    torch.testing.assert_close(logits(model), brute_force_logits(zeroed, kept), rtol=0, atol=1e-5)
    loaded = camera_pl.load(camera_pl.save(model, tmp_path / "m"))
    assert type(loaded) is DeepseekForCausalLM and torch.equal(logits(loaded), logits(model))
    for a, b in zip(moe_layers(model), moe_layers(loaded)):
        assert a.num_experts == b.num_experts and torch.equal(a.experts.present_mask(), b.experts.present_mask())


def test_bad_inputs_have_clear_errors():
    model = tiny_deepseek_v1()
    stats = collect_stats(model, BATCHES)
    with pytest.raises(ValueError, match="fewer than top_k=2"):
        prune(model, stats, 0.9, method="frequency")
    with pytest.raises(ValueError, match="kept must list ascending"):
        moe_layers(model)[0].experts.keep_experts([3, 1])
    assert own_forward(model) and all(layer.experts.full_width for layer in moe_layers(model))
    assert all(layer.num_experts == 8 for layer in moe_layers(model))
    adapted = moe_layers(add_lora(model, LoRAConfig(rank=2)))[0].experts
    with pytest.raises(TypeError, match="merge the adapters"):
        adapted.keep(torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep has shape"):
        moe_layers(model)[0].experts.keep(torch.ones(8, 15, dtype=torch.bool))
    biased = nn.ModuleList([copy.deepcopy(model.model.layers[1].mlp.experts[0])])
    biased[0].up_proj = nn.Linear(32, 16)
    with pytest.raises(TypeError, match="biased"):
        as_experts(biased)


def test_prune_quantize_recover_save_load(tmp_path):
    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.4, allocation="layer")
    quantize(model, collect_stats(model, BATCHES), avg_bits=2.5, group_size=16)
    with pytest.raises(TypeError, match="quantized experts, which LoRA cannot adapt"):
        add_lora(copy.deepcopy(model), LoRAConfig(rank=2))
    codes = {n: t.clone() for n, t in model.state_dict().items() if ".mlp.experts." in n}
    before = logits(model)
    with pytest.warns(UserWarning, match="adapting attention only"):  # experts=True (the default) falls back
        model = camera_pl.recover(model, BATCHES, steps=2, lr=1e-3, rank=2, accelerator="cpu")
    after = logits(model)
    assert not torch.equal(before, after)  # attention adapters were trained and merged
    assert all(torch.equal(t, codes[n]) for n, t in model.state_dict().items() if n in codes)
    assert torch.equal(logits(camera_pl.load(camera_pl.save(model, tmp_path / "m"))), after)


def _adapted_linears(model) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}


def _randomise_adapters(peft_model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter, not the zero init


def test_lora_adapts_every_listed_expert_and_merges_exactly(tmp_path):
    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.4, allocation="layer", allow_expert_removal=True)
    widths = {layer.index: layer.experts.widths().tolist() for layer in moe_layers(model)}
    assert expert_module_targets(model) == sorted(f"experts.{e}.{p}" for e in range(max(map(len, widths.values())))
                                                  for p in ("gate_proj", "up_proj", "down_proj"))
    plain = logits(model)
    peft_model = add_lora(model, LoRAConfig(rank=2))
    adapted = _adapted_linears(peft_model)
    expected = {f"base_model.model.model.layers.{i}.mlp.experts.{e}.{p}" for i, w in widths.items()
                for e in range(len(w)) for p in ("gate_proj", "up_proj", "down_proj")}
    assert {n for n in adapted if ".mlp." in n} == expected  # not the shared experts, not the dense layer's MLP
    assert {layer.index: layer.experts.widths().tolist() for layer in moe_layers(peft_model)} == widths
    up = peft_model.base_model.model.model.layers[1].mlp.experts[0].up_proj
    assert up.lora_B["default"].weight.shape[0] == widths[1][0]  # each adapter at its expert's own width
    _randomise_adapters(peft_model)
    with torch.no_grad():
        with_adapters = peft_model(**BATCHES[0]).logits
    assert not torch.allclose(with_adapters, plain)
    merged = merge_lora(peft_model)
    assert type(merged) is DeepseekForCausalLM and own_forward(merged)
    torch.testing.assert_close(logits(merged), with_adapters, rtol=0, atol=1e-5)
    assert torch.equal(logits(camera_pl.load(camera_pl.save(merged, tmp_path / "m"))), logits(merged))


def test_recover_trains_the_listed_experts():
    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.4, allocation="layer")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = CausalLMModule(model)._loss(BATCHES[0]).item()
    model = camera_pl.recover(model, BATCHES, LoRAConfig(rank=4, steps=20, lr=3e-2), accelerator="cpu")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in changed if ".mlp." in n} == {n for n in before if ".mlp.experts." in n}
    assert not any("norm" in n or "gate.weight" in n for n in changed)
    assert CausalLMModule(model)._loss(BATCHES[0]).item() < loss_before - 0.1


def test_adapter_saves_with_peft_and_reloads_on_the_compressed_model(tmp_path):
    from peft import PeftModel

    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.4, allocation="layer")
    camera_pl.save(model, tmp_path / "base")
    peft_model = add_lora(model, LoRAConfig(rank=4))
    _randomise_adapters(peft_model)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(camera_pl.load(tmp_path / "base"), tmp_path / "adapter")
    assert _adapted_linears(reloaded) == _adapted_linears(peft_model)
    assert torch.equal(logits(reloaded), expected)


def test_prune_compress_experts_save_load(tmp_path):
    model = tiny_deepseek_v1()
    prune(model, collect_stats(model, BATCHES), 0.4, allocation="layer")
    compress_experts(model)
    stats = collect_stats(model, BATCHES)
    assert all(float(entry["act_sq_sum"].sum()) > 0 for entry in stats.layers.values())
    assert torch.equal(logits(camera_pl.load(camera_pl.save(model, tmp_path / "m"))), logits(model))
