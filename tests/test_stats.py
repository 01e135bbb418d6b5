"""Statistics collected in the model's own forward equal a brute-force dense recomputation."""

import pytest
import torch

from camera_pl import MicroExpertStats, StatsMismatchError, collect_stats, moe_layers
from camera_pl.stats.observation import observe
from camera_pl.testing import tiny_moe

from conftest import make_batch
from reference_math import capture_block_inputs, dense_layer


def brute_force_stats(model, batch) -> dict[int, dict[str, torch.Tensor]]:
    layers = moe_layers(model)
    inputs, _ = capture_block_inputs(model, layers, batch)
    m = batch["attention_mask"].reshape(-1).double()
    out = {}
    for layer in layers:
        d = dense_layer(layer, inputs[layer.index])
        E = layer.num_experts
        routed = torch.zeros_like(d["g"]).scatter(1, d["index"], 1.0) * m[:, None]  # [T, E]
        ga2 = (d["g"][..., None] * d["a"]) ** 2 * m[:, None, None]
        fn = d["f"].norm(dim=-1)
        top2 = d["weights"].topk(2, dim=-1).values
        s = {
            "sq_sum": ga2.sum(0), "sq_max": ga2.amax(0),
            "act_sq_sum": (d["a"] ** 2 * routed[..., None]).sum(0),
            "count": routed.sum(0), "weight_sum": (d["g"] * m[:, None]).sum(0),
            "prob_sum": (d["probs"] * m[:, None]).sum(0), "selected_prob_sum": (d["probs"] * routed).sum(0),
            "out_norm_sum": (fn * routed).sum(0), "weighted_out_norm_sum": (fn * d["g"] * m[:, None]).sum(0),
            "ratios": (top2[:, 1] / top2[:, 0])[m.bool()],
            "down_norm_sq": layer.experts.stacked().down.double().pow(2).sum(1),
        }
        assert s["count"].shape == (E,)
        if d["shared_a"] is not None:
            sga2 = (d["shared_g"][:, None] * d["shared_a"]) ** 2 * m[:, None]
            s.update(shared_sq_sum=sga2.sum(0), shared_sq_max=sga2.amax(0),
                     shared_act_sq_sum=(d["shared_a"] ** 2 * m[:, None]).sum(0),
                     shared_down_norm_sq=layer.shared.down_proj.weight.double().pow(2).sum(0))
        out[layer.index] = s
    return out


def test_stats_and_scores_equal_brute_force(arch, model):
    batch = make_batch()
    stats = collect_stats(model, [batch])
    expected = brute_force_stats(model, batch)
    assert stats.tokens == int(batch["attention_mask"].sum())
    for index, exp in expected.items():
        got = stats.layers[index]
        for name, value in exp.items():
            if name == "ratios":
                continue
            torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-7, msg=f"layer {index} {name}")
        assert abs(stats.ratio_median(index) - exp["ratios"].median().item()) < 2e-3
    for r in (0.0, 0.9, 1.0):
        scores = stats.scores("camera", reduce_ratio=r)
        for index, exp in expected.items():
            want = exp["down_norm_sq"] * ((1 - r) * exp["sq_sum"] + r * exp["sq_max"])
            torch.testing.assert_close(scores[index].routed.double(), want, rtol=1e-5, atol=1e-9)
            if "shared_sq_sum" in exp:
                want_s = exp["shared_down_norm_sq"] * ((1 - r) * exp["shared_sq_sum"] + r * exp["shared_sq_max"])
                torch.testing.assert_close(scores[index].shared.double(), want_s, rtol=1e-5, atol=1e-9)


def logits_default_plain_observed(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits with the default experts kernels, camera_pl's implementation, and camera_pl's while observing."""
    with torch.no_grad():
        default = model(**batch).logits
        model.set_experts_implementation("camera_pl")
        plain = model(**batch).logits
        with observe(model) as obs:
            obs.set_attention_mask(batch["attention_mask"], batch["input_ids"])
            observed = model(**batch).logits
    return default, plain, observed


def test_observation_leaves_logits_unchanged(arch, model):
    default, plain, observed = logits_default_plain_observed(model, make_batch())
    assert torch.equal(plain, observed)  # same kernels: bit-identical
    torch.testing.assert_close(observed, default, rtol=0, atol=1e-5)  # vs grouped_mm: kernel rounding only


def test_collect_restores_implementation_and_mode():
    model = tiny_moe("qwen3_moe").train()
    before = model.config._experts_implementation
    collect_stats(model, [make_batch()])
    assert model.config._experts_implementation == before and model.training
    assert all(not hasattr(layer.module, "_camera_observer") for layer in moe_layers(model))


def test_padding_never_counts():
    """A padded batch gives the same stats as its unpadded rows run one by one."""
    model = tiny_moe("qwen2_moe")
    batch = make_batch(pad_from=4)
    padded = collect_stats(model, [batch])
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        rows.append({"input_ids": batch["input_ids"][i : i + 1, :n]})
    unpadded = collect_stats(model, rows)
    assert padded.tokens == unpadded.tokens
    for index in padded.layers:
        for name in ("sq_sum", "sq_max", "count", "prob_sum", "ratio_hist", "shared_sq_sum"):
            torch.testing.assert_close(padded.layers[index][name], unpadded.layers[index][name], rtol=1e-5, atol=1e-6)


def test_max_tokens_stops_early():
    model = tiny_moe("olmoe")
    batches = [make_batch(seed=i, pad_from=None) for i in range(5)]
    stats = collect_stats(model, batches, max_tokens=45)
    assert stats.tokens == 60  # two batches of 30 tokens reach the cap


def test_save_load_roundtrip_and_mismatch(tmp_path):
    model = tiny_moe("deepseek_v3")
    stats = collect_stats(model, [make_batch()])
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = MicroExpertStats.load(path, model=model)
    assert loaded.tokens == stats.tokens and loaded.signature == stats.signature
    for index in stats.layers:
        for name, value in stats.layers[index].items():
            assert torch.equal(loaded.layers[index][name], value)
    with pytest.raises(StatsMismatchError, match="different model.*collect_stats"):
        MicroExpertStats.load(path, model=tiny_moe("qwen3_moe"))
    with pytest.raises(StatsMismatchError, match="layer"):
        stats.check_compatible(tiny_moe("deepseek_v3", moe_intermediate_size=8))


def test_corrupt_or_missing_file_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StatsMismatchError, match="not a readable"):
        MicroExpertStats.load(bad)
    with pytest.raises(FileNotFoundError):
        MicroExpertStats.load(tmp_path / "missing.safetensors")


def test_bad_inputs_have_clear_errors():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="no tokens"):
        collect_stats(model, [])
    with pytest.raises(TypeError, match="dicts with 'input_ids'"):
        collect_stats(model, [torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="max_tokens"):
        collect_stats(model, [make_batch()], max_tokens=0)


def test_score_registry_methods():
    model = tiny_moe("qwen2_moe")
    stats = collect_stats(model, [make_batch()])
    from camera_pl import score_methods

    assert {"camera", "magnitude", "activation", "random", "frequency", "reap", "ean"} <= set(score_methods())
    with pytest.raises(ValueError, match="Unknown score method 'nope'"):
        stats.scores("nope")
    with pytest.raises(ValueError, match="reduce_ratio"):
        stats.scores("camera", reduce_ratio=1.5)
    a, b, c = stats.scores("random", seed=1), stats.scores("random", seed=1), stats.scores("random", seed=2)
    assert torch.equal(a[0].routed, b[0].routed) and not torch.equal(a[0].routed, c[0].routed)
    reap = stats.scores("reap")[0].routed
    s = stats.layers[0]
    torch.testing.assert_close(reap, s["weighted_out_norm_sum"] / s["count"].clamp_min(1))
    assert stats.scores("frequency")[0].level == "expert"
    # weight norms read from a changed model
    with torch.no_grad():
        moe_layers(model)[0].module.down_proj.mul_(2)
    assert torch.allclose(stats.scores("camera", model=model)[0].routed, 4 * stats.scores("camera")[0].routed)
