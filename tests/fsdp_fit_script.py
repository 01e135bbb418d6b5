"""Run by test_fsdp.py: a sharded fit (FSDP2 via ModelParallelStrategy, or FSDP1 via FSDPStrategy) of a tiny MoE.

Usage: ``fsdp_fit_script.py OUT_DIR STRATEGY SCENARIO DEVICES ACCELERATOR`` with STRATEGY fsdp2 | fsdp1 | single,
SCENARIO stats | prune | quantize | recover, DEVICES the process count. ``stats`` validates once; the others fit
3 epochs at lr 0 (weights change only by the compression, so any process count must give the same model), the
compression at epoch 1. Rank 0 writes the statistics (``stats.safetensors``) and ``camera_pl.save``'s directory
(``model``); a failure is written to ``error.txt``.
"""

import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

import camera_pl
from camera_pl.callbacks import CameraPruning, CameraQuantization, LoRARecovery, MicroExpertStatsCallback
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe
from ddp_stats_script import samples


def strategy(name: str, devices: int):
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if name == "fsdp1":
        layer = type(tiny_moe("qwen3_moe").model.layers[0])
        return FSDPStrategy(auto_wrap_policy={layer})
    return "auto"


def compression(scenario: str) -> list:
    if scenario == "prune":
        return [CameraPruning({1: 0.3})]
    if scenario == "quantize":
        return [CameraQuantization(1, method="uniform", avg_bits=4, group_size=16)]
    if scenario == "recover":
        return [CameraPruning({1: 0.3}, allocation="expert"), LoRARecovery(rank=2, steps=2)]
    return []


if __name__ == "__main__":
    out, name, scenario, devices, accelerator = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), \
        sys.argv[5]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    stats = MicroExpertStatsCallback()
    module = CausalLMModule(tiny_moe("qwen3_moe"), lr=0.0)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy(name, devices), max_epochs=3,
                         limit_train_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[stats, *compression(scenario)])
    # each of `devices` ranks sees 8 / devices samples per epoch: the same 8 in total whatever the process count
    loader = torch.utils.data.DataLoader(samples(8), batch_size=8 // (2 * devices), shuffle=False)
    try:
        if scenario == "stats":
            trainer.validate(module, dataloaders=loader, verbose=False)
        else:
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
        camera_pl.save(module.model, out / "model")
        if trainer.global_rank == 0:
            stats.stats.save(out / "stats.safetensors")
    except Exception:
        if trainer.global_rank == 0:
            (out / "error.txt").write_text(traceback.format_exc())
        raise
