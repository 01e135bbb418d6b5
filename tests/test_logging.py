"""Callbacks log through the Trainer's loggers: what a CSVLogger records of a fit that prunes, recovers, quantizes."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from camera_pl import moe_layers
from camera_pl.callbacks import CameraPruning, LoRARecovery, MicroExpertStatsCallback
from camera_pl.callbacks.quantization import CameraQuantization
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe

from conftest import make_batch


def test_csv_logger_records_every_compression_event(tmp_path):
    loader = torch.utils.data.DataLoader([make_batch(seed=i, batch=2, seq=12) for i in range(2)], batch_size=None)
    model = tiny_moe("qwen3_moe")
    layers = [layer.index for layer in moe_layers(model)]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=CSVLogger(tmp_path, name="run"),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, log_every_n_steps=1,
                         callbacks=[MicroExpertStatsCallback(), CameraPruning({1: 0.3}), LoRARecovery(rank=2, steps=1),
                                    CameraQuantization(quantize_epoch=2, method="camera", avg_bits=3, group_size=16)])
    trainer.fit(CausalLMModule(model), loader, loader)
    rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))

    def logged(key):
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    assert [v for _, v in logged("camera/stats_tokens")] == [36.0] * 3  # one per validation
    assert [v for _, v in logged("camera/pruned_ratio")] == [0.3]
    assert all(len(logged(f"camera/layer{i}_expert_params")) == 1 for i in layers)
    assert [v for _, v in logged("camera/recoveries")] == [1.0, 2.0]  # after pruning, after quantizing: no repeats
    assert [v for _, v in logged("camera/quant_avg_bits")] == [pytest.approx(3.0)]
    fractions = [k for k in rows[0] if k.startswith("camera/quant_fraction_")]
    assert fractions and sum(logged(k)[0][1] for k in fractions) == pytest.approx(1.0)
    assert len(logged("val/loss")) == 3 and len(logged("train/loss")) == 6
    steps = [step for step, _ in logged("camera/pruned_ratio") + logged("camera/quant_avg_bits")]
    assert steps == sorted(steps) and steps[0] > 0  # at the step they happened, not step 0
