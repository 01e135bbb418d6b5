"""``LoRARecovery``: a short LoRA finetune after each compression, inside the same Trainer run."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel

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

    Args:
        config: a :class:`LoRAConfig`; its fields may also be given as keywords.
        start_now: start one recovery at the first training epoch (a stand-alone recovery fit).
    """

    def __init__(self, config: LoRAConfig | None = None, start_now: bool = False, **options):
        self.config = LoRAConfig.build(config, **options)
        self.start_now = start_now
        self._active_since: int | None = None
        self.recoveries = 0

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
        self._active_since = None
        self.recoveries += 1
        structure_changed(trainer, pl_module)
        log_event(trainer, {"camera/recoveries": self.recoveries})

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"recoveries": self.recoveries, "active_since": self._active_since}

    def load_state_dict(self, state_dict: dict) -> None:
        self.recoveries, self._active_since = state_dict["recoveries"], state_dict["active_since"]
