"""CAMERA-Q's measured cost: every micro-expert's output error at each bit choice, against brute force."""

import pytest
import torch

from camera_pl import collect_stats, moe_layers, prune, quantize
from camera_pl.experts.base import ExpertWeights
from camera_pl.quant.calibration import capture_layer_inputs
from camera_pl.quant.config import QuantizeConfig
from camera_pl.quant.methods import micro_output_errors
from camera_pl.quant.quantizers import rtn
from camera_pl.testing import tiny_moe

from conftest import make_batch

CALIB = [make_batch(seed=i, batch=4, seq=24) for i in range(2)]
CHOICES = (1, 2, 4)


@torch.no_grad()
def brute_force(layer, inputs, e: int, j: int, bits: int, group_size: int, metric=None) -> float:
    """Σ g²‖y_q − y‖² over expert e's routed tokens with only micro-expert j's rows rounded to ``bits``
    (with ``metric``: Σ Δfᵀ M Δf on the expert's own outputs, no routing weight)."""
    experts = layer.experts
    tok, slot = inputs.routed(e)
    x, g = inputs.hidden[tok].float(), inputs.weights[tok, slot].float()[:, None]
    w = experts.weights(e, torch.float32)
    pos = int((experts.channels(e) == j).nonzero())

    def one_row(m: torch.Tensor) -> torch.Tensor:
        m = m.clone()
        m[pos] = rtn(m[pos:pos + 1], bits, group_size).dequantize()[0]
        return m

    q = ExpertWeights(None if w.gate is None else one_row(w.gate), one_row(w.up), one_row(w.down.t()).t(),
                      w.gate_bias, w.up_bias, w.down_bias)
    y = experts.output(e, experts.activation(e, x, w), w)
    yq = experts.output(e, experts.activation(e, x, q), q)
    if metric is None:
        return float((g * (yq - y)).square().sum())
    diff = (yq - y).double()
    m = metric.double()
    return float(((diff @ m) * diff).sum() if m.dim() == 2 else (diff * m * diff).sum())


@pytest.mark.parametrize("arch,pruned", [("qwen3_moe", False), ("gpt_oss", False), ("qwen2_moe", True)])
def test_micro_output_errors_equal_brute_force(arch, pruned):
    torch.manual_seed(0)
    model = tiny_moe(arch)
    if pruned:  # ragged experts: kept channels differ per expert, removed ones cost nothing
        prune(model, collect_stats(model, CALIB), 0.4, allocation="layer")
    layer = moe_layers(model)[0]
    inputs = capture_layer_inputs(model, layer, CALIB)
    cost = micro_output_errors(layer, inputs, CHOICES, group_size=8)
    assert cost.shape == (layer.num_experts, layer.intermediate_size, len(CHOICES))
    checked = 0
    for e in range(layer.num_experts):
        if inputs.routed(e)[0].numel() == 0:
            assert cost[e].abs().max() == 0
            continue
        channels = layer.experts.channels(e).tolist()
        for j in channels[:2] + channels[-1:]:
            for k, b in enumerate(CHOICES):
                expected = brute_force(layer, inputs, e, j, b, 8)
                assert cost[e, j, k].item() == pytest.approx(expected, rel=1e-3, abs=1e-9)
                checked += 1
        missing = sorted(set(range(layer.intermediate_size)) - set(channels))
        assert all(cost[e, j].abs().max() == 0 for j in missing)
    assert checked >= 9
    assert (cost[..., 0] >= cost[..., -1]).float().mean() > 0.9  # 1 bit costs more than 4 almost everywhere


def test_output_cost_spends_the_budget_and_needs_calibration():
    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, CALIB)
    with pytest.raises(ValueError, match="calibration data"):
        quantize(model, stats, method="camera", avg_bits=2.5, cost="output")
    report = quantize(model, stats, method="camera", avg_bits=2.5, cost="output", calib_dataloader=CALIB)
    assert abs(report.avg_bits - 2.5) < 0.05


@pytest.mark.parametrize("options,message", [
    (dict(method="matrix", avg_bits=2.5, cost="output"), "applies to method='camera' with avg_bits"),
    (dict(method="camera", cost="output"), "applies to method='camera' with avg_bits"),
    (dict(method="camera", avg_bits=2.5, cost="measured"), "cost"),
    (dict(method="channel", avg_bits=2.5, cost="proxy"), "applies to method='camera' with avg_bits"),
])
def test_output_cost_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizeConfig(**options)


def test_needs_calibration_follows_the_cost():
    assert not QuantizeConfig(method="camera", avg_bits=2.5).needs_calibration  # auto: measures if data is given
    assert QuantizeConfig(method="camera", avg_bits=2.5, cost="output").needs_calibration


def test_auto_cost_measures_whenever_calibration_data_is_given():
    from camera_pl import allocate

    model = tiny_moe("qwen3_moe")
    stats = collect_stats(model, CALIB)

    def bits(**options):
        return {i: b.up for i, b in allocate(model, stats, method="camera", avg_bits=2.5, **options).items()}

    proxy, output = bits(cost="proxy"), bits(cost="output", calib_dataloader=CALIB)
    assert all(torch.equal(a, b) for a, b in zip(bits().values(), proxy.values()))
    auto = bits(calib_dataloader=CALIB)
    assert all(torch.equal(a, b) for a, b in zip(auto.values(), output.values()))
    assert any(not torch.equal(a, b) for a, b in zip(proxy.values(), output.values()))


@pytest.mark.parametrize("full", [True, False])
def test_loss_metric_errors_equal_brute_force(full):
    torch.manual_seed(0)
    model = tiny_moe("qwen3_moe")
    layer = moe_layers(model)[0]
    inputs = capture_layer_inputs(model, layer, CALIB)
    hidden, num = layer.hidden_size, layer.num_experts
    g = torch.randn(num, 3 * hidden, hidden)
    curvature = g.transpose(1, 2) @ g if full else g.square().sum(1)  # PSD, like Σ ∇f ∇fᵀ (or its diagonal)
    counts = torch.arange(1, num + 1)
    cost = micro_output_errors(layer, inputs, CHOICES, 8, curvature, counts)
    checked = 0
    for e in range(num):
        if inputs.routed(e)[0].numel() == 0:
            continue
        metric = curvature[e] / counts[e]
        for j in (0, layer.intermediate_size - 1):
            for k, b in enumerate(CHOICES):
                assert cost[e, j, k].item() == pytest.approx(brute_force(layer, inputs, e, j, b, 8, metric), rel=1e-3)
                checked += 1
    assert checked >= 6


def test_loss_cost_needs_heapr_statistics_and_auto_uses_them():
    from camera_pl import allocate

    model = tiny_moe("qwen3_moe")
    plain, curved = collect_stats(model, CALIB), collect_stats(model, CALIB, heapr_mode="auto")
    with pytest.raises(ValueError, match="heapr_mode"):
        allocate(model, plain, method="camera", avg_bits=2.5, cost="loss", calib_dataloader=CALIB)

    def bits(stats, **options):
        out = allocate(model, stats, method="camera", avg_bits=2.5, calib_dataloader=CALIB, **options)
        return [b.up for b in out.values()]

    loss, output = bits(curved, cost="loss"), bits(curved, cost="output")
    assert all(torch.equal(a, b) for a, b in zip(bits(curved), loss))  # auto: the loss metric when it can
    assert all(torch.equal(a, b) for a, b in zip(bits(plain), output))  # auto without curvature: output errors
    assert any(not torch.equal(a, b) for a, b in zip(loss, output))
