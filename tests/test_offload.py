"""Layer-by-layer (offloaded) execution gives the in-memory results, one decoder layer on the device at a time."""

import copy

import pytest
import torch

import camera_pl.offload as offload_module
from camera_pl import ConfigError, collect_stats, prune, quantize
from camera_pl.arch.adapters import decoder_layers
from camera_pl.offload import LayerByLayer, OffloadConfig
from camera_pl.testing import tiny_moe

from conftest import make_batch

# qwen3_moe: plain MoE; qwen2_moe: shared experts and a dense layer; gpt_oss: sliding and full attention layers
# (each layer gets its own mask)
ARCHS = ["qwen3_moe", "qwen2_moe", "gpt_oss"]
BATCHES = [make_batch(0), make_batch(1), make_batch(2)]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache_device", [None, "cpu"])
def test_collect_stats_layer_by_layer_equals_in_memory(arch, cache_device):
    model = tiny_moe(arch)
    max_tokens = 40  # stops after the second batch (26 + 26 unpadded tokens) in both paths
    want = collect_stats(model, BATCHES, max_tokens=max_tokens)
    got = collect_stats(model, BATCHES, max_tokens=max_tokens,
                        offload=OffloadConfig(execution_device="cpu", cache_device=cache_device))
    assert got.tokens == want.tokens and got.signature == want.signature
    for index, entry in want.layers.items():
        assert got.layers[index].keys() == entry.keys()
        for name, value in entry.items():
            torch.testing.assert_close(got.layers[index][name], value, rtol=0, atol=1e-5, msg=f"{index} {name}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [dict(sequential=True), dict(sequential=True, allocation="expert"),
                                     dict(method="naee")], ids=["sequential-layer", "sequential-expert", "naee"])
def test_prune_layer_by_layer_equals_in_memory(arch, options):
    a, b = tiny_moe(arch), tiny_moe(arch)
    want = prune(a, None, 0.5, calib_dataloader=BATCHES, **options)
    got = prune(b, None, 0.5, calib_dataloader=BATCHES, offload="cpu", **options)
    assert want.params_removed > 0
    assert got.summary() == want.summary()
    assert_same_weights(a, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [dict(method="camera", avg_bits=3, quantizer="gptq"),
                                     dict(method="pmq", avg_bits=2.5, quantizer="gptq"),
                                     dict(method="camera", avg_bits=3, quantizer="rtn", pack=False)],
                         ids=["camera-gptq", "pmq-gptq", "camera-rtn"])
def test_quantize_layer_by_layer_equals_in_memory(arch, options):
    a = tiny_moe(arch)
    b = copy.deepcopy(a)
    stats = collect_stats(a, BATCHES)
    want = quantize(a, stats, calib_dataloader=BATCHES, group_size=16, min_tokens=4, **options)
    got = quantize(b, stats, calib_dataloader=BATCHES, group_size=16, min_tokens=4, offload="cpu", **options)
    assert str(got) == str(want)
    assert_same_weights(a, b)  # packed codes, scales and bit maps (or the fake-quantized weights)
    with torch.no_grad():
        torch.testing.assert_close(b(**BATCHES[0]).logits, a(**BATCHES[0]).logits, rtol=0, atol=1e-5)


class MoveLog:
    """Stands in for the layer mover: records which decoder layers are "onloaded" (moved to the fake execution
    device cpu:0, which differs from the home device cpu) and checks every decoder layer forward runs onloaded,
    alone."""

    def __init__(self, model, execution):
        self.layers = decoder_layers(model)
        self.execution = execution
        self.onloaded: set[int] = set()
        self.peak = 0
        self.onloads: list[int] = []
        self.forwards = 0
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda module, args, i=index: self.check(i))

    def move(self, module, device):
        index = next(i for i, layer in enumerate(self.layers) if layer is module)
        if torch.device(device) == self.execution:
            self.onloaded.add(index)
            self.onloads.append(index)
        else:
            self.onloaded.discard(index)
        self.peak = max(self.peak, len(self.onloaded))

    def check(self, index):
        assert self.onloaded == {index}, f"layer {index} ran while {sorted(self.onloaded)} were onloaded"
        self.forwards += 1


@pytest.mark.parametrize("verb", ["stats", "sequential", "gptq"])
def test_one_decoder_layer_onloaded_at_a_time(verb, monkeypatch):
    model = tiny_moe("qwen2_moe")
    offload = OffloadConfig(execution_device="cpu:0")
    log = MoveLog(model, torch.device("cpu:0"))
    monkeypatch.setattr(offload_module, "_move", log.move)
    if verb == "stats":
        collect_stats(model, BATCHES, offload=offload)
    elif verb == "sequential":
        prune(model, None, 0.4, sequential=True, calib_dataloader=BATCHES, offload=offload)
    else:
        quantize(model, None, "uniform", avg_bits=4, quantizer="gptq", group_size=16, calib_dataloader=BATCHES,
                 offload=offload)
    layers = len(log.layers)
    assert log.onloads == list(range(layers)) and log.peak == 1 and not log.onloaded
    assert log.forwards >= layers * len(BATCHES)  # every layer ran the cached batches (while onloaded)


def test_cache_holds_each_layers_own_arguments():
    """gpt_oss alternates sliding-window and full attention: the cached arguments of its layers differ."""
    model = tiny_moe("gpt_oss")
    run = LayerByLayer(model, [make_batch(seq=24, pad_from=None)], "cpu")
    (batch,) = run.batches
    masks = [kwargs["attention_mask"] for _, kwargs in batch.calls]
    assert len(masks) == len(decoder_layers(model)) and not torch.equal(masks[0], masks[1])
    assert run.tokens == 3 * 24
    for step in run:  # the parameters require gradients; the layer-by-layer forward builds no graph
        step.run()
        assert not batch.hidden.requires_grad


def test_bad_offload_inputs():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ConfigError, match="execution_device"):
        OffloadConfig(execution_device="gpu0")
    with pytest.raises(TypeError, match="offload must be"):
        collect_stats(model, BATCHES, offload=3)
    with pytest.raises(ValueError, match="heapr_mode"):
        collect_stats(model, BATCHES, heapr_mode="diag", offload="cpu")
    with pytest.raises(ValueError, match="sequential heapr"):
        prune(model, None, 0.4, method="heapr", sequential=True, calib_dataloader=BATCHES, offload="cpu")
    with pytest.raises(ValueError, match="no tokens"):
        collect_stats(model, [], offload="cpu")
    decoder_layers(model)[0].to("meta")  # as accelerate's offload hooks or init_empty_weights leave weights
    with pytest.raises(ValueError, match="meta device"):
        collect_stats(model, BATCHES, offload="cpu")


def test_recipe_offload_section(tmp_path):
    from pathlib import Path

    from camera_pl.workflows.recipe import RecipeError, load_recipe, parse_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "offload_compress.yaml")
    assert recipe.offload == OffloadConfig(execution_device="auto", cache_device="cpu")
    assert parse_recipe(recipe.to_dict()).offload == recipe.offload
    assert "offload" not in load_recipe(Path(__file__).parent.parent / "recipes" / "mc_pmq.yaml").to_dict()
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\noffload: {execution_device: gpu0}\nsteps:\n  - save: {}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:2: 'offload': OffloadConfig.execution_device='gpu0'"):
        load_recipe(path)
