"""Changing a model's structure inside a running Trainer, the same way for every compression kind.

When a callback prunes, quantizes or compresses the experts, or wraps/merges LoRA adapters,
the model's parameters are new tensors. :func:`structure_changed` does what must follow,
once for all of them:

* the strategy's wrapper is rebuilt around the new parameters (DDP keeps references to the
  parameters it was built with: a step after pruning would fail with "parameters that were
  not used in producing the loss"); DDP's constructor also broadcasts rank 0's parameters,
  so every rank continues from identical weights;
* optimizers are rebuilt by the LightningModule's own ``configure_optimizers``; optimizer
  state of parameters that survived unchanged is kept, and every LR scheduler continues
  from where it was (warmup and cosine schedules are not restarted);
* the compression is published as a :class:`CompressionEvent` to every callback that is a
  :class:`CompressionListener` (e.g. :class:`~camera_pl.callbacks.LoRARecovery`).

Sharded models (FSDP2, Lightning's ``ModelParallelStrategy``): the compression runs inside
:func:`changing_structure`, which unshards the model before and has the LightningModule's
``configure_model`` shard it again after; optimizer state follows parameters by name. FSDP1
(``FSDPStrategy``) models cannot change structure (see :mod:`camera_pl.lightning.sharding`).

Checkpoints: compressing callbacks record the structure with :func:`record_structure` in
``on_save_checkpoint``; the LightningModule calls :func:`restore_structure` in its
``on_load_checkpoint`` (``CausalLMModule`` does), which Lightning runs before loading weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from camera_pl.arch.adapters import UnsupportedModelError, architecture_spec, moe_layers
from camera_pl.lightning.sharding import ShardingError, is_fsdp2, is_sharded, unshard_model
from camera_pl.serialization import apply_structure, describe_structure

STRUCTURE_KEY = "camera_pl_structure"
LORA_KEY = "camera_pl_lora"


@dataclass
class CompressionEvent:
    """A change of the model's structure: what (``prune``, ``quantize``, ``fake_quantize``, ...), when, the report."""

    kind: str
    epoch: int
    global_step: int
    report: Any = None


class CompressionListener:
    """Mixin for callbacks that react to compression events published by other callbacks."""

    def on_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent) -> None:
        """Called right after another callback changed the model's structure."""


def find_moe_model(pl_module: nn.Module) -> nn.Module:
    """The transformers MoE model inside a LightningModule (``.model``, or the first registered one)."""
    candidates = [pl_module.model] if isinstance(getattr(pl_module, "model", None), nn.Module) else []
    candidates += [m for m in pl_module.modules() if hasattr(m, "config") and hasattr(m, "set_experts_implementation")]
    for candidate in candidates:
        try:
            architecture_spec(candidate)
            moe_layers(candidate)
            return candidate
        except UnsupportedModelError:
            continue
    raise UnsupportedModelError(
        f"{type(pl_module).__name__} holds no supported transformers MoE model; keep it at `self.model` "
        "or register its architecture with camera_pl.register_adapter."
    )


def structure_changed(trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent | None = None
                      ) -> None:
    """Re-wrap the strategy's model, rebuild optimizers (keeping scheduler progress), publish ``event``."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()
    if trainer.training and strategy.optimizers:
        rebuild_optimizers(trainer)
    if event is not None:
        for callback in trainer.callbacks:
            if isinstance(callback, CompressionListener):
                callback.on_compression(trainer, pl_module, event)


@contextmanager
def changing_structure(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Wrap a change of structure: a sharded model is unsharded for the block, then sharded again.

    The model is sharded again by ``pl_module.configure_model()`` (``CausalLMModule``'s shards with
    FSDP2); optimizer state moves to the new parameters of the same name and shape, ready for
    :func:`structure_changed`. A no-op for unsharded (single-device, DDP) models.
    """
    if not is_sharded(pl_module):
        yield
        return
    before = dict(pl_module.named_parameters())
    unshard_model(pl_module)
    yield
    pl_module.configure_model()
    if not is_fsdp2(pl_module):
        raise ShardingError(f"{type(pl_module).__name__}.configure_model() did not shard the model again after a "
                            "compression; shard it there whenever it is not sharded (see CausalLMModule).")
    for name, new in pl_module.named_parameters():
        old = before.get(name)
        if old is not None and old.shape == new.shape:
            for optimizer in trainer.strategy.optimizers:
                if old in optimizer.state:
                    optimizer.state[new] = optimizer.state.pop(old)


def log_event(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Log a compression event's figures to every logger of the Trainer, at the current step (from any hook)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """New optimizers for the current parameters; surviving parameters keep their state, schedulers their progress."""
    old_states = [dict(opt.state) for opt in trainer.strategy.optimizers]
    schedules = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for optimizer, state in zip(trainer.strategy.optimizers, old_states):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in state:
                    optimizer.state[p] = state[p]
    for cfg, schedule in zip(trainer.lr_scheduler_configs, schedules):
        cfg.scheduler.load_state_dict(schedule)
        for group, lr in zip(cfg.scheduler.optimizer.param_groups, cfg.scheduler.get_last_lr()):
            group["lr"] = lr


class ChangesStructure(pl.Callback):
    """Base of callbacks that change the model's structure: every checkpoint records the structure."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        record_structure(checkpoint, find_moe_model(pl_module))


def record_structure(checkpoint: dict, model: nn.Module) -> None:
    """Write ``model``'s MoE structure (and active LoRA adapters) into a Lightning checkpoint."""
    checkpoint[STRUCTURE_KEY] = describe_structure(model)
    lora = getattr(model, "_camera_lora", None)
    if lora is not None:
        checkpoint[LORA_KEY] = lora.to_dict()


def restore_structure(model: nn.Module, checkpoint: dict) -> nn.Module:
    """``model`` reshaped to the structure recorded in a Lightning ``checkpoint`` (and re-wrapped with LoRA adapters
    when they were active); returns the model to keep.

    Call it from your LightningModule's ``on_load_checkpoint`` (``CausalLMModule`` does), which
    Lightning runs before loading the state dict.
    """
    if STRUCTURE_KEY in checkpoint:
        with torch.no_grad():
            apply_structure(model, checkpoint[STRUCTURE_KEY])
    if LORA_KEY in checkpoint:
        from camera_pl.lora import LoRAConfig, add_lora

        model = add_lora(model, LoRAConfig.from_dict(checkpoint[LORA_KEY]))
    return model


def calibration_data(trainer: pl.Trainer, given: Iterable | None, who: str, hint: str = "") -> Iterable:
    """Calibration batches for a callback: ``given``, else the fit's validation data (its loaders, or the datamodule's)."""
    if given is not None:
        return given
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None and type(trainer.datamodule).val_dataloader is not \
            pl.LightningDataModule.val_dataloader:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError(f"{who} needs calibration data: pass calib_dataloader=..., or give the fit validation data "
                         f"(val_dataloaders or a datamodule with val_dataloader), which it then uses.{hint}")
    return loaders

