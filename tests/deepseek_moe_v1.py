"""A tiny stand-in for DeepSeek-MoE (v1) remote code, written for the tests.

transformers 5 has no class for ``model_type="deepseek"``; the real model ships its own
``modeling_deepseek.py``. This reproduces its MoE block's module structure and routing —
routed experts as an ``nn.ModuleList`` of gated MLPs, a ``gate`` holding a ``weight [E, H]``
and returning ``(topk_idx, topk_weight, aux_loss)`` (softmax scores, top-k, no
renormalisation unless ``norm_topk_prob``), shared experts without a gate and an
expert-by-expert forward loop — on Llama's attention and decoder layer.
"""

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN


class DeepseekConfig(LlamaConfig):
    model_type = "deepseek"

    def __init__(self, n_routed_experts: int = 8, num_experts_per_tok: int = 2, moe_intermediate_size: int = 16,
                 n_shared_experts: int = 1, norm_topk_prob: bool = False, scoring_func: str = "softmax",
                 first_k_dense_replace: int = 1, moe_layer_freq: int = 1, **kwargs):
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.n_shared_experts = n_shared_experts
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        super().__init__(**kwargs)


class DeepseekMLP(nn.Module):
    def __init__(self, config: DeepseekConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts  # the real gate sizes its auxiliary loss by it
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.randn(self.n_routed_experts, config.hidden_size) * 0.02)

    def forward(self, hidden_states: torch.Tensor):
        h = hidden_states.shape[-1]
        scores = nn.functional.linear(hidden_states.reshape(-1, h), self.weight).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, None


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.experts = nn.ModuleList(DeepseekMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slots = (topk_idx == e).nonzero(as_tuple=True)
            if tokens.numel():
                y.index_add_(0, tokens, expert(x[tokens]) * topk_weight[tokens, slots, None])
        return y.view(shape) + self.shared_experts(identity)


class DeepseekForCausalLM(LlamaForCausalLM):
    config_class = DeepseekConfig

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            if i >= config.first_k_dense_replace and i % config.moe_layer_freq == 0:
                layer.mlp = DeepseekMoE(config)
        self.post_init()


AutoConfig.register("deepseek", DeepseekConfig, exist_ok=True)
AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)


def tiny_deepseek_v1(seed: int = 0, **overrides) -> DeepseekForCausalLM:
    """Three layers (the first dense), 8 experts of width 16, top-2, one shared expert; random weights."""
    config = DeepseekConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not ("norm" in name and param.dim() == 1):
                param.normal_(0, 0.2)
    return model.eval()
