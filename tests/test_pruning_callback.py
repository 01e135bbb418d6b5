"""CameraPruning inside Trainer.fit: gradual schedule, optimizer rebuilt, checkpoints restore pruned shapes."""

import lightning.pytorch as pl
import pytest
import torch

from camera_pl import moe_layers
from camera_pl.callbacks import CameraPruning, MicroExpertStatsCallback
from camera_pl.lightning.module import CausalLMModule
from camera_pl.testing import tiny_moe

from ddp_stats_script import samples


def loader():
    return torch.utils.data.DataLoader(samples(), batch_size=2, shuffle=False)


def expert_width_total(model) -> int:
    return sum(int(layer.experts.widths().sum()) for layer in moe_layers(model))


class Recorder(pl.Callback):
    """Checks after each training batch that the optimizer holds exactly the model's parameters."""

    def __init__(self):
        self.widths, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert opt_params == {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.widths.append(expert_width_total(pl_module.model))


def test_gradual_pruning_during_fit_and_checkpoint_restore(tmp_path):
    model = tiny_moe("qwen3_moe")
    full = expert_width_total(model)
    rec = Recorder()
    pruning = CameraPruning({1: 0.2, 2: 0.4})
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, num_sanity_val_steps=0,
                         callbacks=[MicroExpertStatsCallback(), pruning, rec], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    module = CausalLMModule(model, lr=1e-3, warmup_steps=10)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    per_layer = full // 2  # two MoE layers; each removes floor(ratio * its micro-experts)
    assert rec.widths == [full, full - 2 * int(0.2 * per_layer), full - 2 * int(0.4 * per_layer)]
    assert rec.lrs == sorted(rec.lrs) and rec.lrs == pytest.approx([1e-4 * (n + 2) for n in range(6)])  # warmup continued across pruning
    assert [r.ratio for r in pruning.reports] == [0.2, 0.4]
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = CausalLMModule(tiny_moe("qwen3_moe", seed=1))
    state = torch.load(ckpt, weights_only=False)
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])
    batch = next(iter(loader()))
    with torch.no_grad():
        assert torch.equal(fresh.model(**batch).logits, module.model(**batch).logits)
    # resuming fit from the checkpoint rebuilds the pruned shapes too
    resumed = CausalLMModule(tiny_moe("qwen3_moe", seed=2))
    t2 = pl.Trainer(accelerator="cpu", max_epochs=4, limit_train_batches=1, num_sanity_val_steps=0,
                    callbacks=[MicroExpertStatsCallback(), CameraPruning({1: 0.2, 2: 0.4})], logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t2.fit(resumed, train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt)
    assert expert_width_total(resumed.model) == full - 2 * int(0.4 * per_layer)


def test_missing_statistics_is_a_clear_error():
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                         callbacks=[CameraPruning({0: 0.3})], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="MicroExpertStatsCallback"):
        trainer.fit(CausalLMModule(tiny_moe("mixtral")), train_dataloaders=loader())
    with pytest.raises(ValueError, match="epoch 0"):
        CameraPruning({0: 1.2})


def test_calibration_dataloader_instead_of_stats_callback():
    model = tiny_moe("qwen2_moe")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                         callbacks=[CameraPruning(lambda epoch: 0.5, calib_dataloader=loader())], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(CausalLMModule(model), train_dataloaders=loader())
    assert model.model.layers[0].mlp.shared_expert.down_proj.weight.shape[1] < 24
