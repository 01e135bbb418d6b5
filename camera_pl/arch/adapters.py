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

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from camera_pl.arch.blocks import RouteFn, release, routing_of, run_by_camera, topk_gate_route
from camera_pl.experts.base import Experts, as_experts, is_experts, unwrap
from camera_pl.experts.modulelist import is_expert_list


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
        top_k_key: config key of the number of experts routed per token.
        attention: attribute of a decoder layer holding its self-attention module.
        attention_targets: names of the attention projections (LoRA targets); names absent
            from a given configuration (e.g. DeepSeek's ``q_proj`` when ``q_lora_rank`` is set) are skipped.
        router_tensors: router tensors with one row per expert, sliced when experts are removed.
        router_group_key: router attribute holding the number of expert groups of group-limited routing.
        expert_count_attrs: attributes of the router and the experts module that record the expert count,
            updated when experts are removed (DeepSeek-MoE v1's remote-code gate keeps ``n_routed_experts``).
        routing: None where the router returns ``(router_logits, top_k_weights, top_k_index)`` and the
            block calls one experts module with them (transformers 5). For remote-code blocks that
            loop over an ``nn.ModuleList`` of expert MLPs themselves, a function
            ``(router, hidden [T, H]) -> (logits, weights, index)``; camera_pl then runs the block
            itself where it must (see :mod:`camera_pl.arch.blocks`).
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
    top_k_key: str = "num_experts_per_tok"
    attention: str = "self_attn"
    attention_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    router_tensors: tuple[str, ...] = ("weight", "bias")
    router_group_key: str | None = None
    expert_count_attrs: tuple[str, ...] = ("num_experts",)
    routing: RouteFn | None = None


_MLA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
"""DeepSeek's multi-head latent attention projections."""
_GROUP_LIMITED = dict(router_tensors=("weight", "e_score_correction_bias"), router_group_key="num_group")

_REGISTRY: dict[str, ArchitectureSpec] = {
    "qwen2_moe": ArchitectureSpec(shared="shared_expert", shared_gate="shared_expert_gate",
                                  shared_size_key="shared_expert_intermediate_size"),
    "qwen3_moe": ArchitectureSpec(),
    "mixtral": ArchitectureSpec(expert_size_key="intermediate_size", num_experts_key="num_local_experts"),
    "olmoe": ArchitectureSpec(expert_size_key="intermediate_size"),
    "flex_olmo": ArchitectureSpec(expert_size_key="intermediate_size"),
    "phimoe": ArchitectureSpec(router="router", expert_size_key="intermediate_size", num_experts_key="num_local_experts"),
    "gpt_oss": ArchitectureSpec(router="router", expert_size_key="intermediate_size", num_experts_key="num_local_experts"),
    "deepseek_v2": ArchitectureSpec(shared="shared_experts", num_experts_key="n_routed_experts",
                                    attention_targets=_MLA_TARGETS, router_group_key="num_group"),
    "deepseek_v3": ArchitectureSpec(shared="shared_experts", probs=sigmoid_probs, num_experts_key="n_routed_experts",
                                    attention_targets=_MLA_TARGETS, **_GROUP_LIMITED),
    "glm4_moe": ArchitectureSpec(shared="shared_experts", probs=sigmoid_probs, num_experts_key="n_routed_experts",
                                 **_GROUP_LIMITED),
    # DeepSeek-MoE (v1), remote code: a ModuleList of expert MLPs, a top-k gate, ungated shared experts
    "deepseek": ArchitectureSpec(shared="shared_experts", num_experts_key="n_routed_experts", routing=topk_gate_route,
                                 expert_count_attrs=("num_experts", "n_routed_experts")),
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
    """Uniform view of one MoE block: router, routed experts (through the experts interface), shared experts.

    ``experts`` is the :class:`~camera_pl.experts.base.Experts` interface of whatever module
    the block holds now (fused, ragged, quantized, compressed); ``module`` is that module.
    A micro-expert ``(e, j)`` is row ``j`` of expert ``e``'s gate and up projections and
    column ``j`` of its down projection, ``j`` an index of the original width.
    """

    def __init__(self, index: int, block: nn.Module, spec: ArchitectureSpec):
        self.index = index
        self.block = block
        self.spec = spec
        self.router: nn.Module = getattr(block, spec.router)
        self.routing: nn.Module = self.router if spec.routing is None else routing_of(block, spec)
        """Called with ``hidden [T, H]``, returns ``(logits, weights, index)``; router hooks attach here."""
        self.shared: nn.Module | None = getattr(block, spec.shared) if spec.shared else None
        self.shared_gate: nn.Module | None = getattr(block, spec.shared_gate) if spec.shared_gate else None

    # ---- routed experts -----------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The routed-experts module in the block (under LoRA adapters, the module they wrap)."""
        return unwrap(getattr(self.block, self.spec.experts))

    @property
    def experts(self) -> Experts:
        """The experts interface of :attr:`module`."""
        return as_experts(self.module)

    def replace_experts(self, new: nn.Module) -> None:
        """Put ``new`` in the block in place of the current routed-experts module."""
        setattr(self.block, self.spec.experts, new)
        if self.spec.routing is not None and not is_expert_list(unwrap(new)):
            run_by_camera(self.block, self.spec)  # the block's own loop cannot index a camera_pl module

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def hidden_size(self) -> int:
        return self.experts.hidden_size

    @property
    def intermediate_size(self) -> int:
        """Original width of every expert (micro-expert index space of the statistics)."""
        return self.experts.intermediate_size

    @property
    def shared_intermediate_size(self) -> int:
        return 0 if self.shared is None else int(self.shared.down_proj.weight.shape[1])

    # ---- router ------------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        """Experts routed per token."""
        return int(getattr(self.router, "top_k", 1))

    @property
    def expert_groups(self) -> int:
        """Expert groups of group-limited routing (1 without)."""
        key = self.spec.router_group_key
        return int(getattr(self.router, key, None) or 1) if key else 1

    def keep_router_rows(self, kept: list[int]) -> None:
        """Keep only the router rows of experts ``kept`` and update the expert counts the modules record."""
        router = self.router
        with torch.no_grad():
            for name in self.spec.router_tensors:
                t = getattr(router, name, None)
                if isinstance(t, torch.Tensor):
                    new = t[torch.tensor(kept, dtype=torch.long, device=t.device)].clone()
                    setattr(router, name, nn.Parameter(new, requires_grad=t.requires_grad)
                            if isinstance(t, nn.Parameter) else new)
        for module in (router, self.module):
            for attr in self.spec.expert_count_attrs:
                if hasattr(module, attr):
                    setattr(module, attr, len(kept))
        if isinstance(router, nn.Linear):
            router.out_features = len(kept)

    # ---- computation ------------------------------------------------------------------
    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`` exactly as the model routes."""
        logits, weights, index = self.routing(hidden.reshape(-1, hidden.shape[-1]))[:3]
        return logits, weights, index

    def watch_experts_input(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> Callable[[], None]:
        """Call ``fn(hidden [T, H], top_k_index, top_k_weights)`` with every routed-experts input; returns an undo.

        ``fn`` may raise to stop the forward there (calibration captures).
        """
        if self.spec.routing is not None:  # the block loops itself: run it by camera_pl and read the routing
            run_by_camera(self.block, self.spec)
            handle = self.routing.register_forward_hook(lambda m, args, out: fn(args[0], out[2], out[1]))

            def undo() -> None:
                handle.remove()
                release(self.block, self.spec)

            return undo

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            fn(*values[:3])

        return self.module.register_forward_pre_hook(hook, with_kwargs=True).remove

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert probabilities before top-k selection, float32 ``[T, E]``."""
        return self.spec.probs(logits)

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
            "widths": self.experts.widths().tolist(),
        }

    def fingerprint(self) -> str:
        """A cheap hash of a few sampled weights (router rows, two rows of the first and last expert)."""
        digest = hashlib.sha1()
        experts = self.experts
        samples = [self.router.weight[:2]] if isinstance(getattr(self.router, "weight", None), torch.Tensor) else []
        for e in (0, self.num_experts - 1):
            w = experts.weights(e)
            samples += [w.up[:2], w.down[:2]]
        for t in samples:
            # a copy: numpy sharing a weight's storage would pin it (FSDP2 frees gathered weights by resizing storage)
            digest.update(t.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
        return digest.hexdigest()[:16]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    if callable(getattr(model, "get_base_model", None)):  # a peft model: the model under the adapters
        model = model.get_base_model()
    base = getattr(model, "model", None) or getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layer list at .model.layers; "
            "camera_pl expects a transformers causal LM."
        )
    return layers


def _is_moe_block(block: nn.Module | None, spec: ArchitectureSpec) -> bool:
    return is_experts(getattr(block, spec.experts, None))


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The self-attention module of every decoder layer (``ArchitectureSpec.attention``), by layer index."""
    spec = architecture_spec(model)
    found = {i: getattr(layer, spec.attention, None) for i, layer in enumerate(_decoder_layers(model))}
    return {i: module for i, module in found.items() if isinstance(module, nn.Module)}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM, in depth order."""
    return list(_decoder_layers(model))


def decoder_stack(model: nn.Module) -> nn.ModuleList:
    """The model's own list of decoder layers (to swap layers in place, e.g. for recorders)."""
    return _decoder_layers(model)


def outer_modules(model: nn.Module) -> list[nn.Module]:
    """Modules outside the decoder layers and the LM head: what runs before the first decoder layer
    (embeddings, rotary embedding) and the final norm. Their own tensors only matter (``recurse=False``)."""
    inside = {id(m) for layer in _decoder_layers(model) for m in layer.modules()}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is not None:
        inside |= {id(m) for m in head.modules()}
    return [m for m in model.modules() if id(m) not in inside]


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
            f"{type(model).__name__} has no MoE layers with routed experts (is it a dense configuration, "
            "e.g. num_experts=0 or mlp_only_layers covering every layer?)."
        )
    return found


def model_signature(model: nn.Module, fingerprint: bool = True) -> dict:
    """What a compatible model must match: architecture, per-layer shapes and kept widths, and (unless
    ``fingerprint=False``, for checks that do not compare weights) a weight fingerprint."""
    layers = moe_layers(model)
    cls = type(model)
    cls = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 0)]  # FSDP2's fully_shard subclasses the model's class
    out = {"model_type": model.config.model_type, "model_class": cls.__name__,
           "layers": [layer.signature() for layer in layers]}
    if fingerprint:
        out["fingerprint"] = [layer.fingerprint() for layer in layers]
    return out
