"""Export packed experts in the style of compressed-tensors' ``pack-quantized`` format.

compressed-tensors (the format vLLM loads) describes quantization per *module*: one
``num_bits``/``group_size`` per ``nn.Linear``, asymmetric integer weights packed densely
into int32 words, per-group scales along the input dimension. It therefore cannot express
camera_pl's micro-expert mixed precision. :func:`export_compressed_tensors` writes a
model only when every exported module is uniform:

* every matrix (gate, up, down) of every expert has a single bit-width (experts and
  matrices may differ; one config group is written per bit-width);
* the down projection is stored by output rows (``down_axis="out"``: methods ``uniform``,
  ``pmq``, ``matrix``; CAMERA-Q's per-column down grids have no compressed-tensors form);
* no 1-bit rows (sign × scale is not an affine integer grid);
* experts without biases, and one group size for all matrices.

Anything else raises :class:`ExportError` naming the first offending module. Tensors are
named per expert as in unfused Hugging Face checkpoints
(``...mlp.experts.{e}.{gate,up,down}_proj.weight_packed`` / ``weight_scale`` /
``weight_zero_point`` / ``weight_shape``); codes and zero points are offset by
``2^(b-1)`` to signed integers, codes packed LSB first. Zero points are stored unpacked
(int8), and the result has not been validated against the compressed-tensors library
(not available here): treat it as a starting point, not a certified vLLM checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.experts.quantized import QuantizedExperts

_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class ExportError(ValueError):
    """The model's quantization cannot be written in the compressed-tensors layout."""


def _expert_tensors(experts: QuantizedExperts, prefix: str) -> tuple[dict[str, torch.Tensor], dict[int, list[str]]]:
    spec = experts.spec()
    if experts.layout.has_bias:
        raise ExportError(f"{prefix}: experts with biases (e.g. GPT-OSS) are not exported; "
                          "use camera_pl.serialization.save.")
    if not experts.full_width:
        raise ExportError(f"{prefix}: experts of unequal width (layer/global pruning) cannot be expressed as "
                          "compressed-tensors linears; use camera_pl.save, or prune with allocation='expert'.")
    if spec["down_axis"] != "out":
        raise ExportError(f"{prefix}: down projections are quantized by micro-expert columns (CAMERA-Q), which "
                          "compressed-tensors cannot express; export models quantized with method='uniform', "
                          "'pmq' or 'matrix', or keep camera_pl.serialization.save for this one.")
    tensors, targets = {}, {}
    for m, info in spec["matrices"].items():
        bit_map = getattr(experts, f"{m}_bits")
        per_expert = experts.rows_per_expert(m)
        for e in range(experts.num_experts):
            name = f"{prefix}.{e}.{_PROJ[m]}"
            first, rows = sum(per_expert[:e]), per_expert[e]
            bits = torch.unique(bit_map[first:first + rows]).tolist()
            if len(bits) != 1:
                raise ExportError(f"{name} mixes bit-widths {bits}; compressed-tensors needs one bit-width per module "
                                  "(quantize with method='uniform', 'pmq' or 'matrix').")
            if bits[0] == 1:
                raise ExportError(f"{name} is 1-bit (sign x scale), which is no affine integer grid; quantize with "
                                  "bit_choices starting at 2.")
            b = bits[0]
            start = int((bit_map[:first] == b).sum())
            packed = getattr(experts, f"{m}_q{b}")[start:start + rows]
            packed = nn.functional.pad(packed, (0, (-packed.shape[1]) % 4)).contiguous().view(torch.int32)
            offset = 1 << (b - 1)
            tensors[f"{name}.weight_packed"] = packed.contiguous()
            scale = getattr(experts, f"{m}_s{b}")[start:start + rows]
            tensors[f"{name}.weight_scale"] = scale.view(torch.float16).clone()
            zero = getattr(experts, f"{m}_z{b}")[start:start + rows].to(torch.int16) - offset
            tensors[f"{name}.weight_zero_point"] = zero.to(torch.int8)
            tensors[f"{name}.weight_shape"] = torch.tensor([rows, info["length"]], dtype=torch.int64)
            targets.setdefault(b, []).append(name)
    return tensors, targets


def export_compressed_tensors(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` (with a ``quantization_config``) and ``model.safetensors`` to ``path``.

    Raises :class:`ExportError` unless every routed experts module is a packed
    :class:`QuantizedExperts` with a uniform bit-width per exported module (see module doc).
    """
    path = Path(path)
    names = {id(m): n for n, m in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[int, list[str]] = {}
    replaced = set()
    group_size = None
    for layer in moe_layers(model):
        if not isinstance(layer.module, QuantizedExperts):
            raise ExportError(f"MoE layer {layer.index} is not quantized; run camera_pl.quantize(..., pack=True) "
                              "first.")
        prefix = names[id(layer.module)]
        replaced.add(prefix)
        layer_tensors, layer_targets = _expert_tensors(layer.module, prefix)
        tensors.update(layer_tensors)
        for b, t in layer_targets.items():
            targets.setdefault(b, []).extend(t)
        sizes = {info["group_size"] for info in layer.module.spec()["matrices"].values()}
        if group_size is not None:
            sizes.add(group_size)
        if len(sizes) > 1:
            raise ExportError(f"{prefix}: matrices use different group sizes {sorted(sizes)} (group_size is clipped to "
                              "each row length); quantize with a group_size no larger than the shortest row.")
        group_size = sizes.pop()
    for name, value in model.state_dict().items():
        if not any(name.startswith(p + ".") for p in replaced):
            tensors.setdefault(name, value.detach().cpu().clone())  # clones: tied weights must not share memory
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {f"group_{b}": {"targets": t, "weights": {
            "num_bits": b, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}}
            for b, t in sorted(targets.items())},
        "ignore": ["lm_head"],
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1, default=str))
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path
