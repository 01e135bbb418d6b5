"""Importance scores: a registry of pure functions over one layer's statistics.

A score function takes one layer's statistics dict (see :class:`MicroExpertStats`) and
keyword options, and returns a :class:`LayerScores`. Micro-level scores rank every
micro-expert (routed ``[E, I]`` and shared ``[I_s]``); expert-level scores rank whole
experts (``[E]``). Higher means more important. Add a method with :func:`register_score`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from camera_pl.config import unknown_options


@dataclass
class LayerScores:
    """Scores of one layer. ``level`` is ``"micro"`` (routed ``[E, I]``) or ``"expert"`` (routed ``[E]``)."""

    level: str
    routed: torch.Tensor
    shared: torch.Tensor | None = None


ScoreFn = Callable[..., LayerScores]
_SCORES: dict[str, tuple[str, ScoreFn]] = {}


def register_score(name: str, level: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering ``fn(layer_stats, **kw) -> LayerScores`` under ``name``."""
    if level not in ("micro", "expert"):
        raise ValueError(f"level must be 'micro' or 'expert', got {level!r}.")

    def add(fn: ScoreFn) -> ScoreFn:
        _SCORES[name] = (level, fn)
        return fn

    return add


def score_methods(level: str | None = None) -> list[str]:
    """Registered score names, optionally only those of one level."""
    return sorted(n for n, (lvl, _) in _SCORES.items() if level in (None, lvl))


def score_level(method: str) -> str:
    _check_method(method)
    return _SCORES[method][0]


def _check_method(method: str) -> None:
    if method not in _SCORES:
        raise ValueError(f"Unknown score method {method!r}; choose one of {', '.join(score_methods())}.")


def score_options(method: str) -> list[str]:
    """The keyword options a score method accepts (e.g. ``reduce_ratio`` for ``camera``)."""
    _check_method(method)
    params = list(inspect.signature(_SCORES[method][1]).parameters)[1:]
    return [name for name in params if name != "layer_index"]


def compute_scores(layers: dict[int, dict[str, torch.Tensor]], method: str, **kwargs) -> dict[int, LayerScores]:
    """Scores of every layer from its statistics (``{layer: {name: tensor}}``, weight norms included).

    ``kwargs`` are the method's options (:func:`score_options`); an unknown one raises.
    """
    unknown_options(f"score method {method!r}", kwargs, score_options(method))
    _, fn = _SCORES[method]
    takes_index = "layer_index" in inspect.signature(fn).parameters
    return {index: fn(entry, **kwargs, **({"layer_index": index} if takes_index else {}))
            for index, entry in layers.items()}


# ---- micro-expert level ------------------------------------------------------------------
@register_score("camera", "micro")
def camera_score(s: dict[str, torch.Tensor], reduce_ratio: float = 0.9) -> LayerScores:
    """CAMERA energy: ‖W_down[:, j]‖² · ((1−r)·Σ_t (g a)² + r·max_t (g a)²)  (METHODS §1)."""
    if not 0.0 <= reduce_ratio <= 1.0:
        raise ValueError(f"reduce_ratio must lie in [0, 1], got {reduce_ratio}.")
    r = reduce_ratio
    routed = s["down_norm_sq"] * ((1 - r) * s["sq_sum"] + r * s["sq_max"])
    shared = None
    if "shared_down_norm_sq" in s:
        shared = s["shared_down_norm_sq"] * ((1 - r) * s["shared_sq_sum"] + r * s["shared_sq_max"])
    return LayerScores("micro", routed, shared)


@register_score("magnitude", "micro")
def magnitude_score(s: dict[str, torch.Tensor]) -> LayerScores:
    """Weight magnitude ‖w_gate‖·‖w_up‖·‖w_down‖ per micro-expert (no data)."""
    routed = s["gate_norm"] * s["up_norm"] * s["down_norm_sq"].sqrt()
    shared = None
    if "shared_down_norm_sq" in s:
        shared = s["shared_gate_norm"] * s["shared_up_norm"] * s["shared_down_norm_sq"].sqrt()
    return LayerScores("micro", routed, shared)


@register_score("activation", "micro")
def activation_score(s: dict[str, torch.Tensor]) -> LayerScores:
    """Activation energy Σ a² over the tokens each expert computed (no routing weight, no down norm)."""
    return LayerScores("micro", s["act_sq_sum"].clone(), s["shared_act_sq_sum"].clone() if "shared_down_norm_sq" in s else None)


@register_score("heapr", "micro")
def heapr_score(s: dict[str, torch.Tensor]) -> LayerScores:
    """HEAPr (arXiv 2509.22299): second-order loss change of removing micro-expert ("atomic expert") j.

    Removing j changes expert e's output f_e(t) by ``−a_j(t)·w_j`` (``w_j``: down-projection column
    j), so with the Fisher approximation of the output-space Hessian, ``M_e = mean_t g(t) g(t)ᵀ``
    (``g``: loss gradient at f_e(t), routing weight included, over e's routed tokens), the loss
    changes by about ``a_j² · w_jᵀ M_e w_j``. Computed in HEAPr's factorised form::

        score_j = mean_t a_j(t)² · w_jᵀ M_e w_j = (act_sq_sum / count) · (heapr_quad / count)

    i.e. the token average of a² and M_e are taken separately (not ``mean_t a_j(t)² (w_jᵀ g(t))²``).
    Shared micro-experts use the same form over all tokens (``heapr_tokens``; g before the shared
    gate). With ``diag`` statistics M_e is replaced by its diagonal. Scores of different layers
    share one scale (loss change), so ``global`` ranks them across layers. Needs statistics from
    ``collect_stats(model, dataloader, heapr_mode=...)``; never-routed experts score 0.
    """
    if "heapr_quad" not in s:
        raise ValueError("method='heapr' needs gradient statistics, which these statistics lack: collect them with "
                         "camera_pl.collect_stats(model, dataloader, heapr_mode='auto') (one backward pass per batch).")
    count = s["count"].clamp_min(1)[:, None]
    routed = s["act_sq_sum"] / count * (s["heapr_quad"] / count)
    shared = None
    if "shared_heapr_quad" in s:
        tokens = s["heapr_tokens"].clamp_min(1)
        shared = s["shared_act_sq_sum"] / tokens * (s["shared_heapr_quad"] / tokens)
    return LayerScores("micro", routed, shared)


@register_score("random", "micro")
def random_score(s: dict[str, torch.Tensor], seed: int = 0, layer_index: int = 0) -> LayerScores:
    """Uniform random scores, reproducible from ``seed`` (and the layer index)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + layer_index)
    routed = torch.rand(s["sq_sum"].shape, generator=gen).to(s["sq_sum"].device)
    shared = None
    if "shared_down_norm_sq" in s:
        shared = torch.rand(s["shared_sq_sum"].shape, generator=gen).to(s["sq_sum"].device)
    return LayerScores("micro", routed, shared)


# ---- expert level ------------------------------------------------------------------------
@register_score("frequency", "expert")
def frequency_score(s: dict[str, torch.Tensor]) -> LayerScores:
    """How many tokens selected each expert."""
    return LayerScores("expert", s["count"].clone())


@register_score("reap", "expert")
def reap_score(s: dict[str, torch.Tensor]) -> LayerScores:
    """REAP: mean over routed tokens of g_e(t)·‖f_e(t)‖₂ (0 for never-routed experts)."""
    return LayerScores("expert", s["weighted_out_norm_sum"] / s["count"].clamp_min(1))


@register_score("ean", "expert")
def ean_score(s: dict[str, torch.Tensor]) -> LayerScores:
    """EAN: Σ over routed tokens of ‖f_e(t)‖₂."""
    return LayerScores("expert", s["out_norm_sum"].clone())
