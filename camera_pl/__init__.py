"""camera_pl: micro-expert statistics, compression and recovery for MoE LLMs in Lightning."""

from camera_pl.arch.adapters import (
    ArchitectureSpec,
    MoELayer,
    UnsupportedModelError,
    moe_layers,
    register_adapter,
    supported_model_types,
)
from camera_pl.arch.blocks import topk_gate_route
from camera_pl.expert_compression import CompressedExpertsConfig, compress_experts
from camera_pl.experts.compressed import CompressedExperts
from camera_pl.odp import OdpConfig, OdpHandle, apply_odp
from camera_pl.offload import OffloadConfig
from camera_pl.config import ConfigError
from camera_pl.lora import LoRAConfig
from camera_pl.pruning.api import PruneReport, prune
from camera_pl.pruning.config import PruneConfig
from camera_pl.quant.api import QuantReport, allocate, quantize
from camera_pl.quant.config import QuantizeConfig
from camera_pl.experts.kinds import register_experts_kind
from camera_pl.serialization import CheckpointError, load, save
from camera_pl.stats.scores import LayerScores, register_score, score_methods
from camera_pl.stats.container import MicroExpertStats, StatsMismatchError, collect_stats

__all__ = [
    "ArchitectureSpec",
    "CheckpointError",
    "CompressedExperts",
    "CompressedExpertsConfig",
    "OdpConfig",
    "OffloadConfig",
    "QuantizeConfig",
    "OdpHandle",
    "apply_odp",
    "compress_experts",
    "ConfigError",
    "evaluate",
    "LoRAConfig",
    "recover",
    "PruneConfig",
    "PruneReport",
    "QuantReport",
    "allocate",
    "quantize",
    "load",
    "prune",
    "register_experts_kind",
    "save",
    "LayerScores",
    "MicroExpertStats",
    "MoELayer",
    "StatsMismatchError",
    "UnsupportedModelError",
    "collect_stats",
    "moe_layers",
    "reference_model",
    "register_adapter",
    "register_score",
    "score_methods",
    "supported_model_types",
    "topk_gate_route",
]


def __getattr__(name: str):
    # The reference model pulls in tokenizers and weights, recover() Lightning, evaluate() lm-eval and the
    # task builders: load them only when asked for.
    if name == "reference_model":
        from camera_pl.reference import reference_model

        return reference_model
    if name == "recover":
        from camera_pl.lightning.finetune import recover

        return recover
    if name == "evaluate":
        from camera_pl.eval.harness import evaluate

        return evaluate
    raise AttributeError(f"module 'camera_pl' has no attribute {name!r}")
