"""The experts interface over an ``nn.ModuleList`` of per-expert MLPs (remote-code and older MoEs).

DeepSeek-MoE (v1) and many remote-code MoEs keep routed expert ``e`` as ``experts[e]``, an MLP
with bias-free ``gate_proj [W_e, H]``, ``up_proj [W_e, H]``, ``down_proj [H, W_e]`` Linears and
an ``act_fn``. :class:`ModuleListExperts` answers the experts interface over such a list with
views of those Linears' weights. Pruning narrows each expert's Linears to its kept
micro-experts (:meth:`ModuleListExperts.keep`), so widths may differ between experts without a
new storage kind and the state-dict keys stay the model's own. The original indices of the
kept micro-experts live in a non-persistent buffer of each expert MLP (``camera_channels``),
the original width on the list (``camera_intermediate_size``); :mod:`camera_pl.serialization`
records both in ``camera_pl.json``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from camera_pl.arch.layout import ExpertsLayout
from camera_pl.experts.base import Experts, ExpertWeights, WritesInPlace, cast, unwrap

CHANNELS = "camera_channels"
"""Non-persistent buffer of a pruned expert MLP: original index of each kept micro-expert."""
ORIGINAL_WIDTH = "camera_intermediate_size"
"""Attribute of a pruned expert list: the original width (index space of micro-experts)."""
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_expert_list(module: nn.Module | None) -> bool:
    """Whether ``module`` is a non-empty ``nn.ModuleList`` of gated MLPs with ``nn.Linear`` projections
    (under LoRA adapters: the Linears they wrap)."""
    return isinstance(module, nn.ModuleList) and len(module) > 0 and all(
        all(isinstance(_linear(m, p), nn.Linear) for p in _PROJECTIONS) and callable(getattr(m, "act_fn", None))
        for m in module)


def _linear(mlp: nn.Module, name: str) -> nn.Module | None:
    """Projection ``name`` of ``mlp``; under a LoRA adapter, the ``nn.Linear`` it wraps."""
    return unwrap(getattr(mlp, name, None))


class ListGating(nn.Module):
    """Gating of the listed MLPs, ``act_fn(gate) * up``, in the form camera_pl's kinds call (``_apply_gate``).

    Modules that replace the list (quantized, compressed experts) keep a weightless copy of it as
    their template, so their activation is the list's own.
    """

    def __init__(self, act_fn: nn.Module):
        super().__init__()
        self.act_fn = act_fn

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class ModuleListExperts(WritesInPlace, Experts):
    """The experts interface over an ``nn.ModuleList`` of MLPs (see the module docstring)."""

    kind = "list"

    def __init__(self, module: nn.ModuleList):
        if not is_expert_list(module):
            raise TypeError(f"{type(module).__name__} is not an nn.ModuleList of MLPs with gate_proj/up_proj/down_proj "
                            "nn.Linear layers and an act_fn.")
        biased = [i for i, m in enumerate(module) if any(_linear(m, p).bias is not None for p in _PROJECTIONS)]
        if biased:
            raise TypeError(f"Experts {biased[:5]} of the list have biased projections; camera_pl reads bias-free "
                            "ModuleList experts only (as DeepSeek-MoE's).")
        self._module = module
        self._template = ListGating(module[0].act_fn)
        self.layout = ExpertsLayout()
        self.num_experts = len(module)
        self.hidden_size = int(_linear(module[0], "down_proj").out_features)
        widest = max(int(_linear(m, "gate_proj").out_features) for m in module)
        self.intermediate_size = int(getattr(module, ORIGINAL_WIDTH, widest))

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def template(self) -> nn.Module:
        return self._template

    def widths(self) -> torch.Tensor:
        return torch.tensor([_linear(m, "gate_proj").out_features for m in self._module], dtype=torch.long)

    def channels(self, e: int) -> torch.Tensor:
        mlp = self._module[e]
        recorded = getattr(mlp, CHANNELS, None)
        if recorded is not None:
            return recorded
        return torch.arange(_linear(mlp, "gate_proj").out_features, device=_linear(mlp, "down_proj").weight.device)

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        """Views of expert ``e``'s Linear weights (under LoRA adapters, the base weights without the adapters)."""
        w = ExpertWeights(*(_linear(self._module[e], p).weight for p in _PROJECTIONS))
        return w if dtype is None else cast(w, dtype)

    def weight_modules(self) -> list[str]:
        """Every expert's projection Linears (``"3.gate_proj"``): peft adapts them as the ``nn.Linear`` modules they are."""
        return [f"{e}.{p}" for e in range(self.num_experts) for p in _PROJECTIONS]

    @property
    def device(self) -> torch.device:
        return _linear(self._module[0], "down_proj").weight.device

    @property
    def dtype(self) -> torch.dtype:
        return _linear(self._module[0], "down_proj").weight.dtype

    def keep(self, keep: torch.Tensor) -> None:
        """Narrow every expert's Linears to the micro-experts ``keep [E, I]`` marks (original indices).

        New, smaller ``nn.Linear``s replace the old ones (their weights are released); an expert
        may keep none (its Linears become empty and it outputs zeros).
        """
        if tuple(keep.shape) != (self.num_experts, self.intermediate_size):
            expected = (self.num_experts, self.intermediate_size)
            raise ValueError(f"keep has shape {tuple(keep.shape)}; expected {expected}.")
        if any(not isinstance(getattr(m, p), nn.Linear) for m in self._module for p in _PROJECTIONS):
            raise TypeError("The expert Linears carry LoRA adapters, which narrowing would drop; merge the adapters "
                            "(camera_pl.lora.merge_lora) before pruning.")
        for e, mlp in enumerate(self._module):
            present = self.channels(e)
            local = keep[e, present.cpu()].nonzero().squeeze(1).to(present.device)
            mlp.gate_proj = _sliced(mlp.gate_proj, local, rows=True)
            mlp.up_proj = _sliced(mlp.up_proj, local, rows=True)
            mlp.down_proj = _sliced(mlp.down_proj, local, rows=False)
            mlp.register_buffer(CHANNELS, present[local].clone(), persistent=False)
        setattr(self._module, ORIGINAL_WIDTH, self.intermediate_size)

    def keep_experts(self, kept: list[int]) -> None:
        """Remove every expert MLP not in ``kept`` (ascending ids) from the list, in place; the rest renumber."""
        if sorted(set(kept)) != list(kept) or not kept or kept[0] < 0 or kept[-1] >= self.num_experts:
            raise ValueError(f"kept must list ascending expert ids in [0, {self.num_experts}); got {kept}.")
        for e in reversed(range(self.num_experts)):
            if e not in kept:
                del self._module[e]
        self.num_experts = len(self._module)

    def kept_hex(self) -> list[str] | None:
        """Each expert's kept micro-experts as a hex bit mask over the original width; None before any pruning."""
        if self.full_width and not any(hasattr(m, CHANNELS) for m in self._module):
            return None
        return [np.packbits(row.numpy()).tobytes().hex() for row in self.present_mask()]

    def keep_hex(self, kept: list[str]) -> None:
        """Narrow the (full-width) experts to the masks :meth:`kept_hex` wrote (weights arbitrary until loaded)."""
        if len(kept) != self.num_experts:
            raise ValueError(f"{len(kept)} kept masks recorded for {self.num_experts} experts.")
        rows = [np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8))[: self.intermediate_size] for h in kept]
        self.keep(torch.from_numpy(np.stack(rows)).bool())


def _sliced(linear: nn.Linear, idx: torch.Tensor, rows: bool) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding rows (or columns) ``idx`` of ``linear``'s weight."""
    w = linear.weight[idx] if rows else linear.weight[:, idx]
    new = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new
