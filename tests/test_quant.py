"""Mixed-precision expert quantization: quantizers, packed storage, allocations, PMQ, round trips, errors."""

import itertools

import pytest
import torch

from camera_pl import collect_stats, moe_layers, quantize
from camera_pl.experts.quantized import QuantizedExperts, pack_codes, unpack_codes
from camera_pl.quant.allocation import pmq_bits, solve_budget
from camera_pl.quant.calibration import capture_layer_inputs
from camera_pl.quant.config import QuantizeConfig
from camera_pl.quant.layer import WriteBack, quantize_routed, stored_row_bits
from camera_pl.quant.methods import AllocationContext, uniform_allocation
from camera_pl.quant.allocation import row_errors
from camera_pl.quant.quantizers import gptq, rtn
from camera_pl.serialization import load, save
from camera_pl.testing import tiny_moe

from conftest import make_batch

CALIB = [make_batch(seed=i, batch=4, seq=24) for i in range(3)]
TEST = make_batch(seed=99, batch=2, seq=16)


@pytest.fixture(scope="module")
def stats_of():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = collect_stats(tiny_moe(arch), CALIB)
        return cache[arch]

    return get


def logits(model):
    with torch.no_grad():
        return model(**TEST).logits


def test_rtn_error_decreases_with_bits():
    w = torch.randn(16, 300)
    errors = [(rtn(w, b, 128).dequantize() - w).pow(2).sum().item() for b in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    one = rtn(w, 1, 128)  # sign x mean |W| of each group
    torch.testing.assert_close(one.dequantize()[:, :128].abs().mean(1), w[:, :128].abs().mean(1), rtol=1e-3, atol=0)
    mixed = rtn(w, torch.tensor([1, 2, 8, 3] * 4), 100)
    for r, b in enumerate(mixed.bits.tolist()):
        torch.testing.assert_close(mixed.dequantize()[r], rtn(w[r:r + 1], b, 100).dequantize()[0])
    assert not torch.isnan(rtn(torch.zeros(2, 8), 2).dequantize()).any()


@pytest.mark.parametrize("group_size", [16, 12, 128])
def test_row_errors_are_rtn_errors(group_size, monkeypatch):
    """The chunked, range-sharing error pass equals RTN + dequantize bit for bit (padded groups, weights, chunks)."""
    import camera_pl.quant.allocation as allocation

    w = torch.randn(70, 40, dtype=torch.bfloat16)
    weight = torch.rand(70, 40)
    monkeypatch.setattr(allocation, "ROW_CHUNK", 40 * 9)  # several chunks, the last one short
    choices = (1, 2, 3, 4, 8)
    for cw in (None, weight, weight[0]):
        expected = torch.stack([(((rtn(w, b, group_size).dequantize() - w.float()) ** 2) *
                                 (1 if cw is None else cw)).sum(1).double() for b in choices], dim=1)
        assert torch.equal(row_errors(w, choices, group_size, cw), expected)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, 37), codes)
    from camera_pl.experts.quantized import _codes

    for cpu in (True, False):  # the CPU and the GPU ways agree
        assert torch.equal(_codes(packed, bits, 37, cpu=cpu), codes.float())


@pytest.mark.parametrize("arch,method", [("qwen2_moe", "camera"), ("gpt_oss", "camera"), ("deepseek_v3", "channel"),
                                         ("mixtral", "matrix"), ("phimoe", "camera")])
def test_packed_forward_equals_fake_quant(arch, method, stats_of):
    kwargs = dict(method=method, avg_bits=None if method == "camera" else 2.5, group_size=16)
    fake, packed = tiny_moe(arch), tiny_moe(arch)
    quantize(fake, stats_of(arch), pack=False, **kwargs)
    report = quantize(packed, stats_of(arch), pack=True, **kwargs)
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(packed))
    torch.testing.assert_close(logits(packed), logits(fake), rtol=0, atol=1e-5)
    assert logits(packed).sub(logits(tiny_moe(arch))).abs().max() > 1e-3  # it did quantize
    # scales, zeros and bit maps of 16-wide groups add (16 + 8 + 8·groups/row) / 16 ~ 1.6 bits at most
    assert report.avg_bits < report.bits_per_param < report.avg_bits + 2


def test_gptq_beats_rtn_on_calibrated_layer():
    model = tiny_moe("qwen3_moe")
    layer = moe_layers(model)[0]
    inputs = capture_layer_inputs(model, layer, CALIB)
    reference = layer.module(inputs.hidden, inputs.index, inputs.weights)
    bits = uniform_allocation(AllocationContext(layer, QuantizeConfig(method="uniform", avg_bits=2)))
    errors = {}
    for quantizer in ("rtn", "gptq"):
        packed = QuantizedExperts.for_bits(layer.experts, stored_row_bits(layer, bits), 16, bits.down_axis)
        quantize_routed(layer, bits, quantizer, inputs, 16, packed.write_rows)
        with torch.no_grad():
            errors[quantizer] = (packed(inputs.hidden, inputs.index, inputs.weights) - reference).pow(2).sum().item()
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
    x = torch.randn(500, 64) @ torch.randn(64, 64)
    w = torch.randn(32, 64)
    for axis in ("out", "in"):
        for act_order in (False, True):
            q = gptq(w, x.t() @ x, 3, 32, axis=axis, act_order=act_order).dequantize()
            q = q if axis == "out" else q.t()
            r = rtn(w, 3, 32) if axis == "out" else rtn(w.t(), 3, 32)
            r = r.dequantize() if axis == "out" else r.dequantize().t()
            assert ((q - w) @ x.t()).pow(2).sum() < ((r - w) @ x.t()).pow(2).sum()


def test_rarely_routed_experts_fall_back_to_layer_hessian():
    model = tiny_moe("mixtral")
    layer = moe_layers(model)[0]
    inputs = capture_layer_inputs(model, layer, CALIB[:1], max_tokens=4)
    bits = uniform_allocation(AllocationContext(layer, QuantizeConfig(method="uniform", avg_bits=3)))
    got = []
    fallback = quantize_routed(layer, bits, "gptq", inputs, 16, lambda m, e, q: got.append(q), min_tokens=10**6)
    assert fallback == list(range(layer.num_experts))
    assert len(got) == 3 * layer.num_experts and all(torch.isfinite(q.dequantize()).all() for q in got)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_experts_reach_the_sink_as_they_are_quantized(quantizer, monkeypatch):
    """Each expert's matrices are handed over before the next expert is quantized (GPTQ chunks of one expert), so a
    layer's unpacked codes never exist all at once; packing them that way equals the fake-quantized layer."""
    import camera_pl.quant.quantizers as quantizers

    monkeypatch.setattr(quantizers, "GPTQ_CHUNK_BYTES", 1)
    model = tiny_moe("qwen3_moe")
    layer = moe_layers(model)[0]
    inputs = capture_layer_inputs(model, layer, CALIB)
    bits = uniform_allocation(AllocationContext(layer, QuantizeConfig(method="uniform", avg_bits=3)))
    order = []
    packed = QuantizedExperts.for_bits(layer.experts, stored_row_bits(layer, bits), 16, bits.down_axis)

    def sink(m, e, q):
        order.append((e, m))
        packed.write_rows(m, e, q)

    quantize_routed(layer, bits, quantizer, inputs, 16, sink)
    assert order == [(e, m) for e in range(layer.num_experts) for m in ("gate", "up", "down")]
    quantize_routed(layer, bits, quantizer, inputs, 16, WriteBack(layer, bits))  # fake quantization in place
    with torch.no_grad():
        torch.testing.assert_close(packed(inputs.hidden, inputs.index, inputs.weights),
                                   layer.module(inputs.hidden, inputs.index, inputs.weights), rtol=0, atol=1e-5)


def test_write_rows_refuses_rows_of_another_allocation():
    layer = moe_layers(tiny_moe("qwen3_moe"))[0]
    bits = uniform_allocation(AllocationContext(layer, QuantizeConfig(method="uniform", avg_bits=3)))
    packed = QuantizedExperts.for_bits(layer.experts, stored_row_bits(layer, bits), 16, bits.down_axis)
    w = layer.experts.weights(0)
    with pytest.raises(ValueError, match=r"expert 0's up rows .* do not match the allocation"):
        packed.write_rows("up", 0, rtn(w.up, 4, 16))  # 4 bits where 3 were allocated
    with pytest.raises(ValueError, match=r"group size 8\).*group size 16"):
        packed.write_rows("up", 0, rtn(w.up, 3, 8))


@pytest.mark.parametrize("n,choices", [(5, (1, 2, 3)), (6, (1, 2, 3)), (4, (2, 3, 4, 8))])
def test_pmq_is_exactly_optimal_against_brute_force(n, choices):
    gen = torch.Generator().manual_seed(n)
    for trial in range(4):
        coef = torch.rand(n, len(choices), generator=gen).sort(dim=1, descending=True).values
        if trial == 3:
            coef = coef.round(decimals=1)  # ties: the fewest bits among equal costs
        low = (choices[-1] + choices[-2] + (n - 2) * choices[0]) / n
        for avg in (low, low + 0.3, (low + choices[-1]) / 2, choices[-1]):
            bits = pmq_bits(coef, choices, avg).tolist()
            col = {b: j for j, b in enumerate(choices)}
            feasible = [(sum(coef[i, col[b]].item() for i, b in enumerate(x)), sum(x))
                        for x in itertools.product(choices, repeat=n)
                        if sum(x) <= n * avg + 1e-9 and choices[-1] in x and choices[-2] in x]
            best_cost = min(cost for cost, _ in feasible)
            got = sum(coef[i, col[b]].item() for i, b in enumerate(bits))
            assert sum(bits) <= n * avg + 1e-9 and choices[-1] in bits and choices[-2] in bits
            assert abs(got - best_cost) < 1e-12
            assert sum(bits) == min(used for cost, used in feasible if abs(cost - best_cost) < 1e-12)
    with pytest.raises(ValueError, match="infeasible"):
        pmq_bits(torch.rand(n, len(choices)), choices, choices[0] + 0.01)


@pytest.mark.parametrize("method", ["camera", "matrix", "channel", "pmq"])
def test_budgeted_allocations_meet_avg_bits(method, stats_of):
    model = tiny_moe("qwen2_moe")
    report = quantize(model, stats_of("qwen2_moe"), method=method, avg_bits=2.5, calib_dataloader=CALIB, group_size=16)
    for layer in report.layers:
        assert layer.avg_bits <= 2.5 + 1e-9
        assert layer.avg_bits >= (2.3 if method != "pmq" else 2.0)
        assert layer.shared_bits == 3 and layer.shared_bytes > 0
    assert torch.isfinite(logits(model)).all()


def test_other_linears_are_fake_quantized_on_request():
    model = tiny_moe("qwen3_moe")
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    before = q_proj.detach().clone()
    quantize(model, method="uniform", avg_bits=8, other_bits=3, group_size=16)
    assert q_proj.unique().numel() < before.unique().numel()
    torch.testing.assert_close(q_proj, rtn(before, 3, 16).dequantize())


def test_solve_budget_prefers_costly_units():
    cost = torch.tensor([[10.0, 5.0, 0.0], [1.0, 0.1, 0.0], [1.0, 0.1, 0.0]])  # optimum: 4, 1, 1
    bits = solve_budget(cost, torch.ones(3), (1, 2, 4), 2.0)
    assert bits.tolist() == [4, 1, 1]


def test_save_load_round_trip(tmp_path, stats_of):
    model = tiny_moe("gpt_oss")
    report = quantize(model, stats_of("gpt_oss"), method="channel", avg_bits=2.0, group_size=16)
    before = logits(model)
    loaded = load(save(model, tmp_path / "q"))
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(loaded))
    assert torch.equal(logits(loaded), before)
    assert report.expert_bytes == sum(layer.module.memory()["weight_bytes"] for layer in moe_layers(loaded))


def test_bf16_model_matches_fake_quant(stats_of):
    fake, packed = tiny_moe("olmoe", dtype=torch.bfloat16), tiny_moe("olmoe", dtype=torch.bfloat16)
    stats = collect_stats(tiny_moe("olmoe"), CALIB)
    quantize(fake, stats, pack=False)
    quantize(packed, stats)
    assert logits(packed).dtype == torch.bfloat16
    torch.testing.assert_close(logits(packed), logits(fake), rtol=0, atol=1e-2)


def test_clear_errors(stats_of):
    with pytest.raises(ValueError, match="1..8"):
        rtn(torch.randn(2, 4), 9)
    with pytest.raises(ValueError, match="1..8"):
        rtn(torch.randn(2, 4), 0)
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="collect_stats"):
        quantize(model, None, method="camera")
    with pytest.raises(ValueError, match="infeasible"):
        quantize(model, stats_of("qwen3_moe"), method="camera", avg_bits=0.5)
    with pytest.raises(ValueError, match="infeasible"):
        quantize(model, stats_of("qwen3_moe"), method="pmq", avg_bits=1.2, calib_dataloader=CALIB)
    with pytest.raises(ValueError, match="calibration"):
        quantize(model, stats_of("qwen3_moe"), quantizer="gptq")
    with pytest.raises(ValueError, match="whole bits"):
        quantize(model, method="uniform", avg_bits=2.5)
    with pytest.raises(ValueError, match="sum to 1"):
        quantize(model, stats_of("qwen3_moe"), groups=((8, 0.5), (2, 0.2)))
    assert torch.equal(logits(model), logits(tiny_moe("qwen3_moe")))  # nothing was changed by failed calls
    quantize(model, method="uniform", avg_bits=4)
    with pytest.raises(ValueError, match="already"):
        quantize(model, method="uniform", avg_bits=4)


def test_explicit_weights_match_stored_weights():
    model = tiny_moe("gpt_oss")
    layer = moe_layers(model)[0]
    experts, x = layer.experts, torch.randn(7, layer.hidden_size)
    w = experts.weights(2)
    torch.testing.assert_close(experts.output(2, experts.activation(2, x, w), w), experts.output(2, experts.activation(2, x)))


def _both_paths(model, monkeypatch, run):
    """``run(model)`` through the grouped dequantized path and through the per-expert loop."""
    layers = moe_layers(model)
    x = torch.zeros(1, layers[0].hidden_size, dtype=next(model.parameters()).dtype)
    assert all(layer.experts.grouped_weights(x) is not None for layer in layers)  # the grouped path is taken
    grouped = run(model)
    with monkeypatch.context() as patch:
        patch.setattr(QuantizedExperts, "grouped_weights", lambda self, x, hit=None: None)
        looped = run(model)
    return grouped, looped


@pytest.mark.parametrize("method", ["camera", "matrix"])
def test_grouped_forward_equals_per_expert_forward(arch, method, stats_of, monkeypatch, tmp_path):
    model = tiny_moe(arch)
    quantize(model, stats_of(arch), method=method, avg_bits=2.5, group_size=16)
    grouped, looped = _both_paths(model, monkeypatch, logits)
    torch.testing.assert_close(grouped, looped, rtol=0, atol=1e-5)
    loaded = load(save(model, tmp_path / "q"))
    grouped_loaded, _ = _both_paths(loaded, monkeypatch, logits)
    torch.testing.assert_close(grouped_loaded, looped, rtol=0, atol=1e-5)


def test_cpu_stacks_order_micro_experts_by_bit_width(stats_of, monkeypatch):
    """On a CPU, each expert's micro-experts sit in its stacks by bit-width, every (expert, bit-width) block one
    run of rows written in place: the same logits and observed activations as the per-expert loop."""
    model = tiny_moe("qwen3_moe")
    quantize(model, stats_of("qwen3_moe"), avg_bits=2.5, group_size=16)
    experts = moe_layers(model)[0].experts
    plan = experts._plan(torch.device("cpu"))
    assert len(plan.runs["gate"]) > 1 and all(r is not None for r in plan.runs["gate"].values())
    bits = experts.gate_bits.view(experts.num_experts, -1)
    slot_bits = bits.gather(1, plan.channels)  # bit-width of each slot: ascending within every expert
    assert bool((slot_bits.diff(dim=1) >= 0).all()) and not torch.equal(plan.channels[0], torch.arange(bits.shape[1]))
    from camera_pl.experts import forward, quantized

    written, dequantize_into = [], quantized._dequantize_into
    monkeypatch.setattr(quantized, "_dequantize_into", lambda out, dest, *a: written.append(type(dest)) or
                        dequantize_into(out, dest, *a))
    monkeypatch.setattr(forward, "GROUPED_BUDGET", {"cpu": 1})  # an expert per batch: one run per bit-width
    grouped, looped = _both_paths(model, monkeypatch, logits)
    assert int in written  # blocks written in place (the per-expert loop scatters)
    torch.testing.assert_close(grouped, looped, rtol=0, atol=1e-5)
    stats = _both_paths(model, monkeypatch, lambda m: collect_stats(m, CALIB[:1]))
    for a, b in zip(*(s.layers.values() for s in stats)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_grouped_forward_of_pruned_experts_and_bf16(stats_of, monkeypatch):
    from camera_pl import prune

    model = tiny_moe("qwen3_moe")
    prune(model, collect_stats(model, CALIB), 0.4, allocation="layer")
    assert not moe_layers(model)[0].experts.full_width
    quantize(model, collect_stats(model, CALIB), avg_bits=2.5, group_size=16)
    grouped, looped = _both_paths(model, monkeypatch, logits)
    torch.testing.assert_close(grouped, looped, rtol=0, atol=1e-5)
    stats = _both_paths(model, monkeypatch, lambda m: collect_stats(m, CALIB[:1]))  # observed activations
    for a, b in zip(*(s.layers.values() for s in stats)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    half = tiny_moe("olmoe", dtype=torch.bfloat16)
    quantize(half, stats_of("olmoe"), avg_bits=2.5, group_size=16)
    grouped, looped = _both_paths(half, monkeypatch, logits)
    assert grouped.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, looped, rtol=0, atol=2e-2)


@pytest.mark.parametrize("arch,method,dtype", [("qwen3_moe", "camera", torch.float32),
                                               ("gpt_oss", "camera", torch.float32),
                                               ("deepseek_v3", "channel", torch.float32),  # down rows per output
                                               ("olmoe", "camera", torch.bfloat16)])
def test_decode_sized_grouped_forward_builds_only_hit_experts(arch, method, dtype, stats_of, monkeypatch):
    from camera_pl.experts import forward

    kwargs = dict(method=method, avg_bits=2.5, group_size=16)
    fake, packed = tiny_moe(arch, dtype=dtype), tiny_moe(arch, dtype=dtype)
    quantize(fake, stats_of(arch), pack=False, **kwargs)
    quantize(packed, stats_of(arch), **kwargs)
    layer, fake_layer = moe_layers(packed)[0], moe_layers(fake)[0]
    experts = layer.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, experts.hidden_size, generator=gen).to(dtype)
    weights = torch.rand(3, 2, generator=gen).to(dtype)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for hit in ([1, 5], [2, 3], [0, 5]):  # scattered and consecutive experts, one token each or shared
        index = torch.tensor([hit, hit[::-1], hit])
        built = experts.grouped_weights(x, hit)
        assert built.experts == hit and built.up.shape[0] == built.down.shape[0] == 2
        for e, up in zip(hit, built.up):  # the stacks hold exactly those experts' dequantized weights
            slots = slice(None) if built.channels is None else built.channels[e]  # unpruned: channel = row
            assert torch.equal(experts.layout.split(up.t(), 0)[1], experts.weights(e, dtype).up[slots])
        grouped = layer.module(x, index, weights)
        with monkeypatch.context() as patch:
            patch.setattr(forward, "GROUPED_BUDGET", {"cpu": 1})  # one expert per grouped_weights call
            torch.testing.assert_close(layer.module(x, index, weights), grouped, rtol=0, atol=atol)
            patch.setattr(QuantizedExperts, "grouped_weights", lambda self, x, hit=None: None)
            torch.testing.assert_close(layer.module(x, index, weights), grouped, rtol=0, atol=atol)
        torch.testing.assert_close(fake_layer.module(x, index, weights), grouped, rtol=0, atol=atol)


def test_pmq_weight_over_selected_tokens_changes_w_only(stats_of):
    """pmq_weight='selected' takes w from the router probability of the routed slots (MC's code)."""
    from camera_pl import QuantizeConfig
    from camera_pl.quant.api import allocate

    model = tiny_moe("qwen3_moe")
    stats = stats_of("qwen3_moe")
    calib = [make_batch()]
    for index, entry in stats.layers.items():  # selected mass never exceeds the total and is positive where routed
        assert (entry["selected_prob_sum"] <= entry["prob_sum"] + 1e-6).all()
        assert ((entry["selected_prob_sum"] > 0) == (entry["count"] > 0)).all()
    both = {w: allocate(model, stats, QuantizeConfig(method="pmq", avg_bits=2.5, pmq_weight=w), calib_dataloader=calib)
            for w in ("all", "selected")}
    assert all(abs(bits.avg_bits() - 2.5) < 0.5 for alloc in both.values() for bits in alloc.values())
    legacy = type(stats)(stats.signature, {i: {k: v for k, v in e.items() if k != "selected_prob_sum"}
                                           for i, e in stats.layers.items()}, stats.tokens, stats.meta)
    with pytest.raises(ValueError, match="collect them again"):
        allocate(model, legacy, QuantizeConfig(method="pmq", avg_bits=2.5, pmq_weight="selected"),
                 calib_dataloader=calib)
    with pytest.raises(ValueError, match="pmq_weight"):
        QuantizeConfig(method="pmq", avg_bits=2.5, pmq_weight="some")


def test_moving_quantized_experts_rebuilds_their_cached_plans(stats_of):
    """The forward's cached plans hold the stored buffers; a move (.to, .cuda: new tensors) drops them."""
    model = tiny_moe("qwen3_moe")
    quantize(model, stats_of("qwen3_moe"), avg_bits=2.5, group_size=16)
    module = moe_layers(model)[0].module
    stores = module._stores(torch.device("cpu"))
    assert stores["up"][0].codes is module.get_buffer(f"up_q{stores['up'][0].bits}")
    module._apply(lambda t: t.clone())  # what a device move does to every buffer
    assert module._plans == {}
    moved = module._stores(torch.device("cpu"))["up"][0]
    assert moved.codes is module.get_buffer(f"up_q{moved.bits}") and moved.codes is not stores["up"][0].codes
