"""Lightning callbacks: each decides *when* something happens; the algorithms live in the library."""

from camera_pl.callbacks.evaluation import EvaluationCallback
from camera_pl.callbacks.pruning import CameraPruning
from camera_pl.callbacks.quantization import CameraQuantization
from camera_pl.callbacks.recovery import LoRARecovery
from camera_pl.callbacks.stats import MicroExpertStatsCallback

__all__ = ["CameraPruning", "CameraQuantization", "EvaluationCallback", "LoRARecovery", "MicroExpertStatsCallback"]
