"""Streaming micro-expert statistics, accumulated inside the model's own forward.

:func:`observe` switches the model to camera_pl's experts implementation, attaches one
:class:`LayerObserver` per MoE layer and yields an :class:`Observation`. Statistics live
in a :class:`StatsAccumulator`, a torchmetrics ``Metric`` whose states are float32 tensors
on the model's device with ``sum``/``max`` reductions, so under DDP/FSDP ``compute()``
syncs them through the strategy's process group. Memory is O(layers x experts x
intermediate); no per-token tensor outlives the forward that produced it.

With ``heapr_mode`` the accumulator also holds HEAPr's output-space curvature per expert
(:data:`HEAPR_LAYOUT`): the observers hook each forward's per-slot expert outputs and add the
outer products of the loss gradients that reach them during the backward pass that
:func:`camera_pl.stats.container.collect_stats` runs. That costs O(layers x experts x hidden²)
memory in ``"full"`` mode, O(layers x experts x hidden) in ``"diag"`` mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torchmetrics import Metric

from camera_pl.arch.adapters import MoELayer, moe_layers
from camera_pl.arch.forward import use_camera_experts
from camera_pl.experts.forward import SortedRouting, segment_ends
from camera_pl.stats.reductions import micro_sums

RATIO_BINS = 1000
"""Histogram bins of the top-2/top-1 routing-weight ratio on [0, 1] (median resolution 1e-3)."""

# name -> (shape kind, reduction). Shape kinds: "micro" [E, I], "expert" [E], "shared" [I_s], "bins" [RATIO_BINS].
STATE_LAYOUT: dict[str, tuple[str, str]] = {
    "sq_sum": ("micro", "sum"),  # sum_t (g a)^2
    "sq_max": ("micro", "max"),  # max_t (g a)^2
    "act_sq_sum": ("micro", "sum"),  # sum over routed tokens of a^2
    "count": ("expert", "sum"),  # routed-token count
    "weight_sum": ("expert", "sum"),  # sum of top-k routing weight g
    "prob_sum": ("expert", "sum"),  # sum of router probability (all tokens, before top-k)
    "selected_prob_sum": ("expert", "sum"),  # the same over the tokens that select the expert (MC's code)
    "out_norm_sum": ("expert", "sum"),  # sum over routed tokens of ||f_e(x)||
    "weighted_out_norm_sum": ("expert", "sum"),  # sum over routed tokens of g ||f_e(x)||
    "ratio_hist": ("bins", "sum"),  # histogram of w1/w0 (top-2 over top-1 weight)
    "shared_sq_sum": ("shared", "sum"),
    "shared_sq_max": ("shared", "max"),
    "shared_act_sq_sum": ("shared", "sum"),
}


HEAPR_MODES = ("full", "diag", "auto")
"""``full``: per expert the whole ``[H, H]`` sum of gradient outer products; ``diag``: only its diagonal;
``auto``: ``full`` where a layer's ``E·H²`` is at most :data:`HEAPR_FULL_MAX_ENTRIES`, else ``diag``."""

HEAPR_FULL_MAX_ENTRIES = 1 << 24
"""``auto`` keeps the full ``[E, H, H]`` curvature of a layer up to this many entries (64 MiB in float32,
e.g. 64 experts at hidden size 512) and falls back to the diagonal above (a 2048-wide model with 128
experts would need 2 GiB per layer)."""

# mode -> {name: (shape kind, reduction)}. Extra shape kinds: "expert_hh" [E, H, H], "expert_h" [E, H],
# "hh" [H, H], "h" [H]. Sums over routed (token, slot) pairs of the loss gradient g at the expert's output.
HEAPR_LAYOUT: dict[str, dict[str, tuple[str, str]]] = {
    "full": {"heapr_m": ("expert_hh", "sum"), "shared_heapr_m": ("hh", "sum")},  # sum g g^T
    "diag": {"heapr_diag": ("expert_h", "sum"), "shared_heapr_diag": ("h", "sum")},  # sum g^2
}


def heapr_layer_mode(layer: MoELayer, mode: str) -> str:
    """The mode (``full`` or ``diag``) a requested HEAPr ``mode`` gives ``layer`` (see :data:`HEAPR_MODES`)."""
    if mode not in HEAPR_MODES:
        raise ValueError(f"heapr_mode must be one of {', '.join(HEAPR_MODES)} (or None), got {mode!r}.")
    if mode == "auto":
        return "full" if layer.num_experts * layer.hidden_size**2 <= HEAPR_FULL_MAX_ENTRIES else "diag"
    return mode


def _state_shape(kind: str, layer: MoELayer) -> tuple[int, ...]:
    e, h = layer.num_experts, layer.hidden_size
    return {
        "micro": (e, layer.intermediate_size),
        "expert": (e,),
        "shared": (layer.shared_intermediate_size,),
        "bins": (RATIO_BINS,),
        "expert_hh": (e, h, h),
        "expert_h": (e, h),
        "hh": (h, h),
        "h": (h,),
    }[kind]


class StatsAccumulator(Metric):
    """torchmetrics states for every MoE layer, reduced with ``sum``/``max`` across ranks.

    With ``heapr_mode`` (see :data:`HEAPR_MODES`) each layer also gets the HEAPr curvature
    states of its resolved mode (:attr:`heapr_modes`); they fill only where gradients flow.
    """

    full_state_update = False

    def __init__(self, layers: list[MoELayer], heapr_mode: str | None = None):
        super().__init__()
        self.layer_indices = [layer.index for layer in layers]
        self.heapr_modes = {} if heapr_mode is None else {l.index: heapr_layer_mode(l, heapr_mode) for l in layers}
        self.add_state("tokens", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        for layer in layers:
            for name, (kind, reduce) in self.layout(layer.index).items():
                if kind in ("hh", "h") and layer.shared is None:
                    continue
                zeros = torch.zeros(_state_shape(kind, layer), dtype=torch.float32)
                self.add_state(f"l{layer.index}_{name}", zeros, dist_reduce_fx=reduce)

    def layout(self, layer: int) -> dict[str, tuple[str, str]]:
        """The states of one layer: :data:`STATE_LAYOUT` plus its HEAPr states, if any."""
        mode = self.heapr_modes.get(layer)
        return STATE_LAYOUT if mode is None else {**STATE_LAYOUT, **HEAPR_LAYOUT[mode]}

    def layer_names(self, layer: int) -> list[str]:
        """The names of the states ``layer`` holds (shared-expert curvature only where it has shared experts)."""
        return [name for name in self.layout(layer) if hasattr(self, f"l{layer}_{name}")]

    def state(self, layer: int, name: str) -> torch.Tensor:
        return getattr(self, f"l{layer}_{name}")

    def update(self, tokens: torch.Tensor) -> None:
        """Count the (unmasked) tokens of one batch; layer states are filled by the observers."""
        self.tokens += tokens.to(self.tokens)

    def compute(self) -> dict[str, torch.Tensor]:
        """All states by name (synced across ranks when running distributed)."""
        names = ["tokens"] + [f"l{i}_{n}" for i in self.layer_indices for n in self.layer_names(i)]
        return {name: getattr(self, name).clone() for name in names}


class LayerObserver:
    """Accumulates one MoE layer's statistics from the values the forward already computed."""

    def __init__(self, layer: MoELayer, acc: StatsAccumulator, observation: "Observation"):
        self.layer = layer
        self.acc = acc
        self.observation = observation
        self._shared_gate: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None  # this forward's router probabilities [T, E]

    def _state(self, name: str) -> torch.Tensor:
        return self.acc.state(self.layer.index, name)

    def observe(self, expert_ids: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor, acts: torch.Tensor,
                out_norms: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Routed experts: called by camera_pl's experts forward with (token, slot) pairs sorted by expert."""
        mask = self.observation.token_mask(top_k_weights.shape[0], top_k_weights.device)
        keep = mask[token_ids].float()
        bounds = nn.functional.pad(segment_ends(expert_ids, self.layer.num_experts), (1, 0))
        lengths = bounds.diff()
        w = weights.float()
        act_sq, sq, sq_max = micro_sums(acts, expert_ids, bounds, keep, w.square())  # keep·g²·a² = (g a)² of kept rows
        self._state("act_sq_sum").add_(act_sq)
        self._state("sq_sum").add_(sq)
        torch.maximum(self._state("sq_max"), sq_max, out=self._state("sq_max"))
        g = w * keep
        selected = self._probs[token_ids, expert_ids] * keep  # router probability of the routed slots
        for name, rows in (("count", keep), ("weight_sum", g), ("out_norm_sum", out_norms * keep),
                           ("weighted_out_norm_sum", out_norms * g),
                           ("selected_prob_sum", selected)):  # 1-D segments: one CUB reduction each on CUDA
            self._state(name).add_(torch.segment_reduce(rows, "sum", lengths=lengths, unsafe=True, initial=0.0))
        if top_k_weights.shape[1] >= 2:
            top2 = top_k_weights.float().topk(2, dim=-1).values
            ratio = top2[:, 1] / top2[:, 0].clamp_min(torch.finfo(torch.float32).tiny)
            bins = (ratio.nan_to_num(0.0).clamp(0, 1) * RATIO_BINS).long().clamp(0, RATIO_BINS - 1)
            self._state("ratio_hist").index_add_(0, bins, mask.float())

    def watch_output(self, routing: SortedRouting, out: torch.Tensor, num_tokens: int) -> None:
        """Routed experts' per-slot outputs ``out [S, H]`` (before the routing weight), when they carry gradients.

        With HEAPr states, a tensor hook adds, per expert, the outer products (or squares) of
        the loss gradient at these outputs over the expert's unpadded rows. The gradient at the
        expert's own output f_e(t) is the gradient at the block output times the routing weight.
        """
        mode = self.acc.heapr_modes.get(self.layer.index)
        if mode is None:
            return
        keep = self.observation.token_mask(num_tokens, out.device)[routing.token_ids].float()
        name = "heapr_m" if mode == "full" else "heapr_diag"
        expert_ids, ends = routing.expert_ids, routing.ends

        def on_grad(grad: torch.Tensor) -> None:
            g = grad.detach().float() * keep[:, None]
            state = self._state(name)
            if mode == "diag":
                state.index_add_(0, expert_ids, g.square())
                return
            for e, (start, end) in enumerate(zip([0, *ends], ends)):
                if end > start:
                    state[e].addmm_(g[start:end].T, g[start:end])

        out.register_hook(on_grad)

    def on_shared_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Forward hook on the shared expert: with HEAPr states, hook the gradient at its output (before its gate)."""
        mode = self.acc.heapr_modes.get(self.layer.index)
        if mode is None or not output.requires_grad:
            return
        mask = self.observation.token_mask(output.numel() // output.shape[-1], output.device).float()
        state = self._state("shared_heapr_m" if mode == "full" else "shared_heapr_diag")

        def on_grad(grad: torch.Tensor) -> None:
            g = grad.detach().float().reshape(-1, grad.shape[-1]) * mask[:, None]
            if mode == "diag":
                state.add_(g.square().sum(0))
            else:
                state.addmm_(g.T, g)

        output.register_hook(on_grad)

    def on_router_output(self, module: nn.Module, args: tuple, output: tuple) -> None:
        """Forward hook on the router: accumulate per-expert probability mass."""
        probs = self.layer.router_probs(output[0])
        mask = self.observation.token_mask(probs.shape[0], probs.device)
        self._state("prob_sum").add_((probs * mask[:, None]).sum(0))
        self._probs = probs.detach()  # read by this layer's experts forward, which follows

    def on_block_input(self, module: nn.Module, args: tuple) -> None:
        """Pre-hook on the MoE block: the sigmoid shared-expert gate of each token."""
        gate = self.layer.shared_gate_values(args[0])
        self._shared_gate = None if gate is None else gate.detach().float()

    def on_shared_down_input(self, module: nn.Module, args: tuple) -> None:
        """Pre-hook on the shared expert's down projection: its micro-expert activations."""
        a = args[0].detach().float().reshape(-1, args[0].shape[-1])
        mask = self.observation.token_mask(a.shape[0], a.device).float()
        g = mask if self._shared_gate is None else self._shared_gate * mask
        ga2 = (g[:, None] * a) ** 2
        self._state("shared_sq_sum").add_(ga2.sum(0))
        self._state("shared_sq_max").copy_(torch.maximum(self._state("shared_sq_max"), ga2.amax(0)))
        self._state("shared_act_sq_sum").add_((a**2 * mask[:, None]).sum(0))


class Observation:
    """A live observation of a model: set each batch's attention mask, read the accumulator."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], acc: StatsAccumulator):
        self.model = model
        self.layers = layers
        self.accumulator = acc
        self._mask: torch.Tensor | None = None

    def set_attention_mask(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor,
                           count: bool = True) -> None:
        """Declare which tokens of the next forward count (mask 0 = padding, never counted).

        ``count=False`` leaves the token count alone: layer-by-layer runs declare each batch once per layer.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass a 2D [batch, seq] padding mask."
            )
        self._mask = attention_mask.reshape(-1).bool()
        if count:
            self.accumulator.update(self._mask.sum())

    def token_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("Observation saw a forward before set_attention_mask(); call it for every batch.")
        if self._mask.numel() != num_tokens:
            raise RuntimeError(
                f"The MoE layer saw {num_tokens} tokens but the declared attention mask has {self._mask.numel()}; "
                "observe full-sequence forwards (no KV-cache generation)."
            )
        return self._mask.to(device)


@contextmanager
def observe(model: nn.Module, accumulator: StatsAccumulator | None = None, layers: list[MoELayer] | None = None,
            device: torch.device | None = None) -> Iterator[Observation]:
    """Collect micro-expert statistics from every forward of ``model`` inside the block.

    The model's experts implementation is switched to ``"camera_pl"`` and restored on exit,
    with all hooks removed. Pass an existing ``accumulator`` to keep accumulating into it,
    ``layers`` to observe only those MoE layers (the accumulator's), ``device`` to keep the
    accumulator there (default: the model's; layer-by-layer runs pass the execution device).
    """
    layers = moe_layers(model) if layers is None else layers
    device = next(model.parameters()).device if device is None else device
    acc = (accumulator or StatsAccumulator(layers)).to(device)
    observation = Observation(model, layers, acc)
    handles = []
    restore = use_camera_experts(model)
    try:
        for layer in layers:
            obs = LayerObserver(layer, acc, observation)
            layer.module._camera_observer = obs
            handles.append(layer.routing.register_forward_hook(obs.on_router_output))
            if layer.shared is not None:
                handles.append(layer.block.register_forward_pre_hook(obs.on_block_input))
                handles.append(layer.shared.down_proj.register_forward_pre_hook(obs.on_shared_down_input))
                handles.append(layer.shared.register_forward_hook(obs.on_shared_output))
        yield observation
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.module.__dict__.pop("_camera_observer", None)
        restore()
