"""Perplexity of causal LMs (task accuracies come from lm-eval: `camera_pl.eval.harness`).

* `TokenPerplexity` is a torchmetrics metric accumulating summed token
  negative log-likelihood and token count (float64), so perplexity is the
  correct token-weighted average over batches and devices, with ``-100``
  labels excluded.  `perplexity` runs it over a dataloader.
* `unigram_perplexity` is the baseline a model must beat: add-one-smoothed
  unigram frequencies from training tokens, scored on the same test positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from camera_pl.labels import IGNORE_INDEX


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class TokenPerplexity(Metric):
    """Perplexity = exp(total NLL / number of scored tokens).

    ``update(logits, labels)`` takes unshifted logits ``(B, T, V)`` and labels
    ``(B, T)`` as for a HF causal LM: position ``t`` predicts ``labels[t + 1]``;
    labels equal to ``ignore_index`` are skipped.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.ndim != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        target = labels[:, 1:].reshape(-1)
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        nll = F.cross_entropy(flat, target, ignore_index=self.ignore_index, reduction="sum")
        self.nll += nll.double()
        self.count += (target != self.ignore_index).sum()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens were scored: every label is ignore_index; check the attention masks/labels")
        return torch.exp(self.nll / self.count)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """Token-weighted perplexity of a HF causal LM over batches with input_ids/attention_mask/labels."""
    device = _device(model)
    metric = TokenPerplexity().to(device)
    was_training = model.training
    model.eval()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        metric.update(logits, batch["labels"].to(device))
    model.train(was_training)
    return float(metric.compute())


def unigram_perplexity(
    train_batches: Iterable[dict[str, torch.Tensor]], test_batches: Iterable[dict[str, torch.Tensor]], vocab_size: int
) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on train labels.

    Scored on exactly the positions `TokenPerplexity` scores (labels[:, 1:]
    that are not ``-100``), so it is directly comparable with `perplexity`.
    """
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for batch in train_batches:
        labels = batch["labels"]
        counts += torch.bincount(labels[labels != IGNORE_INDEX].flatten(), minlength=vocab_size)[:vocab_size].double()
    log_probs = counts.log() - counts.sum().log()
    nll, n = 0.0, 0
    for batch in test_batches:
        target = batch["labels"][:, 1:]
        target = target[target != IGNORE_INDEX]
        nll -= float(log_probs[target].sum())
        n += target.numel()
    if n == 0:
        raise ValueError("no test tokens to score; the test batches are empty or fully masked")
    return float(torch.exp(torch.tensor(nll / n)))
