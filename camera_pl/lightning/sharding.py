"""Sharded (FSDP) models under Lightning: what camera_pl needs from them, in one place.

Statistics, compression and saving read full expert weights; a sharded model holds only a
slice of every parameter per rank. This module gives the callbacks and :func:`camera_pl.save`:

* :func:`shard_model`: FSDP2 ``fully_shard`` on every decoder layer, then on the whole model
  (what ``CausalLMModule.configure_model`` does under ``ModelParallelStrategy``);
* :func:`gathered`: one layer's full parameters as plain tensors for the duration of a block
  (FSDP2 ``unshard``/``reshard`` of the units owning them, FSDP1 ``summon_full_params``); never
  the whole model;
* :func:`unshard_model` (FSDP2): every unit gathered, one at a time, into plain parameters and its
  FSDP state removed, so compression can replace modules; the LightningModule's
  ``configure_model`` shards the compressed model again (see
  :func:`camera_pl.lightning.structure.changing_structure`). FSDP1 flat parameters cannot
  change shape: compressing under ``FSDPStrategy`` raises, naming ``ModelParallelStrategy``;
* :func:`full_state_dict`: the full state gathered parameter by parameter onto rank 0's CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

from camera_pl.arch.adapters import decoder_layers


class ShardingError(RuntimeError):
    """An operation camera_pl cannot do on this kind of sharded model."""


def is_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) units."""
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) units."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded by FSDP1 or FSDP2."""
    return is_fsdp1(model) or is_fsdp2(model)


def shard_model(model: nn.Module, mesh: DeviceMesh, **options) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then ``model`` (embeddings, norm, head); ``options`` go to both."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **options)
    return fully_shard(model, mesh=mesh, **options)


def _owners(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of ``model`` that manage a parameter of ``module`` (or of its submodules)."""
    inside = set(module.modules())
    owners = []
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            groups = unit._get_fsdp_state()._fsdp_param_groups
            if any(p._module_info.module in inside for g in groups for p in g.fsdp_params):
                owners.append(unit)
    return owners


def _fsdp1_unit(model: nn.Module, module: nn.Module) -> FullyShardedDataParallel:
    """The innermost FSDP1 unit of ``model`` that contains ``module``."""
    best = None
    for unit in model.modules():
        if isinstance(unit, FullyShardedDataParallel) and any(m is module for m in unit.modules()):
            best = unit  # modules() is pre-order: later containing units are nested deeper
    if best is None:
        raise ShardingError(f"{type(module).__name__} lies in no FSDP unit of {type(model).__name__}.")
    return best


@contextmanager
def gathered(model: nn.Module, module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s parameters are full plain tensors (read-only use); a no-op for unsharded models.

    Only the FSDP units owning them are gathered (with ``fully_shard`` per decoder layer: one layer).
    """
    if is_fsdp2(model):
        owners = _owners(model, module)
        for unit in owners:
            unit.unshard()
        try:
            yield module
        finally:
            for unit in owners:
                unit.reshard()
    elif is_fsdp1(model):
        with FullyShardedDataParallel.summon_full_params(_fsdp1_unit(model, module), writeback=False):
            yield module
    else:
        yield module


def _strip_fully_shard(unit: nn.Module) -> None:
    """Replace an FSDP2 unit's sharded parameters by full plain ones and remove its FSDP state, hooks and class."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    state = unit._get_fsdp_state()
    unit.unshard()
    with torch.no_grad():
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                full = getattr(info.module, info.param_name)
                plain = nn.Parameter(full.detach().clone(), requires_grad=fsdp_param.sharded_param.requires_grad)
                for owner, name in ((info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)):
                    owner._parameters[name] = plain
    state._pre_forward_hook_handle.remove()
    state._post_forward_hook_handle.remove()
    for owner in state._modules:
        _module_state_mapping.pop(owner, None)
        owner.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
        states = owner.__dict__.get(STATE_KEY, {})
        for key in [k for k, v in states.items() if v is state]:
            del states[key]
        owner.__class__ = type(owner).__mro__[type(owner)._orig_cls_mro_index]


def unshard_model(model: nn.Module) -> None:
    """Turn an FSDP2-sharded ``model`` into a plain one in place (units gathered one at a time, innermost first).

    Every rank then holds the full model until it is sharded again. Raises :class:`ShardingError` for FSDP1.
    """
    if is_fsdp1(model):
        raise ShardingError(
            "camera_pl cannot change the structure of an FSDP1 model (FSDPStrategy): its flat parameters have fixed "
            "shapes. Statistics and camera_pl.save work under FSDPStrategy; to prune, quantize or add LoRA adapters "
            "mid-fit, use lightning.pytorch.strategies.ModelParallelStrategy(data_parallel_size=<devices>, "
            "tensor_parallel_size=1) with CausalLMModule (its configure_model shards with FSDP2), or compress "
            "before the sharded fit.")
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in reversed(units):  # inner units first: an outer unit's gather then holds only its own parameters
        _strip_fully_shard(unit)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state of a sharded ``model`` on CPU, gathered one parameter at a time; empty on ranks other than 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def global_rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

