"""Knowledge-distillation recovery: the KD loss, its weights and checks, and KD in a Trainer fit."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from camera_pl import ConfigError, LoRAConfig, collect_stats, prune, recover
from camera_pl.callbacks import CameraPruning, LoRARecovery
from camera_pl.distill import Distillation, check_teacher, frozen_copy, kd_loss
from camera_pl.labels import IGNORE_INDEX, causal_labels
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe

from conftest import make_batch
from ddp_stats_script import samples


def _brute_force_kl(student, teacher, labels, temperature):
    """T² · mean over counted positions of Σ_v p_t(v) (log p_t(v) − log p_s(v)), one position at a time."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            p = torch.softmax(teacher[b, t].double() / temperature, -1)
            q = torch.softmax(student[b, t].double() / temperature, -1)
            terms.append((p * (p.log() - q.log())).sum())
    return torch.stack(terms).mean() * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_equals_brute_force_kl_on_padded_batch(temperature):
    batch = make_batch(batch=3, seq=10, pad_from=4)  # the last row is padding from position 4
    labels = causal_labels(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        student = tiny_moe("qwen3_moe", seed=0)(**batch).logits
        teacher = tiny_moe("qwen3_moe", seed=1)(**batch).logits
    expected = _brute_force_kl(student, teacher, labels, temperature)
    got = kd_loss(student, teacher, labels, temperature)
    assert got.item() > 0.01
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    junk = student.clone()
    junk[-1, 3:] = torch.randn_like(junk[-1, 3:]) * 10  # padded positions (those predicting a padded label)
    torch.testing.assert_close(kd_loss(junk, teacher, labels, temperature), got)
    assert kd_loss(teacher, teacher, labels, temperature).abs().item() < 1e-6


def test_kd_alpha_mixes_kd_and_the_lm_loss_and_alpha_one_ignores_labels():
    batch = make_batch()
    labels = causal_labels(batch["input_ids"], batch["attention_mask"])
    student, teacher = tiny_moe("qwen3_moe", seed=0), tiny_moe("qwen3_moe", seed=1)
    with torch.no_grad():
        out = student(**batch, labels=labels)
        kd = kd_loss(out.logits, teacher(**batch).logits, labels, 2.0)
        for alpha in (0.0, 0.3, 1.0):
            loss, got_kd = Distillation(teacher, 2.0, alpha).loss(batch, labels, out.logits, out.loss)
            torch.testing.assert_close(got_kd, kd)
            torch.testing.assert_close(loss, alpha * kd + (1 - alpha) * out.loss)
    assert not torch.isclose(kd, out.loss)  # the mix is not trivially one term


@pytest.mark.parametrize("options,match", [
    (dict(distill=True, kd_temperature=0.0), "kd_temperature"),
    (dict(distill=True, kd_temperature=-1.0), "kd_temperature"),
    (dict(distill=True, kd_alpha=1.5), "kd_alpha"),
    (dict(distill=True, kd_alpha=-0.1), "kd_alpha"),
    (dict(kd_alpha=0.5), "distill=True"),
])
def test_bad_kd_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        LoRAConfig(**options)


def test_teacher_checks():
    with pytest.raises(ValueError, match="predicts 128 tokens, the student 96"):
        check_teacher(tiny_moe("qwen3_moe", vocab_size=128), tiny_moe("qwen3_moe"))
    with pytest.raises(ConfigError, match="pass teacher="):
        LoRARecovery(distill=True, start_now=True)
    with pytest.raises(ConfigError, match="distill=False"):
        LoRARecovery(teacher=tiny_moe("qwen3_moe"))
    loader = list(torch.utils.data.DataLoader(samples()[:4], batch_size=2))
    with pytest.raises(ValueError, match="predicts 128 tokens"):
        recover(tiny_moe("qwen3_moe"), loader, LoRAConfig(steps=1, distill=True), accelerator="cpu",
                teacher=tiny_moe("qwen3_moe", vocab_size=128))


def _kl_to(teacher, model, batches):
    with torch.no_grad():
        return sum(kd_loss(model(**b).logits, teacher(**b).logits,
                           causal_labels(b["input_ids"], b["attention_mask"])).item() for b in batches) / len(batches)


class _KlProbe(pl.Callback):
    """KL(teacher ‖ model) on held-out batches when LoRA recovery starts and when the fit ends."""

    def __init__(self, recovery, batches):
        self.recovery, self.batches, self.kl = recovery, batches, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.distillation is not None and not self.kl:
            self.kl.append(_kl_to(self.recovery.teacher, pl_module.model, self.batches))

    def on_train_end(self, trainer, pl_module):
        self.kl.append(_kl_to(self.recovery.teacher, pl_module.model, self.batches))


def test_trainer_fit_with_kd_recovery_lowers_kl_to_the_dense_model():
    train = torch.utils.data.DataLoader(samples(24), batch_size=4)
    dense = tiny_moe("qwen3_moe")
    reference = copy.deepcopy(dense)
    module = CausalLMModule(dense.train(), lr=1e-3)
    recovery = LoRARecovery(rank=8, steps=30, lr=3e-3, distill=True, kd_temperature=2.0)
    probe = _KlProbe(recovery, list(train))  # KL on the distillation data
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[CameraPruning({0: 0.75}, calib_dataloader=list(train)), recovery, probe],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=train)
    assert recovery.recoveries == 1 and module.distillation is None  # KD ends with the recovery
    assert _kl_to(reference, recovery.teacher, list(train)) == 0.0  # the teacher is the model before pruning
    assert all(not p.requires_grad for p in recovery.teacher.parameters()) and not recovery.teacher.training
    before, after = probe.kl
    assert before > 0.03 and after < 0.7 * before


def test_recover_in_kd_mode_gets_closer_to_the_teacher_than_lm_recovery():
    batches = list(torch.utils.data.DataLoader(samples(24), batch_size=4))
    dense = tiny_moe("qwen3_moe")
    stats = collect_stats(dense, batches)
    kl = {}
    for distill in (True, False):
        model = copy.deepcopy(dense)
        teacher = frozen_copy(dense)
        prune(model, stats, 0.75)
        before = _kl_to(teacher, model, batches)
        options = dict(distill=True) if distill else {}
        model = recover(model, batches, LoRAConfig(rank=8, steps=20, lr=3e-3, **options), accelerator="cpu",
                        teacher=teacher if distill else None)
        kl[distill] = _kl_to(teacher, model, batches)
    assert kl[True] < 0.7 * before and kl[True] < kl[False]
