"""``PruneConfig``: the options of CAMERA-P and its baselines (see :func:`camera_pl.prune`)."""

from __future__ import annotations

from dataclasses import dataclass

from camera_pl.config import Config
from camera_pl.pruning.allocation import ALLOCATIONS
from camera_pl.stats.observation import HEAPR_MODES
from camera_pl.stats.scores import score_level, score_methods, score_options

CALIBRATED_METHODS = ("naee",)
"""Expert-level methods that measure the model on calibration data instead of reading statistics."""


@dataclass(frozen=True)
class PruneConfig(Config):
    """What to remove and how.

    Attributes:
        ratio: fraction of the *original* micro-experts (or experts, for expert-level methods)
            to remove, in ``[0, 1)``; calling ``prune`` again with a higher ratio prunes further.
        method: a registered score (``camera_pl.score_methods()``: micro level ``camera``,
            ``heapr`` (needs gradient statistics: ``collect_stats(..., heapr_mode=...)``),
            ``magnitude``, ``activation``, ``random``; expert level ``frequency``, ``reap``,
            ``ean``) or ``naee`` (expert level, measured on calibration data).
        allocation: a registered allocation: ``layer`` (CAMERA-P: per layer, unequal widths),
            ``expert`` (the same fraction from every expert: fused layout kept) or ``global``
            (one ranking across layers). Micro-level methods only.
        allow_expert_removal: ``layer``/``global`` may remove every micro-expert of an expert
            (the expert and its router row go).
        max_layer_ratio: ``global``: no layer loses more than this fraction.
        width_multiple: ``expert``: kept widths are rounded up to a multiple of this.
        sequential: collect the statistics of each layer after the layers before it were
            pruned (needs ``calib_dataloader``).
        max_tokens: calibration tokens for ``sequential`` and ``naee``.
        reduce_ratio: the ``camera`` score's peak/total energy mix.
        seed: the ``random`` score's seed.
        heapr_mode: the ``heapr`` curvature (``full``, ``diag`` or ``auto``) when statistics are
            collected here (``sequential``, or by :class:`~camera_pl.callbacks.pruning.CameraPruning`).
    """

    ratio: float = 0.4
    method: str = "camera"
    allocation: str = "layer"
    allow_expert_removal: bool = False
    max_layer_ratio: float = 0.9
    width_multiple: int = 8
    sequential: bool = False
    max_tokens: int | None = None
    reduce_ratio: float = 0.9
    seed: int = 0
    heapr_mode: str = "auto"

    def check(self) -> None:
        self._number("ratio", 0.0, 1.0, high_open=True)
        self._choice("method", score_methods() + list(CALIBRATED_METHODS))
        self._choice("allocation", ALLOCATIONS)
        self._number("max_layer_ratio", 0.0, 1.0, low_open=True)
        self._number("width_multiple", 1, integer=True)
        self._number("max_tokens", 1, integer=True, optional=True)
        self._number("reduce_ratio", 0.0, 1.0)
        self._number("seed", integer=True)
        self._choice("heapr_mode", HEAPR_MODES)
        for flag in ("allow_expert_removal", "sequential"):
            self._flag(flag)
        if self.sequential and (self.level == "expert" or ALLOCATIONS[self.allocation].cross_layer):
            self._fail("sequential", f"sequential calibration prunes layer by layer; it supports micro-level methods "
                                     f"with a per-layer allocation, not method={self.method!r} with "
                                     f"allocation={self.allocation!r}.")
        if self.level == "expert" and self.allocation != "layer":
            self._fail("allocation", f"method={self.method!r} removes whole experts (the same number per layer); "
                                     "allocations apply to micro-level methods.")
        if self.allow_expert_removal and ALLOCATIONS[self.allocation].fused:
            self._fail("allow_expert_removal", f"allocation={self.allocation!r} keeps the same width in every "
                                               "expert, so no expert is ever emptied; use allocation='layer'.")

    @property
    def level(self) -> str:
        """``micro`` or ``expert``: what the method ranks."""
        return "expert" if self.method in CALIBRATED_METHODS else score_level(self.method)

    def score_kwargs(self) -> dict:
        """The options of this config that the score method takes."""
        if self.method in CALIBRATED_METHODS:
            return {}
        return {name: getattr(self, name) for name in score_options(self.method) if hasattr(self, name)}

    def collect_kwargs(self) -> dict:
        """The options of :func:`~camera_pl.stats.container.collect_stats` the method needs (gradients for ``heapr``)."""
        return {"heapr_mode": self.heapr_mode} if self.method == "heapr" else {}
