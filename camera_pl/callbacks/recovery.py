"""``LoRARecovery``: a short LoRA finetune after each compression, inside the same Trainer run."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel
from torch import nn

from camera_pl.config import ConfigError
from camera_pl.distill import Distillation, check_teacher, frozen_copy
from camera_pl.lightning.structure import (ChangesStructure, CompressionEvent, CompressionListener, changing_structure,
                                           log_event, structure_changed)
from camera_pl.lora import LoRAConfig, adaptable_experts, add_lora, merge_lora


class LoRARecovery(ChangesStructure, CompressionListener):
    """Recover with LoRA adapters after every compression event another callback publishes.

    When ``CameraPruning``, ``CameraQuantization`` (packing) or any callback publishing a
    :class:`~camera_pl.lightning.structure.CompressionEvent` has changed the model, the
    model at ``pl_module.model`` is wrapped with LoRA adapters (base frozen) and trains for
    ``config.steps`` batches; then the adapters are merged (``merge=True``) and the model trains
    on as before. Optimizers are rebuilt by the module's ``configure_optimizers`` with the LR
    schedule continuing (never restarted); ``config.lr`` rescales the adapters' learning rate.
    After quantization the packed experts cannot be adapted: attention only, with a warning.

    With ``distill=True`` every recovery minimises the KD loss of :mod:`camera_pl.distill` (the
    LightningModule must have a ``distillation`` attribute, as ``CausalLMModule`` has) against
    ``teacher``, or else against a frozen copy of the model taken in ``setup``: before any
    callback's ``on_fit_start``/epoch hooks can compress it (and, when resuming, before the
    checkpoint's compressed structure is restored). The copy stays on the model's device and
    costs one more set of uncompressed weights.

    Args:
        config: a :class:`LoRAConfig`; its fields may also be given as keywords.
        start_now: start one recovery at the first training epoch (a stand-alone recovery fit;
            in KD mode it needs ``teacher``, as the model is already compressed).
        teacher: the KD teacher (``distill=True`` only; put in eval mode and frozen in place); default: a copy of
            the model as the fit starts.
    """

    def __init__(self, config: LoRAConfig | None = None, start_now: bool = False, teacher: nn.Module | None = None,
                 **options):
        self.config = LoRAConfig.build(config, **options)
        if teacher is not None and not self.config.distill:
            raise ConfigError("LoRARecovery: a teacher was given but distill=False; set distill=True to distil "
                              "from it.")
        if self.config.distill and teacher is None and start_now:
            raise ConfigError("LoRARecovery(start_now=True, distill=True) recovers an already compressed model, so "
                              "it cannot copy the teacher itself: pass teacher=<the model before compression> "
                              "(camera_pl.distill.frozen_copy(model) taken before pruning/quantizing).")
        self.start_now = start_now
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self._active_since: int | None = None
        self.recoveries = 0

    # ---- the KD teacher ---------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.config.distill:
            return
        if not hasattr(pl_module, "distillation"):
            raise TypeError(f"LoRARecovery(distill=True) sets the KD loss through `pl_module.distillation`, which "
                            f"{type(pl_module).__name__} lacks; use camera_pl.CausalLMModule or give your module "
                            "that attribute and its training_step the Distillation loss.")
        model = getattr(pl_module, "model", None)
        if self.teacher is None and stage == "fit" and model is not None:
            self.teacher = frozen_copy(model)
        if self.teacher is not None and model is not None:
            check_teacher(self.teacher, model)

    # ---- when ---------------------------------------------------------------------------------
    def on_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent) -> None:
        if event.kind != "fake_quantize" and self._active_since is None:
            self._start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start_now and self.recoveries == 0 and self._active_since is None:
            self._start(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._active_since is not None and trainer.global_step - self._active_since >= self.config.steps:
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active_since is not None:
            self._finish(trainer, pl_module)

    # ---- what -----------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None or isinstance(model, PeftModel):
            raise TypeError("LoRARecovery wraps the model kept at `pl_module.model` with adapters; keep the "
                            "transformers model there, not already wrapped by peft.")
        config = self.config
        if config.experts and not adaptable_experts(model):
            rank_zero_warn("LoRARecovery: the experts are quantized or compressed and cannot be adapted; adapting "
                           "attention only.")
            config = LoRAConfig.build(config, experts=False)
        with changing_structure(trainer, pl_module):
            pl_module.model = add_lora(model, config)
        if config.distill:
            self.teacher.to(pl_module.device)
            pl_module.distillation = Distillation(self.teacher, config.kd_temperature, config.kd_alpha)
        structure_changed(trainer, pl_module)
        self._set_lr(trainer)
        self._active_since = trainer.global_step

    def _set_lr(self, trainer: pl.Trainer) -> None:
        """Scale the (continuing) schedule so the adapters train at ``config.lr``."""
        if self.config.lr is None:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.config.lr
        for cfg in trainer.lr_scheduler_configs:
            scheduler = cfg.scheduler
            factors = [lr / base for lr, base in zip(scheduler.get_last_lr(), scheduler.base_lrs)]
            scheduler.base_lrs = [self.config.lr] * len(scheduler.base_lrs)
            for group, factor in zip(scheduler.optimizer.param_groups, factors):
                group["lr"] = self.config.lr * factor

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config.merge:
            with changing_structure(trainer, pl_module):
                pl_module.model = merge_lora(pl_module.model)
        if self.config.distill:
            pl_module.distillation = None
        self._active_since = None
        self.recoveries += 1
        structure_changed(trainer, pl_module)
        log_event(trainer, {"camera/recoveries": self.recoveries})

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"recoveries": self.recoveries, "active_since": self._active_since}

    def load_state_dict(self, state_dict: dict) -> None:
        self.recoveries, self._active_since = state_dict["recoveries"], state_dict["active_since"]
