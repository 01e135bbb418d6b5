"""``QuantizeConfig``: the options of CAMERA-Q, MC's PMQ and the baselines (see :func:`camera_pl.quantize`)."""

from __future__ import annotations

from dataclasses import dataclass

from camera_pl.config import Config
from camera_pl.quant.allocation import DEFAULT_CHOICES, DEFAULT_GROUPS, check_groups
from camera_pl.quant.methods import BIT_ALLOCATIONS
from camera_pl.quant.quantizers import MAX_BITS, MIN_BITS
from camera_pl.stats.scores import score_methods

QUANTIZERS = ("rtn", "gptq")
COSTS = ("auto", "proxy", "output", "loss")


@dataclass(frozen=True)
class QuantizeConfig(Config):
    """How many bits where, and how to round.

    Attributes:
        method: a registered bit allocation: ``camera`` | ``pmq`` | ``uniform`` | ``matrix`` |
            ``channel`` (see :mod:`camera_pl.quant.allocation`).
        avg_bits: average code bits per routed weight (required except for ``camera`` with
            rank groups; whole bits for ``uniform``).
        groups: CAMERA-Q rank groups ``((bits, fraction), ...)``, best-scored first; the
            default ``((8, 0.1), (4, 0.3), (2, 0.6))`` applies when neither groups nor avg_bits is given.
        quantizer: ``rtn`` or ``gptq`` (needs calibration data; ``damp``, ``act_order``, ``min_tokens``).
        group_size: weights per scale/zero group along each row (the row length where smaller).
        pack: replace the experts by bit-packed ones (else write the dequantized weights back).
        bit_choices: bit-widths the budgeted allocations may use (PMQ uses MC's 1/2/3).
        cost: what ``method="camera"`` with ``avg_bits`` minimises: ``"proxy"`` (score × relative
            RTN error of each micro-expert's rows; statistics only), ``"output"`` (each
            micro-expert's measured error in the layer output on calibration tokens; needs
            ``calib_dataloader``, sequential like GPTQ), ``"loss"`` (that error measured in the
            metric of HEAPr's loss curvature; also needs statistics collected with ``heapr_mode``)
            or ``"auto"`` (the default: ``loss`` when calibration data is at hand — GPTQ, or a
            ``calib_dataloader`` given — and the statistics hold HEAPr's curvature, ``output``
            with calibration data alone, else ``proxy``).
        reduce_ratio: the CAMERA score's peak/total energy mix.
        score: the micro-expert importance ``method="camera"`` ranks (rank groups) or weighs (budget)
            by: ``camera`` or another micro-level score of ``camera_pl.score_methods("micro")``, e.g.
            ``heapr`` (statistics from ``collect_stats(..., heapr_mode=...)``). The other methods mix
            the score with CAMERA's activation energy and keep the CAMERA score.
        max_calib_tokens: calibration tokens per layer for GPTQ and PMQ.
        pmq_exponents: PMQ's ``(α, β, γ)`` (the paper's γ = 2; MC's code raises ε to α: ``(1, 1.5, 1)``).
        pmq_weight: PMQ's activation weight ``w``: ``"all"`` sums router probabilities over all tokens
            (the paper), ``"selected"`` only over the tokens that select the expert (MC's code).
        shared_bits: bits of shared experts (default: the budget rounded half up).
        other_bits: if set, RTN fake-quantize the decoder's other linear layers at these bits.
    """

    method: str = "camera"
    avg_bits: float | None = None
    groups: tuple[tuple[int, float], ...] | None = None
    quantizer: str = "rtn"
    group_size: int = 128
    pack: bool = True
    bit_choices: tuple[int, ...] = DEFAULT_CHOICES
    cost: str = "auto"
    reduce_ratio: float = 0.9
    score: str = "camera"
    damp: float = 0.01
    act_order: bool = False
    min_tokens: int = 32
    max_calib_tokens: int | None = None
    pmq_exponents: tuple[float, float, float] = (1.0, 1.5, 2.0)
    pmq_weight: str = "all"
    shared_bits: int | None = None
    other_bits: int | None = None

    def check(self) -> None:
        for name in ("groups", "bit_choices", "pmq_exponents"):  # YAML gives lists
            value = getattr(self, name)
            if isinstance(value, list) or (name == "groups" and isinstance(value, tuple)):
                fixed = tuple(tuple(g) for g in value) if name == "groups" else tuple(value)
                object.__setattr__(self, name, fixed)
        self._choice("method", BIT_ALLOCATIONS)
        self._choice("quantizer", QUANTIZERS)
        self._choice("cost", COSTS)
        if self.cost != "auto" and (self.method != "camera" or self.avg_bits is None):
            self._fail("cost", "a measured cost applies to method='camera' with avg_bits (a budget to spend); "
                               "rank groups and the other methods have their own costs.")
        self._number("group_size", 1, integer=True)
        self._number("avg_bits", optional=True)
        self._number("reduce_ratio", 0.0, 1.0)
        self._choice("score", score_methods("micro"))
        if self.score != "camera" and self.method != "camera":
            self._fail("score", f"method={self.method!r} weighs CAMERA scores against CAMERA's activation energy; "
                                "another score applies to method='camera' only.")
        self._number("damp", 0.0, low_open=True)
        self._number("min_tokens", 1, integer=True)
        self._number("max_calib_tokens", 1, integer=True, optional=True)
        self._number("shared_bits", MIN_BITS, MAX_BITS, integer=True, optional=True)
        self._number("other_bits", MIN_BITS, MAX_BITS, integer=True, optional=True)
        for flag in ("pack", "act_order"):
            self._flag(flag)
        choices = self.bit_choices
        if not choices or any(isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS
                              for b in choices) or list(choices) != sorted(set(choices)):
            self._fail("bit_choices", f"expected strictly ascending integers in {MIN_BITS}..{MAX_BITS}.")
        self._choice("pmq_weight", ("all", "selected"))
        if len(self.pmq_exponents) != 3:
            self._fail("pmq_exponents", "expected three exponents (alpha, beta, gamma).")
        if self.groups is not None:
            if self.method != "camera" or self.avg_bits is not None:
                self._fail("groups", "rank groups apply to method='camera' without avg_bits; pass either groups or "
                                     "avg_bits.")
            try:
                check_groups(self.groups)
            except ValueError as err:
                self._fail("groups", str(err))
        if self.avg_bits is None and self.method != "camera":
            self._fail("avg_bits", f"method={self.method!r} needs an average bit budget, e.g. avg_bits=2.5.")
        if self.avg_bits is not None:
            if self.method == "uniform" and float(self.avg_bits) != int(self.avg_bits):
                self._fail("avg_bits", "uniform quantization needs whole bits; use another method for fractional "
                                       "budgets.")
            choices = self.allocation_choices if self.method != "uniform" else tuple(range(MIN_BITS, MAX_BITS + 1))
            if not min(choices) <= self.avg_bits <= max(choices):
                self._fail("avg_bits", f"infeasible for method={self.method!r} with bit choices {choices}: it must "
                                       f"lie in [{min(choices)}, {max(choices)}].")

    @property
    def allocation_choices(self) -> tuple[int, ...]:
        """The bit choices the method allocates from."""
        return BIT_ALLOCATIONS[self.method].choices or self.bit_choices

    @property
    def rank_groups(self) -> tuple[tuple[int, float], ...] | None:
        """CAMERA-Q's rank groups in effect (the default ones without a budget)."""
        if self.groups is not None:
            return self.groups
        return DEFAULT_GROUPS if self.method == "camera" and self.avg_bits is None else None

    @property
    def needs_stats(self) -> bool:
        return BIT_ALLOCATIONS[self.method].needs_stats

    @property
    def needs_inputs(self) -> bool:
        """The bit allocation measures output errors on calibration inputs (PMQ, CAMERA-Q's output cost)."""
        return BIT_ALLOCATIONS[self.method].needs_inputs or self.cost in ("output", "loss")

    def measures_output(self, calibrated: bool) -> bool:
        """Whether the allocation measures output errors on calibration inputs (PMQ, CAMERA-Q's measured costs),
        given whether calibration data is at hand (``cost="auto"`` measures only then)."""
        auto = self.cost == "auto" and self.method == "camera" and self.avg_bits is not None
        return self.needs_inputs or (auto and calibrated)

    @property
    def needs_calibration(self) -> bool:
        """GPTQ Hessians or the allocation's output errors need calibration batches."""
        return self.quantizer == "gptq" or self.needs_inputs
