"""Compressed experts (arXiv 2503.00634, METHODS §5) applied to a model: :func:`compress_experts`.

The module that does the work is :class:`camera_pl.experts.compressed.CompressedExperts`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.config import Config
from camera_pl.experts.compressed import CompressedExperts

TRAINABLE = ("all", "vectors")


@dataclass(frozen=True)
class CompressedExpertsConfig(Config):
    """Options of compressed experts (see :func:`compress_experts`).

    Attributes:
        k_main: main experts per token; None takes ``top_k // 2`` (at least 1), the paper's ``k/2``.
        trainable: ``"all"`` leaves every parameter's ``requires_grad`` as it is (the paper trains
            all parameters); ``"vectors"`` freezes everything except the θ vectors.
    """

    k_main: int | None = None
    trainable: str = "all"

    def check(self) -> None:
        self._number("k_main", 1, integer=True, optional=True)
        self._choice("trainable", TRAINABLE)


def compress_experts(model: nn.Module, config: CompressedExpertsConfig | int | None = None,
                     **options) -> list[CompressedExperts]:
    """Replace every MoE layer's experts of ``model`` (in place) by :class:`CompressedExperts`.

    ``config`` is a :class:`CompressedExpertsConfig` (or its ``k_main``); ``options`` are its
    fields. The experts may be of any kind (fused, pruned, quantized). Returns the new modules,
    in layer order.
    """
    if isinstance(config, int) and not isinstance(config, bool):
        config, options = None, {"k_main": config, **options}
    config = CompressedExpertsConfig.build(config, **options)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    if top_k is None:
        raise ValueError(f"{type(model).__name__}'s config has no num_experts_per_tok; compressed experts need "
                         "top-k routing.")
    k_main = max(1, top_k // 2) if config.k_main is None else config.k_main
    if k_main > top_k:
        raise ValueError(f"k_main={k_main} exceeds the model's top_k={top_k}; choose k_main in [1, {top_k}].")
    layers = moe_layers(model)
    if any(isinstance(layer.module, CompressedExperts) for layer in layers):
        raise ValueError("This model's experts are already compressed.")
    new = []
    for layer in layers:
        module = CompressedExperts(layer.module, top_k, k_main)
        layer.replace_experts(module)
        new.append(module)
    if config.trainable == "vectors":
        model.requires_grad_(False)
        for module in new:
            for theta in module.vectors():
                theta.requires_grad_(True)
    return new


def routed_parameters_per_token(model: nn.Module) -> float:
    """Routed-expert weight elements one token activates, summed over MoE layers (biases left out).

    Compressed layers count ``k_main`` experts plus ``k_a`` vector triples; other layers count
    ``num_experts_per_tok`` experts of mean width.
    """
    top_k = model.config.num_experts_per_tok
    return sum(layer.module.parameters_per_token() if isinstance(layer.module, CompressedExperts)
               else top_k * layer.experts.parameter_counts().mean().item() for layer in moe_layers(model))
