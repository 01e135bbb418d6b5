"""Lightning callback that collects micro-expert statistics while the Trainer validates."""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.lightning.sharding import gathered
from camera_pl.lightning.structure import find_moe_model
from camera_pl.stats.observation import Observation, StatsAccumulator, observe
from camera_pl.stats.container import MicroExpertStats


class MicroExpertStatsCallback(pl.Callback):
    """Collects :class:`MicroExpertStats` during validation.

    Every ``every_n_epochs``-th validation run (sanity checks excluded) is observed, up to
    ``max_tokens`` unpadded tokens; at its end the statistics are reduced across DDP/FSDP ranks
    (torchmetrics ``sum``/``max``; the weight norms of a sharded model read one gathered layer at a
    time) and published as :attr:`stats` for other callbacks. They are saved in and restored from
    Lightning checkpoints.

    Validation batches must be dicts with ``input_ids`` and optional ``attention_mask``.
    """

    def __init__(self, every_n_epochs: int = 1, max_tokens: int | None = None, log: bool = True):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
        self.every_n_epochs = every_n_epochs
        self.max_tokens = max_tokens
        self.log = log
        self.stats: MicroExpertStats | None = None
        self.stats_epoch: int | None = None
        self._stack: ExitStack | None = None
        self._accumulator: StatsAccumulator | None = None
        self._observation: Observation | None = None
        self._model: nn.Module | None = None

    # ---- when to observe ------------------------------------------------------------------
    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self._model = find_moe_model(pl_module)
        self._stack = ExitStack()
        with torch.inference_mode(False):
            self._accumulator = StatsAccumulator(moe_layers(self._model))
        self._observation = self._stack.enter_context(observe(self._model, self._accumulator))

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._observation is None:
            return
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                "MicroExpertStatsCallback needs validation batches as dicts with 'input_ids' "
                f"(and optional 'attention_mask'); got {type(batch).__name__}."
            )
        self._observation.set_attention_mask(batch.get("attention_mask"), batch["input_ids"])

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._observation is None or self.max_tokens is None:
            return
        if self._observation.accumulator.tokens.item() >= self.max_tokens:
            self._stop_observing()  # the accumulator keeps what was seen; later batches run unobserved

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stack is None:
            return
        self._stop_observing()
        stats = MicroExpertStats.from_accumulator(self._accumulator, self._model, meta={"epoch": trainer.current_epoch},
                                                  gather=partial(gathered, pl_module))
        if stats.tokens == 0:
            raise ValueError("MicroExpertStatsCallback saw no tokens: the validation dataloader is empty or all padding.")
        self.stats, self.stats_epoch = stats, trainer.current_epoch
        self._stack = None
        if self.log:
            pl_module.log("camera/stats_tokens", float(stats.tokens), rank_zero_only=True, sync_dist=False)

    def _stop_observing(self) -> None:
        if self._observation is not None:
            self._observation = None
            self._stack.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = self._observation = None

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.stats is None:
            return {}
        return {
            "signature": self.stats.signature,
            "tokens": self.stats.tokens,
            "meta": self.stats.meta,
            "epoch": self.stats_epoch,
            "layers": {i: {n: t.detach().cpu() for n, t in e.items()} for i, e in self.stats.layers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        layers = {int(i): dict(e) for i, e in state_dict["layers"].items()}
        self.stats = MicroExpertStats(state_dict["signature"], layers, state_dict["tokens"], state_dict["meta"])
        self.stats_epoch = state_dict["epoch"]


def latest_stats(trainer: pl.Trainer) -> MicroExpertStats | None:
    """The statistics of the Trainer's :class:`MicroExpertStatsCallback` (its latest validation), if any."""
    for callback in trainer.callbacks:
        if isinstance(callback, MicroExpertStatsCallback) and callback.stats is not None:
            return callback.stats
    return None
