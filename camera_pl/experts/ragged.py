"""Experts of unequal width: what CAMERA-P's layer-wise and global allocations leave behind.

transformers' fused ``[E, 2I, H]`` tensors need every expert to keep the same width.
:class:`RaggedExperts` keeps the experts in a few width buckets (:mod:`camera_pl.experts.buckets`):
bucket ``b`` stores its experts' weights as one stack in transformers' own orientation —
``{gate_up|up}_{b} [E_b, P·W_b, H]`` (``P = 2`` with a gate, packed as the layout packs them),
``down_{b} [E_b, H, W_b]``, biases alike — with each expert's kept micro-experts first and zeros
after them, plus ``channels_{b} [E_b, W_b]``, the original index of every slot (``intermediate_size``
for padding). A forward is then two grouped GEMMs per bucket over the stored weights, nothing
materialised; padded slots are masked out of the activations, so they contribute nothing even
when an adapter (LoRA) moves their weights.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.experts.base import (Experts, ExpertWeights, GroupedWeights, WeightGroups, WritesInPlace, cast,
                                    grouped_mm_supported)
from camera_pl.experts.buckets import BucketPlan, plan_buckets
from camera_pl.experts.module import CameraExperts

LEGACY_KEYS = ("gate", "up", "down", "gate_bias", "up_bias", "channel_index")
"""State-dict keys of the compact ``[ΣW_e, H]`` storage that camera_pl 0.2 wrote (converted on load)."""


class RaggedExperts(WritesInPlace, CameraExperts):
    """Routed experts where expert ``e`` keeps ``widths[e]`` of its original micro-experts."""

    kind = "ragged"

    def __init__(self, replaced: Experts, widths: list[int], dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__(replaced, len(widths))
        self._widths = torch.tensor(widths, dtype=torch.long)
        self.plan: BucketPlan = plan_buckets([int(w) for w in widths])
        self._where = {e: (b, p) for b, members in enumerate(self.plan.members) for p, e in enumerate(members)}
        self._dtype = dtype
        kw = dict(dtype=dtype, device=device)
        hidden, packed = self.hidden_size, 2 if self.layout.has_gate else 1
        group_of = torch.full((self.num_experts,), len(self.plan.members), dtype=torch.long)
        self._padded = [any(int(widths[e]) < width for e in members)  # buckets whose slots past a width need masking
                        for members, width in zip(self.plan.members, self.plan.widths)]
        for b, (members, width) in enumerate(zip(self.plan.members, self.plan.widths)):
            n = len(members)
            group_of[list(members)] = b
            self.register_parameter(self._up_name(b), nn.Parameter(torch.zeros(n, packed * width, hidden, **kw)))
            self.register_parameter(f"down_{b}", nn.Parameter(torch.zeros(n, hidden, width, **kw)))
            if self.layout.has_bias:
                self.register_parameter(f"{self._up_name(b)}_bias", nn.Parameter(torch.zeros(n, packed * width, **kw)))
            self.register_buffer(f"channels_{b}", torch.full((n, width), self.intermediate_size, dtype=torch.long,
                                                             device=device))
            self.register_buffer(f"widths_{b}", self._widths[list(members)].to(device), persistent=False)
        self.down_bias = nn.Parameter(torch.zeros(self.num_experts, hidden, **kw)) if self.layout.has_bias else None
        self.register_buffer("group_of", group_of.to(device), persistent=False)

    def _up_name(self, b: int) -> str:
        return f"{'gate_up' if self.layout.has_gate else 'up'}_{b}"

    @classmethod
    def from_experts(cls, source: Experts, keep: torch.Tensor, experts_kept: list[int] | None = None
                     ) -> "RaggedExperts":
        """Keep ``keep [E, I]`` (original indices) of ``source``'s experts ``experts_kept`` (default all)."""
        kept = range(source.num_experts) if experts_kept is None else experts_kept
        weights, channels = [], []
        for e in kept:
            present = source.channels(e)
            local = keep[e, present.to(keep.device)].nonzero().squeeze(1).to(present.device)
            w = source.weights(e)
            channels.append(present[local])
            weights.append(ExpertWeights(*(None if t is None else t[local] for t in (w.gate, w.up)),
                                         w.down[:, local],
                                         *(None if t is None else t[local] for t in (w.gate_bias, w.up_bias)),
                                         w.down_bias))
        new = cls(source, [len(c) for c in channels], weights[0].up.dtype, weights[0].up.device)
        targets = {**dict(new.named_parameters()), **dict(new.named_buffers())}
        with torch.no_grad():
            for name, tensor in new._stacked_state(weights, channels).items():
                targets[name].copy_(tensor)
        new.train(source.module.training)
        return new

    def _stacked_state(self, weights: list[ExpertWeights], channels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state-dict tensors holding per-expert ``weights`` and kept ``channels`` (zero-padded)."""
        state: dict[str, torch.Tensor] = {}
        ref, layout = weights[0].up, self.layout
        for b, (members, width) in enumerate(zip(self.plan.members, self.plan.widths)):
            n = len(members)
            gate = ref.new_zeros(n, width, self.hidden_size) if layout.has_gate else None
            up, down = ref.new_zeros(n, width, self.hidden_size), ref.new_zeros(n, self.hidden_size, width)
            gate_bias = ref.new_zeros(n, width) if layout.has_gate and layout.has_bias else None
            up_bias = ref.new_zeros(n, width) if layout.has_bias else None
            slots = torch.full((n, width), self.intermediate_size, dtype=torch.long, device=ref.device)
            for p, e in enumerate(members):
                w, k = weights[e], int(self._widths[e])
                for target, source in ((gate, w.gate), (up, w.up), (gate_bias, w.gate_bias), (up_bias, w.up_bias)):
                    if target is not None:
                        target[p, :k] = source
                down[p, :, :k] = w.down
                slots[p, :k] = channels[e]
            state[self._up_name(b)] = layout.pack(gate, up, 1)
            state[f"down_{b}"] = down
            if layout.has_bias:
                state[f"{self._up_name(b)}_bias"] = layout.pack(gate_bias, up_bias, 1)
            state[f"channels_{b}"] = slots
        if layout.has_bias:
            state["down_bias"] = torch.stack([w.down_bias for w in weights])
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Convert the compact storage of camera_pl 0.2 (``up [ΣW_e, H]`` ...) to buckets, then load."""
        if prefix + "channel_index" in state_dict:
            legacy = {k: state_dict.pop(prefix + k) for k in LEGACY_KEYS if prefix + k in state_dict}
            bias = state_dict.get(prefix + "down_bias")
            offsets = [0] + torch.cumsum(self._widths, 0).tolist()
            weights, channels = [], []
            for e in range(self.num_experts):
                s = slice(offsets[e], offsets[e + 1])
                weights.append(ExpertWeights(*(None if legacy.get(k) is None else legacy[k][s] for k in ("gate", "up")),
                                             legacy["down"][:, s],
                                             *(None if legacy.get(k) is None else legacy[k][s]
                                               for k in ("gate_bias", "up_bias")),
                                             None if bias is None else bias[e]))
                channels.append(legacy["channel_index"][s])
            state_dict.update({prefix + k: v for k, v in self._stacked_state(weights, channels).items()})
        elif (former := self._former_plan(state_dict, prefix)) is not None:
            self._restack(state_dict, prefix, former)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _restack(self, state_dict: dict, prefix: str, former: BucketPlan) -> None:
        """Replace, in ``state_dict``, buckets planned as ``former`` by this plan's (same weights, other stacks)."""
        names = [n for b in range(len(former.members)) for n in
                 (self._up_name(b), f"{self._up_name(b)}_bias", f"down_{b}", f"channels_{b}")]
        stored = {n: state_dict.pop(prefix + n) for n in names if prefix + n in state_dict}
        bias = state_dict.get(prefix + "down_bias")
        where = {e: (b, p) for b, members in enumerate(former.members) for p, e in enumerate(members)}
        weights, channels = [], []
        for e in range(self.num_experts):
            (b, p), k = where.get(e, (0, 0)), int(self._widths[e])  # width 0: empty slices of bucket 0
            up_bias = stored.get(f"{self._up_name(b)}_bias")
            weights.append(self._expert(stored[self._up_name(b)][p], stored[f"down_{b}"][p],
                                        None if up_bias is None else up_bias[p], k, None if bias is None else bias[e]))
            channels.append(stored[f"channels_{b}"][p, :k])
        state_dict.update({prefix + k: v for k, v in self._stacked_state(weights, channels).items()})

    def _former_plan(self, state_dict: dict, prefix: str) -> BucketPlan | None:
        """The former planner's buckets (finer alignments, :data:`~camera_pl.experts.buckets.FORMER_ALIGNMENTS`)
        where ``state_dict`` holds their shapes rather than this plan's: a save of camera_pl before the change.
        Any other mismatch is left to ``load_state_dict``'s own size error."""
        stored = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items()
                  if k.startswith(prefix + "channels_") and k[len(prefix) + 9:].isdigit()}

        def shapes(plan: BucketPlan) -> dict[str, tuple[int, int]]:
            return {f"channels_{b}": (len(m), w) for b, (m, w) in enumerate(zip(plan.members, plan.widths))}

        if not stored or stored == shapes(self.plan):
            return None
        former = plan_buckets(self._widths.tolist(), former=True)
        return former if stored == shapes(former) else None

    # ---- the experts interface -------------------------------------------------------------
    def _stacks(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Bucket ``b``'s packed gate/up stack, down stack and packed gate/up bias (or None)."""
        name = self._up_name(b)  # read as attributes: under peft's parametrization they include the LoRA delta
        return getattr(self, name), getattr(self, f"down_{b}"), getattr(self, f"{name}_bias", None)

    def widths(self) -> torch.Tensor:
        return self._widths.clone()

    def channels(self, e: int) -> torch.Tensor:
        if e not in self._where:
            return self.group_of.new_zeros(0)
        b, p = self._where[e]
        return self.get_buffer(f"channels_{b}")[p, : int(self._widths[e])]

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        if e not in self._where:  # width 0: empty weights
            empty = torch.zeros(0, self.hidden_size, dtype=self._dtype, device=self.device)
            bias = torch.zeros(0, dtype=self._dtype, device=self.device) if self.layout.has_bias else None
            w = ExpertWeights(empty if self.layout.has_gate else None, empty, empty.t(),
                              bias if self.layout.has_gate else None, bias,
                              None if self.down_bias is None else self.down_bias[e])
            return w if dtype is None else cast(w, dtype)
        (b, p), k = self._where[e], int(self._widths[e])
        up_stack, down_stack, bias_stack = self._stacks(b)
        w = self._expert(up_stack[p], down_stack[p], None if bias_stack is None else bias_stack[p], k,
                         None if self.down_bias is None else self.down_bias[e])
        return w if dtype is None else cast(w, dtype)

    def _expert(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, k: int,
                down_bias: torch.Tensor | None) -> ExpertWeights:
        """Views of the first ``k`` slots of one stacked expert: packed gate/up ``up``, ``down``, packed ``bias``."""
        gate, up = self.layout.split(up, 0)
        gate_bias, up_bias = (None, None) if bias is None else self.layout.split(bias, 0)
        return ExpertWeights(None if gate is None else gate[:k], up[:k], down[:, :k],
                             None if gate_bias is None else gate_bias[:k], None if up_bias is None else up_bias[:k],
                             down_bias)

    def weight_parameters(self) -> list[str]:
        return [name for b in range(len(self.plan.members)) for name in (self._up_name(b), f"down_{b}")]

    @property
    def device(self) -> torch.device:
        return self.group_of.device

    @property
    def dtype(self) -> torch.dtype:
        return self._stacks(0)[0].dtype if self.plan.members else self._dtype

    def grouped_weights(self, x: torch.Tensor, hit: list[int] | None = None) -> WeightGroups | None:
        """The buckets' stored stacks, in the grouped-GEMM orientation (views; gated experts without a post-norm)."""
        if not self.layout.has_gate or self.layout.post_norm or not grouped_mm_supported(x) or self.dtype != x.dtype:
            return None
        step = 16 // x.element_size()  # grouped GEMM needs 16-byte aligned strides
        if self.hidden_size % step:
            return None  # toy hidden sizes: the per-expert loop runs
        groups = []
        for b, members in enumerate(self.plan.members):
            up, down, bias = self._stacks(b)
            channels, pad = self.get_buffer(f"channels_{b}"), -self.plan.widths[b] % step
            if pad:  # buckets of widths below 8 (1, 2, 4): zero slots appended for this forward, a small copy
                up, bias = (None if t is None else self.layout.pack(*(nn.functional.pad(h, p)
                                                                      for h in self.layout.split(t, 1)), 1)
                            for t, p in ((up, (0, 0, 0, pad)), (bias, (0, pad))))
                down = nn.functional.pad(down, (0, pad))
                channels = nn.functional.pad(channels, (0, pad), value=self.intermediate_size)
            widths = self.get_buffer(f"widths_{b}") if self._padded[b] or pad else None
            groups.append(GroupedWeights(up.transpose(1, 2), down.transpose(1, 2), bias,
                                         None if self.down_bias is None else self.down_bias[list(members)],
                                         channels=channels, widths=widths))
        return WeightGroups(groups, [list(m) for m in self.plan.members], self.group_of)

    # ---- description -------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"widths": self._widths.tolist()}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, widths={self._widths.tolist()}, of={self.intermediate_size}, "
                f"buckets={list(self.plan.widths)}")


def build_ragged(spec: dict, replaced: Experts) -> RaggedExperts:
    """Empty :class:`RaggedExperts` of the recorded widths (weights and channels come from the state dict)."""
    return RaggedExperts(replaced, spec["widths"], replaced.dtype, replaced.device)
