"""Lightning callback that prunes the model at configured epochs (CAMERA-P or a baseline)."""

from __future__ import annotations

from typing import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn

from camera_pl.callbacks.stats import MicroExpertStatsCallback, find_moe_model
from camera_pl.pruning.api import PruneReport, prune
from camera_pl.serialization import apply_structure, describe_structure
from camera_pl.stats.container import collect_stats

STRUCTURE_KEY = "camera_pl_structure"

Schedule = dict[int, float] | Callable[[int], float | None]


class CameraPruning(pl.Callback):
    """Prune at the start of scheduled training epochs, then let training continue.

    ``schedule`` maps epoch -> target ratio (of the original micro-experts), or is a callable
    ``epoch -> ratio or None``; rising ratios give gradual pruning (e.g. {0: 0.2, 1: 0.4, 2: 0.6}).
    Statistics come from a :class:`MicroExpertStatsCallback` on the same Trainer (its latest
    validation), or from ``calib_dataloader``. After pruning, the optimizers and LR schedulers
    are rebuilt by the Trainer's strategy for the new parameters (scheduler progress kept),
    and parameter counts are logged. Checkpoints written after pruning record the pruned
    shapes; :func:`restore_structure` rebuilds them when the checkpoint is loaded.
    """

    def __init__(self, schedule: Schedule, method: str = "camera", allocation: str = "layer",
                 calib_dataloader: Iterable | None = None, max_tokens: int | None = None, **prune_kwargs):
        if isinstance(schedule, dict):
            for epoch, ratio in schedule.items():
                if not 0.0 <= ratio < 1.0:
                    raise ValueError(f"schedule ratio for epoch {epoch} must lie in [0, 1), got {ratio}.")
        self.schedule = schedule
        self.method = method
        self.allocation = allocation
        self.calib_dataloader = calib_dataloader
        self.max_tokens = max_tokens
        self.prune_kwargs = prune_kwargs
        self.reports: list[PruneReport] = []
        self.current_ratio = 0.0

    def _target(self, epoch: int) -> float | None:
        return self.schedule.get(epoch) if isinstance(self.schedule, dict) else self.schedule(epoch)

    def _stats(self, trainer: pl.Trainer, model: nn.Module):
        for cb in trainer.callbacks:
            if isinstance(cb, MicroExpertStatsCallback) and cb.stats is not None:
                return cb.stats
        if self.calib_dataloader is not None:
            return collect_stats(model, self.calib_dataloader, max_tokens=self.max_tokens)
        raise ValueError(
            "CameraPruning found no statistics: add MicroExpertStatsCallback to the Trainer (with validation "
            "before the pruning epoch) or pass calib_dataloader=..."
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ratio = self._target(trainer.current_epoch)
        if ratio is None or ratio <= self.current_ratio:
            return
        model = find_moe_model(pl_module)
        with torch.inference_mode(False):
            report = prune(model, self._stats(trainer, model), ratio, method=self.method,
                           allocation=self.allocation, **self.prune_kwargs)
        self.reports.append(report)
        self.current_ratio = ratio
        self._rebuild_optimizers(trainer)
        pl_module.log_dict({"camera/pruned_ratio": ratio, "camera/expert_params": float(report.params_after),
                            "camera/params": float(sum(p.numel() for p in pl_module.parameters()))})

    @staticmethod
    def _rebuild_optimizers(trainer: pl.Trainer) -> None:
        """New parameters need a new optimizer; LR schedulers keep their step count and learning rates."""
        saved = [(cfg.scheduler.last_epoch, cfg.scheduler.get_last_lr()) for cfg in trainer.lr_scheduler_configs]
        trainer.strategy.setup_optimizers(trainer)
        for cfg, (last, lrs) in zip(trainer.lr_scheduler_configs, saved):
            cfg.scheduler.last_epoch = last
            cfg.scheduler._last_lr = list(lrs)
            for group, lr in zip(cfg.scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"current_ratio": self.current_ratio}

    def load_state_dict(self, state_dict: dict) -> None:
        self.current_ratio = state_dict["current_ratio"]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Record the pruned shapes; ``restore_structure`` rebuilds them before the weights load."""
        checkpoint[STRUCTURE_KEY] = describe_structure(find_moe_model(pl_module))


def restore_structure(model: nn.Module, checkpoint: dict) -> None:
    """Reshape ``model`` to the pruned structure recorded in a Lightning ``checkpoint`` (if any).

    Call it from your LightningModule's ``on_load_checkpoint`` (``CausalLMModule`` does), which
    Lightning runs before loading the state dict.
    """
    if STRUCTURE_KEY in checkpoint:
        apply_structure(model, checkpoint[STRUCTURE_KEY])
