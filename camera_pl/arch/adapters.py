"""Architecture knowledge, kept in one place.

Every transformers 5.x MoE block has the same three parts: a router that returns
``(router_logits, top_k_weights, top_k_index)``, a fused experts module
(``gate_up_proj [E, 2I, H]`` + ``down_proj [E, H, I]``, or transposed, or without gate,
with flags set by ``use_experts_implementation``) and optionally shared experts with a
sigmoid gate. What differs between architectures is only *where* these parts live and how
router logits turn into per-expert probabilities. An :class:`ArchitectureSpec` records
that, the registry maps ``config.model_type`` to a spec, and :class:`MoELayer` gives the
algorithms one uniform view of a layer: per-expert and per-micro-expert weight views,
the router, the shared experts.

Register a new architecture with :func:`register_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from camera_pl.arch.forward import expert_activation, expert_output


def softmax_probs(logits: torch.Tensor) -> torch.Tensor:
    """Router probabilities of softmax-gated models (Qwen, Mixtral, OLMoE, Phi-MoE, GPT-OSS)."""
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_probs(logits: torch.Tensor) -> torch.Tensor:
    """Router affinities of sigmoid-gated models (DeepSeek-V3, GLM-4-MoE)."""
    return torch.sigmoid(logits.float())


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where an architecture keeps its MoE parts.

    Attributes:
        router: attribute of the MoE block holding the router module.
        experts: attribute of the MoE block holding the fused experts module.
        shared: attribute holding the shared-expert MLP (``gate_proj``/``up_proj``/``down_proj``), if any.
        shared_gate: attribute holding the shared expert's scalar gate (a ``Linear(H, 1)``
            passed through a sigmoid), if any.
        probs: router logits ``[T, E]`` -> per-expert probabilities ``[T, E]`` (before top-k).
        block: attribute of a decoder layer holding its MLP / MoE block.
        expert_size_key: config key of the routed experts' intermediate size.
        num_experts_key: config key of the number of routed experts.
        shared_size_key: config key of the shared experts' intermediate size; None where it is
            derived from ``expert_size_key`` (DeepSeek: ``moe_intermediate_size * n_shared_experts``).
    """

    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    probs: Callable[[torch.Tensor], torch.Tensor] = softmax_probs
    block: str = "mlp"
    expert_size_key: str = "moe_intermediate_size"
    num_experts_key: str = "num_experts"
    shared_size_key: str | None = None


_REGISTRY: dict[str, ArchitectureSpec] = {
    "qwen2_moe": ArchitectureSpec(shared="shared_expert", shared_gate="shared_expert_gate",
                                  shared_size_key="shared_expert_intermediate_size"),
    "qwen3_moe": ArchitectureSpec(),
    "mixtral": ArchitectureSpec(expert_size_key="intermediate_size", num_experts_key="num_local_experts"),
    "olmoe": ArchitectureSpec(expert_size_key="intermediate_size"),
    "flex_olmo": ArchitectureSpec(expert_size_key="intermediate_size"),
    "phimoe": ArchitectureSpec(router="router", expert_size_key="intermediate_size", num_experts_key="num_local_experts"),
    "gpt_oss": ArchitectureSpec(router="router", expert_size_key="intermediate_size", num_experts_key="num_local_experts"),
    "deepseek_v2": ArchitectureSpec(shared="shared_experts", num_experts_key="n_routed_experts"),
    "deepseek_v3": ArchitectureSpec(shared="shared_experts", probs=sigmoid_probs, num_experts_key="n_routed_experts"),
    "glm4_moe": ArchitectureSpec(shared="shared_experts", probs=sigmoid_probs, num_experts_key="n_routed_experts"),
}


class UnsupportedModelError(TypeError):
    """The model is not an MoE model camera_pl knows how to read."""


def register_adapter(model_type: str, spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Teach camera_pl a new MoE architecture, keyed by ``config.model_type``."""
    if model_type in _REGISTRY and not overwrite:
        raise ValueError(f"An adapter for model_type {model_type!r} exists; pass overwrite=True to replace it.")
    _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a registered adapter."""
    return sorted(_REGISTRY)


def architecture_spec(model: nn.Module) -> ArchitectureSpec:
    """The registered spec for ``model``, or an error naming the class and the fix."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has no camera_pl MoE adapter. "
            f"Supported model types: {', '.join(supported_model_types())}. For another MoE architecture, "
            "describe where its router, experts and shared experts live with "
            "camera_pl.register_adapter(model_type, camera_pl.ArchitectureSpec(router=..., shared=...))."
        )
    return _REGISTRY[model_type]


class MoELayer:
    """Uniform view of one MoE block: router, fused routed experts, shared experts.

    Weight views returned here are views (no copies) in ``nn.Linear`` orientation:
    gate/up ``[I, H]`` per expert and down ``[H, I]``. A micro-expert ``(e, j)`` is row ``j``
    of ``gate(e)``, row ``j`` of ``up(e)`` and column ``j`` of ``down(e)``.
    """

    def __init__(self, index: int, block: nn.Module, spec: ArchitectureSpec):
        self.index = index
        self.block = block
        self.spec = spec
        self.experts: nn.Module = getattr(block, spec.experts)
        self.router: nn.Module = getattr(block, spec.router)
        self.shared: nn.Module | None = getattr(block, spec.shared) if spec.shared else None
        self.shared_gate: nn.Module | None = getattr(block, spec.shared_gate) if spec.shared_gate else None

    # ---- shapes and flags -------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def has_gate(self) -> bool:
        return bool(getattr(self.experts, "has_gate", True))

    @property
    def is_transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def is_concatenated(self) -> bool:
        return bool(getattr(self.experts, "is_concatenated", True))

    @property
    def has_bias(self) -> bool:
        return bool(getattr(self.experts, "has_bias", False))

    @property
    def is_ragged(self) -> bool:
        """Experts of unequal width (after CAMERA-P's layer/global allocation)."""
        return hasattr(self.experts, "expert_channels")

    @property
    def hidden_size(self) -> int:
        if getattr(self.experts, "kind", None) is not None:  # camera_pl modules record their shapes
            return int(self.experts.hidden_size)
        return self.down(0).shape[0]

    @property
    def intermediate_size(self) -> int:
        """Original width of every expert (micro-expert index space of the statistics)."""
        if getattr(self.experts, "kind", None) is not None:
            return int(self.experts.intermediate_size)
        return self.down(0).shape[1]

    def expert_channels(self, e: int) -> torch.Tensor:
        """Original indices of expert ``e``'s micro-experts still present."""
        if self.is_ragged:
            return self.experts.expert_channels(e)
        return torch.arange(self.intermediate_size, device=self.experts.down_proj.device)

    @property
    def shared_intermediate_size(self) -> int:
        return 0 if self.shared is None else int(self.shared.down_proj.weight.shape[1])

    # ---- routed expert weight views ---------------------------------------------------
    def _up_param(self) -> torch.Tensor:
        return self.experts.gate_up_proj if self.has_gate else self.experts.up_proj

    def gate_up(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(gate [I, H] or None, up [I, H])`` of expert ``e``, honouring the layout flags."""
        if self.is_ragged:
            return self.experts.gate_up(e)
        w = self._up_param()[e]
        if self.is_transposed:
            w = w.t()
        if not self.has_gate:
            return None, w
        if self.is_concatenated:
            half = w.shape[0] // 2
            return w[:half], w[half:]
        return w[0::2], w[1::2]

    def down(self, e: int) -> torch.Tensor:
        """``down [H, I]`` of expert ``e``."""
        if self.is_ragged:
            return self.experts.down_weight(e)
        w = self.experts.down_proj[e]
        return w.t() if self.is_transposed else w

    def stacked_weights(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """All experts at once: ``(gate [E, I, H] or None, up [E, I, H], down [E, H, I])`` views (fused layout only)."""
        if self.is_ragged:
            raise TypeError(f"Layer {self.index} has experts of unequal width; use per-expert views gate_up(e)/down(e).")
        w = self._up_param()
        if self.is_transposed:
            w = w.transpose(1, 2)
        down = self.experts.down_proj
        down = down.transpose(1, 2) if self.is_transposed else down
        if not self.has_gate:
            return None, w, down
        if self.is_concatenated:
            half = w.shape[1] // 2
            return w[:, :half], w[:, half:], down
        return w[:, 0::2], w[:, 1::2], down

    def stacked_biases(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """``(gate_bias [E, I] or None, up_bias [E, I], down_bias [E, H])`` views, or None without biases."""
        if not self.has_bias:
            return None
        b = self.experts.gate_up_proj_bias if self.has_gate else self.experts.up_proj_bias
        down = self.experts.down_proj_bias
        if not self.has_gate:
            return None, b, down
        if self.is_concatenated:
            half = b.shape[1] // 2
            return b[:, :half], b[:, half:], down
        return b[:, 0::2], b[:, 1::2], down

    # ---- computation ------------------------------------------------------------------
    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`` exactly as the model routes."""
        logits, weights, index = self.router(hidden.reshape(-1, hidden.shape[-1]))[:3]
        return logits, weights, index

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert probabilities before top-k selection, float32 ``[T, E]``."""
        return self.spec.probs(logits)

    def expert_activation(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Micro-expert activations ``a_e(x) [T, I]`` (the input of expert ``e``'s down projection)."""
        return expert_activation(self.experts, e, x)

    def expert_output(self, e: int, a: torch.Tensor) -> torch.Tensor:
        """``f_e(x) [T, H]`` from the activations of expert ``e``."""
        return expert_output(self.experts, e, a)

    def shared_gate_values(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Sigmoid shared-expert gate per token ``[T]`` (None where the model has no such gate)."""
        if self.shared_gate is None:
            return None
        return torch.sigmoid(self.shared_gate(hidden.reshape(-1, hidden.shape[-1]))).squeeze(-1)

    def signature(self) -> dict:
        """Shapes that statistics and compression results depend on."""
        return {
            "index": self.index,
            "num_experts": self.num_experts,
            "intermediate_size": self.intermediate_size,
            "hidden_size": self.hidden_size,
            "shared_intermediate_size": self.shared_intermediate_size,
        }


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None) or getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layer list at .model.layers; "
            "camera_pl expects a transformers causal LM."
        )
    return layers


def _is_moe_block(block: nn.Module | None, spec: ArchitectureSpec) -> bool:
    experts = getattr(block, spec.experts, None)
    if getattr(experts, "kind", None) is not None:  # a camera_pl experts module (ragged, quantized)
        return True
    down = getattr(experts, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE layers of ``model`` (dense layers of mixed models are skipped), in depth order."""
    spec = architecture_spec(model)
    found = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, spec.block, None)
        if _is_moe_block(block, spec):
            found.append(MoELayer(i, block, spec))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layers with fused experts (is it a dense configuration, "
            "e.g. num_experts=0 or mlp_only_layers covering every layer?)."
        )
    return found


def model_signature(model: nn.Module) -> dict:
    """What a compatible model must match: architecture and per-layer shapes."""
    return {
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "layers": [layer.signature() for layer in moe_layers(model)],
    }
