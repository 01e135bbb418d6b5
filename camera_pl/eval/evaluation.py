"""Perplexity of causal LMs (task accuracies come from lm-eval: `camera_pl.eval.harness`).

* `perplexity` runs torchmetrics' `Perplexity` over a dataloader: it keeps the
  summed token negative log-likelihood and the token count (cast to float64
  here, so long runs do not lose precision), so the result is the correct
  token-weighted average over batches and devices, ``-100`` labels excluded.
  torchmetrics does not shift, so `perplexity` pairs position ``t``'s logits
  with ``labels[t + 1]`` itself, and casts logits to float32 first (the metric
  takes a softmax in the logits' own dtype, which bf16 would spoil).
* `mean_kl` is how far a compressed model's next-token distributions moved from a
  reference model's logits, over the unpadded tokens.
* `unigram_perplexity` is the baseline a model must beat: add-one-smoothed
  unigram frequencies from training tokens, scored on the same test positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchmetrics.text import Perplexity

from camera_pl.labels import IGNORE_INDEX


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_batches: int | None = None) -> float:
    """Token-weighted perplexity of a HF causal LM over batches with input_ids/attention_mask/labels."""
    device = _device(model)
    metric = Perplexity(ignore_index=IGNORE_INDEX).set_dtype(torch.float64).to(device)
    was_training = model.training
    model.eval()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        metric.update(logits[:, :-1].float(), batch["labels"][:, 1:].to(device))
    model.train(was_training)
    with metric.sync_context():  # the count over all processes
        scored = int(metric.count)
    if scored == 0:
        raise ValueError("no tokens were scored: every label is -100 (or no batches); check the attention masks/labels")
    return float(metric.compute())


@torch.no_grad()
def mean_kl(reference_logits: Sequence[torch.Tensor], model: nn.Module,
            batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean KL(reference ‖ model) of next-token distributions over the batches' unpadded tokens.

    ``reference_logits[i]`` are the logits a reference (e.g. the dense) model gave batch ``i``.
    """
    device = _device(model)
    total, count = 0.0, 0
    for ref, batch in zip(reference_logits, batches):
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits
        p = torch.log_softmax(ref.to(device).float(), -1)[mask.bool()]
        q = torch.log_softmax(logits.float(), -1)[mask.bool()]
        total += float((p.exp() * (p - q)).sum())
        count += int(mask.sum())
    return total / count


def unigram_perplexity(
    train_batches: Iterable[dict[str, torch.Tensor]], test_batches: Iterable[dict[str, torch.Tensor]], vocab_size: int
) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on train labels.

    Scored on exactly the positions `perplexity` scores (labels[:, 1:]
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
