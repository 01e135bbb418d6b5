"""camera_pl: micro-expert statistics, compression and recovery for MoE LLMs in Lightning."""

from camera_pl.arch.adapters import (
    ArchitectureSpec,
    MoELayer,
    UnsupportedModelError,
    moe_layers,
    register_adapter,
    supported_model_types,
)
from camera_pl.experts.compressed import CompressedExperts, compress_experts
from camera_pl.odp import OdpHandle, apply_odp
from camera_pl.pruning.api import PruneReport, prune
from camera_pl.serialization import CheckpointError, load, register_experts_kind, save
from camera_pl.stats.scores import LayerScores, register_score, score_methods
from camera_pl.stats.container import MicroExpertStats, StatsMismatchError, collect_stats

__all__ = [
    "ArchitectureSpec",
    "CheckpointError",
    "CompressedExperts",
    "OdpHandle",
    "apply_odp",
    "compress_experts",
    "PruneReport",
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
]


def __getattr__(name: str):
    # The reference model pulls in tokenizers and weights; load it only when asked for.
    if name == "reference_model":
        from camera_pl.reference import reference_model

        return reference_model
    raise AttributeError(f"module 'camera_pl' has no attribute {name!r}")
