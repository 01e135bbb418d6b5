"""Save and load compressed models as Hugging Face directories.

``camera_pl.save`` writes ``config.json`` + weights like ``save_pretrained`` and a
``camera_pl.json`` describing each MoE layer's structure: expert count, expert width (with, for
experts kept as a list of MLPs and narrowed by pruning, each expert's kept micro-experts as a hex
bit mask), or — for camera_pl expert modules (ragged after pruning, packed after quantization) —
the module's kind and construction spec. ``camera_pl.load`` rebuilds the model from the config, swaps in empty
modules of the recorded kinds and loads the weights strictly, so any missing, extra or
misshapen tensor is an error. A directory without ``camera_pl.json`` is a plain transformers
checkpoint. The same structure description travels in Lightning checkpoints (see
:class:`camera_pl.callbacks.CameraPruning`).

Plain transformers loads what it can represent (fused experts, fewer or narrower ones) from
``model.safetensors``. Experts it cannot represent (ragged, quantized, compressed) would load
there as randomly initialised experts without an error, so such a model's weights go to
``camera_pl.safetensors``, a name transformers does not read: ``from_pretrained`` fails on the
missing weights file. For transformers' own model classes the directory also carries
``camera_pl_model.py`` and an ``auto_map`` entry, so ``from_pretrained(path, trust_remote_code=True)`` (and tools built on it, such as
lm-eval's ``hf`` model with ``trust_remote_code=True``) loads it through ``camera_pl.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.checksum import tensors_digest
from camera_pl.experts import kinds
from camera_pl.experts.module import WrappingExperts, describe
from camera_pl.experts.modulelist import ModuleListExperts, is_expert_list
from camera_pl.pruning.surgery import remove_experts, shrink_fused, shrink_shared

MANIFEST = "camera_pl.json"
WEIGHTS = "model.safetensors"
CAMERA_WEIGHTS = "camera_pl.safetensors"
LOADER = "camera_pl_model.py"
FORMAT_VERSION = 2
_AUTO_MAP = {"AutoModelForCausalLM": f"{LOADER[:-3]}.CameraPLForCausalLM"}

_LOADER_SOURCE = '''"""Loads this directory, written by camera_pl.save, through transformers' Auto classes.

Its experts are stored in a form plain transformers cannot represent; with
``trust_remote_code=True`` this class hands the directory to ``camera_pl.load``.
"""

from transformers import PreTrainedModel, {config_class}


class CameraPLForCausalLM(PreTrainedModel):
    config_class = {config_class}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            import camera_pl
        except ImportError as err:
            raise ImportError("This model was compressed by camera_pl; `pip install camera_pl` to load it.") from err
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device = kwargs.get("device_map")
        return camera_pl.load(pretrained_model_name_or_path, dtype=None if dtype in (None, "auto") else dtype,
                              device=device if isinstance(device, str) and device != "auto" else "cpu")
'''


class CheckpointError(ValueError):
    """A directory is not a loadable camera_pl / transformers checkpoint."""


def describe_structure(model: nn.Module) -> dict[str, dict]:
    """Per MoE layer: expert count, expert width (fused) or experts kind + spec, shared width."""
    out = {}
    for layer in moe_layers(model):
        entry: dict = {"num_experts": layer.num_experts, "shared_intermediate_size": layer.shared_intermediate_size}
        description = describe(layer.module)
        if description is not None:
            entry["experts"] = description
        else:
            entry["intermediate_size"] = layer.intermediate_size
        kept = _narrowed_list(layer.module)
        if kept is not None:  # list experts (maybe under a wrapping kind) narrowed to widths the config cannot describe
            entry["kept"] = kept
        out[str(layer.index)] = entry
    return out


def _narrowed_list(module: nn.Module) -> list[str] | None:
    """Kept masks of the pruned list of MLPs at the bottom of ``module``'s wrapping kinds (None: no such list)."""
    while isinstance(module, WrappingExperts):
        module = module.base
    return ModuleListExperts(module).kept_hex() if is_expert_list(module) else None


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> None:
    """Reshape ``model``'s MoE layers (weights arbitrary) to ``structure``, so a state dict of that shape loads."""
    by_index = {layer.index: layer for layer in moe_layers(model)}
    for index, entry in structure.items():
        layer = by_index.get(int(index))
        description = entry.get("experts")
        if layer is None or (description is not None and not kinds.known(description)):
            kind = None if description is None else description["kind"]
            raise CheckpointError(
                f"The saved structure names MoE layer {index} (experts kind {kind!r}), which this model/camera_pl "
                "cannot rebuild (mismatched config, or a camera_pl version without that kind)."
            )
        if entry["num_experts"] != layer.num_experts:
            keep = torch.zeros(layer.num_experts, dtype=torch.bool)
            keep[: entry["num_experts"]] = True
            remove_experts(layer, keep)
        if "kept" in entry:  # first: a wrapping kind is rebuilt around the narrowed list
            if not isinstance(layer.experts, ModuleListExperts):
                raise CheckpointError(f"The saved structure narrows MoE layer {index}'s experts as a list of MLPs, "
                                      f"but this model holds {layer.experts.kind} experts there.")
            layer.experts.keep_hex(entry["kept"])
        if description is not None:
            layer.replace_experts(kinds.build(description, layer.experts))
        elif "kept" not in entry and entry["intermediate_size"] != layer.intermediate_size:
            keep = torch.zeros(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
            keep[:, : entry["intermediate_size"]] = True
            shrink_fused(layer, keep)
        if layer.shared is not None and entry["shared_intermediate_size"] != layer.shared_intermediate_size:
            keep = torch.zeros(layer.shared_intermediate_size, dtype=torch.bool)
            keep[: entry["shared_intermediate_size"]] = True
            shrink_shared(layer, keep)


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (compressed or not) to directory ``path``; see :func:`load`.

    A sharded (FSDP) model: every rank must call it; the full state is gathered one parameter at a
    time onto rank 0's CPU and rank 0 writes the directory.
    """
    from camera_pl.lightning.sharding import full_state_dict, global_rank, is_sharded

    path = Path(path)
    state = full_state_dict(model) if is_sharded(model) else model.state_dict()
    if global_rank() != 0 and is_sharded(model):
        return path
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    structure = describe_structure(model)
    custom = any("experts" in entry or "kept" in entry for entry in structure.values())  # not for plain transformers
    for stale in (WEIGHTS, CAMERA_WEIGHTS, LOADER):  # from an earlier save into this directory
        (path / stale).unlink(missing_ok=True)
    if custom and hasattr(transformers, type(model.config).__name__):  # remote-code configs keep their auto_map
        _add_loader(path, type(model.config).__name__)
    tensors = {}
    seen: dict[int, str] = {}
    for name, tensor in state.items():
        key = tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)
        if tensor.numel() and hash(key) in seen:  # tied weights (e.g. embeddings) are stored once
            continue
        seen[hash(key)] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(path / (CAMERA_WEIGHTS if custom else WEIGHTS)), metadata={"format": "pt"})
    info = {"version": FORMAT_VERSION, "dtype": str(next(model.parameters()).dtype),
            "layers": structure, "checksum": tensors_digest(tensors)}
    (path / MANIFEST).write_text(json.dumps(info, indent=1))
    return path


def _add_loader(path: Path, config_class: str) -> None:
    """Write the ``trust_remote_code`` loader and point ``config.json``'s ``auto_map`` at it."""
    (path / LOADER).write_text(_LOADER_SOURCE.format(config_class=config_class))
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = _AUTO_MAP
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` (or by ``save_pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    weights = next((path / name for name in (CAMERA_WEIGHTS, WEIGHTS) if (path / name).is_file()), None)
    if not (path / "config.json").is_file() or weights is None:
        raise CheckpointError(f"{path} is not a model directory: it needs config.json and {WEIGHTS} "
                              f"(or {CAMERA_WEIGHTS}).")
    try:
        config = AutoConfig.from_pretrained(path)
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} holds an unreadable config or weights file ({err}).") from err
    if getattr(config, "auto_map", None) == _AUTO_MAP:  # serves this directory only: not for a later save_pretrained
        del config.auto_map
    info = _read_manifest(path / MANIFEST) if (path / MANIFEST).exists() else None
    if info is not None and info.get("checksum") != tensors_digest(state):
        raise CheckpointError(f"{weights} does not match the checksum recorded in {MANIFEST}: its bytes were "
                              "changed or damaged after camera_pl.save. Save the model again.")
    saved_dtype = getattr(torch, info["dtype"].split(".")[-1]) if info else None
    with no_init_weights():  # every tensor is overwritten from the file below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or saved_dtype or config.dtype)
    if info is not None:
        apply_structure(model, info["layers"])
    model = model.to(device)
    missing, unexpected = _load_state(model, state)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    model.tie_weights()
    return model.eval()


def _read_manifest(path: Path) -> dict:
    """camera_pl.json, checked: version, dtype and one entry per MoE layer with the keys ``apply_structure`` reads."""
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the directory was not written completely by "
                              "camera_pl.save. Save the model again.") from None
    if not isinstance(info, dict) or info.get("version") != FORMAT_VERSION:
        version = info.get("version") if isinstance(info, dict) else None
        raise CheckpointError(f"{path} has format version {version}; expected {FORMAT_VERSION}. Save the model again "
                              "with this camera_pl version.")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype.split(".")[-1], None), torch.dtype):
        raise CheckpointError(f"{path}: 'dtype' is {dtype!r}, not a torch dtype such as 'torch.bfloat16'.")
    layers = info.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{path}: 'layers' is missing; it records each MoE layer's structure.")
    for index, entry in layers.items():
        needed = ["num_experts", "shared_intermediate_size"] + (["experts"] if "experts" in entry else
                                                                ["intermediate_size"])
        missing = [k for k in needed if k not in entry]
        if missing:
            raise CheckpointError(f"{path}: MoE layer {index} lacks {missing}; the file is damaged. Save the model "
                                  "again.")
    return info


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    own = model.state_dict()
    tied = {k for k in own if k not in state and getattr(model.config, "tie_word_embeddings", False)
            and k.endswith("lm_head.weight")}
    missing = set(own) - set(state) - tied
    unexpected = set(state) - set(own)
    for name, value in state.items():
        if name in own and own[name].shape != value.shape:
            raise CheckpointError(f"Tensor {name} has shape {tuple(value.shape)} on disk but {tuple(own[name].shape)} "
                                  "in the rebuilt model: the directory's config and weights disagree.")
    model.load_state_dict(state, strict=False)
    return missing, unexpected
