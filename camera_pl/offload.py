"""Layer-by-layer execution: one-shot compression of models larger than the accelerator.

The model's weights stay on their *home* device (normally CPU). :class:`LayerByLayer` first
runs the calibration batches through what precedes the decoder layers (embeddings, rotary
embedding, mask construction) on the execution device, with every decoder layer swapped for
a recorder that keeps the hidden states and the arguments the model passes it (masks and
position embeddings can differ between layers, e.g. sliding-window ones). Iterating it then
moves each decoder layer in turn to the execution device and hands it to the caller as a
:class:`LayerStep`, whose :meth:`~LayerStep.run` feeds it every cached batch (with whatever
observation or calibration hooks the caller installed) and can replace the cache by the
layer's outputs, the next layer's inputs; the layer goes home before the next one comes.

Peak memory on the execution device is one decoder layer, plus the cached hidden states and
layer arguments unless ``cache_device`` keeps them elsewhere, plus what the hooks accumulate.
This is the schedule of GPTQ's reference code and of llm-compressor's sequential pipeline;
:func:`camera_pl.collect_stats`, :func:`camera_pl.prune` (``sequential``) and
:func:`camera_pl.quantize` (GPTQ, PMQ) use it when given ``offload=``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from camera_pl.arch.adapters import MoELayer, decoder_stack, moe_layers, outer_modules
from camera_pl.config import Config


def calibration_batches(dataloader: Iterable, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, bool attention mask)`` of each calibration batch on ``device``; batches must be dicts with
    ``input_ids`` (a missing mask means no padding)."""
    for batch in dataloader:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("Calibration batches must be dicts with 'input_ids' (and optional "
                            f"'attention_mask'); got {type(batch).__name__}.")
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        yield ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device).bool()


@dataclass(frozen=True)
class OffloadConfig(Config):
    """Where layer-by-layer execution runs.

    Attributes:
        execution_device: where each decoder layer runs, e.g. ``"cuda"``, ``"cuda:1"``, ``"cpu"``;
            ``"auto"``: the current accelerator (``torch.accelerator``), else CPU.
        cache_device: where the hidden states between layers are kept (None: the execution
            device). ``"cpu"`` trades a host-device copy per layer and batch for device memory.
    """

    execution_device: str = "auto"
    cache_device: str | None = None

    def check(self) -> None:
        for option in ("execution_device", "cache_device"):
            value = getattr(self, option)
            if value is None and option == "cache_device" or value == "auto" and option == "execution_device":
                continue
            try:
                torch.device(value)
            except (RuntimeError, TypeError):
                self._fail(option, "expected a device name such as 'cuda', 'cuda:1' or 'cpu'.")

    @property
    def device(self) -> torch.device:
        """The execution device, ``auto`` resolved."""
        if self.execution_device != "auto":
            return torch.device(self.execution_device)
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator or torch.device("cpu")

    @property
    def cache(self) -> torch.device:
        """Where cached hidden states live."""
        return torch.device(self.cache_device) if self.cache_device is not None else self.device


def as_offload(offload: OffloadConfig | str | torch.device | None) -> OffloadConfig | None:
    """``offload=`` as the verbs take it: a config, a device (the execution device) or None (in memory)."""
    if offload is None or isinstance(offload, OffloadConfig):
        return offload
    if isinstance(offload, (str, torch.device)):
        return OffloadConfig(execution_device=str(offload))
    raise TypeError(f"offload must be an OffloadConfig, a device name such as 'cuda' or None; got "
                    f"{type(offload).__name__}.")


def home_device(model: nn.Module) -> torch.device:
    """The one device that holds all of ``model``'s weights, or an error naming what to do instead."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    hooked = any(hasattr(m, "_hf_hook") for m in model.modules())
    if hooked or any(d.type == "meta" for d in devices):
        raise ValueError("Layer-by-layer mode moves each decoder layer itself and edits weights in place, so it needs "
                         "the weights in memory, not on the meta device or behind accelerate's offload hooks "
                         "(dispatch_model / cpu_offload / a device_map over several devices). Load the model to CPU "
                         "(from_pretrained without device_map, or device_map='cpu') and pass offload='cuda'.")
    if len(devices) != 1:
        raise ValueError(f"Layer-by-layer mode expects all weights on one home device (normally CPU), but they are on "
                         f"{sorted(map(str, devices))}; move the model there first with model.to('cpu').")
    return devices.pop()


def _move(module: nn.Module, device: torch.device) -> None:
    """Move a decoder layer (all its tensors) to ``device``; the one place layers are onloaded and offloaded."""
    module.to(device)


def _place(modules: list[nn.Module], device: torch.device) -> None:
    """Move the modules' own tensors (not their children's) to ``device``."""
    for module in modules:
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))


def _to(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """``value`` (tensors in tuples, lists, dicts, or objects with ``.to`` like flex attention's BlockMask) on
    ``device``; a tensor shared between layers is moved once (``memo``) and stays shared."""
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    if isinstance(value, torch.Tensor) or callable(getattr(value, "to", None)) and not isinstance(value, nn.Module):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    return value


class _Recorded(Exception):
    """Raised by the last recorder: the batch's arguments of every decoder layer are known."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer while batches are cached: records its call and passes the hidden states on."""

    def __init__(self, index: int, last: bool, calls: list):
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Recorded
        return hidden_states


@dataclass
class _Batch:
    """One calibration batch at the current layer: ``hidden [B, S, H]``, ``mask [B, S]`` (True: a real token)
    and, per decoder layer, the ``(args, kwargs)`` the model calls it with; all on the cache device."""

    hidden: torch.Tensor
    mask: torch.Tensor
    calls: list[tuple[tuple, dict]]


class LayerStep:
    """One decoder layer, on the execution device, and the cached batches at its input."""

    def __init__(self, index: int, layer: nn.Module, moe: MoELayer | None, batches: list[_Batch],
                 offload: OffloadConfig):
        self.index = index
        self.layer = layer
        self.moe = moe
        """The layer's MoE view (None for dense layers)."""
        self.last = index == len(batches[0].calls) - 1
        """The model's last decoder layer (whose outputs no layer needs)."""
        self._batches = batches
        self._offload = offload

    def run(self, keep_outputs: bool = True, before_batch: Callable[[torch.Tensor], None] | None = None,
            stop: type[Exception] | None = None) -> None:
        """Feed the layer every cached batch; with ``keep_outputs`` its outputs become the cached batches.

        ``before_batch(mask)`` is called before each batch with its ``[B, S]`` boolean token mask on the
        execution device (to declare it to observers). Hooks may raise ``stop`` to cut a batch's forward
        short (calibration captures); the outputs are then not kept. Runs without gradients.
        """
        if stop is not None and keep_outputs:
            raise ValueError("A forward that hooks may stop has no outputs to keep; pass keep_outputs=False.")
        with torch.no_grad():
            self._run(keep_outputs, before_batch, stop)

    def _run(self, keep_outputs: bool, before_batch: Callable[[torch.Tensor], None] | None,
             stop: type[Exception] | None) -> None:
        device, cache = self._offload.device, self._offload.cache
        for batch in self._batches:
            memo: dict[int, Any] = {}
            args, kwargs = _to(batch.calls[self.index], device, memo)
            if before_batch is not None:
                before_batch(batch.mask.to(device))
            try:
                out = self.layer(batch.hidden.to(device), *args, **kwargs)
            except stop or ():
                continue
            if keep_outputs:
                batch.hidden = (out[0] if isinstance(out, tuple) else out).to(cache)


class LayerByLayer:
    """Calibration batches cached at the first decoder layer; iterating yields each decoder layer onloaded.

    ``dataloader`` gives dicts with ``input_ids`` and optional ``attention_mask``; caching stops after the
    batch that reaches ``max_tokens`` unpadded tokens (:attr:`tokens` counts them). A layer is moved back
    to the home device when the loop moves on (or leaves), so at most one is on the execution device.
    """

    def __init__(self, model: nn.Module, dataloader: Iterable, offload: OffloadConfig | str | torch.device,
                 max_tokens: int | None = None):
        self.offload = as_offload(offload)
        self.model = model
        self.home = home_device(model)
        self.moe = {layer.index: layer for layer in moe_layers(model)}
        self.batches: list[_Batch] = []
        self.tokens = 0
        self._cache(dataloader, max_tokens)

    def _cache(self, dataloader: Iterable, max_tokens: int | None) -> None:
        stack = decoder_stack(self.model)
        originals = list(stack)
        calls: list = []
        outer = outer_modules(self.model)
        device, cache = self.offload.device, self.offload.cache
        for i in range(len(stack)):
            stack[i] = _Recorder(i, i == len(stack) - 1, calls)
        _place(outer, device)
        try:
            with torch.no_grad():
                for ids, mask in calibration_batches(dataloader, device):
                    calls.clear()
                    try:
                        self.model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
                    except _Recorded:
                        pass
                    memo: dict[int, Any] = {}
                    self.batches.append(_Batch(_to(calls[0][0], cache, memo), mask.to(cache),
                                               [_to((args, kwargs), cache, memo) for _, args, kwargs in calls]))
                    self.tokens += int(mask.sum())
                    if max_tokens is not None and self.tokens >= max_tokens:
                        break
        finally:
            for i, layer in enumerate(originals):
                stack[i] = layer
            _place(outer, self.home)
        if self.tokens == 0:
            raise ValueError("The calibration dataloader gave no tokens: it is empty or every token is padding.")

    def __iter__(self) -> Iterator[LayerStep]:
        for index, layer in enumerate(decoder_stack(self.model)):
            with onloaded(layer, self.offload, self.home):
                yield LayerStep(index, layer, self.moe.get(index), self.batches, self.offload)


@contextmanager
def onloaded(layer: nn.Module, offload: OffloadConfig, home: torch.device) -> Iterator[nn.Module]:
    """``layer`` on the execution device inside the block, back on ``home`` after it."""
    _move(layer, offload.device)
    try:
        yield layer
    finally:
        _move(layer, home)
