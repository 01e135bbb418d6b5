"""Tiny randomly initialised MoE models built from real transformers configs.

Used by the tests and benchmarks (and useful for trying camera_pl without downloads).
Each config keeps the architecture's distinguishing features: shared experts with a
sigmoid gate (Qwen2-MoE), dense first layers (DeepSeek-V3 ``first_k_dense_replace``,
Qwen2-MoE ``decoder_sparse_step``), group-limited routing with correction bias
(DeepSeek-V3), sparsemixer (Phi-MoE), interleaved transposed biased experts (GPT-OSS).
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

_COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                         decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=6,
                                      num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=3)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                                             topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, norm_topk_prob=True,
                                             routed_scaling_factor=2.5, num_key_value_heads=4)),
    "phimoe": ("PhimoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=6,
                                    num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=6,
                                     num_experts_per_tok=2, head_dim=8, sliding_window=16,
                                     layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v2": ("DeepseekV2Config", dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             num_key_value_heads=4, n_group=4, topk_group=2,
                                             topk_method="group_limited_greedy")),
    "glm4_moe": ("Glm4MoeConfig", dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                       first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8,
                                       norm_topk_prob=True)),
    "flex_olmo": ("FlexOlmoConfig", dict(num_hidden_layers=2, intermediate_size=16, num_experts=8,
                                         num_experts_per_tok=2)),
}


def tiny_moe(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A tiny causal LM of ``model_type`` with random weights (router biases randomised too)."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"No tiny config for {model_type!r}; available: {', '.join(TINY_CONFIGS)}.")
    config_name, kwargs = TINY_CONFIGS[model_type]
    config = getattr(transformers, config_name)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                continue
            if param.dim() == 1:  # biases (GPT-OSS experts/router) start at zero: make them matter
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.2, 0.2)
    return model.eval()
