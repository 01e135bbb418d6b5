"""The experts interface: what every camera_pl algorithm may ask of one layer's routed experts.

A layer's routed experts come in several kinds — transformers' fused experts, ragged
(pruned to unequal widths), quantized (bit-packed), compressed (IA³ vectors) and their
combinations — and all of them answer the same questions:

* sizes: ``num_experts``, ``hidden_size``, ``intermediate_size`` (the *original* width, the
  index space of micro-experts and statistics), ``widths()`` (what each expert keeps) and
  ``channels(e)`` (original indices of expert ``e``'s kept micro-experts);
* ``weights(e)``: expert ``e``'s (dequantized) weights in ``nn.Linear`` orientation;
* ``activation(e, x)`` / ``output(e, a)``: the expert's math, optionally with explicit
  weights (GPTQ, straight-through fake quantization) or a separate up-projection input (IA³);
* ``grouped_weights(x, hit)``: stacked weights for grouped GEMMs, where the kind has them — one
  stack, or several groups of experts (ragged experts' width buckets); kinds that build them
  per call (e.g. by dequantizing) stack only the experts ``hit``.

:func:`as_experts` returns the interface of any experts module: camera_pl's own modules
implement it, transformers' fused modules get a :class:`FusedExperts` view, an ``nn.ModuleList``
of per-expert MLPs a :class:`~camera_pl.experts.modulelist.ModuleListExperts` view. Nothing outside
:mod:`camera_pl.arch` and this package knows how a kind stores its weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from camera_pl.arch.layout import ExpertsLayout

if TYPE_CHECKING:
    from camera_pl.experts.forward import SortedRouting


@dataclass
class ExpertWeights:
    """One expert's weights in ``nn.Linear`` orientation: gate/up ``[W, H]``, down ``[H, W]``, biases."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class GroupedWeights:
    """Weights of experts for grouped GEMMs over expert-sorted rows.

    ``up [n, H, P]`` produces the packed gate/up projection in the module's layout
    (``P = 2W`` with a gate), ``down [n, W, H]``, for the ``n`` experts ``experts`` (ascending
    expert ids; None: all ``E``). Biases, ``channels [., W]`` and ``widths`` are indexed by expert
    id — or, inside a :class:`WeightGroups` group, by position in the group. ``channels`` maps a
    padded slot to its original micro-expert index (``intermediate_size`` for padding), or is None
    at full width; ``widths`` (kept widths) is set where slots past them must be masked out.
    """

    up: torch.Tensor
    down: torch.Tensor
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    widths: torch.Tensor | None = None
    experts: list[int] | None = None


@dataclass
class WeightGroups:
    """Experts split into groups (width buckets), each with its own :class:`GroupedWeights`.

    ``members[g]`` lists group ``g``'s expert ids in ascending order (its weights' leading
    dimension follows it); ``group_of [E]`` (on the weights' device) is each expert's group,
    ``len(members)`` for experts in none (width 0: they output zeros).
    """

    groups: list[GroupedWeights]
    members: list[list[int]]
    group_of: torch.Tensor


def grouped_mm_supported(x: torch.Tensor, on_cpu: bool = True) -> bool:
    """Whether torch's grouped GEMM runs on ``x``'s device and dtype (CUDA: bf16 on sm80+)."""
    if not hasattr(nn.functional, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return on_cpu and x.device.type == "cpu"


class Experts:
    """The interface (see the module docstring). Subclasses provide storage; the math is shared here."""

    kind: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    layout: ExpertsLayout
    grouped_subsets: bool = False
    """Whether :meth:`grouped_weights` builds stacks of only the experts ``hit`` it is given (kinds that build
    them per call, e.g. by dequantizing: decoding then builds 8 of 128 experts). The experts forward passes
    ``hit`` only to these kinds."""

    # ---- storage: provided by each kind ----------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The ``nn.Module`` that holds the weights (and sits in the MoE block)."""
        raise NotImplementedError

    @property
    def template(self) -> nn.Module:
        """The module whose gating and constants define the activation (see :meth:`ExpertsLayout.activate`)."""
        raise NotImplementedError

    def widths(self) -> torch.Tensor:
        """Kept width of every expert, int64 ``[E]`` on the CPU."""
        raise NotImplementedError

    def channels(self, e: int) -> torch.Tensor:
        """Original micro-expert indices kept by expert ``e`` (int64, on the weights' device)."""
        raise NotImplementedError

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        """Expert ``e``'s weights (views where the storage allows; ``dtype`` casts)."""
        raise NotImplementedError

    def grouped_weights(self, x: torch.Tensor, hit: list[int] | None = None
                        ) -> GroupedWeights | WeightGroups | None:
        """Stacked weights for grouped GEMMs on ``x``'s device (one stack or several groups), or None.

        ``hit``: ascending ids of the experts that have rows in this forward (None: all); a kind
        with :attr:`grouped_subsets` may stack only those (:attr:`GroupedWeights.experts`).
        """
        return None

    def kernel_rows(self, x: torch.Tensor, routing: "SortedRouting", observed: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """Activations ``[S, ·]`` (original indices; only when ``observed``) and outputs ``[S, H]`` of the rows ``x``
        sorted by expert, computed by the kind's own kernels straight from its storage; None where it has none
        for ``x``'s device and dtype (the experts forward then asks for :meth:`grouped_weights`)."""
        return None

    def weight_parameters(self) -> list[str]:
        """Names of the module's weight ``nn.Parameter``s that adapters may train (empty: none, e.g. packed codes)."""
        return []

    def weight_modules(self) -> list[str]:
        """Names, within the module, of ``nn.Linear`` submodules holding expert weights that adapters may train as
        modules (empty: none; the weights are parameters, see :meth:`weight_parameters`, or cannot be adapted)."""
        return []

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def full_width(self) -> bool:
        """Every expert keeps all ``intermediate_size`` micro-experts."""
        return bool((self.widths() == self.intermediate_size).all())

    @property
    def device(self) -> torch.device:
        return self.weights(0).up.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights(0).up.dtype

    def present_mask(self) -> torch.Tensor:
        """``[E, I]`` on the CPU: which original micro-experts each expert still has."""
        mask = torch.zeros(self.num_experts, self.intermediate_size, dtype=torch.bool)
        for e in range(self.num_experts):
            mask[e, self.channels(e).cpu()] = True
        return mask

    def parameter_counts(self) -> torch.Tensor:
        """Weight elements of each expert's gate, up and down projections, float64 ``[E]`` (biases left out)."""
        matrices = 3 if self.layout.has_gate else 2
        return (self.widths() * matrices * self.hidden_size).to(torch.float64)

    def stacked(self) -> ExpertWeights:
        """All experts' weights stacked ``[E, ...]`` (experts of equal width only)."""
        if not bool((self.widths() == self.widths()[0]).all()):
            raise TypeError(f"{type(self).__name__} experts have unequal widths; read them per expert with weights(e).")
        per = [self.weights(e) for e in range(self.num_experts)]

        def stack(name: str) -> torch.Tensor | None:
            first = getattr(per[0], name)
            return None if first is None else torch.stack([getattr(w, name) for w in per])

        return ExpertWeights(*(stack(n) for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")))

    # ---- the experts' math ------------------------------------------------------------------------
    def act(self, gate_out: torch.Tensor | None, up_out: torch.Tensor) -> torch.Tensor:
        """Micro-expert activations from the gate and up projections (the module's own gating)."""
        return self.layout.activate(self.template, self.layout.pack(gate_out, up_out, -1))

    def act_packed(self, proj: torch.Tensor) -> torch.Tensor:
        """Activations from a packed gate/up projection in this layout (grouped GEMM output)."""
        return self.layout.activate(self.template, proj)

    def activation(self, e: int, x: torch.Tensor, w: ExpertWeights | None = None,
                   up_input: torch.Tensor | None = None) -> torch.Tensor:
        """Micro-expert activations ``a_e(x) [T, W_e]``: the input of expert ``e``'s down projection.

        ``w`` replaces the stored weights; ``up_input`` feeds the up projection a different
        input than the gate (compressed experts scale the two inputs separately).
        """
        w = self.weights(e, x.dtype) if w is None else w
        up = nn.functional.linear(x if up_input is None else up_input, w.up, w.up_bias)
        gate = None if w.gate is None else nn.functional.linear(x, w.gate, w.gate_bias)
        return self.act(gate, up)

    def output(self, e: int, a: torch.Tensor, w: ExpertWeights | None = None) -> torch.Tensor:
        """``f_e(x) [T, H]`` from expert ``e``'s activations (routing weight not applied)."""
        w = self.weights(e, a.dtype) if w is None else w
        out = nn.functional.linear(a, w.down, w.down_bias)
        return self.module.post_expert_norm(out) if self.layout.post_norm else out


def weightless(module: nn.Module) -> nn.Module:
    """A shallow copy of an experts module without tensors: only its gating behaviour and constants remain."""
    template = copy.copy(module)
    template._parameters = {}
    template._buffers = {}
    template._modules = {name: m for name, m in module._modules.items() if not any(True for _ in m.parameters())}
    template.__dict__.pop("_camera_observer", None)
    return template


class WritesInPlace:
    """For kinds whose :meth:`Experts.weights` are views of their own storage: writes go through the views.

    Kinds whose per-expert weights are computed (dequantized) have no ``write``.
    """

    def write(self, e: int, w: ExpertWeights) -> None:
        """Overwrite expert ``e``'s gate, up and down weights in place (fake quantization)."""
        mine = self.weights(e)
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                target = getattr(mine, name)
                if target is not None:
                    target.copy_(getattr(w, name))


class FusedExperts(WritesInPlace, Experts):
    """The interface over a transformers fused experts module (``gate_up_proj [E, 2I, H]`` + ``down_proj``)."""

    kind = "fused"

    def __init__(self, module: nn.Module):
        self._module = module
        self.layout = ExpertsLayout.of(module)
        down = self.layout.as_linear(module.down_proj)  # [E, H, I]
        self.num_experts, self.hidden_size, self.intermediate_size = (int(d) for d in down.shape)

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def template(self) -> nn.Module:
        return self._module

    def widths(self) -> torch.Tensor:
        return torch.full((self.num_experts,), self.intermediate_size, dtype=torch.long)

    def channels(self, e: int) -> torch.Tensor:
        return torch.arange(self.intermediate_size, device=self._module.down_proj.device)

    def _up_param(self) -> torch.Tensor:
        return getattr(self._module, self.layout.up_name)

    def weight_parameters(self) -> list[str]:
        return [self.layout.up_name, "down_proj"]

    def stacked(self) -> ExpertWeights:
        """Views of all experts' weights ``[E, ...]`` (no copies)."""
        layout, m = self.layout, self._module
        gate, up = layout.split(layout.as_linear(self._up_param()), 1)
        out = ExpertWeights(gate, up, layout.as_linear(m.down_proj))
        if layout.has_bias:
            out.gate_bias, out.up_bias = layout.split(getattr(m, f"{layout.up_name}_bias"), 1)
            out.down_bias = m.down_proj_bias
        return out

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        s = self.stacked()
        out = ExpertWeights(*(None if t is None else t[e] for t in
                              (s.gate, s.up, s.down, s.gate_bias, s.up_bias, s.down_bias)))
        return out if dtype is None else cast(out, dtype)

    @property
    def device(self) -> torch.device:
        return self._module.down_proj.device

    @property
    def dtype(self) -> torch.dtype:
        return self._module.down_proj.dtype

    def grouped_weights(self, x: torch.Tensor, hit: list[int] | None = None) -> GroupedWeights | None:
        """Views of all experts' weights (``hit`` is not needed: nothing is built)."""
        layout, m = self.layout, self._module
        if layout.post_norm or not layout.has_gate or not grouped_mm_supported(x):
            return None
        up, down = self._up_param(), m.down_proj
        if up.dtype != x.dtype or any(d * x.element_size() % 16 for d in (*up.shape[1:], *down.shape[1:])):
            return None  # grouped GEMM needs 16-byte aligned strides
        up = up if layout.transposed else up.transpose(1, 2)
        down = down if layout.transposed else down.transpose(1, 2)
        if layout.has_bias:
            return GroupedWeights(up, down, getattr(m, f"{layout.up_name}_bias"), m.down_proj_bias)
        return GroupedWeights(up, down)



def cast(w: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
    """``w`` with every tensor in ``dtype``."""
    return ExpertWeights(*(None if t is None else t.to(dtype) for t in
                           (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)))


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The experts module under adapter wrappers (peft's ``get_base_layer``), or ``module`` itself."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def is_experts(module: nn.Module | None) -> bool:
    """Whether ``module`` is a routed-experts module :func:`as_experts` can read."""
    from camera_pl.experts.modulelist import is_expert_list  # the list view builds on this module

    module = unwrap(module)
    if isinstance(module, Experts) or is_expert_list(module):
        return True
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3


def as_experts(module: nn.Module) -> Experts:
    """The experts interface of any routed-experts module (camera_pl's own, transformers' fused, a list of MLPs)."""
    from camera_pl.experts.modulelist import ModuleListExperts, is_expert_list

    if not is_experts(module):
        raise TypeError(f"{type(module).__name__} is not a routed-experts module camera_pl can read: expected "
                        "transformers' fused experts (3D gate_up_proj/down_proj), an nn.ModuleList of gated MLPs "
                        "or a camera_pl experts module.")
    module = unwrap(module)
    if isinstance(module, Experts):
        return module
    return ModuleListExperts(module) if is_expert_list(module) else FusedExperts(module)
