"""``EvaluationCallback``: lm-eval task accuracies at the end of chosen training epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from camera_pl.config import ConfigError
from camera_pl.eval.harness import evaluate, require_lm_eval, task_names


class EvaluationCallback(pl.Callback):
    """Run lm-eval ``tasks`` on the model at the end of chosen training epochs and log the results.

    The tasks are scored by :func:`camera_pl.evaluate`. They can be camera_pl's offline tasks
    (``next_line``, ``docstring_match``) or lm-eval's own tasks, which need network access.
    Each metric is logged as ``eval/<task>/<metric>`` (e.g. ``eval/next_line/acc``) with
    ``pl_module.log`` at the epoch's end, so every logger of the Trainer receives it. Standard
    errors are left out. Only global rank zero evaluates; the other ranks wait for it. The
    model goes back to the train/eval mode it had before.

    Args:
        tasks: task names (see :func:`camera_pl.evaluate`).
        epochs: the (0-based) epochs after which to evaluate; None: every ``every_n_epochs``-th epoch.
        every_n_epochs: the interval when ``epochs`` is None.
        limit: items per task (None: all).
        batch_size: sequences per forward pass of the evaluation.
        tokenizer: the model's tokenizer, or a name that ``camera_pl.pretrained.load_tokenizer``
            resolves (``"reference"``, a model directory, a hub name). None: the datamodule's
            ``tokenizer``.
        model_attr: attribute of the LightningModule that holds the causal LM (``""``: the module itself).
    """

    def __init__(self, tasks: str | Sequence[str], epochs: Sequence[int] | None = None, every_n_epochs: int = 1,
                 limit: int | None = None, batch_size: int = 16, tokenizer: Any = None, model_attr: str = "model"):
        self.tasks = task_names(tasks)
        require_lm_eval()
        if epochs is not None and not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs):
            raise ConfigError(f"EvaluationCallback epochs must be epoch numbers (integers >= 0), got {epochs!r}.")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError(f"EvaluationCallback every_n_epochs must be a positive integer, got {every_n_epochs!r}.")
        self.epochs = None if epochs is None else sorted(set(epochs))
        self.every_n_epochs = every_n_epochs
        self.limit, self.batch_size, self.model_attr = limit, batch_size, model_attr
        if isinstance(tokenizer, str):
            from camera_pl.pretrained import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.results: dict[int, dict[str, dict[str, float]]] = {}  # epoch -> camera_pl.evaluate's output

    def _due(self, epoch: int) -> bool:
        return epoch in self.epochs if self.epochs is not None else (epoch + 1) % self.every_n_epochs == 0

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attr, None) if self.model_attr else pl_module
        if not isinstance(model, nn.Module):
            raise ConfigError(f"EvaluationCallback: {type(pl_module).__name__} has no module at "
                              f"'{self.model_attr}'; set model_attr to the attribute holding the causal LM.")
        return model

    def _tokenizer(self, trainer: pl.Trainer) -> Any:
        tokenizer = self.tokenizer or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("EvaluationCallback needs the model's tokenizer: pass tokenizer= (an object or a "
                              "name such as 'reference'), or use a datamodule with a `tokenizer` attribute.")
        return tokenizer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._model(pl_module)
        self._tokenizer(trainer)
        if self.epochs and trainer.max_epochs not in (None, -1):
            late = [e for e in self.epochs if e >= trainer.max_epochs]
            if late:
                raise ConfigError(f"EvaluationCallback is scheduled after epochs {late}, but the Trainer stops after "
                                  f"max_epochs={trainer.max_epochs}; those evaluations would never run.")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self._due(epoch):
            return
        if trainer.is_global_zero:
            results = evaluate(self._model(pl_module), self._tokenizer(trainer), self.tasks, limit=self.limit,
                               batch_size=self.batch_size)
            self.results[epoch] = results
            for task, metrics in results.items():
                for metric, value in metrics.items():
                    if metric != "n" and not metric.endswith("_stderr"):
                        pl_module.log(f"eval/{task}/{metric}", value, rank_zero_only=True)
        trainer.strategy.barrier("camera_pl_evaluation")
