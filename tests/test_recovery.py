"""LoRA recovery: adapters on attention and (fused or ragged) experts, merging, recovery in a Trainer."""

import logging

import lightning.pytorch as pl
import pytest
import torch

from camera_pl import collect_stats, prune
from camera_pl.callbacks import CameraPruning, LoRARecovery, MicroExpertStatsCallback
from camera_pl.lightning.module import CausalLMModule
from camera_pl import ConfigError, LoRAConfig, recover
from camera_pl.lora import add_lora, expert_parameter_targets, merge_lora
from camera_pl.testing import tiny_moe

from conftest import make_batch
from ddp_stats_script import samples


@pytest.mark.parametrize("allocation", ["layer", "expert"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_merged_equals_adapter_model(arch, allocation):
    batch = make_batch()
    model = tiny_moe(arch)
    prune(model, collect_stats(model, [batch]), 0.5, allocation=allocation)
    targets = expert_parameter_targets(model)
    assert targets and all(t.startswith("experts.") for t in targets)
    peft_model = add_lora(model, LoRAConfig(rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter, not the zero init
        adapted = peft_model(**batch).logits
        merged = merge_lora(peft_model)
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-4)
    assert type(merged).__name__.endswith("ForCausalLM")


def test_recover_lowers_loss_after_pruning():
    loader = torch.utils.data.DataLoader(samples(), batch_size=4)
    model = tiny_moe("qwen3_moe")
    prune(model, collect_stats(model, loader), 0.4)
    before = CausalLMModule(model)._loss(next(iter(loader))).item()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    model = recover(model, list(loader), LoRAConfig(rank=8, steps=30, lr=3e-2), accelerator="cpu")
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # LoRA only
    after = CausalLMModule(model)._loss(next(iter(loader))).item()
    assert after < before - 0.1


def test_recovery_callback_after_scheduled_pruning():
    loader = torch.utils.data.DataLoader(samples(), batch_size=2)
    module = CausalLMModule(tiny_moe("qwen3_moe"), lr=1e-3)
    recovery = LoRARecovery(rank=4, steps=2, lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3, num_sanity_val_steps=0,
                         callbacks=[MicroExpertStatsCallback(), CameraPruning({1: 0.3}), recovery], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert recovery.recoveries == 1 and module.lr == 1e-3
    assert type(module.model).__name__ == "Qwen3MoeForCausalLM"  # merged back
    assert all(p.requires_grad for p in module.model.parameters())
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="Did you mean 'rank'"):
        LoRARecovery(rnak=4)


@pytest.mark.slow
def test_recovery_lowers_validation_loss_of_pruned_reference_model():
    import itertools

    import camera_pl
    from camera_pl.data import TextDataModule
    from camera_pl.eval.evaluation import perplexity

    torch.manual_seed(0)
    model, tokenizer = camera_pl.reference_model()
    dm = TextDataModule(tokenizer, block_size=128, batch_size=8, max_documents=60)
    dm.setup()
    val = list(itertools.islice(dm.val_dataloader(), 6))
    prune(model, collect_stats(model, val), 0.4)
    pruned = perplexity(model, val)
    model = recover(model, list(itertools.islice(dm.train_dataloader(), 40)), steps=40, lr=3e-4, accelerator="cpu")
    assert perplexity(model, val) < pruned


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_recovery_inside_fit_continues_the_lr_schedule(weight_decay):
    """LoRA start and merge rebuild the optimizer, but the warmup schedule is never restarted (with weight decay
    too, where the no-decay group empties while only LoRA matrices train)."""
    loader = torch.utils.data.DataLoader(samples(), batch_size=2)
    module = CausalLMModule(tiny_moe("qwen3_moe"), lr=1e-3, warmup_steps=20, weight_decay=weight_decay)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=3, num_sanity_val_steps=0,
                         callbacks=[MicroExpertStatsCallback(), CameraPruning({1: 0.3}), LoRARecovery(rank=2, steps=2)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == trainer.global_step == 9
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 10 / 20)  # warmup step 10 of 20, not restarted


def test_recovery_fit_is_quiet(recwarn, caplog):
    """No Lightning tips, accelerator report or warnings a user cannot act on; modules train in train mode."""
    model = tiny_moe("qwen3_moe")
    caplog.set_level(logging.INFO)
    recover(model, list(torch.utils.data.DataLoader(samples()[:8], batch_size=4)), LoRAConfig(rank=2, steps=2),
            accelerator="cpu")
    assert not [str(w.message) for w in recwarn.list]
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_adapter_saves_with_peft_and_reloads_on_the_compressed_model(arch, tmp_path):
    """peft's own save_pretrained / PeftModel.from_pretrained over a camera_pl-saved ragged model (bucket parameters)."""
    from peft import PeftModel

    import camera_pl

    batch = make_batch()
    model = tiny_moe(arch)
    prune(model, collect_stats(model, [batch]), 0.4)
    camera_pl.save(model, tmp_path / "base")
    peft_model = add_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter, not the zero init
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(camera_pl.load(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


def test_validation_loss_is_token_weighted():
    """Two validation batches of different token counts: ``val/loss`` is the mean over tokens, not over batches."""
    model = tiny_moe("qwen3_moe")
    short, full = make_batch(pad_from=3), make_batch(pad_from=None)
    module = CausalLMModule(model)
    losses, tokens = [], []
    with torch.no_grad():
        for batch in (short, full):
            losses.append(module._loss(batch).item())
            tokens.append(int((module._labels(batch)[:, 1:] != -100).sum()))
    assert tokens[0] != tokens[1]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    [metrics] = trainer.validate(CausalLMModule(model), torch.utils.data.DataLoader([short, full], batch_size=None),
                                 verbose=False)
    expected = sum(l * n for l, n in zip(losses, tokens)) / sum(tokens)
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(metrics["val/loss"] - sum(losses) / 2) > 1e-4  # the per-batch mean would differ


def test_recovery_active_across_a_validation_and_a_checkpoint(tmp_path):
    """LoRA still training when an epoch ends: validation (with statistics) and the checkpoint see the adapters."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    loader = torch.utils.data.DataLoader(samples()[:8], batch_size=2)  # 4 batches an epoch
    recovery = LoRARecovery(rank=2, steps=6, lr=1e-2)  # starts at epoch 1, ends in epoch 2
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[MicroExpertStatsCallback(), CameraPruning({1: 0.3}), recovery, checkpoints])
    trainer.fit(CausalLMModule(tiny_moe("qwen3_moe")), train_dataloaders=loader, val_dataloaders=loader)
    assert recovery.recoveries == 1 and type(trainer.lightning_module.model).__name__ == "Qwen3MoeForCausalLM"
    mid = torch.load(tmp_path / "epoch=1-step=8.ckpt", weights_only=False)  # adapters active when it was written
    assert any("lora_" in name for name in mid["state_dict"])
    module = CausalLMModule(tiny_moe("qwen3_moe"))
    module.on_load_checkpoint(mid)
    module.load_state_dict(mid["state_dict"])
