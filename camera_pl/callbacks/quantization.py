"""``CameraQuantization``: quantize an MoE model's experts during or after a fit.

The callback decides *when*; :func:`camera_pl.quantize` and :mod:`camera_pl.quant.fake` do
the work. Two schedules:

* direct: at the start of ``quantize_epoch`` (or at the end of the fit when it is None)
  the experts are quantized and packed;
* ``fake_quant=True``: at ``quantize_epoch`` the allocation is fixed and the experts are
  seen through straight-through fake quantization (the latent full-precision weights keep
  training); at the start of ``pack_epoch`` (or at the end of the fit) the latent weights
  are quantized with the configured quantizer at the same allocation and packed. With
  ``quantizer="rtn"`` the packed model computes exactly what the last fake-quantized
  forward computed.

Statistics come from the Trainer's :class:`~camera_pl.callbacks.MicroExpertStatsCallback`
(e.g. the previous epoch's validation). After packing, expert weights are buffers and no
longer train. Checkpoints record the structure (fake-quantized or packed), so a run
resumes from them.
"""

from __future__ import annotations

from typing import Iterable

import lightning.pytorch as pl
import torch

from camera_pl.callbacks.stats import latest_stats
from camera_pl.config import ConfigError
from camera_pl.lightning.structure import (ChangesStructure, CompressionEvent, calibration_data, changing_structure,
                                           find_moe_model, log_event, structure_changed)
from camera_pl.quant.allocation import LayerBits
from camera_pl.quant.api import QuantReport, allocate, quantize
from camera_pl.quant.config import QuantizeConfig
from camera_pl.quant.fake import end_fake_quantization, fake_allocation, fake_quantize


class CameraQuantization(ChangesStructure):
    """Quantize the experts at a configured epoch, optionally after a fake-quantized (STE) phase.

    Args:
        quantize_epoch: epoch at whose start quantization (or fake quantization) begins;
            None quantizes at the end of the fit.
        fake_quant: train with straight-through fake quantization before packing.
        pack_epoch: with ``fake_quant``, epoch at whose start the model is packed (None: end of fit).
        config: the :class:`QuantizeConfig`; its fields may also be given as keywords
            (``CameraQuantization(1, method="camera", avg_bits=2.5)``).
        calib_dataloader: calibration batches for GPTQ/PMQ (default: the fit's validation data).
    """

    def __init__(self, quantize_epoch: int | None = None, fake_quant: bool = False, pack_epoch: int | None = None,
                 config: QuantizeConfig | None = None, calib_dataloader: Iterable | None = None, **options):
        if quantize_epoch is not None and (not isinstance(quantize_epoch, int) or quantize_epoch < 0):
            raise ConfigError(f"quantize_epoch must be an epoch >= 0 or None, got {quantize_epoch!r}.")
        if pack_epoch is not None and (not fake_quant or quantize_epoch is None or pack_epoch <= quantize_epoch):
            raise ConfigError("pack_epoch needs fake_quant=True and must come after quantize_epoch "
                              f"(got quantize_epoch={quantize_epoch}, pack_epoch={pack_epoch}).")
        if fake_quant and quantize_epoch is None:
            raise ConfigError("fake_quant=True needs a quantize_epoch at which the fake-quantized phase starts.")
        self.config = QuantizeConfig.build(config, **options)
        self.quantize_epoch = quantize_epoch
        self.fake_quant = fake_quant
        self.pack_epoch = pack_epoch
        self.calib_dataloader = calib_dataloader
        self.phase = "waiting"  # -> "fake" (fake-quantized phase) -> "packed"
        self.allocation: dict[int, LayerBits] | None = None
        self.report: QuantReport | None = None

    def _stats(self, trainer: pl.Trainer):
        stats = latest_stats(trainer)
        if stats is None and self.config.needs_stats:
            raise ValueError("CameraQuantization found no statistics: add a MicroExpertStatsCallback to the Trainer "
                             "and make sure a validation run happened before quantizing (or quantize at a later epoch).")
        return stats

    def _calibration(self, trainer: pl.Trainer) -> Iterable | None:
        """GPTQ/PMQ batches: ``calib_dataloader``, else the fit's validation data; None where none is needed."""
        if not self.config.needs_calibration or (self.allocation is not None and self.config.quantizer != "gptq"):
            return self.calib_dataloader
        return calibration_data(trainer, self.calib_dataloader, "CameraQuantization (GPTQ/PMQ)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = [e for e in (self.quantize_epoch, self.pack_epoch) if e is not None]
        if trainer.max_epochs not in (None, -1) and any(e >= trainer.max_epochs for e in epochs):
            raise ConfigError(f"CameraQuantization is scheduled at epoch {max(epochs)}, but the Trainer stops after "
                              f"max_epochs={trainer.max_epochs}; lower the epoch or raise max_epochs.")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.phase == "waiting" and self.quantize_epoch is not None and epoch >= self.quantize_epoch:
            if self.fake_quant:
                self._start_fake_quant(trainer, pl_module)
            else:
                self._pack(trainer, pl_module)
        elif self.phase == "fake" and self.pack_epoch is not None and epoch >= self.pack_epoch:
            self._pack(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == "fake" or (self.phase == "waiting" and self.quantize_epoch is None):
            self._pack(trainer, pl_module)

    def _start_fake_quant(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_moe_model(pl_module)
        with torch.inference_mode(False), changing_structure(trainer, pl_module):
            self.allocation = allocate(model, self._stats(trainer), self.config,
                                       calib_dataloader=self._calibration(trainer))
            fake_quantize(model, self.allocation, self.config.group_size)
        self.phase = "fake"
        structure_changed(trainer, pl_module, CompressionEvent("fake_quantize", trainer.current_epoch,
                                                               trainer.global_step))

    def _pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_moe_model(pl_module)
        with torch.inference_mode(False), changing_structure(trainer, pl_module):
            self.allocation = fake_allocation(model) if self.phase == "fake" else None  # also after a resume
            end_fake_quantization(model)
            stats = None if self.allocation is not None else self._stats(trainer)
            self.report = quantize(model, stats, self.config, calib_dataloader=self._calibration(trainer),
                                   allocation=self.allocation)
        self.phase = "packed"
        structure_changed(trainer, pl_module, CompressionEvent("quantize", trainer.current_epoch, trainer.global_step,
                                                               self.report))
        weights = sum(layer.params for layer in self.report.layers)
        histogram: dict[str, float] = {}  # fraction of routed weights stored at each bit-width, over all layers
        for layer in self.report.layers:
            for bits, fraction in layer.histogram.items():
                key = f"camera/quant_fraction_{bits}bit"
                histogram[key] = histogram.get(key, 0.0) + fraction * layer.params / max(weights, 1)
        log_event(trainer, {"camera/quant_avg_bits": self.report.avg_bits,
                            "camera/quant_bits_per_param": self.report.bits_per_param, **histogram})

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"phase": self.phase}

    def load_state_dict(self, state_dict: dict) -> None:
        self.phase = state_dict["phase"]
