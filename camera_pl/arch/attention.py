"""Attention taps: read each layer's query/key states as the model's own attention computes them.

Token protection (MC's ODP) needs the attention every token receives. While a tap is
installed, the model's attention runs through the registered ``"camera_pl_tap"``
implementation: it hands the layer's exact query/key states (after RoPE, q/k norms, MLA
projections), the attention mask, the softmax scale and attention sinks to a consumer, then
delegates the attention output to the model's eager implementation (when the model ran
eager, e.g. GPT-OSS with attention sinks) or to SDPA with the same explicit mask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from camera_pl.arch.adapters import attention_modules

TAP = "camera_pl_tap"

Consumer = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float, "torch.Tensor | None"], None]
"""``consumer(query [B, Hq, L, D], key [B, Hkv, S, D], attention_mask, scaling, sinks)``."""


@dataclass
class _Tap:
    delegate: Callable
    consumer: Consumer | None


def _tapped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    tap: _Tap | None = module.__dict__.get("_camera_tap")
    if tap is None:
        raise RuntimeError(f"{type(module).__name__} runs attention implementation {TAP!r} without a camera_pl tap "
                           "installed; install it with camera_pl.arch.attention.tap_attention (as apply_odp does).")
    if tap.consumer is not None:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        tap.consumer(query, key, attention_mask, scaling, kwargs.get("s_aux"))
    return tap.delegate(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(TAP, _tapped_attention)
AttentionMaskInterface.register(TAP, eager_mask)


def _delegate(module: nn.Module, implementation: str | None) -> Callable:
    """The modelling file's own eager attention where the model ran eager (e.g. GPT-OSS sinks), else SDPA."""
    if implementation != "eager":
        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise TypeError(f"{type(module).__name__} runs eager attention but its module defines no "
                        "eager_attention_forward, so its attention cannot be tapped.")
    return eager


class AttentionTaps:
    """Installed taps; :meth:`remove` restores the model's attention implementation."""

    def __init__(self, model: nn.Module, modules: list[nn.Module], previous: str | None):
        self.model, self.modules, self.previous = model, modules, previous

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("_camera_tap", None)
        self.model.set_attn_implementation(self.previous)


def tap_attention(model: nn.Module, consumers: dict[int, Consumer]) -> AttentionTaps:
    """Feed the attention of decoder layers ``consumers`` keys to their consumers (other layers run untouched)."""
    previous = model.config._attn_implementation
    modules = attention_modules(model)
    missing = sorted(set(consumers) - set(modules))
    if missing:
        raise ValueError(f"{type(model).__name__} has no self-attention module in decoder layers {missing}.")
    for index, module in modules.items():
        module._camera_tap = _Tap(_delegate(module, previous), consumers.get(index))
    model.set_attn_implementation(TAP)
    return AttentionTaps(model, list(modules.values()), previous)
