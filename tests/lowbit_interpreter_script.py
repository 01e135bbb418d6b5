"""Checks of camera_pl's Triton kernels run by Triton's interpreter on CPU tensors (``tests/test_lowbit.py``).

Run as ``TRITON_INTERPRET=1 python lowbit_interpreter_script.py SCENARIO OUT``: the variable must be set
before anything imports Triton, hence a process of its own. Every check compares the kernels with the
paths they replace — fake quantization (the dequantized weights written back), the grouped dequantizing
path, torch's reductions — and counts the kernel launches so that a check cannot pass without them.
Writes ``OUT`` (a JSON summary) on success; any failed check raises.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch

from camera_pl import collect_stats, load, moe_layers, prune, quantize, save
from camera_pl.experts import lowbit
from camera_pl.kernels import interpreting
from camera_pl.stats import reductions
from camera_pl.testing import TINY_CONFIGS, tiny_moe

assert interpreting(), "run with TRITON_INTERPRET=1"
LAUNCHES = {"rows": 0, "columns": 0}
_rows, _columns = lowbit.rows_matmul, lowbit.columns_matmul


def _count(name, fn):
    def counted(*args, **kwargs):
        LAUNCHES[name] += 1
        return fn(*args, **kwargs)
    return counted


lowbit.rows_matmul, lowbit.columns_matmul = _count("rows", _rows), _count("columns", _columns)


def batch(seed: int = 0, rows: int = 2, seq: int = 9) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, data: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**data).logits.float()


def without_kernels(fn):
    """``fn()`` with both kernels switched off: the grouped dequantizing path and torch's reductions run."""
    with mock.patch.object(lowbit, "available", lambda x: False), \
            mock.patch.object(reductions, "_triton_kernel", lambda: None):
        return fn()


def check_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> float:
    err = float((got - want).abs().max())
    assert err <= atol, f"{what}: max |kernel - reference| = {err:.3g} > {atol}"
    return err


def quantized_pair(model, stats, **kwargs):
    fake, packed = copy.deepcopy(model), copy.deepcopy(model)
    quantize(fake, stats, pack=False, **kwargs)
    quantize(packed, stats, **kwargs)
    return fake, packed


def scenario_architectures(out: dict, tmp: str) -> None:
    """Every supported fused architecture, fp32: CAMERA-Q (down rows per micro-expert: the columns kernel) and
    matrix-level bits (down rows per output channel: the rows kernel), equal to fake quantization; after
    save/load too."""
    data = batch()
    for arch in TINY_CONFIGS:
        model = tiny_moe(arch, moe_intermediate_size=40, intermediate_size=40)
        stats = collect_stats(model, [data])
        for method in ("camera", "matrix"):
            fake, packed = quantized_pair(model, stats, method=method, avg_bits=2.5, group_size=16)
            before = dict(LAUNCHES)
            got = logits(packed, data)
            assert LAUNCHES["rows"] > before["rows"], f"{arch} {method}: the kernels did not run"
            axis = moe_layers(packed)[0].module.spec()["down_axis"]
            assert (LAUNCHES["columns"] > before["columns"]) == (axis == "in")
            out[f"{arch} {method}"] = check_close(got, logits(fake, data), 1e-5, f"{arch} {method}")
            if arch in ("qwen3_moe", "gpt_oss"):
                loaded = load(save(packed, f"{tmp}/{arch}-{method}"))
                assert torch.equal(logits(loaded, data), got), f"{arch} {method}: differs after save/load"


def scenario_ragged_bf16_decode(out: dict, tmp: str) -> None:
    """Pruned (ragged, padded slots) then quantized experts; bf16; decode-sized inputs with scattered and
    consecutive hit experts: against fake quantization and the grouped dequantizing path."""
    data = batch(1)
    for arch in ("qwen2_moe", "gpt_oss"):
        model = tiny_moe(arch, moe_intermediate_size=40, intermediate_size=40)
        prune(model, collect_stats(model, [data]), 0.5, allocation="layer")
        assert not moe_layers(model)[0].experts.full_width
        fake, packed = quantized_pair(model, collect_stats(model, [data]), method="camera", avg_bits=2.5,
                                      group_size=16)
        assert moe_layers(packed)[0].module._plan(torch.device("cpu")).padded
        out[f"{arch} ragged"] = check_close(logits(packed, data), logits(fake, data), 1e-5, f"{arch} ragged")
    for arch in ("qwen3_moe", "gpt_oss"):
        model = tiny_moe(arch, dtype=torch.bfloat16, moe_intermediate_size=40, intermediate_size=40)
        fake, packed = quantized_pair(model, collect_stats(model, [data]), method="camera", avg_bits=2.5,
                                      group_size=16)
        layer, fake_layer = moe_layers(packed)[0], moe_layers(fake)[0]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(16, layer.hidden_size, generator=gen).to(torch.bfloat16)
        weights = torch.rand(16, 2, generator=gen).to(torch.bfloat16)
        index = torch.randint(0, layer.experts.num_experts, (16, 2), generator=gen)
        with torch.no_grad():
            for rows, hit in ((16, None), (1, [1, 4]), (2, [2, 3])):  # prefill-sized, then decode-sized
                idx = index[:rows] if hit is None else torch.tensor([hit, hit[::-1]][:rows])
                before = LAUNCHES["rows"]
                got = layer.module(x[:rows], idx, weights[:rows]).float()
                assert LAUNCHES["rows"] > before
                scale = float(got.abs().max())
                grouped = without_kernels(lambda: layer.module(x[:rows], idx, weights[:rows]).float())
                want = fake_layer.module(x[:rows], idx, weights[:rows]).float()
                # bf16: the same bf16 weights and fp32 accumulation, another summation order: an ulp or two
                check_close(got, grouped, 2 ** -7 * scale, f"{arch} bf16 vs grouped")
                out[f"{arch} bf16 rows={rows}"] = check_close(got, want, 2 ** -7 * scale, f"{arch} bf16 vs fake")
        x.requires_grad_(True)  # the kernels have no backward: a training forward takes the grouped path
        before = LAUNCHES["rows"]
        layer.module(x, index, weights).float().square().sum().backward()
        assert LAUNCHES["rows"] == before and x.grad is not None
        grad, x.grad = x.grad, None
        fake_layer.module(x, index, weights).float().square().sum().backward()
        check_close(grad.float(), x.grad.float(), 2 ** -6 * float(x.grad.abs().max()), f"{arch} gradient")


def scenario_switch_and_fallback(out: dict, tmp: str) -> None:
    """``use_kernels=False`` on a module runs the dequantizing path; a failing kernel warns once, switches the
    kernels off and the forward still returns the right outputs."""
    import warnings

    from camera_pl.experts.quantized import QuantizedExperts

    data = batch(4)
    model = tiny_moe("qwen3_moe", moe_intermediate_size=40, intermediate_size=40)
    fake, packed = quantized_pair(model, collect_stats(model, [data]), method="camera", avg_bits=2.5, group_size=16)
    want = logits(fake, data)
    check_close(logits(packed, data), want, 1e-5, "with the kernels")
    assert LAUNCHES["rows"] > 0
    for layer in moe_layers(packed):
        layer.module.use_kernels = False
    before = dict(LAUNCHES)
    check_close(logits(packed, data), want, 1e-5, "use_kernels=False")
    assert LAUNCHES == before, "use_kernels=False still launched the kernels"
    for layer in moe_layers(packed):
        del layer.module.use_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compilation failure")

    with mock.patch.object(lowbit, "rows_matmul", broken), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits(packed, data)
    assert QuantizedExperts.use_kernels is False
    assert len(caught) == 1 and "simulated compilation failure" in str(caught[0].message), [str(w.message) for w in caught]
    out["fallback"] = check_close(got, want, 1e-5, "after a kernel failure")
    QuantizedExperts.use_kernels = True


def scenario_observation(out: dict, tmp: str) -> None:
    """Statistics collected through the kernels (and reduced by the Triton micro-sums kernel) equal the grouped
    path's with torch's reductions."""
    data = [batch(2), batch(3)]
    for arch in ("qwen2_moe", "deepseek_v3"):
        model = tiny_moe(arch, moe_intermediate_size=40, intermediate_size=40)
        prune(model, collect_stats(model, data), 0.4, allocation="layer")
        quantize(model, collect_stats(model, data), method="camera", avg_bits=3, group_size=16)
        sums = mock.patch.object(reductions, "_triton_sums", wraps=reductions._triton_sums)
        with sums as counted:
            got = collect_stats(model, data)
        assert counted.call_count > 0, "the micro-sums kernel did not run"
        want = without_kernels(lambda: collect_stats(model, data))
        worst = 0.0
        for index, entry in want.layers.items():
            for name, value in entry.items():
                mine = got.layers[index][name]
                torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{arch} {name}: {m}")
                if value.is_floating_point():
                    worst = max(worst, float((mine - value).abs().max()))
        out[f"{arch} stats"] = worst
    gen = torch.Generator().manual_seed(0)  # the reduction itself: strided rows, an empty expert, uneven segments
    ids = torch.randint(0, 6, (700,), generator=gen).sort().values
    ids[ids == 1] = 2
    bounds = torch.nn.functional.pad(torch.searchsorted(ids, torch.arange(1, 7)), (1, 0))
    keep, g2 = (torch.rand(700, generator=gen) > 0.2).float(), torch.rand(700, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        acts = torch.randn(700, 81, generator=gen).to(dtype)[:, :80]
        for got, want in zip(reductions.micro_sums(acts, ids, bounds, keep, g2),
                             reductions._torch_sums(acts, ids, 6, keep, g2)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    scenario, target = sys.argv[1], sys.argv[2]
    summary: dict = {}
    globals()[f"scenario_{scenario}"](summary, str(Path(target).parent))
    summary["launches"] = LAUNCHES
    with open(target, "w") as f:
        json.dump(summary, f, indent=1)
