"""Lightning callbacks: each decides *when* something happens; the algorithms live elsewhere."""

from camera_pl.callbacks.pruning import CameraPruning, restore_structure
from camera_pl.callbacks.quantization import CameraQuantization
from camera_pl.callbacks.stats import MicroExpertStatsCallback, find_moe_model

__all__ = ["CameraPruning", "CameraQuantization", "MicroExpertStatsCallback", "find_moe_model", "restore_structure"]
