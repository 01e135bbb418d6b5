"""CAMERA-P: real structural removal equals masking; save/load; baselines; errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import camera_pl
from camera_pl import collect_stats, moe_layers, prune
from camera_pl.experts.ragged import RaggedExperts
from camera_pl.testing import tiny_moe

from conftest import make_batch


def surviving(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Which columns of ``original [H, I]`` survive in ``pruned [H, I']`` (matched by value)."""
    return (original.t()[:, None, :] == pruned.t()[None]).all(-1).any(1)


def kept_masks(model, reference):
    """Keep masks in original indices, found by matching weights: routed [E, I] and shared [I_s]."""
    routed, shared = {}, {}
    for layer, ref in zip(moe_layers(model), moe_layers(reference)):
        routed[layer.index] = torch.stack([surviving(ref.experts.weights(e).down, layer.experts.weights(e).down)
                                           for e in range(ref.num_experts)])
        if layer.shared is not None:
            shared[layer.index] = surviving(ref.shared.down_proj.weight, layer.shared.down_proj.weight)
    return routed, shared


def padded_slots(model) -> int:
    """Stored slots of ragged experts that hold no micro-expert (bucket padding)."""
    return sum(layer.module.plan.padding(layer.experts.widths().tolist()) for layer in moe_layers(model)
               if isinstance(layer.module, RaggedExperts))


def zero_pruned(model, masks, shared_keep):
    """The same pruning by masking: zero the down-projection column of every removed micro-expert."""
    with torch.no_grad():
        for layer in moe_layers(model):
            down = layer.experts.stacked().down
            down.mul_(masks[layer.index][:, None, :].to(down.dtype))
            if layer.shared is not None:
                layer.shared.down_proj.weight.mul_(shared_keep[layer.index][None, :].to(down.dtype))


@pytest.mark.parametrize("allocation", ["layer", "expert", "global"])
def test_structural_pruning_equals_zeroing(arch, allocation):
    batch = make_batch()
    model = tiny_moe(arch)
    reference = tiny_moe(arch)
    stats = collect_stats(model, [batch])
    params_before = sum(p.numel() for p in model.parameters())
    report = prune(model, stats, 0.5, allocation=allocation)
    masks, shared_keep = kept_masks(model, reference)
    zero_pruned(reference, masks, shared_keep)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
    removed = sum((~m).sum().item() for m in masks.values())
    per_micro = 3 * model.config.hidden_size + (2 if moe_layers(model)[0].experts.layout.has_bias else 0)
    shared_removed = sum((~k).sum().item() for k in shared_keep.values()) * 3 * model.config.hidden_size
    stored_removed = params_before - sum(p.numel() for p in model.parameters())
    assert stored_removed == (removed - padded_slots(model)) * per_micro + shared_removed
    assert report.params_removed == stored_removed  # stored parameters: bucket padding counts as kept
    n_total = sum(m.numel() for m in masks.values()) + sum(k.numel() for k in shared_keep.values())
    if allocation == "layer":
        assert removed * per_micro + shared_removed > 0
        for layer in report.layers:
            n = sum(layer.widths_before) + layer.shared_before
            assert sum(layer.widths_after) + layer.shared_after == n - int(0.5 * n)
    assert all(min(layer.widths_after) >= 1 for layer in report.layers)
    if allocation != "expert":
        assert any(isinstance(layer.experts, RaggedExperts) for layer in moe_layers(model))
    assert 0 < removed + sum((~k).sum().item() for k in shared_keep.values()) <= int(0.5 * n_total)


def test_state_dict_bytes_drop_by_removed_params():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [make_batch()])
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = prune(model, stats, 0.4)
    after = model.state_dict()
    bookkeeping = sum(t.numel() * t.element_size() for k, t in after.items() if ".channels_" in k)
    after_bytes = sum(t.numel() * t.element_size() for t in after.values())
    assert before - (after_bytes - bookkeeping) == report.params_removed * 4  # stored parameters, padding included


def test_save_load_roundtrip_ragged_and_plain(tmp_path):
    batch = make_batch()
    for arch in ("qwen2_moe", "gpt_oss", "deepseek_v3"):
        model = tiny_moe(arch)
        prune(model, collect_stats(model, [batch]), 0.4, allocation="layer")
        camera_pl.save(model, tmp_path / arch)
        loaded = camera_pl.load(tmp_path / arch)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    # expert allocation keeps the fused layout: plain transformers loading works too
    model = tiny_moe("qwen2_moe")
    prune(model, collect_stats(model, [batch]), 0.5, allocation="expert")
    model.save_pretrained(tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-6)


def test_corrupt_checkpoint_errors(tmp_path):
    with pytest.raises(camera_pl.CheckpointError, match="config.json"):
        camera_pl.load(tmp_path)
    model = tiny_moe("qwen3_moe")
    prune(model, collect_stats(model, [make_batch()]), 0.4)
    camera_pl.save(model, tmp_path / "m")
    (tmp_path / "m" / "camera_pl.safetensors").write_bytes(b"broken")  # ragged: the camera_pl weights file
    with pytest.raises(camera_pl.CheckpointError, match="unreadable"):
        camera_pl.load(tmp_path / "m")


def test_expert_level_baselines_remove_experts_and_router_rows():
    batch = make_batch()
    for method in ("frequency", "reap", "ean"):
        model = tiny_moe("qwen3_moe")
        report = prune(model, collect_stats(model, [batch]), 0.25, method=method)
        assert all(len(layer.experts_removed) == 2 for layer in report.layers)
        for layer in moe_layers(model):
            assert layer.num_experts == 6 and layer.router.weight.shape[0] == 6
        assert model.config.num_experts == 6
        assert model(**batch).logits.isfinite().all()


def test_allow_expert_removal_and_width_floor():
    batch = make_batch()
    model = tiny_moe("mixtral")
    report = prune(model, collect_stats(model, [batch]), 0.9)
    assert all(min(layer.widths_after) >= 1 for layer in report.layers)
    model = tiny_moe("mixtral")
    stats = collect_stats(model, [batch])
    with torch.no_grad():  # make expert 0 useless everywhere so it is emptied
        for index in stats.layers:
            stats.layers[index]["sq_sum"][0] = 0
            stats.layers[index]["sq_max"][0] = 0
    report = prune(model, stats, 0.5, allow_expert_removal=True)
    assert all(0 in layer.experts_removed for layer in report.layers)
    assert model(**batch).logits.isfinite().all()


def test_sequential_calibration_runs_layer_by_layer():
    batch = make_batch()
    model = tiny_moe("olmoe")
    report = prune(model, None, 0.3, sequential=True, calib_dataloader=[batch])
    assert all(sum(layer.widths_after) < sum(layer.widths_before) for layer in report.layers)


def test_gradual_pruning_counts_earlier_removals():
    batch = make_batch()
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [batch])
    prune(model, stats, 0.2)
    report = prune(model, collect_stats(model, [batch]), 0.4)
    for layer in report.layers:
        total = 8 * 16
        assert sum(layer.widths_after) == total - int(0.4 * total)


def test_bad_inputs():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [make_batch()])
    with pytest.raises(ValueError, match=r"ratio=1.0: must lie in \[0.0, 1.0\)"):
        prune(model, stats, 1.0)
    with pytest.raises(ValueError, match="needs statistics"):
        prune(model, None, 0.2)
    with pytest.raises(ValueError, match="allocation"):
        prune(model, stats, 0.2, allocation="diagonal")
    with pytest.raises(camera_pl.StatsMismatchError):
        prune(tiny_moe("mixtral"), stats, 0.2)
    with pytest.raises(ValueError, match="n_group"):
        ds = tiny_moe("deepseek_v3")
        prune(ds, collect_stats(ds, [make_batch()]), 0.3, method="frequency")


def test_pruned_model_trains_in_bf16():
    model = tiny_moe("gpt_oss", dtype=torch.bfloat16)
    batch = make_batch()
    prune(model, collect_stats(model, [batch]), 0.5)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    ragged = [layer.module for layer in moe_layers(model)]
    grads = [r.get_parameter(name) for r in ragged for name in r.weight_parameters()]
    assert grads and all(p.grad is not None and p.dtype == torch.bfloat16 for p in grads)


def test_naee_removes_the_least_harmful_experts():
    batch = make_batch()
    model = tiny_moe("mixtral")  # 6 experts: exhaustive search
    reference = tiny_moe("mixtral")
    report = prune(model, None, 1 / 3, method="naee", calib_dataloader=[batch])
    assert all(len(layer.experts_removed) == 2 for layer in report.layers)
    # the chosen pair is at least as good as any other pair on the calibration layer inputs
    from camera_pl.pruning.naee import _removal_error, cache_layer_inputs

    layers = moe_layers(reference)
    inputs = cache_layer_inputs(reference, layers, [batch])
    layer = layers[0]
    with torch.no_grad():
        y = layer.block(inputs[0]).float()
    chosen = _removal_error(layer, inputs[0], y, tuple(report.layers[0].experts_removed))
    assert chosen <= min(_removal_error(layer, inputs[0], y, (a, b)) for a in range(6) for b in range(a + 1, 6)) + 1e-6
    with pytest.raises(ValueError, match="calib_dataloader"):
        prune(tiny_moe("mixtral"), None, 0.3, method="naee")
    from camera_pl.pruning.naee import naee_keep

    greedy = naee_keep(layers, inputs, 2, exhaustive_max=2)  # greedy search beyond the exhaustive limit
    assert all(int((~keep).sum()) == 2 for keep in greedy.values())


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [256, 12, 4])  # 12, 4: widths of 8 and below, some buckets padded per forward
def test_ragged_bucketed_grouped_path_matches_per_expert_path(arch, dtype, width, monkeypatch):
    """Grouped GEMMs over the width buckets equal the per-expert loop, with observation, whatever padding holds."""
    batch = make_batch()
    model = tiny_moe(arch, dtype=dtype, moe_intermediate_size=width, intermediate_size=width)
    prune(model, collect_stats(model, [batch]), 0.5)
    experts = [layer.module for layer in moe_layers(model)]
    assert width > 4 or all(min(e.plan.widths) < 4 for e in experts)  # padded per forward in fp32 and bf16
    assert all(e.grouped_weights(torch.zeros(1, e.hidden_size, dtype=dtype)) is not None for e in experts)
    with torch.no_grad():
        clean = model(**batch).logits
    with torch.no_grad():  # padded slots hold garbage (as LoRA deltas would): masked out, never read
        for e in experts:
            for b in range(len(e.plan.members)):
                pad = e.get_buffer(f"channels_{b}") == e.intermediate_size  # [E_b, W_b]
                up, down = e.get_parameter(e._up_name(b)), e.get_parameter(f"down_{b}")
                up.masked_fill_(e.layout.pack(pad, pad, 1)[..., None], 3.0)
                down.masked_fill_(pad[:, None, :], 3.0)
        grouped = model(**batch).logits
    stats_grouped = collect_stats(model, [batch])
    monkeypatch.setattr(RaggedExperts, "grouped_weights", lambda self, x: None)
    with torch.no_grad():
        loop = model(**batch).logits
    stats_loop = collect_stats(model, [batch])
    assert torch.equal(grouped, clean)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: kernels round differently
    torch.testing.assert_close(grouped, loop, rtol=tol, atol=tol)
    for index, entry in stats_loop.layers.items():
        for name in ("sq_sum", "sq_max", "act_sq_sum", "out_norm_sum"):
            torch.testing.assert_close(stats_grouped.layers[index][name], entry[name], rtol=10 * tol, atol=1e-5)


def test_expert_removal_keeps_router_aux_loss_working():
    model = tiny_moe("qwen3_moe", output_router_logits=True)
    batch = make_batch()
    prune(model, collect_stats(model, [batch]), 0.25, method="frequency")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.aux_loss is not None


def test_config_options_are_checked_by_name():
    from camera_pl import ConfigError, PruneConfig

    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [make_batch()])
    with pytest.raises(ConfigError, match="no option 'alocation'. Did you mean 'allocation'"):
        prune(model, stats, 0.2, alocation="global")
    with pytest.raises(ConfigError, match="'gloabl'.*Did you mean 'global'"):
        PruneConfig(allocation="gloabl")
    with pytest.raises(ConfigError, match="sequential"):
        PruneConfig(sequential=True, allocation="global")
    with pytest.raises(ConfigError, match="removes whole experts"):
        PruneConfig(method="frequency", allocation="global")
    with pytest.raises(ConfigError, match="no option 'reduce_ratoi'"):
        stats.scores("camera", reduce_ratoi=0.0)
    with pytest.raises(ConfigError, match="expected a number"):
        PruneConfig(ratio=float("nan"))
    config = PruneConfig(ratio=0.3, allocation="global")
    assert prune(model, stats, config).allocation == "global"


@pytest.mark.parametrize("ratio", [0.95, 0.999])
def test_layer_allocation_at_extreme_ratios_fails_clearly_or_removes_experts(ratio):
    model = tiny_moe("qwen3_moe")  # 8 experts x 16 micro-experts per layer: at most 120/128 removable
    stats = collect_stats(model, [make_batch()])
    before = [layer.experts.widths().tolist() for layer in moe_layers(model)]
    with pytest.raises(ValueError, match="at most 0.9375.*allow_expert_removal"):
        prune(model, stats, ratio)
    assert [layer.experts.widths().tolist() for layer in moe_layers(model)] == before  # nothing changed
    if ratio == 0.999:  # one micro-expert left: fewer experts than top_k, refused before any edit
        with pytest.raises(ValueError, match="fewer than top_k"):
            prune(model, stats, ratio, allow_expert_removal=True)
        assert [layer.experts.widths().tolist() for layer in moe_layers(model)] == before
        return
    report = prune(model, stats, ratio, allow_expert_removal=True)
    assert all(layer.experts_removed for layer in report.layers)


@pytest.mark.parametrize("allocation", ["expert", "layer"])
def test_ratios_refer_to_the_original_model_across_calls_and_reloads(allocation, tmp_path):
    """prune(0.25) then prune(0.5) leaves what prune(0.5) alone leaves, also for shrunk fused and shared experts."""
    batches = [make_batch(0), make_batch(1)]
    once, twice = tiny_moe("qwen2_moe"), tiny_moe("qwen2_moe")
    prune(once, collect_stats(once, batches), 0.5, allocation=allocation)
    prune(twice, collect_stats(twice, batches), 0.25, allocation=allocation)
    twice = camera_pl.load(camera_pl.save(twice, tmp_path / "m"))  # the original sizes travel in the config
    prune(twice, collect_stats(twice, batches), 0.5, allocation=allocation)

    def sizes(model):
        return [(int(l.experts.widths().sum()), l.shared_intermediate_size) for l in moe_layers(model)]

    assert [sum(s) for s in sizes(twice)] == [sum(s) for s in sizes(once)]
    if allocation == "expert":
        assert sizes(twice) == sizes(once) == [(8 * 8, 12), (8 * 8, 12)]
