"""Short Lightning fits on a transformers model: :func:`finetune` and stand-alone LoRA :func:`recover`."""

from __future__ import annotations

from typing import Iterable

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


def finetune(model: nn.Module, train_batches: Iterable, steps: int, lr: float = 1e-4, accelerator: str = "auto",
             callbacks: list | None = None, val_batches: Iterable | None = None, progress: bool = False) -> nn.Module:
    """A short Lightning fit of ``steps`` batches on ``model`` (whatever is trainable); returns the trained model."""
    module = CausalLMModule(model.train(), lr=lr)
    trainer = pl.Trainer(accelerator=accelerator, max_steps=steps, logger=False, enable_checkpointing=False,
                         callbacks=callbacks or [], enable_progress_bar=progress, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0 if val_batches is None else 1.0)
    with torch.inference_mode(False):
        trainer.fit(module, train_dataloaders=_as_loader(train_batches), val_dataloaders=_as_loader(val_batches))
    return module.model.eval()


def recover(model: nn.Module, train_dataloader: Iterable, config: LoRAConfig | int | None = None, *,
            val_dataloader: Iterable | None = None, accelerator: str = "auto", progress: bool = False,
            **options) -> nn.Module:
    """Stand-alone LoRA recovery: a short Lightning fit of ``config.steps`` batches; returns the (merged) model.

    ``config`` is a :class:`~camera_pl.lora.LoRAConfig` (or its ``steps``); ``options`` are its
    fields. Without ``lr`` the adapters train at 1e-3.
    """
    if isinstance(config, int) and not isinstance(config, bool):
        config, options = None, {"steps": config, **options}
    config = LoRAConfig.build(config, **options)
    callback = LoRARecovery(config, start_now=True)
    return finetune(model, train_dataloader, config.steps, config.lr or 1e-3, accelerator, [callback], val_dataloader,
                    progress)
