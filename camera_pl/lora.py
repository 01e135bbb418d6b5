"""LoRA recovery after compression, with peft.

Adapters go on the attention projections (``target_modules``) and on the expert weights
as *parameters* (peft's ``target_parameters``): the fused ``gate_up_proj``/``down_proj``
tensors of transformers' experts, or the compact ``gate``/``up``/``down`` matrices of
camera_pl's ragged experts — a low-rank update of a ragged expert matrix keeps every
expert's width. Experts kept as a list of MLPs (DeepSeek-MoE v1) have ``nn.Linear``
projections, which peft adapts as modules (``experts.3.gate_proj``, one adapter per expert
and projection, at each expert's own width). After training the adapters are merged into
the compressed weights (``merge=True``) or left in place, unmerged, for inspection or
further training.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from camera_pl.arch.adapters import architecture_spec, moe_layers
from camera_pl.config import Config

@dataclass(frozen=True)
class LoRAConfig(Config):
    """What LoRA recovery adapts and how long it trains.

    Attributes:
        rank, alpha, dropout: the adapters' rank, scaling numerator and dropout.
        attention_targets: attention projections to adapt; None takes the architecture's
            (``ArchitectureSpec.attention_targets``, e.g. DeepSeek's MLA projections).
        experts: also adapt the routed experts' weights (fused, pruned or listed experts; quantized
            experts hold codes and cannot be adapted).
        extra_targets: further module names to adapt.
        steps: training batches of one recovery.
        lr: learning rate of the adapters (None: the LightningModule's).
        merge: fold the adapters into the weights when the recovery ends.
        distill: knowledge distillation (:mod:`camera_pl.distill`): train on
            ``kd_alpha · KL(teacher ‖ student) + (1 − kd_alpha) · LM loss`` instead of the LM loss. The
            teacher is a frozen copy of the model before compression (``LoRARecovery`` takes it when
            the fit starts; a recipe from its loaded model) or the one given as ``teacher=``; it
            costs one more copy of the uncompressed weights in memory and a teacher forward per step.
        kd_temperature: the softmax temperature ``T > 0`` of both distributions (the KL is scaled by ``T²``).
        kd_alpha: weight in [0, 1] of the KD term (1: KD only; 0: the LM loss alone).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    attention_targets: tuple[str, ...] | None = None
    experts: bool = True
    extra_targets: tuple[str, ...] = ()
    steps: int = 100
    lr: float | None = None
    merge: bool = True
    distill: bool = False
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0

    def check(self) -> None:
        for name in ("attention_targets", "extra_targets"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self._number("rank", 1, integer=True)
        self._number("alpha", 0.0, low_open=True)
        self._number("dropout", 0.0, 1.0, high_open=True)
        self._number("steps", 1, integer=True)
        self._number("lr", 0.0, low_open=True, optional=True)
        self._flag("experts")
        self._flag("merge")
        self._flag("distill")
        self._number("kd_temperature", 0.0, low_open=True)
        self._number("kd_alpha", 0.0, 1.0)
        for option, default in (("kd_temperature", 1.0), ("kd_alpha", 1.0)):
            if not self.distill and getattr(self, option) != default:
                self._fail(option, "applies to knowledge distillation only; set distill=True.")


LoRASettings = LoRAConfig
"""The former name of :class:`LoRAConfig` (kept for one release)."""


def _expert_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """peft ``(target_parameters, target_modules)`` names of the routed experts' weights over every MoE layer."""
    parameters: set[str] = set()
    modules: set[str] = set()
    for layer in moe_layers(model):
        experts = layer.experts
        weights, linears = experts.weight_parameters(), experts.weight_modules()
        if not weights and not linears:
            raise TypeError(
                f"Layer {layer.index} holds {experts.kind} experts, which LoRA cannot adapt; recover before "
                "quantizing or compressing experts, or set experts=False to adapt attention only."
            )
        parameters.update(f"{layer.spec.experts}.{name}" for name in weights)
        modules.update(f"{layer.spec.experts}.{name}" for name in linears)  # suffixes: match every MoE layer
    return sorted(parameters), sorted(modules)


def expert_parameter_targets(model: nn.Module) -> list[str]:
    """peft ``target_parameters`` names of the routed experts' weights kept as parameters (fused, ragged)."""
    return _expert_targets(model)[0]


def expert_module_targets(model: nn.Module) -> list[str]:
    """peft ``target_modules`` names of the routed experts' weights kept as ``nn.Linear``s (a list of MLPs)."""
    return _expert_targets(model)[1]


def adaptable_experts(model: nn.Module) -> bool:
    """Whether every MoE layer's experts have weights LoRA can adapt."""
    return all(layer.experts.weight_parameters() or layer.experts.weight_modules() for layer in moe_layers(model))


def add_lora(model: nn.Module, config: LoRAConfig) -> PeftModel:
    """Wrap ``model`` with trainable LoRA adapters; the base weights are frozen (their flags are remembered)."""
    targets = config.attention_targets or architecture_spec(model).attention_targets
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    parameters, linears = _expert_targets(model) if config.experts else ([], [])
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=[t for t in targets + config.extra_targets if t in present] + linears,
        target_parameters=parameters or None,
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    wrapped = get_peft_model(model, peft_config)
    wrapped._camera_trainable = trainable
    wrapped._camera_lora = config  # recorded in Lightning checkpoints, so a resumed run re-wraps
    return wrapped


def merge_lora(model: PeftModel) -> nn.Module:
    """Fold the adapters into the (compressed) base weights; the base parameters get their former trainability."""
    trainable = getattr(model, "_camera_trainable", None)
    merged = model.merge_and_unload()
    for name, p in merged.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
    return merged
