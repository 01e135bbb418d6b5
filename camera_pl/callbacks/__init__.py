"""Lightning callbacks: each decides *when* something happens; the algorithms live elsewhere."""

from camera_pl.callbacks.stats import MicroExpertStatsCallback, find_moe_model

__all__ = ["MicroExpertStatsCallback", "find_moe_model"]
