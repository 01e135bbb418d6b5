"""CausalLMModule's optimiser (weight-decay groups), LR schedule (warmup, cosine, wall-clock cosine of the
reference training) and aux-loss handling."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_batch

from camera_pl.lightning.module import CausalLMModule
from camera_pl.reference.train import WallClockCosineModule
from camera_pl.testing import tiny_moe


def _factors(module: CausalLMModule, steps: int) -> list[float]:
    """Learning rates the configured scheduler sets over ``steps`` optimizer steps, as fractions of lr."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"] / module.lr)
        optimizer.step()
        scheduler.step()
    return out


def test_decay_groups_cover_matrices_only_and_betas() -> None:
    model = tiny_moe("qwen3_moe")
    model.lm_head.weight.requires_grad_(False)
    optimizer = CausalLMModule(model, weight_decay=0.1, betas=(0.9, 0.95)).configure_optimizers()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.95)
    assert all(p.ndim >= 2 and "norm" not in names[id(p)] for p in decay["params"])
    assert all(p.ndim < 2 or "norm" in names[id(p)] for p in no_decay["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert id(model.lm_head.weight) not in trainable
    [single] = CausalLMModule(model).configure_optimizers().param_groups  # no decay: one group, as before
    assert {id(p) for p in single["params"]} == trainable
    only_matrix = CausalLMModule(torch.nn.Linear(2, 2, bias=False), weight_decay=0.1).configure_optimizers()
    assert [len(g["params"]) for g in only_matrix.param_groups] == [1, 0]  # both groups kept, for rebuilds


def test_warmup_then_constant_or_cosine() -> None:
    model = tiny_moe("qwen3_moe")
    assert isinstance(CausalLMModule(model).configure_optimizers(), torch.optim.AdamW)  # no schedule
    assert _factors(CausalLMModule(model, lr=1.0, warmup_steps=4), 7) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1])
    cosine = _factors(CausalLMModule(model, lr=1.0, warmup_steps=2, cosine_steps=6, min_lr_ratio=0.1), 8)
    expected = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * min(1, (s - 2) / 4))) for s in range(2, 8)]
    assert cosine == pytest.approx(expected)
    assert cosine[2] == pytest.approx(1.0) and cosine[6] == cosine[7] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        CausalLMModule(model, warmup_steps=5, cosine_steps=5)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        CausalLMModule(model, cosine_steps=5, min_lr_ratio=1.5)


def test_wall_clock_cosine_follows_the_further_of_steps_and_time() -> None:
    model = tiny_moe("qwen3_moe")
    kwargs = dict(lr=1.0, warmup_steps=2, cosine_steps=102, min_lr_ratio=0.1)
    plenty = WallClockCosineModule(model, max_seconds=1e6, **kwargs)
    assert _factors(plenty, 4) == pytest.approx(_factors(CausalLMModule(model, **kwargs), 4))
    spent = WallClockCosineModule(model, max_seconds=1e6, **kwargs)
    spent.start_time -= 1e6  # the wall-clock budget is used up: the rate is at its floor right after warmup
    assert _factors(spent, 4) == pytest.approx([0.5, 1.0, 0.1, 0.1])


def test_aux_loss_logged_in_training_and_left_out_of_validation() -> None:
    model = tiny_moe("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)
    batch = make_batch()
    module = CausalLMModule(model, lr=0.0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1)
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    logged = trainer.logged_metrics
    with torch.no_grad():
        labels = module._labels(batch)
        with_aux = module._forward(batch, labels)
        lm_only = module._forward(batch, labels, output_router_logits=False).loss
    assert float(logged["train/aux_loss"]) == pytest.approx(float(with_aux.aux_loss), rel=1e-5)
    assert float(logged["train/loss"]) == pytest.approx(float(with_aux.loss), rel=1e-5)
    assert float(logged["val/loss"]) == pytest.approx(float(lm_only), rel=1e-5)
    assert float(with_aux.loss) > float(lm_only) + 1e-3  # the aux loss is not negligible here
