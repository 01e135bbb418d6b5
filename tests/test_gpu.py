"""The same checks on CUDA in bf16 (skipped without a GPU)."""

import pytest
import torch

import camera_pl
from camera_pl import collect_stats, prune
from camera_pl.testing import tiny_moe

from conftest import make_batch
from test_stats import brute_force_stats, logits_default_plain_observed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU_ARCHS = ["qwen2_moe", "deepseek_v3", "gpt_oss", "mixtral"]


def cuda_batch():
    return {k: v.cuda() for k, v in make_batch().items()}


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_bf16_cuda_observation_exact_and_stats_match_brute_force(arch):
    model = tiny_moe(arch, dtype=torch.bfloat16).cuda()
    batch = cuda_batch()
    default, plain, observed = logits_default_plain_observed(model, batch)
    assert torch.equal(plain, observed)
    torch.testing.assert_close(observed.float(), default.float(), rtol=0.05, atol=0.05)
    stats = collect_stats(model, [batch])
    for entry in stats.layers.values():
        assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in entry.values())
    expected = brute_force_stats(model, batch)
    for index, exp in expected.items():
        for name in ("sq_sum", "count", "weight_sum", "prob_sum"):
            got, want = stats.layers[index][name].double().cpu(), exp[name].cpu()
            torch.testing.assert_close(got, want, rtol=0.05, atol=1e-3 * float(want.abs().max()), msg=name)


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_bf16_cuda_prune_train_save_load(arch, tmp_path):
    model = tiny_moe(arch, dtype=torch.bfloat16).cuda()
    batch = cuda_batch()
    dtypes = {p.dtype for p in model.parameters()}  # some routers stay float32 by design
    report = prune(model, collect_stats(model, [batch]), 0.4)
    assert report.params_removed > 0
    assert all(p.device.type == "cuda" for p in model.parameters()) and {p.dtype for p in model.parameters()} == dtypes
    assert all(layer.experts.dtype == torch.bfloat16 for layer in camera_pl.moe_layers(model))
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    camera_pl.save(model, tmp_path / arch)
    loaded = camera_pl.load(tmp_path / arch, device="cuda")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_micro_sums_match_torch_reductions(dtype):
    """The Triton reduction equals torch's row-indexed reductions (strided rows, an empty expert, uneven segments)."""
    from camera_pl.stats.reductions import _torch_sums, micro_sums

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (5000,), generator=gen).sort().values
    ids[ids == 1] = 2
    ids, bounds = ids.cuda(), torch.nn.functional.pad(torch.searchsorted(ids, torch.arange(1, 7)), (1, 0)).cuda()
    acts = torch.randn(5000, 201, generator=gen).to(dtype).cuda()[:, :200]
    keep, g2 = (torch.rand(5000, generator=gen) > 0.2).float().cuda(), torch.rand(5000, generator=gen).cuda()
    for got, want in zip(micro_sums(acts, ids, bounds, keep, g2), _torch_sums(acts, ids, 6, keep, g2)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_bf16_cuda_ragged_buckets_run_grouped_and_match_the_loop(arch, monkeypatch):
    """Layer-pruned experts on CUDA: grouped GEMMs over the width buckets, equal to the per-expert loop."""
    from camera_pl import moe_layers
    from camera_pl.experts.ragged import RaggedExperts

    model = tiny_moe(arch, dtype=torch.bfloat16, moe_intermediate_size=256, intermediate_size=256).cuda()
    batch = cuda_batch()
    prune(model, collect_stats(model, [batch]), 0.4)
    x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    assert all(layer.experts.grouped_weights(x) is not None for layer in moe_layers(model))
    with torch.no_grad():
        grouped = model(**batch).logits.float()
        monkeypatch.setattr(RaggedExperts, "grouped_weights", lambda self, x: None)
        loop = model(**batch).logits.float()
    torch.testing.assert_close(grouped, loop, rtol=0.05, atol=0.1)


def test_offloaded_layer_by_layer_matches_in_memory_cuda():
    """CPU-resident weights, one decoder layer at a time on CUDA: the in-memory CUDA results, weights stay home."""
    import copy

    from camera_pl import quantize

    home = tiny_moe("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[])
    resident = copy.deepcopy(home).cuda()
    batches = [make_batch(0), make_batch(1)]
    want = collect_stats(resident, [{k: v.cuda() for k, v in b.items()} for b in batches])
    got = collect_stats(home, batches, offload="cuda")  # peak memory: benchmarks/offload_memory.py --device cuda
    assert all(p.device.type == "cpu" for p in home.parameters())
    for index, entry in want.layers.items():
        for name, value in entry.items():
            torch.testing.assert_close(got.layers[index][name], value.cpu(), rtol=1e-4, atol=1e-4, msg=name)
    options = dict(method="camera", avg_bits=3, quantizer="gptq", group_size=16, min_tokens=4)
    quantize(resident, want, calib_dataloader=[{k: v.cuda() for k, v in b.items()} for b in batches], **options)
    quantize(home, got, calib_dataloader=batches, offload="cuda", **options)
    assert all(t.device.type == "cpu" for t in home.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(home.cuda()(**cuda_batch()).logits, resident(**cuda_batch()).logits,
                                   rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("arch,method", [("qwen3_moe", "camera"), ("gpt_oss", "camera"), ("mixtral", "matrix")])
def test_lowbit_kernels_match_fake_quantization_on_cuda(arch, method, dtype, monkeypatch):
    """The compiled low-bit kernels (prefill- and decode-sized) equal fake quantization and the grouped path."""
    import copy

    from camera_pl import moe_layers, quantize
    from camera_pl.experts import lowbit

    model = tiny_moe(arch, dtype=dtype, moe_intermediate_size=200, intermediate_size=200).cuda()
    batch = cuda_batch()
    stats = collect_stats(model, [batch])
    fake, packed = copy.deepcopy(model), model
    quantize(fake, stats, method=method, avg_bits=2.5, group_size=32, pack=False)
    quantize(packed, stats, method=method, avg_bits=2.5, group_size=32)
    x = torch.zeros(1, model.config.hidden_size, dtype=dtype, device="cuda")
    assert lowbit.available(x)
    layer, fake_layer = moe_layers(packed)[0], moe_layers(fake)[0]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(300, layer.hidden_size, generator=gen).to(dtype).cuda()
    index = torch.randint(0, layer.experts.num_experts, (300, 2), generator=gen).cuda()
    weights = torch.rand(300, 2, generator=gen).to(dtype).cuda()
    with torch.no_grad():
        for rows in (300, 1, 3):
            got = layer.module(h[:rows], index[:rows], weights[:rows]).float()
            want = fake_layer.module(h[:rows], index[:rows], weights[:rows]).float()
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=0, atol=tol)
            with monkeypatch.context() as patch:
                patch.setattr(lowbit, "available", lambda x: False)
                grouped = layer.module(h[:rows], index[:rows], weights[:rows]).float()
            torch.testing.assert_close(got, grouped, rtol=0, atol=tol)
        torch.testing.assert_close(packed(**batch).logits.float(), fake(**batch).logits.float(), rtol=0,
                                   atol=1e-4 if dtype == torch.float32 else 0.1)
