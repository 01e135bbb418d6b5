"""HEAPr: gradient statistics collected in the experts forward equal a brute-force autograd recomputation,
and the ``heapr`` score drives pruning and CAMERA-Q's bit allocation."""

import math

import pytest
import torch
from torch import nn

from camera_pl import ConfigError, MicroExpertStats, PruneConfig, QuantizeConfig, allocate, collect_stats, \
    moe_layers, prune, quantize
from camera_pl.stats import observation
from camera_pl.testing import tiny_moe

from conftest import make_batch
from reference_math import capture_block_inputs, dense_layer

HEAPR_ARCHS = ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"]  # plain, gated shared, shared + scaling, no gate


def block_output_grads(model, batch) -> dict[int, torch.Tensor]:
    """dL/dy [T, H] at every MoE block's output, L = next-token loss summed over unpadded targets (plain autograd,
    the model's default experts implementation)."""
    outputs, handles = {}, []
    for layer in moe_layers(model):
        def hook(module, args, output, index=layer.index):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            outputs[index] = out
        handles.append(layer.block.register_forward_hook(hook))
    try:
        logits = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum")
    loss.backward()
    return {i: out.grad.reshape(-1, out.shape[-1]).double() for i, out in outputs.items()}


def brute_force_heapr(model, batch) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: M_e = Σ_t g_e(t)² dL/dy_t dL/dy_tᵀ over e's routed unpadded tokens (the gradient at expert e's
    output is the routing weight times the gradient at the block output), the shared M over all unpadded tokens
    (times the shared gate²), their quadratic forms with the down columns, and the HEAPr score."""
    layers = moe_layers(model)
    inputs, _ = capture_block_inputs(model, layers, batch)
    grads = block_output_grads(model, batch)
    m = batch["attention_mask"].reshape(-1).double()
    out = {}
    for layer in layers:
        d, grad = dense_layer(layer, inputs[layer.index]), grads[layer.index]
        routed = torch.zeros_like(d["g"]).scatter(1, d["index"], 1.0) * m[:, None]  # [T, E]
        g_out = d["g"][..., None] * grad[:, None, :]  # [T, E, H]: gradient at f_e(t)
        big_m = torch.einsum("te,teh,tek->ehk", routed, g_out, g_out)
        down = layer.experts.stacked().down.detach().double()  # [E, H, I]
        quad = torch.einsum("ehi,ehk,eki->ei", down, big_m, down)
        count = routed.sum(0).clamp_min(1)[:, None]
        act_sq = (d["a"] ** 2 * routed[..., None]).sum(0)
        s = {"heapr_m": big_m, "heapr_quad": quad, "act_sq_sum": act_sq, "score": act_sq / count * quad / count}
        if d["shared_a"] is not None:
            g_shared = d["shared_g"][:, None] * grad
            shared_m = torch.einsum("t,th,tk->hk", m, g_shared, g_shared)
            w = layer.shared.down_proj.weight.detach().double()
            shared_quad = torch.einsum("hi,hk,ki->i", w, shared_m, w)
            tokens = m.sum()
            shared_act = (d["shared_a"] ** 2 * m[:, None]).sum(0)
            s.update(shared_heapr_m=shared_m, shared_heapr_quad=shared_quad,
                     shared_score=shared_act / tokens * shared_quad / tokens)
        out[layer.index] = s
    return out


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-12, msg=what)


@pytest.mark.parametrize("arch", HEAPR_ARCHS)
def test_heapr_stats_equal_brute_force(arch):
    check_against_brute_force(tiny_moe(arch), arch)


def test_heapr_stats_of_experts_kept_as_a_list_equal_brute_force():
    from deepseek_moe_v1 import tiny_deepseek_v1

    check_against_brute_force(tiny_deepseek_v1(), "deepseek v1 (list of MLPs)")


def check_against_brute_force(model, arch: str) -> None:
    batch = make_batch()
    stats = collect_stats(model, [batch], heapr_mode="full")
    expected = brute_force_heapr(model, batch)
    scores = stats.scores("heapr")
    for index, exp in expected.items():
        got = stats.layers[index]
        for name in ("heapr_m", "heapr_quad", "act_sq_sum", "shared_heapr_m", "shared_heapr_quad"):
            if name in exp:
                close(got[name], exp[name], f"{arch} layer {index} {name}")
        close(scores[index].routed, exp["score"], f"{arch} layer {index} score")
        if "shared_score" in exp:
            close(scores[index].shared, exp["shared_score"], f"{arch} layer {index} shared score")
            assert int(got["heapr_tokens"]) == int(batch["attention_mask"].sum())
        else:
            assert scores[index].shared is None


def test_heapr_collects_on_every_architecture(arch, model):
    stats = collect_stats(model, [make_batch()], heapr_mode="diag")
    for layer in moe_layers(model):
        entry = stats.layers[layer.index]
        routed = entry["count"] > 0  # (an expert routed only at sequence ends sees no gradient: no later token)
        assert float(entry["heapr_diag"].sum()) > 0, f"{arch} layer {layer.index}"
        assert bool((entry["heapr_diag"][~routed] == 0).all())
        scores = stats.scores("heapr")[layer.index]
        assert bool(torch.isfinite(scores.routed).all()) and bool((scores.routed >= 0).all())
        assert (scores.shared is not None) == (layer.shared is not None)


def test_heapr_leaves_parameters_and_other_stats_alone():
    model = tiny_moe("qwen2_moe")
    batches = [make_batch(0), make_batch(1)]
    plain = collect_stats(model, batches)
    with_grads = collect_stats(model, batches, heapr_mode="diag")
    assert all(p.grad is None for p in model.parameters())
    assert not plain.has_gradients and with_grads.has_gradients
    for index, entry in plain.layers.items():
        for name, value in entry.items():
            torch.testing.assert_close(with_grads.layers[index][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_diag_mode_is_the_diagonal_of_full(arch):
    model = tiny_moe(arch)
    batches = [make_batch(0), make_batch(2, pad_from=3)]
    full = collect_stats(model, batches, heapr_mode="full")
    diag = collect_stats(model, batches, heapr_mode="diag")
    for index, entry in diag.layers.items():
        assert "heapr_m" not in entry and "heapr_diag" not in full.layers[index]
        want = full.layers[index]["heapr_m"].diagonal(dim1=-2, dim2=-1)
        torch.testing.assert_close(entry["heapr_diag"], want, rtol=1e-5, atol=1e-9)
        if "shared_heapr_diag" in entry:
            torch.testing.assert_close(entry["shared_heapr_diag"], full.layers[index]["shared_heapr_m"].diagonal(),
                                       rtol=1e-5, atol=1e-9)
        # the diagonal form: Σ_h w_hj² M_hh
        down = {l.index: l for l in moe_layers(model)}[index].experts.stacked().down
        torch.testing.assert_close(entry["heapr_quad"], (want[:, :, None] * down.square()).sum(1), rtol=1e-5,
                                   atol=1e-9)


def test_auto_mode_keeps_full_curvature_up_to_the_threshold(monkeypatch):
    model = tiny_moe("qwen2_moe")
    batch = make_batch()
    auto = collect_stats(model, [batch], heapr_mode="auto")
    assert all("heapr_m" in entry and "shared_heapr_m" in entry for entry in auto.layers.values())
    monkeypatch.setattr(observation, "HEAPR_FULL_MAX_ENTRIES", 0)
    small = collect_stats(model, [batch], heapr_mode="auto")
    assert all("heapr_diag" in entry and "heapr_m" not in entry for entry in small.layers.values())


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_prune_heapr_removes_the_requested_ratio(allocation):
    model = tiny_moe("qwen2_moe")
    stats = collect_stats(model, [make_batch(0), make_batch(1)], heapr_mode="auto")
    sizes = {l.index: l.num_experts * l.intermediate_size + l.shared_intermediate_size for l in moe_layers(model)}
    ratio = 0.4
    report = prune(model, stats, ratio, method="heapr", allocation=allocation)
    kept = {l.index: int(l.experts.widths().sum()) + l.shared_intermediate_size for l in moe_layers(model)}
    removed = {i: sizes[i] - kept[i] for i in sizes}
    if allocation == "layer":
        assert removed == {i: math.floor(ratio * n) for i, n in sizes.items()}
    else:  # an expert the ranking empties keeps its best micro-expert
        experts = sum(l.num_experts for l in moe_layers(model))
        budget = math.floor(ratio * sum(sizes.values()))
        assert budget - experts <= sum(removed.values()) <= budget
        assert all(r <= math.floor(0.9 * sizes[i]) for i, r in removed.items())  # max_layer_ratio
    assert report.method == "heapr"
    with torch.no_grad():
        assert torch.isfinite(model(**make_batch()).logits).all()


def test_prune_heapr_keeps_the_top_scored_micro_experts():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [make_batch(0)], heapr_mode="full")
    scores = stats.scores("heapr")
    prune(model, stats, 0.5, method="heapr")
    for layer in moe_layers(model):
        routed = scores[layer.index].routed
        present = layer.experts.present_mask()
        assert routed[present].min() >= routed[~present].max() or (present.sum(1) == 1).any()


def test_heapr_on_a_pruned_model_and_sequential():
    model = tiny_moe("qwen2_moe")
    batches = [make_batch(0), make_batch(1)]
    prune(model, collect_stats(model, batches), 0.25)  # ragged experts: gradients through camera_pl's forward
    stats = collect_stats(model, batches, heapr_mode="full")
    for layer in moe_layers(model):
        quad = stats.layers[layer.index]["heapr_quad"]
        assert bool((quad[~layer.experts.present_mask()] == 0).all())
    prune(model, stats, 0.5, method="heapr")
    fresh = tiny_moe("qwen2_moe")
    prune(fresh, None, 0.3, method="heapr", sequential=True, calib_dataloader=batches)
    assert all(int(l.experts.widths().sum()) < l.num_experts * l.intermediate_size for l in moe_layers(fresh))


def test_heapr_stats_survive_save_and_load(tmp_path):
    model = tiny_moe("qwen2_moe")
    stats = collect_stats(model, [make_batch()], heapr_mode="full")
    loaded = MicroExpertStats.load(stats.save(tmp_path / "stats.safetensors"), model=model)
    for index, want in stats.scores("heapr").items():
        got = loaded.scores("heapr", model=model)[index]
        torch.testing.assert_close(got.routed, want.routed)
        torch.testing.assert_close(got.shared, want.shared)


def test_heapr_errors_name_the_fix():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [make_batch()])
    with pytest.raises(ValueError, match=r"heapr_mode="):
        prune(model, stats, 0.3, method="heapr")
    with pytest.raises(ValueError, match="heapr_mode must be one of"):
        collect_stats(model, [make_batch()], heapr_mode="exact")
    with pytest.raises(ConfigError, match="heapr_mode"):
        PruneConfig(method="heapr", heapr_mode="exact")
    with pytest.raises(ConfigError, match="score"):
        QuantizeConfig(method="uniform", avg_bits=4, score="heapr")
    with pytest.raises(ConfigError, match="score"):
        QuantizeConfig(score="reap")  # expert level


def test_camera_q_ranks_by_heapr():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, [make_batch(0), make_batch(1)], heapr_mode="full")
    bits = allocate(model, stats, method="camera", score="heapr")
    scores = stats.scores("heapr")
    for layer in moe_layers(model):
        routed_bits = bits[layer.index].down.float()  # one bit-width per micro-expert, down column j
        score = scores[layer.index].routed.flatten()
        top = score.argsort(descending=True)[: max(1, int(0.1 * score.numel()))]
        assert bool((routed_bits.flatten()[top] == 8).all())
    report = quantize(model, stats, method="camera", score="heapr", avg_bits=3.0)
    assert report.avg_bits <= 3.0 + 1e-6


def test_recipe_stats_step_takes_heapr_mode():
    from camera_pl.workflows.recipe import RecipeError, StatsStep, parse_recipe

    recipe = parse_recipe({"name": "x", "steps": [{"stats": {"heapr_mode": "auto"}}, {"prune": {"method": "heapr"}}]})
    assert isinstance(recipe.steps[0][1], StatsStep) and recipe.steps[0][1].heapr_mode == "auto"
    with pytest.raises((ConfigError, RecipeError), match="heapr_mode"):
        parse_recipe({"name": "x", "steps": [{"stats": {"heapr_mode": "exact"}}]})
