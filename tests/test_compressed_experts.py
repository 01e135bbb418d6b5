"""Compressed experts: exactness at θ = 1, the IA³ formula, training, save/load, parameter counts."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import camera_pl
from camera_pl import collect_stats, moe_layers, prune
from camera_pl.expert_compression import compress_experts, routed_parameters_per_token
from camera_pl.experts.compressed import CompressedExperts
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe

from conftest import make_batch


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomise_vectors(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CompressedExperts):
                for theta in module.vectors():
                    theta.copy_(1 + 0.5 * torch.randn(theta.shape, generator=gen))


def test_all_main_experts_equal_the_original(model):
    batch = make_batch()
    reference = logits(model, batch)
    compress_experts(model, k_main=model.config.num_experts_per_tok)
    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_unit_vectors_equal_naive_top_k_main(arch):
    """θ = 1: only the k_main highest-weight experts run, with their original weights."""
    model, batch = tiny_moe(arch), make_batch()
    naive = copy.deepcopy(model)
    naive.set_experts_implementation("camera_pl")
    k_main, sentinel = max(1, model.config.num_experts_per_tok // 2), moe_layers(model)[0].num_experts

    def keep_main(mod, args, out):
        logits_, weights, index = out[:3]
        aux = weights.argsort(-1, descending=True).argsort(-1) >= k_main
        return (logits_, weights.masked_fill(aux, 0), index.masked_fill(aux, sentinel), *out[3:])

    for layer in moe_layers(naive):
        layer.router.register_forward_hook(keep_main)
    compress_experts(model)
    torch.testing.assert_close(logits(model, batch), logits(naive, batch), rtol=0, atol=1e-5)


def reference_layer(layer, module, hidden, index, weights):
    """METHODS §5 token by token from the original layer's weight views (SiLU-gated, bias-free experts)."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        order = weights[t].argsort(descending=True)
        main, aux = order[: module.k_main], order[module.k_main:]
        alpha = weights[t, aux] / weights[t, aux].sum()
        thetas = [sum(a * theta[index[t, i]] for a, i in zip(alpha, aux)) for theta in module.vectors()]
        for i in main:
            e = int(index[t, i])
            w = layer.experts.base_experts.weights(e)
            gate, up = w.gate, w.up
            channels = layer.experts.channels(e)
            a = nn.functional.silu(gate @ (hidden[t] * thetas[0])) * (up @ (hidden[t] * thetas[2]))
            out[t] += weights[t, i] * (w.down @ (a * thetas[1][channels]))
    return out


@pytest.mark.parametrize("pruned", [False, True])
def test_modulation_follows_the_formula(pruned):
    model = tiny_moe("olmoe")  # top-3: one main expert modulated by two aggregated auxiliary ones at k_main=1
    if pruned:
        prune(model, collect_stats(model, [make_batch()]), 0.4, allocation="layer")
    layer = moe_layers(model)[0]
    (module,) = compress_experts(model)[:1]
    randomise_vectors(model)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, layer.hidden_size, generator=gen)
    _, weights, index = layer.route(hidden)
    with torch.no_grad():
        got = module(hidden, index, weights)
        expected = reference_layer(layer, module, hidden, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def changed_parameters(model, train) -> tuple[set[str], set[str]]:
    """Names of the parameters ``train(model)`` changed, and of the θ vectors."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    return changed, {name for name in before if ".theta_" in name}


def test_lightning_finetune_of_the_vectors_only():
    model = tiny_moe("qwen3_moe")
    compress_experts(model, trainable="vectors")

    def fit(model, steps=2):
        loader = torch.utils.data.DataLoader([make_batch(seed=s) for s in range(steps)], batch_size=None)
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(CausalLMModule(model, lr=0.05), train_dataloaders=loader)

    changed, vectors = changed_parameters(model, fit)
    assert vectors and changed == vectors


def test_training_all_parameters_updates_vectors_and_weights():
    model = tiny_moe("qwen3_moe")
    compress_experts(model)
    module = CausalLMModule(model, lr=0.05)
    optimizer = module.configure_optimizers()

    def step(model):
        module.training_step(make_batch(), 0).backward()
        optimizer.step()

    changed, vectors = changed_parameters(model, step)
    assert vectors and vectors < changed
    assert any(".base." in name for name in changed)


@pytest.mark.parametrize("pruned", [False, True])
def test_save_load_roundtrip(tmp_path, pruned):
    model, batch = tiny_moe("gpt_oss"), make_batch()
    if pruned:
        prune(model, collect_stats(model, [batch]), 0.3, allocation="expert")
    compress_experts(model)
    randomise_vectors(model)
    camera_pl.save(model, tmp_path / "m")
    loaded = camera_pl.load(tmp_path / "m")
    assert isinstance(moe_layers(loaded)[0].experts, CompressedExperts)
    assert moe_layers(loaded)[0].experts.spec() == moe_layers(model)[0].experts.spec()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_parameters_per_token():
    model = tiny_moe("olmoe")  # H = 32, I = 16, top-3, two MoE layers
    expert = 3 * 32 * 16
    assert routed_parameters_per_token(model) == 2 * 3 * expert
    compress_experts(model)  # k_main = 1: one expert + two vector triples (2H + I) per layer
    assert routed_parameters_per_token(model) == 2 * (expert + 2 * (2 * 32 + 16))


def test_bfloat16_and_bad_inputs():
    model = tiny_moe("qwen3_moe", dtype=torch.bfloat16)
    compress_experts(model)
    modules = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    assert all(t.dtype == torch.bfloat16 for m in modules for t in m.vectors())
    assert logits(model, make_batch()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already compressed"):
        compress_experts(model)
    with pytest.raises(ValueError, match="k_main"):
        compress_experts(tiny_moe("qwen3_moe"), k_main=3)
    with pytest.raises(ValueError, match="trainable"):
        compress_experts(tiny_moe("qwen3_moe"), trainable="router")
