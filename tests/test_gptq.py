"""Batched GPTQ (gptq_batched, the chunked per-layer path) against a frozen copy of the former per-matrix loop."""

import pytest
import torch

import camera_pl.quant.api as quant_api
import camera_pl.quant.quantizers as quantizers
from camera_pl import collect_stats, moe_layers, prune, quantize
from camera_pl.experts.base import ExpertWeights
from camera_pl.quant.calibration import capture_layer_inputs
from camera_pl.quant.config import QuantizeConfig
from camera_pl.quant.layer import _row_bits, quantize_routed
from camera_pl.quant.methods import AllocationContext, BIT_ALLOCATIONS
from camera_pl.quant.quantizers import (QuantizedRows, _encode, _expand, _grid, _grouped, _per_row,
                                        effective_group_size, gptq, gptq_batched, gptq_chunk_size, rtn)
from camera_pl.testing import tiny_moe

from conftest import make_batch

CALIB = [make_batch(seed=i, batch=4, seq=24) for i in range(3)]


# ---- the oracle: the per-matrix GPTQ loop as it was before batching (inverse Hessian, column by column) --------
def _reference_factor(hessian, damp):
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * (10**attempt) * mean_diag * eye)
        if int(info) == 0:
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye, chol), upper=True)
            if int(info) == 0:
                return factor
    raise ValueError("not positive definite")


def reference_gptq(weight, hessian, bits, group_size=128, *, axis="out", damp=0.01, act_order=False):
    rows, cols = weight.shape
    bits = _per_row(bits, rows if axis == "out" else cols, weight.device)
    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(cols)
    w = weight.detach().double()[:, order].clone()
    factor = _reference_factor(hessian[order][:, order], damp)
    length = rows if axis == "in" else cols
    gs = effective_group_size(group_size, length)
    groups = -(-length // gs)
    n = rows if axis == "out" else cols
    codes = torch.zeros(n, length, dtype=torch.uint8)
    scale, zero = torch.zeros(n, groups), torch.zeros(n, groups)
    if axis == "out" and act_order:
        start = rtn(weight, bits, gs)
        scale, zero = start.scale.float(), start.zero.float()
    block = gs if axis == "out" and not act_order else 128
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err, f1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=torch.float64), factor[i1:i2, i1:i2]
        if axis == "out" and not act_order:
            s, z = _grid(*_grouped(w1.float(), i2 - i1), bits)
            scale[:, i1 // gs], zero[:, i1 // gs] = s[:, 0], z[:, 0]
        if axis == "in":
            cols_ = order[i1:i2]
            s, z = _grid(*_grouped(w1.t().float(), gs), bits[cols_])
            scale[cols_], zero[cols_] = s, z
            block_s, block_z = _expand(s, gs, length), _expand(z, gs, length)
        for i in range(i2 - i1):
            c = int(order[i1 + i])
            col = w1[:, i].float()
            if axis == "out":
                s, z, b = scale[:, c // gs:c // gs + 1], zero[:, c // gs:c // gs + 1], bits
                q = _encode(col[:, None], s, z, b)[:, 0]
                codes[:, c] = q.to(torch.uint8)
                deq = torch.where(b == 1, (2 * q - 1) * s[:, 0], (q - z[:, 0]) * s[:, 0])
            else:
                s, z, b = block_s[i:i + 1], block_z[i:i + 1], bits[c:c + 1]
                q = _encode(col[None], s, z, b)[0]
                codes[c] = q.to(torch.uint8)
                deq = torch.where(b == 1, (2 * q - 1) * s[0], (q - z[0]) * s[0])
            e = (w1[:, i] - deq.double()) / f1[i, i]
            w1[:, i:] -= e[:, None] * f1[i, i:][None]
            err[:, i] = e
        w[:, i2:] -= err @ factor[i1:i2, i2:]
    return QuantizedRows(codes, scale.to(torch.float16), zero.to(torch.uint8), bits, gs)


def reference_quantize_routed(layer, bits, quantizer, inputs, group_size, sink, damp=0.01, act_order=False,
                              min_tokens=32):
    """The former per-expert, per-matrix GPTQ loop of quantize_routed (every matrix handed to ``sink`` at the end)."""
    experts = layer.experts
    out = {m: [] for m in bits.rows()}
    fallback = []
    everything = inputs.hidden
    all_tokens = everything.float().t() @ everything.float()
    for e in range(layer.num_experts):
        w, ch = experts.weights(e), experts.channels(e)
        tok, _ = inputs.routed(e)
        if tok.numel() >= min_tokens:
            x = everything[tok]
            hessian = x.float().t() @ x.float()
        else:
            x, hessian = everything, all_tokens
            fallback.append(e)
        options = dict(damp=damp, act_order=act_order)
        qg = None
        if w.gate is not None:
            qg = reference_gptq(w.gate, hessian, _row_bits(bits, "gate", e, ch), group_size, **options)
            out["gate"].append(qg)
        qu = reference_gptq(w.up, hessian, _row_bits(bits, "up", e, ch), group_size, **options)
        out["up"].append(qu)
        q = ExpertWeights(None if qg is None else qg.dequantize(x.dtype), qu.dequantize(x.dtype), w.down,
                          w.gate_bias, w.up_bias, w.down_bias)
        a = experts.activation(e, x, q).float()
        out["down"].append(reference_gptq(w.down, a.t() @ a, _row_bits(bits, "down", e, ch), group_size,
                                          axis=bits.down_axis, **options))
    for m, per_expert in out.items():
        for e, q in enumerate(per_expert):
            sink(m, e, q)
    return fallback


def collected(routed, layer, bits, *args, **kwargs):
    """``(matrices {m: [rows per expert]}, fallback)`` of ``routed`` (quantize_routed or the reference); every
    matrix must reach the sink exactly once."""
    got = {m: [None] * layer.num_experts for m in bits.rows()}

    def sink(m, e, q):
        assert got[m][e] is None, f"expert {e}'s {m} handed over twice"
        got[m][e] = q

    fallback = routed(layer, bits, *args, sink, **kwargs)
    assert all(q is not None for per in got.values() for q in per)
    return got, fallback


def assert_same(got: QuantizedRows, expected: QuantizedRows) -> None:
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.scale, expected.scale) and torch.equal(got.zero, expected.zero)
    assert torch.equal(got.bits, expected.bits) and got.group_size == expected.group_size
    torch.testing.assert_close(got.dequantize(), expected.dequantize(), rtol=0, atol=1e-6)


# ---- matrices -------------------------------------------------------------------------------------------
def random_problem(seed, rows, cols, tokens, axis, dead=0, dtype=torch.float32):
    """A weight, a (possibly rank-deficient) Hessian with ``dead`` unseen inputs, and mixed bits incl. 1-bit rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen) * torch.rand(cols, generator=gen) * 3
    x[:, torch.randperm(cols, generator=gen)[:dead]] = 0
    weight = torch.randn(rows, cols, generator=gen).to(dtype)
    bits = torch.randint(1, 9, (rows if axis == "out" else cols,), generator=gen)
    bits[:3] = 1
    return weight, x.t() @ x, bits


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows,cols,tokens,group_size,dead", [(24, 300, 500, 32, 0), (33, 70, 20, 16, 5),
                                                              (20, 200, 1000, 128, 7), (140, 40, 60, 48, 0)])
def test_batched_equals_per_matrix_reference(axis, act_order, rows, cols, tokens, group_size, dead):
    """Several blocks, short last groups, rank-deficient and dead-input Hessians, bf16 weights, mixed bits incl. 1."""
    problems = [random_problem(seed, rows, cols, tokens, axis, dead, dtype)
                for seed, dtype in enumerate([torch.float32, torch.bfloat16, torch.float32])]
    expected = [reference_gptq(w, h, b, group_size, axis=axis, act_order=act_order) for w, h, b in problems]
    weights, hessians, bits = (torch.stack([p[i] for p in problems]) for i in range(3))  # bf16 -> float32, exact
    batched = gptq_batched(weights, hessians, bits, group_size, axis=axis, act_order=act_order)
    for (w, h, b), got, want in zip(problems, batched, expected):
        assert_same(got, want)
        assert_same(gptq(w, h, b, group_size, axis=axis, act_order=act_order), want)  # the one-matrix case


def test_damping_grows_per_matrix():
    """A Hessian that needs 10x damping is escalated alone; its batch neighbours keep the first damping."""
    weight, good, bits = random_problem(0, 16, 40, 200, "out")
    bad = good.clone()
    bad[:2, :2] = torch.tensor([[1.0, 1.05], [1.05, 1.0]]) * good.diagonal().mean()  # indefinite at λ = 0.01·mean
    bad[:2, 2:], bad[2:, :2] = 0, 0
    with pytest.raises(torch.linalg.LinAlgError):  # not positive definite at the first damping
        torch.linalg.cholesky(bad.double() + 0.01 * bad.diagonal().double().mean() * torch.eye(40, dtype=torch.float64))
    got = gptq_batched(torch.stack([weight] * 3), torch.stack([good, bad, good]), torch.stack([bits] * 3), 16)
    for q, h in zip(got, (good, bad, good)):
        assert_same(q, reference_gptq(weight, h, bits, 16))
    hopeless = good.clone()
    hopeless[0, 0] = torch.nan
    with pytest.raises(ValueError, match=r"matrix \[1\] of this batch is not positive definite"):
        gptq_batched(torch.stack([weight] * 2), torch.stack([good, hopeless]), torch.stack([bits] * 2), 16)


def test_bad_batched_inputs():
    w, h, b = random_problem(0, 8, 16, 30, "out")
    with pytest.raises(ValueError, match=r"bits must have one value per quantized row"):
        gptq_batched(w[None], h[None], b[None, :4], 8)
    with pytest.raises(ValueError, match=r"weight \[B, out, in\] and hessian \[B, in, in\]"):
        gptq_batched(w[None], h, b[None], 8)


# ---- layers and models -------------------------------------------------------------------------------------
def layer_problem(arch, method, prune_first=False):
    model = tiny_moe(arch)
    if prune_first:
        prune(model, collect_stats(model, CALIB), 0.4, allocation="layer")
    layer = moe_layers(model)[0]
    inputs = capture_layer_inputs(model, layer, CALIB)
    stats = collect_stats(model, CALIB) if method != "uniform" else None
    config = QuantizeConfig(method=method, avg_bits=2.5)
    scores = None if stats is None else stats.scores(config.score, model=model)[layer.index].routed
    energy = None if stats is None else stats.layers[layer.index]["sq_sum"]
    ctx = AllocationContext(layer, config, scores, energy, None if stats is None else stats.layers[layer.index], inputs)
    return layer, BIT_ALLOCATIONS[method].fn(ctx), inputs


@pytest.mark.parametrize("arch,method,prune_first", [("qwen3_moe", "camera", False), ("qwen3_moe", "matrix", False),
                                                     ("qwen3_moe", "camera", True), ("gpt_oss", "camera", False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_quantize_routed_equals_per_matrix_loop(arch, method, prune_first, act_order, monkeypatch):
    """Chunked, gate/up-joint GPTQ of a whole layer equals the former per-matrix loop (incl. fallback experts),
    also with chunks of one expert (a tiny memory bound)."""
    layer, bits, inputs = layer_problem(arch, method, prune_first)
    if prune_first:
        assert len(set(layer.experts.widths().tolist())) > 1  # ragged: several width groups
    counts = torch.bincount(inputs.index.flatten(), minlength=layer.num_experts)
    min_tokens = int(counts.median()) + 1  # some experts fall back to all tokens, some do not
    expected, expected_fallback = collected(reference_quantize_routed, layer, bits, "gptq", inputs, 16,
                                            act_order=act_order, min_tokens=min_tokens)
    assert 0 < len(expected_fallback) < layer.num_experts
    calls = []
    original = quantizers.gptq_batched

    def spy(weight, *args, **kwargs):
        calls.append(weight.shape[0])
        return original(weight, *args, **kwargs)

    monkeypatch.setattr("camera_pl.quant.layer.gptq_batched", spy)
    for bound in (quantizers.GPTQ_CHUNK_BYTES, 1):
        monkeypatch.setattr(quantizers, "GPTQ_CHUNK_BYTES", bound)
        calls.clear()
        got, fallback = collected(quantize_routed, layer, bits, "gptq", inputs, 16, act_order=act_order,
                                  min_tokens=min_tokens)
        assert fallback == expected_fallback
        assert set(calls) == {1} if bound == 1 else max(calls) > 1  # the bound decides the chunk sizes
        for m in expected:
            for q, want in zip(got[m], expected[m], strict=True):
                assert_same(q, want)


def test_chunk_size_respects_the_bound(monkeypatch):
    for rows, cols in [(1536, 2048), (2048, 768), (16, 32)]:
        n = gptq_chunk_size(rows, cols)
        assert n >= 1 and (n == 1 or n * 8 * (3 * cols * cols + 2 * rows * cols) <= quantizers.GPTQ_CHUNK_BYTES)
    monkeypatch.setattr(quantizers, "GPTQ_CHUNK_BYTES", 0)
    assert gptq_chunk_size(16, 32) == 1


def test_quantize_with_gptq_equals_per_matrix_loop(monkeypatch):
    """Through quantize(): sequential calibration over all layers, biases (gpt_oss), packing."""
    outputs = []
    for routed in (quantize_routed, reference_quantize_routed):
        monkeypatch.setattr(quant_api, "quantize_routed", routed)
        model = tiny_moe("gpt_oss")
        report = quantize(model, collect_stats(model, CALIB), method="camera", avg_bits=2.5, quantizer="gptq",
                          calib_dataloader=CALIB, group_size=16, min_tokens=20)
        with torch.no_grad():
            outputs.append((model(**make_batch(seed=99, batch=2, seq=16)).logits, report.to_markdown()))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=0, atol=1e-5)
    assert outputs[0][1] == outputs[1][1]
