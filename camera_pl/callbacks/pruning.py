"""``CameraPruning``: prune the model at configured epochs (CAMERA-P or a baseline)."""

from __future__ import annotations

from typing import Callable, Iterable

import lightning.pytorch as pl
import torch

from camera_pl.callbacks.stats import latest_stats
from camera_pl.config import ConfigError
from camera_pl.lightning.structure import (ChangesStructure, CompressionEvent, calibration_data, changing_structure,
                                           find_moe_model, log_event, structure_changed)
from camera_pl.pruning.api import PruneReport, prune
from camera_pl.pruning.config import PruneConfig
from camera_pl.stats.container import collect_stats

Schedule = dict[int, float] | Callable[[int], float | None]


class CameraPruning(ChangesStructure):
    """Prune at the start of scheduled training epochs, then let training continue.

    Args:
        schedule: epoch -> target ratio (of the original micro-experts), or a callable
            ``epoch -> ratio or None``; rising ratios give gradual pruning ({0: 0.2, 1: 0.4, 2: 0.6}).
        config: the :class:`PruneConfig` (its ``ratio`` is replaced by the schedule's); its
            fields may also be given as keywords (``CameraPruning({1: 0.4}, allocation="global")``).
        calib_dataloader: statistics source when no :class:`MicroExpertStatsCallback` has
            validated yet, and the data of ``sequential`` / ``naee`` (default: the fit's validation data).

    Statistics come from a :class:`MicroExpertStatsCallback` on the same Trainer (its latest
    validation), or from ``calib_dataloader`` (else the fit's validation data). The change of structure is handled by
    :func:`~camera_pl.lightning.structure.structure_changed` (DDP re-wrapped, optimizers rebuilt
    with scheduler progress kept, listeners such as ``LoRARecovery`` notified); checkpoints
    record the pruned shapes.
    """

    def __init__(self, schedule: Schedule, config: PruneConfig | None = None,
                 calib_dataloader: Iterable | None = None, **options):
        if isinstance(schedule, dict):
            for epoch, ratio in schedule.items():
                if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
                    raise ConfigError(f"CameraPruning schedule: the ratio for epoch {epoch} must lie in [0, 1), "
                                      f"got {ratio!r}.")
        elif not callable(schedule):
            raise ConfigError(f"CameraPruning schedule must map epoch -> ratio or be a callable; got {schedule!r}.")
        self.schedule = schedule
        self.config = PruneConfig.build(config, **options)
        self.calib_dataloader = calib_dataloader
        self.reports: list[PruneReport] = []
        self.current_ratio = 0.0

    def _target(self, epoch: int) -> float | None:
        return self.schedule.get(epoch) if isinstance(self.schedule, dict) else self.schedule(epoch)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.schedule, dict) and trainer.max_epochs not in (None, -1):
            late = [e for e in self.schedule if e >= trainer.max_epochs]
            if late:
                raise ConfigError(f"CameraPruning is scheduled at epochs {late}, but the Trainer stops after "
                                  f"max_epochs={trainer.max_epochs}; those steps would never run.")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ratio = self._target(trainer.current_epoch)
        if ratio is None or ratio <= self.current_ratio:
            return
        model = find_moe_model(pl_module)
        config = PruneConfig.build(self.config, ratio=float(ratio))
        stats = latest_stats(trainer)
        if stats is not None and config.collect_kwargs() and not stats.has_gradients:
            stats = None  # the callback's statistics come from forwards only; heapr collects its own below
        needs_data = config.sequential or config.method == "naee"
        hint = "" if stats is not None or config.collect_kwargs() else (
            " Or add a MicroExpertStatsCallback to the Trainer, with a validation before the pruning epoch.")
        calib = calibration_data(trainer, self.calib_dataloader, "CameraPruning", hint) if needs_data or stats is None \
            else self.calib_dataloader
        with torch.inference_mode(False), changing_structure(trainer, pl_module):
            if stats is None and not needs_data:  # no usable statistics from a MicroExpertStatsCallback: collect them
                stats = collect_stats(model, calib, max_tokens=config.max_tokens, **config.collect_kwargs())
            report = prune(model, stats, config, calib_dataloader=calib)
        self.reports.append(report)
        self.current_ratio = float(ratio)
        structure_changed(trainer, pl_module, CompressionEvent("prune", trainer.current_epoch, trainer.global_step,
                                                               report))
        log_event(trainer, {"camera/pruned_ratio": ratio, "camera/expert_params": report.params_after,
                            "camera/params": sum(p.numel() for p in pl_module.parameters()),
                            **{f"camera/layer{layer.index}_expert_params": layer.params_after
                               for layer in report.layers}})

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"current_ratio": self.current_ratio}

    def load_state_dict(self, state_dict: dict) -> None:
        self.current_ratio = state_dict["current_ratio"]
