"""Run by test_callback.py: 2-process CPU DDP (gloo) validation with the stats callback."""

import sys

import lightning.pytorch as pl
import torch

from camera_pl.callbacks import MicroExpertStatsCallback
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe


def samples(n: int = 8, seq: int = 10) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 96, (seq,), generator=gen)
        mask = torch.ones(seq, dtype=torch.long)
        mask[seq - (i % 4):] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    cb = MicroExpertStatsCallback()
    trainer = pl.Trainer(accelerator="cpu", devices=int(sys.argv[2]), strategy="ddp" if sys.argv[2] != "1" else "auto",
                         callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(samples(), batch_size=2, shuffle=False)
    trainer.validate(CausalLMModule(tiny_moe("qwen2_moe")), dataloaders=loader, verbose=False)
    if trainer.global_rank == 0:
        cb.stats.save(sys.argv[1])
