"""Export packed experts as a compressed-tensors checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

transformers 5 keeps a layer's routed experts fused (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``). It loads compressed-tensors checkpoints of such models
only in the per-expert layout of unfused checkpoints (``...experts.{e}.gate_proj.weight_packed``
and so on): the architecture's checkpoint conversion mapping (``transformers.conversion_mapping``)
merges those names into the fused parameters, and the quantizer's ``CompressedTensorsDequantize``
(``transformers/integrations/compressed_tensors.py``) first decompresses every expert matrix. That
step fixes what can be exported (transformers 5.24):

* it rebuilds each expert matrix from ``weight_packed``, ``weight_scale`` and ``weight_shape`` only,
  so an asymmetric scheme fails (``Asymmetric quant requires zero-point values``) although its
  zero points are in the checkpoint. camera_pl's asymmetric ``b``-bit codes are therefore written
  losslessly as *symmetric* ``b+1``-bit integers ``q − z`` (1-bit rows ``2q − 1`` as 2-bit), with
  float32 copies of the float16 scales: the loaded model dequantizes to exactly camera_pl's
  weights, at one more code bit per weight than ``camera_pl.save`` stores (8-bit codes would
  need 9 and are refused);
* it decompresses all experts of the model with *one* scheme (``get_experts_scheme``: the first
  config group whose ``re:`` targets mention experts), so all expert matrices must share one
  bit-width and one group size: ``method="uniform"`` qualifies; PMQ's per-expert bits or
  ``matrix``'s per-matrix bits, though compressed-tensors config groups could describe them, would
  load with the wrong bit-width and are refused;
* the experts must be fused-shaped: equal widths (no layer/global pruning), no biases, down
  projections quantized by output rows (not CAMERA-Q's micro-expert columns), and the model type
  needs a per-expert conversion mapping.

Codes, zero-free, are packed with compressed-tensors' own ``pack_to_int32`` and the
``quantization_config`` is built from its ``QuantizationConfig``; ``compressed-tensors`` must be
installed (``pip install camera_pl[export]``). Anything that cannot load raises :class:`ExportError`
naming ``camera_pl.save`` / ``camera_pl.load``, which store every compressed form.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from camera_pl.arch.adapters import moe_layers
from camera_pl.experts.quantized import QuantizedExperts, unpack_codes
from camera_pl.quant.quantizers import MAX_BITS, SCALE_DTYPE

_ALTERNATIVE = "save it with camera_pl.save(model, dir) and load it with camera_pl.load(dir) instead"


class ExportError(ValueError):
    """The model's quantization cannot be written as a compressed-tensors checkpoint that transformers loads."""


def _require_compressed_tensors():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     QuantizationStatus)
    except ImportError as err:
        raise ImportError("export_compressed_tensors needs the compressed-tensors package: "
                          "pip install 'camera_pl[export]' (or pip install compressed-tensors).") from err
    return pack_to_int32, CompressionFormat, QuantizationArgs, QuantizationConfig, QuantizationScheme, \
        QuantizationStatus


def expert_module_names(model: nn.Module) -> dict[str, str]:
    """Per-expert module names of gate, up and down (``gate_proj``/``w1``...) from transformers' conversion mapping.

    The fused parameters must be built by ``MergeModulelist`` (+ ``Concatenate`` of gate and up)
    from ``experts.*.{name}.weight``: the only layout transformers loads quantized experts from.
    """
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    found = {}
    for conv in extract_weight_conversions_for_model(model) or []:
        if not isinstance(conv, WeightConverter):
            continue
        ops = [type(op) for op in conv.operations]
        target, sources = conv._original_target_patterns, conv._original_source_patterns
        leaves = [s.rpartition(".*.")[2].removesuffix(".weight") for s in sources]
        if target[0].endswith("experts.gate_up_proj") and ops == [MergeModulelist, Concatenate] and len(leaves) == 2:
            found["gate"], found["up"] = leaves
        elif target[0].endswith("experts.down_proj") and ops == [MergeModulelist] and len(leaves) == 1:
            found["down"] = leaves[0]
    if set(found) != {"gate", "up", "down"}:
        raise ExportError(f"transformers has no per-expert checkpoint conversion for model type "
                          f"{model.config.model_type!r}, so it cannot load quantized experts of it; {_ALTERNATIVE}.")
    return found


def _check_layer(experts: nn.Module, prefix: str) -> None:
    if not isinstance(experts, QuantizedExperts):
        raise ExportError(f"{prefix} is not quantized ({type(experts).__name__}); run camera_pl.quantize(model, "
                          "method='uniform', avg_bits=..., pack=True) first.")
    if experts.layout.has_bias:
        raise ExportError(f"{prefix}: experts with biases (e.g. GPT-OSS) are not exported; {_ALTERNATIVE}.")
    if not experts.full_width:
        raise ExportError(f"{prefix}: experts of unequal width (layer/global pruning) have no fused form; prune with "
                          f"allocation='expert', or {_ALTERNATIVE}.")
    if experts.spec()["down_axis"] != "out":
        raise ExportError(f"{prefix}: down projections are quantized by micro-expert columns (CAMERA-Q), which "
                          f"compressed-tensors cannot express; quantize with method='uniform', or {_ALTERNATIVE}.")


def _single_bits(experts: QuantizedExperts, prefix: str) -> int:
    """The one bit-width of all of ``experts``' rows (transformers decompresses all experts with one scheme)."""
    bits = sorted({b for m in experts.spec()["matrices"] for b in getattr(experts, f"{m}_bits").unique().tolist()})
    if len(bits) != 1:
        raise ExportError(f"{prefix} mixes bit-widths {bits}; transformers decompresses all experts of a model with "
                          "one compressed-tensors scheme (get_experts_scheme), so only a single bit-width for all "
                          f"experts loads (method='uniform'); {_ALTERNATIVE}.")
    if bits[0] == MAX_BITS:
        raise ExportError(f"{prefix}: {MAX_BITS}-bit codes would be exported as {MAX_BITS + 1}-bit symmetric "
                          f"integers (transformers drops zero points of experts), which compressed-tensors cannot "
                          f"pack; quantize with avg_bits < {MAX_BITS}, or {_ALTERNATIVE}.")
    return bits[0]


def _group_size(experts: QuantizedExperts, prefix: str) -> int:
    """The one group size, dividing every row length (compressed-tensors has no partial groups)."""
    matrices = experts.spec()["matrices"]
    lengths = sorted({info["length"] for info in matrices.values()})
    sizes = {info["group_size"] for info in matrices.values()}
    valid = [g for g in range(1, lengths[0] + 1) if all(n % g == 0 for n in lengths)]
    if len(sizes) != 1 or any(n % g for g in sizes for n in lengths):
        raise ExportError(f"{prefix}: group size {sorted(sizes)} (clipped to each row length) does not divide all row "
                          f"lengths {lengths}; compressed-tensors needs one group size dividing them: quantize with "
                          f"group_size in {valid}.")
    return sizes.pop()


def _signed_codes(experts: QuantizedExperts, m: str, e: int, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Expert ``e``'s matrix ``m`` as int8 ``q − z`` (``2q − 1`` at 1 bit) ``[R, C]`` and float32 scales ``[R, G]``."""
    length = experts.spec()["matrices"][m]["length"]
    rows = experts.rows_per_expert(m)
    start, stop = sum(rows[:e]), sum(rows[:e + 1])  # one bit-width: row r of the matrix is row r of its store
    codes = unpack_codes(getattr(experts, f"{m}_q{bits}")[start:stop], bits, length).to(torch.int16)
    if bits == 1:
        codes = 2 * codes - 1
    else:
        codes = codes - getattr(experts, f"{m}_z{bits}")[start:stop].to(torch.int16).repeat_interleave(group_size, 1)
    scale = getattr(experts, f"{m}_s{bits}")[start:stop].view(SCALE_DTYPE).float()
    return codes.to(torch.int8), scale


def export_compressed_tensors(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` (with a ``quantization_config``) and ``model.safetensors`` to ``path``.

    ``AutoModelForCausalLM.from_pretrained(path)`` (with ``compressed-tensors`` installed) then gives
    the same logits as ``model``. Raises :class:`ExportError`, before writing anything, for a
    quantization transformers cannot load (see the module docstring).
    """
    pack_to_int32, CompressionFormat, QuantizationArgs, QuantizationConfig, QuantizationScheme, \
        QuantizationStatus = _require_compressed_tensors()
    layers = moe_layers(model)
    if not layers:
        raise ExportError("the model has no MoE layers to export.")
    module_names = {id(m): n for n, m in model.named_modules()}
    formats = set()
    for layer in layers:
        prefix = module_names[id(layer.module)]
        _check_layer(layer.module, prefix)
        formats.add((_single_bits(layer.module, prefix), _group_size(layer.module, prefix)))
    if len(formats) > 1:
        raise ExportError(f"MoE layers use different (bits, group size) {sorted(formats)}; transformers decompresses "
                          f"all experts with one compressed-tensors scheme; {_ALTERNATIVE}.")
    bits, group_size = formats.pop()
    leaves = expert_module_names(model)
    tensors: dict[str, torch.Tensor] = {}
    prefixes = []
    for layer in layers:
        experts, prefix = layer.module, module_names[id(layer.module)]
        prefixes.append(prefix)
        for m in experts.spec()["matrices"]:
            for e in range(experts.num_experts):
                codes, scale = _signed_codes(experts, m, e, bits, group_size)
                name = f"{prefix}.{e}.{leaves[m]}"
                tensors[f"{name}.weight_packed"] = pack_to_int32(codes, bits + 1)
                tensors[f"{name}.weight_scale"] = scale
                tensors[f"{name}.weight_shape"] = torch.tensor(codes.shape, dtype=torch.int64)
    for name, value in model.state_dict().items():
        if not any(name.startswith(p + ".") for p in prefixes):
            tensors.setdefault(name, value.detach().cpu().clone())  # clones: tied weights must not share memory
    scheme = QuantizationScheme(
        targets=[rf"re:.*experts\.\d+\.({'|'.join(leaves.values())})$"],
        weights=QuantizationArgs(num_bits=bits + 1, type="int", symmetric=True, strategy="group",
                                 group_size=group_size))
    quantization = QuantizationConfig(config_groups={"group_0": scheme}, format=CompressionFormat.pack_quantized.value,
                                      quantization_status=QuantizationStatus.COMPRESSED, ignore=["lm_head"])
    config = model.config.to_dict()
    config["quantization_config"] = quantization.model_dump(mode="json")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1, default=str))
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path
