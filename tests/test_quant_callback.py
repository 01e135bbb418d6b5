"""CameraQuantization in Lightning fits: direct packing, and a straight-through fake-quantized phase."""


import lightning.pytorch as pl
import pytest
import torch

from camera_pl import collect_stats, moe_layers
from camera_pl.callbacks import MicroExpertStatsCallback
from camera_pl.callbacks.quantization import CameraQuantization
from camera_pl.lightning.module import CausalLMModule
from camera_pl.experts.quantized import QuantizedExperts
from camera_pl.testing import tiny_moe

from conftest import make_batch

BATCHES = [make_batch(seed=i, batch=2, seq=12) for i in range(2)]


def fit(model, quant, epochs=2, lr=1e-3):
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[MicroExpertStatsCallback(), quant], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         max_epochs=epochs, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(BATCHES, batch_size=None)
    trainer.fit(CausalLMModule(model, lr=lr), train_dataloaders=loader, val_dataloaders=loader)
    return trainer


def test_fit_with_fake_quant_phase_packs_at_fit_end():
    model = tiny_moe("qwen3_moe")
    quant = CameraQuantization(quantize_epoch=1, fake_quant=True, method="camera", avg_bits=3.0, group_size=16)
    fit(model, quant)
    assert quant.report is not None and quant.report.avg_bits <= 3.0 + 1e-9
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(model))


def test_fake_quant_forward_equals_packed_forward():
    model = tiny_moe("gpt_oss")
    module = CausalLMModule(model)
    stats_cb = MicroExpertStatsCallback()
    stats_cb.stats = collect_stats(model, BATCHES)
    trainer = pl.Trainer(accelerator="cpu", callbacks=[stats_cb], logger=False, enable_progress_bar=False)
    quant = CameraQuantization(quantize_epoch=0, fake_quant=True, method="channel", avg_bits=2.5, group_size=16)
    quant.on_train_epoch_start(trainer, module)
    batch = BATCHES[0]
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    latent = moe_layers(model)[0].module.base.gate_up_proj
    assert latent.grad is not None and latent.grad.abs().sum() > 0  # straight-through gradients reach the latent weights
    quant.on_fit_end(trainer, module)
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, out.logits.detach(), rtol=0, atol=1e-5)


def test_missing_stats_is_a_clear_error():
    model = tiny_moe("mixtral")
    quant = CameraQuantization(quantize_epoch=0, method="camera")
    with pytest.raises(ValueError, match="MicroExpertStatsCallback"):
        fit(model, quant, epochs=1)


def test_gptq_and_pmq_calibrate_on_the_fits_validation_data():
    """No calib_dataloader: GPTQ/PMQ take the fit's validation loader, as a YAML-configured callback must."""
    model = tiny_moe("qwen3_moe")
    quant = CameraQuantization(quantize_epoch=1, method="pmq", avg_bits=2.5, quantizer="gptq", group_size=16)
    fit(model, quant, epochs=2)
    assert quant.phase == "packed" and quant.report is not None
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(model))
    lonely = CameraQuantization(quantize_epoch=0, method="uniform", avg_bits=4, quantizer="gptq")
    trainer = pl.Trainer(accelerator="cpu", callbacks=[MicroExpertStatsCallback(), lonely], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="needs calibration data"):  # no validation data either
        trainer.fit(CausalLMModule(tiny_moe("qwen3_moe")), torch.utils.data.DataLoader(BATCHES, batch_size=None))


def test_checkpoint_of_the_fake_quant_phase_loads_and_resumes(tmp_path):
    """Validations with statistics before, during and after the fake-quantized phase; its checkpoint resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(epochs):
        quant = CameraQuantization(quantize_epoch=1, fake_quant=True, pack_epoch=2, method="camera", avg_bits=3.0,
                                   group_size=16)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        return quant, pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[MicroExpertStatsCallback(), quant, ckpt])

    loader = torch.utils.data.DataLoader(BATCHES, batch_size=None)
    quant, first = trainer(3)
    first.fit(CausalLMModule(tiny_moe("qwen3_moe")), loader, loader)
    assert quant.phase == "packed"
    fake_phase = tmp_path / "epoch=1-step=4.ckpt"  # saved at the end of the fake-quantized epoch
    module = CausalLMModule(tiny_moe("qwen3_moe"))
    checkpoint = torch.load(fake_phase, weights_only=False)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: the fake-quant parametrizations are rebuilt
    resumed_quant, resumed = trainer(3)
    resumed.fit(CausalLMModule(tiny_moe("qwen3_moe")), loader, loader, ckpt_path=fake_phase)
    assert resumed_quant.phase == "packed"
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(resumed.lightning_module.model))
