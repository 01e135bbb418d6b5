"""Adapters: every supported architecture is seen as routed + shared micro-experts, exactly."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import camera_pl
from camera_pl.arch.adapters import ArchitectureSpec, UnsupportedModelError, moe_layers, register_adapter
from camera_pl.testing import tiny_moe

from conftest import make_batch
from reference_math import capture_block_inputs, dense_layer

EXPECTED_MOE_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v3": [1, 2], "deepseek_v2": [1, 2], "glm4_moe": [1, 2]}


def test_layers_found_and_dense_layers_skipped(arch, model):
    layers = moe_layers(model)
    expected = EXPECTED_MOE_LAYERS.get(arch, list(range(model.config.num_hidden_layers)))
    assert [layer.index for layer in layers] == expected
    has_shared = arch in ("qwen2_moe", "deepseek_v3", "deepseek_v2", "glm4_moe")
    assert all((layer.shared is not None) == has_shared for layer in layers)


def test_micro_expert_decomposition_reproduces_block_output(arch, model):
    """y = sum_e g_e sum_j a_ej W_down[:, j] (+ shared) equals the block's own output."""
    batch = make_batch()
    layers = moe_layers(model)
    inputs, outputs = capture_block_inputs(model, layers, batch)
    for layer in layers:
        dense = dense_layer(layer, inputs[layer.index])
        torch.testing.assert_close(dense["y"].float(), outputs[layer.index], rtol=1e-4, atol=1e-5)


def test_per_expert_views_match_stacked_views(model):
    layer = moe_layers(model)[0]
    w, w1 = layer.experts.stacked(), layer.experts.weights(1)
    assert torch.equal(w1.up, w.up[1]) and torch.equal(w1.down, w.down[1])
    assert w1.gate is None or torch.equal(w1.gate, w.gate[1])
    fused = getattr(layer.module, layer.experts.layout.up_name)
    assert w.up.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view


def test_unsupported_model_names_class_and_fix():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*register_adapter"):
        moe_layers(dense)


def test_moe_architecture_without_moe_layers_is_an_error():
    config = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, mlp_only_layers=[0, 1])
    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        moe_layers(Qwen3MoeForCausalLM(config))


def test_register_adapter_hook():
    model = tiny_moe("mixtral")
    model.config.model_type = "my_mixtral_variant"
    with pytest.raises(UnsupportedModelError, match="my_mixtral_variant"):
        moe_layers(model)
    register_adapter("my_mixtral_variant", ArchitectureSpec())
    assert len(moe_layers(model)) == 2
    with pytest.raises(ValueError, match="overwrite=True"):
        register_adapter("my_mixtral_variant", ArchitectureSpec())
    assert "my_mixtral_variant" in camera_pl.supported_model_types()
