"""MicroExpertStatsCallback inside real Lightning Trainer runs (CPU, 1 and 2 processes)."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from camera_pl import MicroExpertStats, collect_stats
from camera_pl.callbacks import MicroExpertStatsCallback
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe

from ddp_stats_script import samples

HERE = Path(__file__).parent


def loader(batch_size: int = 2):
    return torch.utils.data.DataLoader(samples(), batch_size=batch_size, shuffle=False)


def trainer(cb, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


def assert_same_stats(a: MicroExpertStats, b: MicroExpertStats) -> None:
    assert a.tokens == b.tokens and a.signature == b.signature
    for index in a.layers:
        for name, value in a.layers[index].items():
            torch.testing.assert_close(value, b.layers[index][name], rtol=1e-5, atol=1e-6, msg=f"{index}.{name}")


def test_validate_collects_same_stats_as_collect_stats():
    model = tiny_moe("qwen2_moe")
    cb = MicroExpertStatsCallback()
    trainer(cb).validate(CausalLMModule(model), dataloaders=loader(), verbose=False)
    assert cb.stats is not None and cb.stats_epoch == 0
    assert_same_stats(cb.stats, collect_stats(model, loader()))
    assert model.config._experts_implementation != "camera_pl"  # restored after validation


def test_fit_skips_sanity_check_and_respects_every_n_epochs():
    model = tiny_moe("mixtral")
    cb = MicroExpertStatsCallback(every_n_epochs=2)
    trainer(cb, max_epochs=2, limit_train_batches=1, num_sanity_val_steps=2).fit(
        CausalLMModule(model, lr=0.0), train_dataloaders=loader(), val_dataloaders=loader())
    assert cb.stats_epoch == 0  # epoch 1 not due; sanity check not counted
    assert cb.stats.tokens == sum(int(s["attention_mask"].sum()) for s in samples())


def test_token_cap():
    cb = MicroExpertStatsCallback(max_tokens=20)
    trainer(cb).validate(CausalLMModule(tiny_moe("olmoe")), dataloaders=loader(), verbose=False)
    first_two = sum(int(s["attention_mask"].sum()) for s in samples()[:2])
    first_four = sum(int(s["attention_mask"].sum()) for s in samples()[:4])
    assert cb.stats.tokens == (first_two if first_two >= 20 else first_four)


def test_checkpoint_saves_and_restores_stats(tmp_path):
    model = tiny_moe("qwen3_moe")
    cb = MicroExpertStatsCallback()
    t = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, callbacks=[cb], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   num_sanity_val_steps=0)
    t.fit(CausalLMModule(model, lr=0.0), train_dataloaders=loader(), val_dataloaders=loader())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    restored = MicroExpertStatsCallback()
    t2 = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[restored], logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    t2.fit(CausalLMModule(tiny_moe("qwen3_moe"), lr=0.0), train_dataloaders=loader(), val_dataloaders=loader(),
           ckpt_path=ckpt)
    assert restored.stats_epoch == 0
    assert_same_stats(restored.stats, cb.stats)


def test_non_dict_batches_are_rejected():
    cb = MicroExpertStatsCallback()
    bad = torch.utils.data.DataLoader([torch.zeros(4, dtype=torch.long)] * 2, batch_size=2)

    class Module(CausalLMModule):
        def validation_step(self, batch, batch_idx):
            return None

    with pytest.raises(TypeError, match="dicts with 'input_ids'"):
        trainer(cb).validate(Module(tiny_moe("qwen3_moe")), dataloaders=bad, verbose=False)
    with pytest.raises(ValueError, match="every_n_epochs"):
        MicroExpertStatsCallback(every_n_epochs=0)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    """gloo DDP on CPU: states reduced by torchmetrics (sum/max) equal one process over all data."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    outputs = {}
    for devices in ("2", "1"):
        path = tmp_path / f"stats_{devices}.safetensors"
        subprocess.run([sys.executable, str(HERE / "ddp_stats_script.py"), str(path), devices], check=True, env=env,
                       cwd=tmp_path, timeout=300, capture_output=True)
        outputs[devices] = MicroExpertStats.load(path)
    assert_same_stats(outputs["2"], outputs["1"])
    assert outputs["1"].tokens == sum(int(s["attention_mask"].sum()) for s in samples())
