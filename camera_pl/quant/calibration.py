"""Calibration inputs of one MoE layer: what its routed experts receive, captured in the model's forward.

GPTQ needs each expert's inputs (for its Hessians) and PMQ needs the layer's inputs (to
measure output errors). :func:`capture_layer_inputs` runs the model over calibration
batches and records, for one layer, the tokens entering its experts module together
with their routing; the forward is cut short right after that layer, so capturing layer
``l`` costs ``l + 1`` decoder layers per batch. Called layer by layer while quantizing,
this gives sequential calibration: layer ``l`` sees the outputs of the already quantized
layers before it (as GPTQ and CAMERA's public code do). :func:`capture_step_inputs` captures
the same from the cached batches of a layer-by-layer run (:mod:`camera_pl.offload`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer
from camera_pl.offload import LayerStep, calibration_batches


@dataclass
class LayerInputs:
    """Unpadded calibration tokens of one layer: ``hidden [T, H]``, ``index``/``weights [T, k]``."""

    hidden: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token positions, slots)`` of the tokens routed to expert ``e``."""
        return torch.where(self.index == e)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once the layer's input is recorded."""


class _Capture:
    """The hook :meth:`MoELayer.watch_experts_input` calls: keeps the unpadded tokens of the declared mask, then stops
    the forward."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.mask: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        keep = self.mask.reshape(-1).to(hidden.device)
        self.parts.append((hidden[keep].detach(), index[keep].detach(), weights[keep].detach()))
        raise _Captured

    def inputs(self) -> LayerInputs:
        if not any(len(hidden) for hidden, _, _ in self.parts):
            raise ValueError("The calibration dataloader gave no tokens; pass batches with unpadded input_ids.")
        hidden, index, weights = (torch.cat(p) for p in zip(*self.parts))
        return LayerInputs(hidden, index, weights)


def capture_layer_inputs(model: nn.Module, layer: MoELayer, dataloader: Iterable,
                         max_tokens: int | None = None) -> LayerInputs:
    """Inputs of ``layer``'s experts over ``dataloader`` (dicts with ``input_ids``, optional ``attention_mask``).

    Padding tokens are dropped. Stops after the batch that reaches ``max_tokens`` tokens.
    """
    device = next(model.parameters()).device
    capture = _Capture()
    undo = layer.watch_experts_input(capture)
    tokens = 0
    try:
        with torch.no_grad():
            for ids, capture.mask in calibration_batches(dataloader, device):
                try:
                    model(input_ids=ids, attention_mask=capture.mask.long(), use_cache=False)
                except _Captured:
                    pass
                tokens += int(capture.mask.sum())
                if max_tokens is not None and tokens >= max_tokens:
                    break
    finally:
        undo()
    return capture.inputs()


def capture_step_inputs(step: LayerStep) -> LayerInputs:
    """The experts inputs of a layer-by-layer step's MoE layer over its cached batches (:mod:`camera_pl.offload`)."""
    capture = _Capture()
    undo = step.moe.watch_experts_input(capture)
    try:
        step.run(keep_outputs=False, before_batch=lambda mask: setattr(capture, "mask", mask), stop=_Captured)
    finally:
        undo()
    return capture.inputs()
