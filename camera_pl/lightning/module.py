"""A plain LightningModule around a transformers causal LM, for finetuning and validation."""

from __future__ import annotations

import math
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from camera_pl.distill import Distillation
from camera_pl.labels import IGNORE_INDEX, causal_labels
from camera_pl.lightning.sharding import ShardingError, is_fsdp2, is_sharded, shard_model
from camera_pl.lightning.structure import LORA_KEY, STRUCTURE_KEY, restore_structure
from camera_pl.pretrained import load_pretrained
from camera_pl.serialization import describe_structure


class CausalLMModule(pl.LightningModule):
    """Next-token training/validation of ``model`` (kept at ``self.model``, where callbacks look).

    Batches are dicts with ``input_ids``, optional ``attention_mask`` and optional ``labels``
    (default: ``input_ids`` with padding set to -100). The MoE router auxiliary loss is
    added when the model returns one (``output_router_logits=True`` in its config).

    While ``distillation`` (a :class:`~camera_pl.distill.Distillation`, set by
    :class:`~camera_pl.callbacks.LoRARecovery` in KD mode) is set, training steps minimise its
    loss (logged as ``train/kd`` besides ``train/loss``); validation keeps the LM loss.

    ``model`` is a module, or a name :func:`~camera_pl.pretrained.load_pretrained` resolves
    (``"reference"``, a saved directory, a hub name) loaded in ``dtype``, so that a LightningCLI
    config can name it.

    Optimiser: AdamW (``betas``) with ``weight_decay`` on weight matrices only (not on biases,
    norms or other vectors). Learning rate: linear warmup over ``warmup_steps``, then constant,
    or, with ``cosine_steps``, a cosine from ``lr`` down to ``min_lr_ratio * lr`` at step
    ``cosine_steps`` (`progress` measures the way; subclasses may measure it otherwise).
    """

    def __init__(self, model: nn.Module | str, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 dtype: str = "float32", cosine_steps: int | None = None, min_lr_ratio: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.999)):
        super().__init__()
        if cosine_steps is not None and cosine_steps <= warmup_steps:
            raise ValueError(f"cosine_steps={cosine_steps} must exceed warmup_steps={warmup_steps} (the cosine "
                             "starts after warmup); raise it or leave it None for a constant rate")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1] (a fraction of lr)")
        if isinstance(model, str):
            model = load_pretrained(model, dtype)[0].train()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.cosine_steps = cosine_steps
        self.min_lr_ratio = min_lr_ratio
        self.betas = tuple(betas)
        self.distillation: Distillation | None = None  # a plain attribute: the teacher is no submodule

    @staticmethod
    def _labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.get("labels")
        return causal_labels(batch["input_ids"], batch.get("attention_mask")) if labels is None else labels

    def _forward(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                          use_cache=False, **kwargs)

    def _loss(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(batch, self._labels(batch) if labels is None else labels).loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logs ``train/loss`` (with the router aux loss when the model adds one, also logged as ``train/aux_loss``)."""
        labels = self._labels(batch)
        out = self._forward(batch, labels)
        loss = out.loss
        if self.distillation is not None:
            loss, kd = self.distillation.loss(batch, labels, out.logits, out.loss)
            self.log("train/kd", kd, prog_bar=True)
        if getattr(out, "aux_loss", None) is not None:
            self.log("train/aux_loss", out.aux_loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logs ``val/loss``: the epoch's mean LM loss over predicted tokens (a batch counts by its tokens, not as
        one); the router aux loss, a training regulariser, is left out."""
        labels = self._labels(batch)
        if getattr(getattr(self.model, "config", None), "output_router_logits", False):
            loss = self._forward(batch, labels, output_router_logits=False).loss
        else:
            loss = self._loss(batch, labels)
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the model predicts token t+1 from t
        # Lightning weights the epoch mean by batch_size and, with sync_dist, sums values and weights over ranks
        self.log("val/loss", loss, prog_bar=True, batch_size=tokens, sync_dist=True)
        return loss

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (a device mesh is set): shard the model with FSDP2, each decoder layer
        then the whole, unless it is sharded already; camera_pl's callbacks call it again after a compression."""
        if self.device_mesh is not None and not is_fsdp2(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the compressed structure recorded by camera_pl's callbacks before Lightning loads the weights."""
        if is_sharded(self.model):
            if checkpoint.get(STRUCTURE_KEY, describe_structure(self.model)) != describe_structure(self.model) \
                    or LORA_KEY in checkpoint:
                raise ShardingError("This checkpoint holds a compressed model; a sharded (FSDP) fit cannot resume "
                                    "from it (the model is sharded before the checkpoint is read). Save the model "
                                    "with camera_pl.save and start a new fit from that directory "
                                    "(CausalLMModule(model='DIR')), or resume without FSDP.")
            return
        self.model = restore_structure(self.model, checkpoint)

    def progress(self, step: int) -> float:
        """Fraction of the cosine schedule done after ``step`` optimizer steps (0 at the end of warmup, 1 at
        ``cosine_steps``)."""
        return min(1.0, (step - self.warmup_steps) / (self.cosine_steps - self.warmup_steps))

    def lr_factor(self, step: int) -> float:
        """The learning rate after ``step`` optimizer steps, as a fraction of ``lr``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.cosine_steps is None:
            return 1.0
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def configure_optimizers(self) -> Any:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.weight_decay == 0:
            groups = [{"params": [p for _, p in named], "weight_decay": 0.0}]
        else:  # always both groups, possibly one empty: structure changes rebuild the optimizer and keep the schedule
            groups = [{"params": [p for n, p in named if p.ndim >= 2 and "norm" not in n],
                       "weight_decay": self.weight_decay},
                      {"params": [p for n, p in named if p.ndim < 2 or "norm" in n], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        if self.warmup_steps <= 0 and self.cosine_steps is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
