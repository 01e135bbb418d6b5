"""Lightning callback that quantizes an MoE model's experts during or after a fit.

:class:`CameraQuantization` decides *when*; :func:`camera_pl.quant.quantize` does the work.
Two schedules:

* direct: at the start of ``quantize_epoch`` (or at the end of the fit when it is None)
  the experts are quantized and packed;
* ``fake_quant=True``: at ``quantize_epoch`` the allocation is fixed and every expert
  weight is replaced in the forward by its round-to-nearest quantization with
  straight-through gradients (the latent full-precision weights keep training); at the
  start of ``pack_epoch`` (or at the end of the fit) the latent weights are quantized with
  the configured quantizer at the same allocation and packed. With ``quantizer="rtn"``
  the packed model computes exactly what the last fake-quantized forward computed.

Statistics come from the :class:`~camera_pl.callbacks.stats.MicroExpertStatsCallback` in
``trainer.callbacks`` (its ``.stats``, e.g. from the previous epoch's validation). After
packing, expert weights are buffers and no longer train. Resuming from a checkpoint
written after quantization is not supported (the packed structure is not rebuilt).
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

from camera_pl.arch.adapters import MoELayer, moe_layers
from camera_pl.callbacks.stats import MicroExpertStatsCallback, find_moe_model
from camera_pl.quant.allocation import LayerBits
from camera_pl.quant.api import QuantReport, allocate, quantize
from camera_pl.quant.quantizers import rtn


class _FakeQuantSTE(nn.Module):
    """Parametrization of a fused experts tensor: ``W + (RTN(W) − W).detach()`` row by row.

    ``parts`` lists, per quantized row stack inside the fused tensor, a function giving its
    ``[E, R, C]`` view and the bits ``[E, R]`` of those rows.
    """

    def __init__(self, parts: list[tuple[Any, torch.Tensor]], group_size: int):
        super().__init__()
        self.parts = parts
        self.group_size = group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = weight.detach().clone()
        for view, bits in self.parts:
            rows = view(quantized)
            flat = rows.reshape(-1, rows.shape[-1])
            q = rtn(flat, bits.flatten().to(flat.device), self.group_size)
            rows.copy_(q.dequantize(flat.dtype).reshape(rows.shape))
        return weight + (quantized - weight).detach()


def _fused_parts(layer: MoELayer, bits: LayerBits) -> dict[str, list[tuple[Any, torch.Tensor]]]:
    """Row-stack views of the fused tensors (``gate_up_proj``/``up_proj``, ``down_proj``) for an allocation."""
    t = layer.is_transposed

    def linear(w: torch.Tensor) -> torch.Tensor:  # [E, out, in]
        return w.transpose(1, 2) if t else w

    up_name = "gate_up_proj" if layer.has_gate else "up_proj"
    if not layer.has_gate:
        up_parts = [(linear, bits.up)]
    elif layer.is_concatenated:
        half = layer.intermediate_size
        up_parts = [(lambda w: linear(w)[:, :half], bits.gate), (lambda w: linear(w)[:, half:], bits.up)]
    else:
        up_parts = [(lambda w: linear(w)[:, 0::2], bits.gate), (lambda w: linear(w)[:, 1::2], bits.up)]
    down_view = (lambda w: linear(w).transpose(1, 2)) if bits.down_axis == "in" else linear
    return {up_name: up_parts, "down_proj": [(down_view, bits.down)]}


class CameraQuantization(pl.Callback):
    """Quantize the experts at a configured epoch, optionally after a fake-quantized (STE) phase.

    Args:
        quantize_epoch: epoch at whose start quantization (or fake quantization) begins;
            None quantizes at the end of the fit.
        fake_quant: train with straight-through fake quantization before packing.
        pack_epoch: with ``fake_quant``, epoch at whose start the model is packed (None: end of fit).
        calib_dataloader: calibration batches for GPTQ/PMQ.
        **quantize_kwargs: passed to :func:`camera_pl.quant.quantize` (method, avg_bits, groups,
            quantizer, group_size, ...).
    """

    def __init__(self, quantize_epoch: int | None = None, fake_quant: bool = False, pack_epoch: int | None = None,
                 calib_dataloader: Iterable | None = None, **quantize_kwargs: Any):
        if quantize_epoch is not None and quantize_epoch < 0:
            raise ValueError(f"quantize_epoch must be >= 0 or None, got {quantize_epoch}.")
        if pack_epoch is not None and (not fake_quant or quantize_epoch is None or pack_epoch <= quantize_epoch):
            raise ValueError("pack_epoch needs fake_quant=True and must come after quantize_epoch "
                             f"(got quantize_epoch={quantize_epoch}, pack_epoch={pack_epoch}).")
        if fake_quant and quantize_epoch is None:
            raise ValueError("fake_quant=True needs a quantize_epoch at which the fake-quantized phase starts.")
        needs_calib = quantize_kwargs.get("quantizer") == "gptq" or quantize_kwargs.get("method") == "pmq"
        if needs_calib and calib_dataloader is None:
            raise ValueError("GPTQ and PMQ need calibration data: pass calib_dataloader to CameraQuantization.")
        self.quantize_epoch = quantize_epoch
        self.fake_quant = fake_quant
        self.pack_epoch = pack_epoch
        self.calib_dataloader = calib_dataloader
        self.kwargs = quantize_kwargs
        self.allocation: dict[int, LayerBits] | None = None
        self.report: QuantReport | None = None

    def _stats(self, trainer: pl.Trainer):
        for cb in trainer.callbacks:
            if isinstance(cb, MicroExpertStatsCallback) and cb.stats is not None:
                return cb.stats
        if self.kwargs.get("method") == "uniform":
            return None
        raise ValueError("CameraQuantization found no statistics: add a MicroExpertStatsCallback to the Trainer and "
                         "make sure a validation run happened before quantizing (or quantize at a later epoch).")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self.quantize_epoch and self.report is None and self.allocation is None:
            if self.fake_quant:
                self._start_fake_quant(trainer, pl_module)
            else:
                self._pack(trainer, pl_module)
        elif self.fake_quant and epoch == self.pack_epoch and self.report is None:
            self._pack(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is None and (self.quantize_epoch is None or self.allocation is not None):
            self._pack(trainer, pl_module)

    def _start_fake_quant(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_moe_model(pl_module)
        keys = ("method", "avg_bits", "groups", "group_size", "bit_choices", "reduce_ratio", "max_calib_tokens",
                "pmq_exponents")
        self.allocation = allocate(model, self._stats(trainer), calib_dataloader=self.calib_dataloader,
                                   **{k: v for k, v in self.kwargs.items() if k in keys})
        group_size = self.kwargs.get("group_size", 128)
        for layer in moe_layers(model):
            for name, parts in _fused_parts(layer, self.allocation[layer.index]).items():
                parametrize.register_parametrization(layer.experts, name, _FakeQuantSTE(parts, group_size))

    def _pack(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_moe_model(pl_module)
        for layer in moe_layers(model):
            for name in list(getattr(layer.experts, "parametrizations", {})):
                parametrize.remove_parametrizations(layer.experts, name, leave_parametrized=False)
        stats = None if self.allocation is not None else self._stats(trainer)
        with torch.inference_mode(False):
            self.report = quantize(model, stats, calib_dataloader=self.calib_dataloader, allocation=self.allocation,
                                   **self.kwargs)
        if pl_module.logger is not None:
            pl_module.logger.log_metrics({"camera/quant_avg_bits": self.report.avg_bits,
                                          "camera/quant_bits_per_param": self.report.bits_per_param})
