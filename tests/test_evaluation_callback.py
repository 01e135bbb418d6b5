"""EvaluationCallback: lm-eval tasks at chosen epochs of a real Trainer.fit, logged through the Trainer's loggers."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from camera_pl.callbacks import EvaluationCallback
from camera_pl.config import ConfigError
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe

from conftest import make_batch


class ModeProbe(pl.Callback):
    """Records the model's train/eval mode right after the EvaluationCallback ran (it runs first)."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.modes.append(pl_module.model.training)


def test_callback_logs_chosen_epochs_to_csv(tmp_path, tokenizer):
    model = tiny_moe("qwen3_moe", vocab_size=len(tokenizer), max_position_embeddings=512,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id).train()
    evaluation = EvaluationCallback(["next_line"], epochs=[1], limit=4, tokenizer=tokenizer)
    probe = ModeProbe()
    batches = [make_batch(seed=s, vocab=len(tokenizer), pad_from=None) for s in range(2)]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                         logger=CSVLogger(tmp_path, name="run"), callbacks=[evaluation, probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CausalLMModule(model), train_dataloaders=DataLoader(batches, batch_size=None))
    assert list(evaluation.results) == [1]  # only the chosen epoch
    assert probe.modes == [True, True]  # still training after the evaluation
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [(int(r["epoch"]), float(r["eval/next_line/acc"])) for r in rows if r.get("eval/next_line/acc")]
    assert logged == [(1, evaluation.results[1]["next_line"]["acc"])]
    assert [r for r in rows if r.get("eval/next_line/acc_bytes")]
    assert not any(k.endswith("_stderr") for k in rows[0])


def test_callback_refuses_bad_schedules_and_missing_tokenizer():
    with pytest.raises(ValueError, match="task names"):
        EvaluationCallback([])
    with pytest.raises(ConfigError, match="epochs"):
        EvaluationCallback(["next_line"], epochs=[-1])
    with pytest.raises(ConfigError, match="every_n_epochs"):
        EvaluationCallback(["next_line"], every_n_epochs=0)
    late = EvaluationCallback(["next_line"], epochs=[5], tokenizer="reference")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, callbacks=[late], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    batches = [make_batch(pad_from=None)]
    with pytest.raises(ConfigError, match="max_epochs=2"):
        trainer.fit(CausalLMModule(tiny_moe("qwen3_moe")), train_dataloaders=DataLoader(batches, batch_size=None))
    no_tokenizer = EvaluationCallback(["next_line"])
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[no_tokenizer],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        trainer.fit(CausalLMModule(tiny_moe("qwen3_moe")), train_dataloaders=DataLoader(batches, batch_size=None))
    assert torch.is_grad_enabled()
