"""``MicroExpertStats``: the statistics of one model, with scoring, saving and loading.

Besides the streamed activation statistics (see :mod:`camera_pl.stats.observation`) the
container keeps a snapshot of per-micro-expert weight norms (``‖W_down[:, j]‖²`` and the
gate/up row norms) so scores can be computed without the model; pass ``model=`` to
:meth:`MicroExpertStats.scores` to read the current weights instead.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from camera_pl.arch.adapters import MoELayer, model_signature, moe_layers
from camera_pl.checksum import tensors_digest
from camera_pl.labels import IGNORE_INDEX, causal_labels
from camera_pl.offload import LayerByLayer, OffloadConfig, as_offload
from camera_pl.stats.observation import RATIO_BINS, StatsAccumulator, observe
from camera_pl.stats.scores import LayerScores, compute_scores


FORMAT_VERSION = 1


class StatsMismatchError(ValueError):
    """Statistics and model (or file) do not belong together."""


def weight_norms(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Per-micro-expert weight norms of a layer, float32: routed ``[E, I]`` and shared ``[I_s]``.

    Micro-experts already pruned away (ragged layers) have norm 0.
    """
    with torch.no_grad():
        experts = layer.experts
        shape = (layer.num_experts, layer.intermediate_size)
        norms = {k: torch.zeros(shape, device=experts.device) for k in ("down_norm_sq", "up_norm", "gate_norm")}
        for e in range(layer.num_experts):
            w = experts.weights(e)
            ch = experts.channels(e)
            norms["down_norm_sq"][e, ch] = w.down.float().pow(2).sum(0)
            norms["up_norm"][e, ch] = w.up.float().norm(dim=1)
            norms["gate_norm"][e, ch] = w.gate.float().norm(dim=1) if w.gate is not None else 1.0
        shared = layer.shared
        if shared is not None:
            norms["shared_down_norm_sq"] = shared.down_proj.weight.float().pow(2).sum(0)
            norms["shared_up_norm"] = shared.up_proj.weight.float().norm(dim=1)
            norms["shared_gate_norm"] = shared.gate_proj.weight.float().norm(dim=1)
    return norms


def heapr_quadratic(layer: MoELayer, entry: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HEAPr's ``w_jᵀ (Σ_t g gᵀ) w_j`` per micro-expert from ``entry``'s curvature sums and the layer's weights.

    ``w_j`` is the down-projection column of micro-expert j; ``heapr_m [E, H, H]`` (``full``) or
    ``heapr_diag [E, H]`` (``diag``: ``Σ_t g²``, so ``Σ_h w_jh² Σ_t g_h²``) gives the curvature of
    each expert's output. Returns ``heapr_quad [E, I]`` (0 for micro-experts no longer present)
    and ``shared_heapr_quad [I_s]`` where the layer has shared experts; nothing without HEAPr states.
    """
    if "heapr_m" in entry:
        full, curvature = True, entry["heapr_m"]
    elif "heapr_diag" in entry:
        full, curvature = False, entry["heapr_diag"]
    else:
        return {}

    def quad(m: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        d = down.float()
        m = m.to(d.device)
        return ((m @ d) * d).sum(0) if full else (m[:, None] * d.square()).sum(0)

    with torch.no_grad():
        experts = layer.experts
        out = {"heapr_quad": torch.zeros(layer.num_experts, layer.intermediate_size, device=experts.device)}
        for e in range(layer.num_experts):
            out["heapr_quad"][e, experts.channels(e)] = quad(curvature[e], experts.weights(e).down)
        if layer.shared is not None:
            shared = entry["shared_heapr_m" if full else "shared_heapr_diag"]
            out["shared_heapr_quad"] = quad(shared, layer.shared.down_proj.weight)
    return out


def check_finite(index: int, entry: dict[str, torch.Tensor]) -> None:
    """Raise naming the layer, the statistic and the experts where a statistic is NaN or infinite."""
    for name, value in entry.items():
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            where = ""
            if value.dim() >= 1 and not name.startswith("shared") and name != "ratio_hist":
                experts = bad.reshape(value.shape[0], -1).any(1).nonzero().flatten().tolist()
                where = f", experts {experts[:8]}{'...' if len(experts) > 8 else ''}"
            raise ValueError(f"MoE layer {index}: statistic {name!r} is not finite{where}. The model's weights or "
                             "activations hold NaN or inf there (check the checkpoint, e.g. torch.isfinite on those "
                             "experts' weights, and the dtype's range); no pruning or quantization decision can use it.")


def layer_entry(acc: StatsAccumulator, layer: MoELayer, states: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """One layer's statistics from an accumulator (``states``: its computed states, to compute them once),
    with the layer's current weight norms (and HEAPr's quadratic forms); checked finite."""
    states = acc.compute() if states is None else states
    entry = {name: states[f"l{layer.index}_{name}"] for name in acc.layer_names(layer.index)}
    if layer.index in acc.heapr_modes:
        entry["heapr_tokens"] = states["tokens"].clone()
    entry.update(weight_norms(layer))
    entry.update(heapr_quadratic(layer, entry))
    check_finite(layer.index, entry)
    return entry


@dataclass
class MicroExpertStats:
    """Micro-expert statistics of every MoE layer of one model.

    Attributes:
        signature: architecture and per-layer shapes of the model the stats came from.
        layers: ``{layer_index: {name: tensor}}``; names are those of
            :data:`camera_pl.stats.observation.STATE_LAYOUT` plus the weight-norm snapshot; statistics
            collected with ``heapr_mode`` add HEAPr's curvature (see
            :data:`~camera_pl.stats.observation.HEAPR_LAYOUT`), ``heapr_tokens`` (the tokens of the
            shared experts' average) and ``heapr_quad``/``shared_heapr_quad`` (:func:`heapr_quadratic`).
        tokens: number of (unpadded) tokens observed.
    """

    signature: dict
    layers: dict[int, dict[str, torch.Tensor]]
    tokens: int
    meta: dict = field(default_factory=dict)

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_accumulator(cls, acc: StatsAccumulator, model: nn.Module, meta: Mapping | None = None,
                         gather: Callable[[nn.Module], AbstractContextManager] | None = None) -> "MicroExpertStats":
        """Read (and, under DDP/FSDP, sync) an accumulator into a stats object for ``model``.

        ``gather(experts_module)`` makes one layer's full weights readable for its weight norms (for
        sharded models, :func:`camera_pl.lightning.sharding.gathered`); by default they are read as they are.
        """
        states = acc.compute()
        layers, fingerprints = {}, []
        for layer in moe_layers(model):
            with (gather or nullcontext)(layer.block):
                layers[layer.index] = layer_entry(acc, layer, states)
                fingerprints.append(layer.fingerprint())
        signature = {**model_signature(model, fingerprint=False), "fingerprint": fingerprints}
        return cls(signature, layers, int(states["tokens"].item()), dict(meta or {}))

    # ---- queries ----------------------------------------------------------------------
    def check_compatible(self, model: nn.Module, same_weights: bool = False) -> None:
        """Raise :class:`StatsMismatchError` naming the difference if these statistics do not describe ``model``.

        Architecture and shapes must match; every expert of ``model`` may keep at most the
        micro-experts it had when the statistics were collected (statistics of a model may prune
        it further, not the reverse). With ``same_weights``, the weight fingerprint must match
        too (a file of statistics loaded for a model).
        """
        mine, theirs = self.signature, model_signature(model, fingerprint=same_weights)
        diffs = []
        if mine["model_type"] != theirs["model_type"] or mine["model_class"] != theirs["model_class"]:
            diffs.append(f"{mine['model_class']} ({mine['model_type']}) vs {theirs['model_class']} "
                         f"({theirs['model_type']})")
        elif len(mine["layers"]) != len(theirs["layers"]):
            diffs.append(f"{len(mine['layers'])} MoE layers in stats vs {len(theirs['layers'])} in model")
        else:
            for a, b in zip(mine["layers"], theirs["layers"]):
                shape_a = {k: v for k, v in a.items() if k != "widths"}
                shape_b = {k: v for k, v in b.items() if k != "widths"}
                if shape_a != shape_b:
                    diffs.append(f"layer {a['index']}: stats {shape_a} vs model {shape_b}")
                elif any(w_model > w_stats for w_stats, w_model in zip(a.get("widths", []), b["widths"])):
                    diffs.append(f"layer {a['index']}: the statistics come from a more pruned model (expert widths "
                                 f"{a.get('widths')} vs the model's {b['widths']})")
            if same_weights and not diffs and mine.get("fingerprint") != theirs["fingerprint"]:
                diffs.append("same shapes, other weights (the weight fingerprints differ)")
        if diffs:
            raise StatsMismatchError(
                f"These statistics were collected on a different model ({'; '.join(diffs[:3])}). "
                "Collect statistics on this model with camera_pl.collect_stats(model, dataloader)."
            )

    def scores(self, method: str = "camera", model: nn.Module | None = None, **kwargs) -> dict[int, LayerScores]:
        """Per-layer scores by a registered method (see :mod:`camera_pl.stats.scores`).

        With ``model``, weight norms (and HEAPr's quadratic forms) are read from its current weights instead
        of the snapshot.
        """
        layers = self.layers
        if model is not None:
            self.check_compatible(model)
            layers = {layer.index: {**self.layers[layer.index], **weight_norms(layer),
                                    **heapr_quadratic(layer, self.layers[layer.index])} for layer in moe_layers(model)}
        return compute_scores(layers, method, **kwargs)

    @property
    def has_gradients(self) -> bool:
        """Whether every layer holds HEAPr's gradient statistics (``collect_stats(..., heapr_mode=...)``)."""
        return all("heapr_quad" in entry for entry in self.layers.values())

    def ratio_median(self, layer: int) -> float:
        """Median of the top-2/top-1 routing-weight ratio w1/w0 in ``layer`` (for MC's ODP threshold)."""
        hist = self.layers[layer]["ratio_hist"].double()
        total = hist.sum()
        if total <= 0:
            raise ValueError(f"Layer {layer} has no top-2 routing observations (top_k < 2 or no tokens).")
        cdf = hist.cumsum(0)
        b = int(torch.searchsorted(cdf, total / 2).item())
        below = cdf[b - 1] if b > 0 else torch.zeros((), dtype=torch.float64)
        frac = ((total / 2 - below) / hist[b].clamp_min(1e-12)).item()
        return (b + frac) / RATIO_BINS

    def nbytes(self) -> int:
        """Memory held by all statistic tensors."""
        return sum(t.numel() * t.element_size() for entry in self.layers.values() for t in entry.values())

    def to(self, device: torch.device | str) -> "MicroExpertStats":
        layers = {i: {n: t.to(device) for n, t in entry.items()} for i, entry in self.layers.items()}
        return MicroExpertStats(self.signature, layers, self.tokens, dict(self.meta))

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; its header metadata holds the model signature as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{i}.{n}": t.detach().cpu().contiguous() for i, e in self.layers.items() for n, t in e.items()}
        header = {"format": "camera_pl.MicroExpertStats", "version": FORMAT_VERSION, "signature": self.signature,
                  "tokens": self.tokens, "meta": self.meta, "checksum": tensors_digest(tensors)}
        save_file(tensors, str(path), metadata={"camera_pl": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu") -> "MicroExpertStats":
        """Read a file written by :meth:`save`; with ``model``, also check it belongs to that model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No statistics file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("camera_pl")
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise StatsMismatchError(f"{path} is not a readable safetensors statistics file ({err}).") from err
        if raw is None:
            raise StatsMismatchError(f"{path} is a safetensors file but not camera_pl statistics (no 'camera_pl' header).")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as err:
            raise StatsMismatchError(f"{path}: the camera_pl header is not valid JSON ({err}); the file is damaged. "
                                     "Collect the statistics again.") from None
        if header.get("version") != FORMAT_VERSION:
            raise StatsMismatchError(f"{path} has statistics format version {header.get('version')}; expected {FORMAT_VERSION}.")
        if header.get("checksum") != tensors_digest(tensors):
            raise StatsMismatchError(f"{path}: the statistics do not match the checksum in the file's header (damaged "
                                     "or edited bytes). Collect the statistics again.")
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            _, index, name = key.split(".", 2)
            layers.setdefault(int(index), {})[name] = tensor
        for index, entry in layers.items():
            check_finite(index, entry)
        stats = cls(header["signature"], dict(sorted(layers.items())), int(header["tokens"]), header.get("meta", {}))
        if model is not None:
            stats.check_compatible(model, same_weights=True)
        return stats


def _batches(dataloader: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    for batch in dataloader:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"collect_stats expects batches as dicts with 'input_ids' (and optional 'attention_mask'); "
                f"got {type(batch).__name__}."
            )
        yield batch["input_ids"], batch.get("attention_mask")


def _lm_loss_backward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """One forward and backward pass of the next-token loss, summed over the batch's unpadded targets.

    Summing (not averaging) gives every token's loss the same weight whatever the batch sizes.
    Gradients flow to a detached copy of the input embeddings only (``autograd.backward(inputs=)``),
    so the model's parameters get no ``.grad`` and frozen models work alike; the observers' tensor
    hooks read the gradients at the expert outputs on the way.
    """
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
    labels = causal_labels(input_ids, attention_mask)[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
    torch.autograd.backward(loss, inputs=[embeds])


def collect_stats(model: nn.Module, dataloader: Iterable, max_tokens: int | None = None,
                  heapr_mode: str | None = None, offload: OffloadConfig | str | torch.device | None = None
                  ) -> MicroExpertStats:
    """Run ``model`` over ``dataloader`` (no Trainer needed) and return its micro-expert statistics.

    Batches are dicts with ``input_ids`` and optional ``attention_mask``; padding tokens never
    count. Stops after the batch that reaches ``max_tokens`` unpadded tokens. The model is
    run in eval mode; its train/eval mode is restored afterwards.

    Without ``heapr_mode`` the forward runs without gradients. With ``heapr_mode`` (``"full"``,
    ``"diag"`` or ``"auto"``, see :data:`~camera_pl.stats.observation.HEAPR_MODES`) every batch
    also runs a backward pass of the summed next-token loss, and the statistics gain HEAPr's
    curvature of each expert's output (``heapr_m`` or ``heapr_diag``), from which the ``heapr``
    score is computed. The same pass collects all other statistics. A sequence's last token has no
    target and no later token attending to it, so its gradient is zero; it still counts in the
    token averages (as every routed token does in ``count``).

    With ``offload`` (an :class:`~camera_pl.offload.OffloadConfig` or the execution device, e.g.
    ``"cuda"``) the model stays on its home device (CPU) and runs one decoder layer at a time on
    the execution device (:mod:`camera_pl.offload`); the statistics are the same and live on
    the home device. HEAPr's backward pass needs the whole model and is not available then.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
    offload = as_offload(offload)
    if offload is not None and heapr_mode is not None:
        raise ValueError("heapr_mode needs a backward pass through every later layer, which layer-by-layer execution "
                         "(offload=...) does not run; collect HEAPr statistics in memory or use another score.")
    layers = moe_layers(model)
    accumulator = StatsAccumulator(layers, heapr_mode=heapr_mode)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if offload is not None:
            return _collect_layerwise(model, dataloader, max_tokens, offload, accumulator)
        with torch.set_grad_enabled(heapr_mode is not None), observe(model, accumulator) as obs:
            for input_ids, attention_mask in _batches(dataloader):
                input_ids = input_ids.to(device)
                attention_mask = None if attention_mask is None else attention_mask.to(device)
                obs.set_attention_mask(attention_mask, input_ids)
                if heapr_mode is None:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                else:
                    _lm_loss_backward(model, input_ids, attention_mask)
                if max_tokens is not None and obs.accumulator.tokens.item() >= max_tokens:
                    break
            if obs.accumulator.tokens.item() == 0:
                raise ValueError("collect_stats saw no tokens: the dataloader is empty or every token is padding.")
            return MicroExpertStats.from_accumulator(obs.accumulator, model)
    finally:
        model.train(was_training)


def _collect_layerwise(model: nn.Module, dataloader: Iterable, max_tokens: int | None, offload: OffloadConfig,
                       accumulator: StatsAccumulator) -> MicroExpertStats:
    """:func:`collect_stats` one decoder layer at a time: every layer's observers see every cached batch."""
    run = LayerByLayer(model, dataloader, offload, max_tokens)
    with observe(model, accumulator, device=offload.device) as obs:
        for step in run:
            step.run(before_batch=lambda mask: obs.set_attention_mask(mask, mask, count=False))
    accumulator.update(torch.tensor(float(run.tokens)))
    return MicroExpertStats.from_accumulator(accumulator.to(run.home), model)
