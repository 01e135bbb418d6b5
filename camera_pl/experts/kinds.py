"""The registry of camera_pl experts kinds: rebuild an empty module from its ``{kind, spec}`` description.

``camera_pl.save`` records each MoE layer's experts module with
:func:`camera_pl.experts.module.describe`; ``load``
rebuilds an empty module of the same kind and shapes with :func:`build` (weights then come
from the state dict). A kind that wraps another (compressed experts over a ragged or
quantized base) records the base in its spec under ``"base"``; it is rebuilt first.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from camera_pl.experts.base import Experts, as_experts
from camera_pl.experts.compressed import build_compressed
from camera_pl.experts.fake_quant import build_fake_quant
from camera_pl.experts.quantized import build_quantized
from camera_pl.experts.ragged import build_ragged

Builder = Callable[[dict, Experts], nn.Module]

_BUILDERS: dict[str, Builder] = {"ragged": build_ragged, "quantized": build_quantized,
                                 "compressed": build_compressed, "fake_quant": build_fake_quant}


def register_experts_kind(kind: str, build: Builder) -> None:
    """Register ``build(spec, replaced_experts) -> empty module`` for camera_pl experts modules of ``kind``."""
    _BUILDERS[kind] = build


def known(description: dict) -> bool:
    """Whether every kind in ``description`` (and its bases) has a builder."""
    base = description["spec"].get("base")
    return description["kind"] in _BUILDERS and (base is None or known(base))


def build(description: dict, replaced: Experts) -> nn.Module:
    """An empty module of the described kind in place of ``replaced`` (bases first)."""
    base = description["spec"].get("base")
    if base is not None:
        replaced = as_experts(build(base, replaced))
    return _BUILDERS[description["kind"]](description["spec"], replaced)
