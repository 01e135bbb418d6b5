"""LoRA recovery after compression, with peft.

Adapters go on the attention projections (``target_modules``) and on the expert weights
as *parameters* (peft's ``target_parameters``): the fused ``gate_up_proj``/``down_proj``
tensors of transformers' experts, or the compact ``gate``/``up``/``down`` matrices of
camera_pl's ragged experts — a low-rank update of a ragged expert matrix keeps every
expert's width. After training the adapters are merged into the compressed weights
(``merge=True``) or left in place, unmerged, for inspection or further training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import lightning.pytorch as pl
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from camera_pl.arch.adapters import moe_layers

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoRASettings:
    """What to adapt and how: rank, alpha, dropout, attention targets, whether to adapt experts."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    attention_targets: tuple[str, ...] = ATTENTION_TARGETS
    experts: bool = True
    extra_targets: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")


def expert_parameter_targets(model: nn.Module) -> list[str]:
    """peft ``target_parameters`` names for the expert weights of every MoE layer's storage type."""
    names: set[str] = set()
    for layer in moe_layers(model):
        experts = layer.experts
        kind = getattr(experts, "kind", None)
        if kind == "ragged":
            candidates = ("gate", "up", "down")
        elif kind is None:
            candidates = ("gate_up_proj", "up_proj", "down_proj")
        else:
            raise TypeError(
                f"Layer {layer.index} holds {type(experts).__name__} experts, which LoRA cannot adapt as parameters; "
                "recover before quantizing, or set experts=False to adapt attention only."
            )
        names.update(f"{layer.spec.experts}.{c}" for c in candidates if isinstance(getattr(experts, c, None), nn.Parameter))
    return sorted(names)


def add_lora(model: nn.Module, settings: LoRASettings) -> PeftModel:
    """Wrap ``model`` with trainable LoRA adapters; the base weights are frozen."""
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.attention_targets + settings.extra_targets),
        target_parameters=expert_parameter_targets(model) if settings.experts else None,
    )
    return get_peft_model(model, config)


def merge_lora(model: PeftModel) -> nn.Module:
    """Fold the adapters into the (compressed) base weights and return the plain model."""
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


class LoRARecovery(pl.Callback):
    """Short LoRA finetune after each compression step, inside the same Trainer run.

    When a compression callback on the Trainer (``CameraPruning``; anything with a growing
    ``reports`` list) has just compressed the model at the start of an epoch, the model is
    wrapped with LoRA adapters (base frozen), the optimizer is rebuilt for the adapters at
    learning rate ``lr`` (default: the module's), and after ``steps`` training batches the
    adapters are merged (or kept, ``merge=False``) and the full model trains on.
    Set ``start_now=True`` to start recovery at the first training batch (a stand-alone recovery fit).
    """

    def __init__(self, settings: LoRASettings | None = None, steps: int = 100, lr: float | None = None,
                 merge: bool = True, start_now: bool = False):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        self.settings = settings or LoRASettings()
        self.steps = steps
        self.lr = lr
        self.merge = merge
        self.start_now = start_now
        self._seen_reports = 0
        self._active_since: int | None = None
        self._saved_lr: float | None = None
        self.recoveries = 0

    def _compressed_now(self, trainer: pl.Trainer) -> bool:
        reports = sum(len(getattr(cb, "reports", [])) for cb in trainer.callbacks if cb is not self)
        fresh = reports > self._seen_reports
        self._seen_reports = reports
        return fresh

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active_since is None and (self._compressed_now(trainer) or (self.start_now and self.recoveries == 0)):
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model = add_lora(pl_module.model, self.settings)
        if self.lr is not None and hasattr(pl_module, "lr"):
            self._saved_lr, pl_module.lr = pl_module.lr, self.lr
        trainer.strategy.setup_optimizers(trainer)
        self._active_since = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._active_since is not None and trainer.global_step - self._active_since >= self.steps:
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active_since is not None:
            self._finish(trainer, pl_module, rebuild=False)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool = True) -> None:
        if self.merge:
            pl_module.model = merge_lora(pl_module.model)
        if self._saved_lr is not None:
            pl_module.lr = self._saved_lr
        self._active_since = None
        self.recoveries += 1
        if rebuild:
            trainer.strategy.setup_optimizers(trainer)
        pl_module.log("camera/recoveries", float(self.recoveries))


def recover(model: nn.Module, train_dataloader: Iterable, steps: int = 100, lr: float = 1e-3,
            settings: LoRASettings | None = None, merge: bool = True, accelerator: str = "auto",
            val_dataloader: Iterable | None = None, progress: bool = False) -> nn.Module:
    """Stand-alone LoRA recovery: a short Lightning fit of ``steps`` batches; returns the (merged) model."""
    from camera_pl.lightning.module import finetune

    callback = LoRARecovery(settings, steps=steps, merge=merge, start_now=True)
    return finetune(model, train_dataloader, steps, lr, accelerator, [callback], val_dataloader, progress)
