"""Evaluation of causal LMs: perplexity and zero-shot multiple choice.

* `TokenPerplexity` is a torchmetrics metric accumulating summed token
  negative log-likelihood and token count (float64), so perplexity is the
  correct token-weighted average over batches and devices, with ``-100``
  labels excluded.  `perplexity` runs it over a dataloader.
* `unigram_perplexity` is the baseline a model must beat: add-one-smoothed
  unigram frequencies from training tokens, scored on the same test positions.
* `multiple_choice` scores lm-eval style tasks (sum of continuation
  log-likelihoods; ``acc`` and byte-length-normalised ``acc_norm``) read from
  JSONL files (`load_task`; fields ``context``, ``choices``, ``label``).
  `camera_pl.eval.tasks` builds such files from held-out corpus files.
* `EvaluationCallback` logs these figures during Lightning validation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

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


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: the model scores ``context + choices[i]`` for each i."""

    context: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"need at least 2 non-empty string choices, got {self.choices!r}")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} is out of range for {len(self.choices)} choices")


def load_task(path: str | Path) -> list[MCExample]:
    """Read a JSONL multiple-choice task (fields ``context``, ``choices``, ``label``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist; build tasks with build_tasks()")
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(MCExample(row["context"], tuple(row["choices"]), int(row["label"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}:{lineno} is not a valid task row ({err!r}); "
                'expected {"context": str, "choices": [str, ...], "label": int}'
            ) from err
    if not examples:
        raise ValueError(f"task file {path} holds no examples")
    return examples


def write_task(path: str | Path, examples: Sequence[MCExample]) -> Path:
    """Write examples as JSONL (one object per line) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (json.dumps({"context": e.context, "choices": list(e.choices), "label": e.label}) for e in examples)
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _encode_request(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids ``[EOS] + context + continuation`` (left-truncated) and the continuation length.

    Context and continuation are encoded separately so the continuation tokens
    are exactly those of the choice; the leading EOS mirrors the document
    separator seen in training and gives the first token a prediction.
    """
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if len(cont) >= max_length:
        raise ValueError(
            f"continuation of {len(cont)} tokens does not fit max_length={max_length}; shorten the choices"
        )
    ids = ([tokenizer.eos_token_id] + ctx + cont)[-max_length:]
    return ids, len(cont)


@torch.no_grad()
def continuation_loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each ``(context, continuation)`` pair.

    Requests are batched longest-first, right-padded, on the model's device.
    ``max_length`` defaults to ``model.config.max_position_embeddings``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set one (it starts every scored sequence)")
    if max_length is None:
        max_length = model.config.max_position_embeddings
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encode_request(tokenizer, ctx, cont, max_length) for ctx, cont in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(encoded[idx[0]][0])
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(idx):
            ids = encoded[i][0]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(idx):
            ids, n_cont = encoded[i]
            targets = torch.tensor(ids[-n_cont:], device=device)
            positions = torch.arange(len(ids) - n_cont - 1, len(ids) - 1, device=device)
            results[i] = float(log_probs[row, positions, targets].sum())
    model.train(was_training)
    return results


def multiple_choice(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[MCExample], batch_size: int = 16
) -> dict[str, float]:
    """Zero-shot accuracy in the lm-eval style.

    ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm``
    divides each by the choice's UTF-8 byte length first.  Ties go to the
    first choice.
    """
    if not examples:
        raise ValueError("no examples to score")
    requests = [(e.context, c) for e in examples for c in e.choices]
    scores = iter(continuation_loglikelihoods(model, tokenizer, requests, batch_size))
    correct = correct_norm = 0
    for e in examples:
        ll = [next(scores) for _ in e.choices]
        norm = [s / len(c.encode("utf-8")) for s, c in zip(ll, e.choices)]
        correct += max(range(len(ll)), key=ll.__getitem__) == e.label
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == e.label
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples), "n": float(len(examples))}


class EvaluationCallback(L.Callback):
    """Log perplexity and/or multiple-choice accuracies at the end of each validation epoch.

    Lightning forbids ``log`` in ``on_validation_end``, so this runs in
    ``on_validation_epoch_end`` (skipped during the sanity check).  Metrics are
    logged as ``eval/perplexity``, ``eval/<task>/acc`` and ``eval/<task>/acc_norm``.

    Args:
        batches: perplexity batches (e.g. a test dataloader); None skips perplexity.
        tasks: task name -> examples; needs ``tokenizer``.
        tokenizer: tokenizer of the model, for the tasks.
        model_attr: attribute of the LightningModule holding the HF model
            (``""`` means the LightningModule itself).
        max_batches: cap on perplexity batches per evaluation.
        batch_size: batch size of the multiple-choice scoring.
    """

    def __init__(
        self,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
        tasks: Mapping[str, Sequence[MCExample]] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        model_attr: str = "model",
        max_batches: int | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        if batches is None and not tasks:
            raise ValueError("EvaluationCallback needs batches (for perplexity) or tasks (for accuracy)")
        if tasks and tokenizer is None:
            raise ValueError("EvaluationCallback got tasks but no tokenizer; pass the model's tokenizer")
        self.batches, self.tasks, self.tokenizer = batches, dict(tasks or {}), tokenizer
        self.model_attr, self.max_batches, self.batch_size = model_attr, max_batches, batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        model = getattr(pl_module, self.model_attr) if self.model_attr else pl_module
        if self.batches is not None:
            pl_module.log("eval/perplexity", perplexity(model, self.batches, self.max_batches), sync_dist=True)
        for name, examples in self.tasks.items():
            scores = multiple_choice(model, self.tokenizer, examples, self.batch_size)
            pl_module.log(f"eval/{name}/acc", scores["acc"], sync_dist=True)
            pl_module.log(f"eval/{name}/acc_norm", scores["acc_norm"], sync_dist=True)
