"""ODP: MC's online dynamic pruning of routed experts at inference time (METHODS §4b).

Per MoE layer and token, the router's top-k slots whose weight is below ``μ`` times the
token's largest weight are dropped (for sorted weights these are exactly the trailing
experts with ``w_i / w_0 < μ``); ``μ`` defaults to the layer's calibration median of
``w1/w0`` (:meth:`MicroExpertStats.ratio_median`). Kept weights are rescaled so that they
sum to the token's original top-k total: the layer's routed output keeps its scale
whether or not the model renormalises top-k weights (``norm_topk_prob``) or scales them
(DeepSeek's ``routed_scaling_factor``).

How a slot is dropped: its weight becomes 0 *and* its index becomes the sentinel
``num_experts``, so no expert is computed for it. transformers 5 honours such sentinels only
in some experts implementations (eager skips index ``num_experts``; ``grouped_mm`` and
``batched_mm`` only under expert parallelism), so while ODP is on the model runs camera_pl's
experts implementation, which skips every index ``>= num_experts`` — as do camera_pl's own
experts modules (ragged after pruning, quantized). The previous implementation is restored by
:meth:`OdpHandle.remove`.

Token protection: at prefill (any forward with more than one new token) the top
``protect_ratio`` of each sequence's tokens by ``I_j = ‖t_j‖₁ · mean_i A_ij`` keep all their
experts; decode steps (one new token) use the weight rule only. ``t_j`` is the MoE block's
input (the token the router sees); ``A`` is the layer's own attention, averaged over heads;
the mean runs over the queries allowed to attend to ``j`` (``L − j`` of them under a causal
mask, fewer under a sliding window), padding queries excluded. ``A`` is never materialised
whole: while ODP protects, an attention tap (:mod:`camera_pl.arch.attention`) hands each
layer's exact query/key states to :func:`attention_received`, which accumulates the column
sums of the attention probabilities in query chunks of bounded size (``chunk_elements``
scores at a time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer, moe_layers
from camera_pl.arch.attention import AttentionTaps, tap_attention
from camera_pl.arch.forward import use_camera_experts
from camera_pl.config import Config
from camera_pl.labels import IGNORE_INDEX, causal_labels

if TYPE_CHECKING:
    from camera_pl.stats.container import MicroExpertStats

CHUNK_ELEMENTS = 1 << 22
"""Attention scores held at once while accumulating the attention each token receives."""


# ---- attention received, from query/key states ------------------------------------------
@torch.no_grad()
def attention_received(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                       sinks: torch.Tensor | None = None,
                       chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention probability each of the current tokens receives, and which tokens are real.

    Args:
        query: ``[B, Hq, L, D]`` query states of the ``L`` current tokens.
        key: ``[B, Hkv, S, D]`` key states, the current tokens last (``S >= L``, ``Hq % Hkv == 0``).
        attention_mask: additive float ``[B or 1, 1 or Hq, L, >=S]`` (0 = attend) or boolean
            (True = attend) mask; None attends everywhere, as eager attention does.
        scaling: softmax scale of the scores.
        sinks: per-head sink logits ``[Hq]`` joining every softmax denominator (GPT-OSS).
        chunk_elements: at most this many scores are held at once (queries are chunked).

    Returns:
        ``received [B, L]`` float32: ``Σ_i A_ij / #{i allowed to attend j}`` over real queries
        ``i``, ``A`` averaged over heads; ``valid [B, L]``: the token is not padding (it may
        attend to itself).
    """
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if heads % kv_heads or keys < length:
        raise ValueError(f"attention_received needs Hq % Hkv == 0 and S >= L; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}.")
    groups = heads // kv_heads
    q = query.float().reshape(batch, kv_heads, groups, length, dim)
    k = key.float()
    if attention_mask is not None:
        attention_mask = attention_mask[..., :keys].expand(batch, -1, length, keys)
    offset = keys - length
    received = query.new_zeros(batch, keys, dtype=torch.float32)
    counts = torch.zeros_like(received)
    valid = torch.zeros(batch, length, dtype=torch.bool, device=query.device)
    step = max(1, chunk_elements // max(1, batch * heads * keys))
    for start in range(0, length, step):
        stop = min(length, start + step)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, start:stop], k) * scaling
        if attention_mask is None:
            allowed = torch.ones(batch, stop - start, keys, dtype=torch.bool, device=query.device)
        else:
            m = attention_mask[:, :, start:stop]
            if m.dtype == torch.bool:
                allowed = m[:, 0]
                m = torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)
            else:
                allowed = m[:, 0] > torch.finfo(m.dtype).min / 2
            m = m.float().unsqueeze(2) if m.shape[1] == 1 else m.float().reshape(batch, kv_heads, groups, *m.shape[2:])
            scores = scores + m
        if sinks is not None:
            sink = sinks.float().reshape(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, stop - start, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        rows = torch.arange(start, stop, device=query.device)
        real = allowed[:, rows - start, rows + offset]  # a real query attends to itself
        valid[:, start:stop] = real
        weight = real.float()[:, :, None]
        received += (probs.mean(dim=(1, 2)) * weight).sum(dim=1)
        counts += (allowed.float() * weight).sum(dim=1)
    received = received[:, offset:] / counts[:, offset:].clamp_min(1.0)
    return received, valid


# ---- the per-layer routing rule ---------------------------------------------------------------
@dataclass
class LayerUsage:
    """What ODP did in one MoE layer since the last reset (every routed token counts, padding included).

    Attributes:
        tokens: tokens routed.
        slots: expert calls the router asked for (tokens × top-k).
        skipped: expert calls dropped.
        protected: tokens kept whole by token protection.
        full_params: routed-expert weight elements all top-k slots would have run.
        active_params: routed-expert weight elements actually run.
    """

    tokens: int
    slots: int
    skipped: int
    protected: int
    full_params: float
    active_params: float


class _LayerRule:
    """Forward hook of one router: applies the weight rule and token protection, and counts."""

    def __init__(self, layer: MoELayer, threshold: float, protect_ratio: float):
        self.layer = layer
        self.threshold = threshold
        self.protect_ratio = protect_ratio
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._params: tuple[tuple, torch.Tensor] | None = None  # (widths key, counts) of the experts as they are now
        self.totals: torch.Tensor | None = None  # tokens, slots, skipped, protected, full/active params

    def on_attention(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                     sinks: torch.Tensor | None) -> None:
        """Attention tap of this layer: at prefill, the attention each token receives (for protection)."""
        if query.shape[2] > 1:
            self.pending = attention_received(query, key, attention_mask, scaling, sinks)

    @torch.no_grad()
    def _protected(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Which routed tokens ``[T]`` protection keeps whole, from the pending attention column sums (or None)."""
        if self.pending is None:
            return None
        received, valid = self.pending
        self.pending = None
        batch, length = received.shape
        if batch * length != hidden.shape[0]:
            raise RuntimeError(f"Layer {self.layer.index}: the router saw {hidden.shape[0]} tokens but its attention "
                               f"{batch}×{length}; ODP token protection needs the MoE block to route the "
                               "attention's tokens.")
        importance = hidden.float().abs().sum(-1).reshape(batch, length) * received
        importance = importance.masked_fill(~valid, float("-inf"))
        quota = (valid.sum(1) * self.protect_ratio).floor().long()
        order = importance.argsort(dim=1, descending=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand(batch, -1))
        return ((ranks < quota[:, None]) & valid).reshape(-1)

    def __call__(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        logits, weights, index = output[:3]
        hidden = args[0].reshape(-1, args[0].shape[-1])
        w = weights.float()
        keep = w >= self.threshold * w.max(dim=-1, keepdim=True).values
        protected = self._protected(hidden)
        if protected is not None:
            keep |= protected[:, None]
        kept = w * keep
        scale = w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        new_weights = (kept * scale).to(weights.dtype)
        new_index = index.masked_fill(~keep, self.layer.num_experts)
        self._count(index, keep, protected)
        return (logits, new_weights, new_index, *output[3:])

    @torch.no_grad()
    def _count(self, index: torch.Tensor, keep: torch.Tensor, protected: torch.Tensor | None) -> None:
        """Add this call to the totals, on the routing's device (counting never synchronises)."""
        device = index.device
        if self.totals is None or self.totals.device != device:
            self.totals = torch.zeros(6, dtype=torch.float64, device=device)
        params = self._parameter_counts(device)[index]
        sizes = torch.tensor([index.shape[0], index.numel()], dtype=torch.float64, device=device)
        n_protected = protected.sum() if protected is not None else torch.zeros((), device=device)
        counts = torch.stack([(~keep).sum(), n_protected, params.sum(), (params * keep).sum()]).double()
        self.totals += torch.cat([sizes, counts])

    def _parameter_counts(self, device: torch.device) -> torch.Tensor:
        """Weight elements per expert of the layer's experts *now* (they may be pruned while ODP is installed)."""
        experts = self.layer.experts
        key = (id(experts.module), tuple(experts.widths().tolist()), str(device))
        if self._params is None or self._params[0] != key:
            self._params = (key, experts.parameter_counts().to(device))
        return self._params[1]

    def usage(self) -> LayerUsage:
        t = self.totals.tolist() if self.totals is not None else [0.0] * 6
        return LayerUsage(int(t[0]), int(t[1]), int(t[2]), int(t[3]), t[4], t[5])


# ---- installing and removing -----------------------------------------------------------------
class OdpHandle:
    """ODP installed on a model: measures what it skipped; :meth:`remove` restores the model."""

    def __init__(self, model: nn.Module, config: "OdpConfig", rules: list[_LayerRule], hooks: list,
                 taps: AttentionTaps | None, restore_experts: Callable[[], None]):
        self.model = model
        self.config = config
        self.rules = rules
        self._hooks = hooks
        self._taps = taps
        self._restore_experts = restore_experts

    @property
    def thresholds(self) -> dict[int, float]:
        """The threshold μ of every MoE layer."""
        return {rule.layer.index: rule.threshold for rule in self.rules}

    def usage(self) -> dict[int, LayerUsage]:
        """Per MoE layer: tokens, expert calls asked/skipped, protected tokens, parameters run."""
        return {rule.layer.index: rule.usage() for rule in self.rules}

    def skipped_fraction(self) -> float:
        """Fraction of the routed expert calls (token × top-k slot) that ODP skipped, over the layers it runs on."""
        used = self.usage().values()
        slots = sum(u.slots for u in used)
        if slots == 0:
            raise ValueError("ODP has measured nothing yet: run the model first (or since the last reset()).")
        return sum(u.skipped for u in used) / slots

    def activated_params_per_token(self) -> tuple[float, float]:
        """Routed-expert weight elements run per token, summed over the layers ODP runs on: ``(with ODP, full top-k)``."""
        used = [u for u in self.usage().values() if u.tokens]
        if not used:
            raise ValueError("ODP has measured nothing yet: run the model first (or since the last reset()).")
        return (sum(u.active_params / u.tokens for u in used), sum(u.full_params / u.tokens for u in used))

    def reset(self) -> None:
        """Zero the measurements."""
        for rule in self.rules:
            rule.totals = None

    def remove(self) -> None:
        """Uninstall ODP: router hooks, attention taps and the model's previous implementations (idempotent)."""
        if self.model.__dict__.get("_camera_odp_handle") is not self:
            return
        for hook in self._hooks:
            hook.remove()
        if self._taps is not None:
            self._taps.remove()
        self._restore_experts()
        del self.model._camera_odp_handle


def _thresholds(layers: list[MoELayer], stats: MicroExpertStats | None,
                thresholds: float | Mapping[int, float] | None) -> dict[int, float]:
    given = thresholds if isinstance(thresholds, Mapping) else {}
    unknown = sorted(set(given) - {layer.index for layer in layers})
    if unknown:
        raise ValueError(f"thresholds name MoE layers {unknown}, which this model does not have; its MoE layers are "
                         f"{[layer.index for layer in layers]}.")
    out = {}
    for layer in layers:
        if isinstance(thresholds, (int, float)):
            mu = float(thresholds)
        elif layer.index in given:
            mu = float(given[layer.index])
        elif stats is None or layer.index not in stats.layers:
            raise ValueError(f"No ODP threshold for MoE layer {layer.index}: pass stats collected on this model "
                             "(camera_pl.collect_stats) or thresholds={layer_index: mu} covering every MoE layer.")
        else:
            try:
                mu = stats.ratio_median(layer.index)
            except ValueError as err:
                raise ValueError(f"{err} Pass thresholds= explicitly for such layers.") from err
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"ODP threshold of layer {layer.index} is {mu}; it is a ratio w_i/w_0 and must lie "
                             "in [0, 1].")
        out[layer.index] = mu
    return out


@dataclass(frozen=True)
class OdpConfig(Config):
    """Options of ODP (see :func:`apply_odp`).

    Attributes:
        protect_ratio: fraction of each sequence's tokens (rounded down) kept whole at prefill;
            0 turns protection off (weight rule only, attention untouched).
        thresholds: one μ for all layers, or ``{layer_index: μ}`` overriding the statistics;
            None takes each layer's calibration median of ``w1/w0``.
        layers: the MoE layers ODP runs on (MC applies it to a chosen subset): a list of layer
            indices; or a count ``k``: the ``k`` layers where ODP alone raises the calibration loss
            least (:func:`rank_layers`; needs ``calib_dataloader``); None: every MoE layer.
    """

    protect_ratio: float = 0.02
    thresholds: float | dict[int, float] | None = None
    layers: list[int] | int | None = None

    def check(self) -> None:
        self._number("protect_ratio", 0.0, 1.0)
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self._number("layers", 1, integer=True)
        elif self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in self.layers) or not self.layers:
                self._fail("layers", "expected a non-empty list of MoE layer indices, or None for every layer.")
            object.__setattr__(self, "layers", sorted(set(self.layers)))
        t = self.thresholds
        if isinstance(t, dict):
            for layer, mu in t.items():
                if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu <= 1.0:
                    self._fail("thresholds", f"the threshold of layer {layer} must be a ratio w_i/w_0 in [0, 1].")
        elif t is not None:
            self._number("thresholds", 0.0, 1.0)


def _calibration_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token loss over the (unpadded) tokens of ``batches``."""
    device = next(model.parameters()).device
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            labels = causal_labels(ids, mask)
            tokens = float((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * tokens
            count += tokens
    return total / max(count, 1.0)


def rank_layers(model: nn.Module, stats: MicroExpertStats | None, calib_dataloader: Iterable,
                config: OdpConfig | None = None) -> list[tuple[int, float]]:
    """``(layer index, calibration-loss increase)`` of ODP on each MoE layer alone, least harmful first."""
    config = OdpConfig.build(config)
    restore = use_camera_experts(model)  # the baseline runs the same experts implementation as ODP
    try:
        base = _calibration_loss(model, calib_dataloader)
    finally:
        restore()
    ranked = []
    for layer in moe_layers(model):
        handle = apply_odp(model, stats, OdpConfig.build(config, layers=[layer.index]))
        try:
            ranked.append((layer.index, _calibration_loss(model, calib_dataloader) - base))
        finally:
            handle.remove()
    return sorted(ranked, key=lambda item: item[1])


def apply_odp(model: nn.Module, stats: MicroExpertStats | None = None, config: OdpConfig | float | None = None,
              calib_dataloader: Iterable | None = None, **options) -> OdpHandle:
    """Install ODP on the MoE layers of ``model`` (in place); see the module docstring and :class:`OdpConfig`.

    Args:
        model: a transformers MoE causal LM (experts of any kind: fused, pruned, quantized, compressed).
        stats: calibration statistics of this model; each layer's threshold defaults to
            ``stats.ratio_median(layer)``. May be None when ``thresholds`` covers every layer.
        config: an :class:`OdpConfig` (or its ``protect_ratio``); ``options`` are its fields.
        calib_dataloader: batches (dicts with ``input_ids``) that rank the layers when
            ``config.layers`` is a count.

    Returns:
        An :class:`OdpHandle`; ``handle.remove()`` restores the model.
    """
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        config, options = None, {"protect_ratio": float(config), **options}
    config = OdpConfig.build(config, **options)
    if hasattr(model, "_camera_odp_handle"):
        raise RuntimeError("ODP is already installed on this model; call handle.remove() before installing it again.")
    layers = moe_layers(model)
    if isinstance(config.layers, int):
        if calib_dataloader is None:
            raise ValueError(f"OdpConfig.layers={config.layers} picks the layers where ODP costs least on calibration "
                             "data: pass calib_dataloader=..., or list the layer indices instead.")
        if config.layers > len(layers):
            raise ValueError(f"OdpConfig.layers={config.layers}, but this model has {len(layers)} MoE layers.")
        chosen = [index for index, _ in rank_layers(model, stats, calib_dataloader, config)[: config.layers]]
        config = OdpConfig.build(config, layers=chosen)
    if config.layers is not None:
        unknown = sorted(set(config.layers) - {layer.index for layer in layers})
        if unknown:
            raise ValueError(f"OdpConfig.layers names MoE layers {unknown}, which this model does not have; its MoE "
                             f"layers are {[layer.index for layer in layers]}.")
        layers = [layer for layer in layers if layer.index in config.layers]
    if stats is not None:
        stats.check_compatible(model)
    mus = _thresholds(layers, stats, config.thresholds)
    rules = [_LayerRule(layer, mus[layer.index], config.protect_ratio) for layer in layers]
    taps = None
    if config.protect_ratio > 0:
        taps = tap_attention(model, {rule.layer.index: rule.on_attention for rule in rules})
    restore_experts = use_camera_experts(model)
    hooks = [rule.layer.routing.register_forward_hook(rule) for rule in rules]
    handle = OdpHandle(model, config, rules, hooks, taps, restore_experts)
    model._camera_odp_handle = handle
    return handle
