"""Knowledge distillation for recovery: the compressed model (student) learns the logits of its uncompressed self.

The loss is ``kd_alpha · KD + (1 − kd_alpha) · LM``: ``KD`` is the Kullback–Leibler divergence
``KL(teacher ‖ student)`` between the next-token distributions softened by a temperature ``T``,
scaled by ``T²`` (so its gradients keep their size as ``T`` changes; Hinton et al., 2015), averaged
over exactly the positions the LM loss counts (:func:`camera_pl.labels.causal_labels`: padding is
ignored); ``LM`` is the model's own next-token loss (with the router auxiliary loss where the model
adds one). The teacher is a frozen copy of the model before compression (:func:`frozen_copy`) or
any model with the same vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from camera_pl.labels import IGNORE_INDEX


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """``T² · mean KL(softmax(teacher/T) ‖ softmax(student/T))`` over the positions whose next label counts.

    Logits ``[B, L, V]`` (any float dtype; computed in float32), ``labels [B, L]`` as for the LM
    loss: position ``t`` predicts ``labels[:, t + 1]`` and counts unless that is ``IGNORE_INDEX``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}; the teacher needs the student's vocabulary.")
    counted = labels[:, 1:] != IGNORE_INDEX
    student = student_logits[:, :-1][counted].float() / temperature
    teacher = teacher_logits[:, :-1][counted].float() / temperature
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0  # no counted position (all padding): no signal, but a graph
    kl = nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def output_vocab(model: nn.Module) -> int:
    """Number of logits per position ``model`` predicts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """The teacher predicts the student's vocabulary (KD compares their logits token by token)."""
    t, s = output_vocab(teacher), output_vocab(student)
    if t != s:
        raise ValueError(f"the KD teacher predicts {t} tokens, the student {s}; distil from a model with the "
                         "student's vocabulary (e.g. the student before compression).")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a deep copy of ``model`` on its device and in its dtype, in eval mode, without gradients.

    It costs a second copy of the model's weights (as many bytes as the uncompressed model)
    plus one teacher forward's activations per training step; no gradients or optimizer state.
    """
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


@dataclass
class Distillation:
    """The KD part of a training loss: a teacher and the loss weights (see the module docstring)."""

    teacher: nn.Module
    temperature: float = 1.0
    alpha: float = 1.0

    def loss(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, student_logits: torch.Tensor,
             lm_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha · KD + (1 − alpha) · lm_loss, KD)`` for one batch the student has already run on."""
        device = student_logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                          use_cache=False).logits
        kd = kd_loss(student_logits, teacher_logits, labels, self.temperature)
        return self.alpha * kd + (1.0 - self.alpha) * lm_loss, kd
