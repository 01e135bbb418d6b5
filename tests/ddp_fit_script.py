"""Run by test_ddp_fit.py: a 2-process CPU DDP (gloo) fit with a compressing callback, then a resume.

Usage: ``ddp_fit_script.py OUT_DIR SCENARIO PHASE`` with SCENARIO prune | quantize | recover and
PHASE fit (3 epochs, compression at epoch 1, a checkpoint every epoch) or resume (from the
epoch-1 checkpoint, written after the compression, to 4 epochs). Each rank saves its final
parameters and buffers to ``OUT_DIR/PHASE_rank{r}.pt``.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from camera_pl.callbacks import CameraPruning, CameraQuantization, LoRARecovery, MicroExpertStatsCallback
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe
from ddp_stats_script import samples


def compression(scenario: str) -> list:
    if scenario == "prune":
        return [CameraPruning({1: 0.3})]
    if scenario == "quantize":
        return [CameraQuantization(1, avg_bits=3.0, group_size=16)]
    return [CameraPruning({1: 0.3}, allocation="expert"), LoRARecovery(rank=2, steps=2, lr=1e-2)]


if __name__ == "__main__":
    out, scenario, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = CausalLMModule(tiny_moe("qwen3_moe"), lr=1e-3, warmup_steps=4)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3 if phase == "fit" else 4,
                         limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[MicroExpertStatsCallback(), *compression(scenario), checkpoints])
    loader = torch.utils.data.DataLoader(samples(16), batch_size=2, shuffle=False)
    ckpt = str(out / "ckpt" / "epoch=1.ckpt") if phase == "resume" else None
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=ckpt)
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    torch.save({"state": state, "step": trainer.global_step}, out / f"{phase}_rank{trainer.global_rank}.pt")
