"""Short Lightning fits on a transformers model: :func:`finetune` and stand-alone LoRA :func:`recover`."""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from camera_pl.callbacks.recovery import LoRARecovery
from camera_pl.lightning.module import CausalLMModule
from camera_pl.lora import LoRAConfig


def _as_loader(batches: Iterable | None) -> DataLoader | None:
    """Lightning reads a plain list as several dataloaders: wrap pre-built batches as one."""
    return batches if batches is None or isinstance(batches, DataLoader) else DataLoader(list(batches), batch_size=None)


NOISE = (
    r"You defined a `validation_step` but have no `val_dataloader`",  # a fit without validation data, by design
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning against a newer torch
    r"`is_gradient_checkpointing` is deprecated",  # transformers' rename, reached through Lightning/peft
)
"""Warnings a short fit triggers by design or through library versions: nothing a user can act on."""


@contextmanager
def quiet_fit() -> Iterator[None]:
    """Lightning's info lines (accelerator report, tips, stop reason) and the :data:`NOISE` warnings, silenced."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        log.setLevel(level)


def _epochs(loader: DataLoader, steps: int) -> int:
    """Epochs that ``steps`` batches span (the progress bar's 'Epoch i/n'); -1 for a loader without length."""
    try:
        return max(1, math.ceil(steps / len(loader)))
    except TypeError:
        return -1


def finetune(model: nn.Module, train_batches: Iterable, steps: int, lr: float = 1e-4, accelerator: str = "auto",
             callbacks: list | None = None, val_batches: Iterable | None = None, progress: bool = False) -> nn.Module:
    """A short Lightning fit of ``steps`` batches on ``model`` (whatever is trainable); returns the trained model."""
    module = CausalLMModule(model.train(), lr=lr)
    loader = _as_loader(train_batches)
    with quiet_fit():
        trainer = pl.Trainer(accelerator=accelerator, max_steps=steps, max_epochs=_epochs(loader, steps),
                             logger=False, enable_checkpointing=False, callbacks=callbacks or [],
                             enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0 if val_batches is None else 1.0)
        with torch.inference_mode(False):
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=_as_loader(val_batches))
    return module.model.eval()


def recover(model: nn.Module, train_dataloader: Iterable, config: LoRAConfig | int | None = None, *,
            val_dataloader: Iterable | None = None, accelerator: str = "auto", progress: bool = False,
            teacher: nn.Module | None = None, **options) -> nn.Module:
    """Stand-alone LoRA recovery: a short Lightning fit of ``config.steps`` batches; returns the (merged) model.

    ``config`` is a :class:`~camera_pl.lora.LoRAConfig` (or its ``steps``); ``options`` are its
    fields. Without ``lr`` the adapters train at 1e-3. With ``distill=True``, ``teacher`` is the
    model before compression (e.g. ``camera_pl.distill.frozen_copy(model)`` taken before pruning).
    """
    if isinstance(config, int) and not isinstance(config, bool):
        config, options = None, {"steps": config, **options}
    config = LoRAConfig.build(config, **options)
    callback = LoRARecovery(config, start_now=True, teacher=teacher)
    return finetune(model, train_dataloader, config.steps, config.lr or 1e-3, accelerator, [callback], val_dataloader,
                    progress)
