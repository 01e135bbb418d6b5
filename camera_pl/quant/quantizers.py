"""Weight-only integer quantizers: round-to-nearest (RTN) and GPTQ at 1–8 bits.

Everything here quantizes *rows*: a matrix ``[R, C]`` is cut into groups of ``group_size``
consecutive entries along ``C`` (the last group may be shorter; ``group_size`` larger than
``C`` means one group per row) and every group gets its own grid. Each row may have its
own bit-width, which is what micro-expert mixed precision needs.

Grids (kept identical in RTN, GPTQ, fake quantization and packed storage, so that all four
agree bit for bit):

* ``b >= 2`` bits: asymmetric, ``w ≈ (q − z) · s`` with ``q, z ∈ [0, 2^b − 1]``; the range
  ``[min(w, 0), max(w, 0)]`` is spread over ``2^b − 1`` steps (including 0 keeps constant
  groups exact and the zero point in range).
* ``b = 1``: sign × scale, ``w ≈ ±s`` with ``s`` = mean ``|w|`` of the group (``q`` = sign bit).

Scales are rounded to float16 before codes are computed (that is what is stored); zero
points are integers (stored as uint8).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 1, 8
SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-7  # keeps float16 scales non-zero (smallest float16 subnormal is 6e-8)


def check_bits(bits: torch.Tensor | int, what: str = "bits") -> torch.Tensor:
    """``bits`` as an int64 tensor, or a ValueError if any value is outside 1..8."""
    t = torch.as_tensor(bits)
    if t.is_floating_point() or t.numel() == 0 or int(t.min()) < MIN_BITS or int(t.max()) > MAX_BITS:
        raise ValueError(
            f"{what} must be integers in {MIN_BITS}..{MAX_BITS} (weight-only integer quantization); got "
            f"{t.tolist() if t.numel() < 10 else f'values in [{t.min().item()}, {t.max().item()}]'}. "
            "Keep a module in full precision by not quantizing it instead."
        )
    return t.long()


def _per_row(bits: torch.Tensor | int, rows: int, device: torch.device) -> torch.Tensor:
    """Validated bits, one per row."""
    t = check_bits(bits).to(device).flatten()
    if t.numel() not in (1, rows):
        raise ValueError(f"bits must be one int or one per quantized row ({rows}); got {t.numel()} values.")
    return t.expand(rows).contiguous()


def effective_group_size(group_size: int, row_length: int) -> int:
    """The group size actually used: ``group_size``, or the row length where that is smaller."""
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size}.")
    return min(group_size, row_length)


@dataclass
class QuantizedRows:
    """A quantized matrix ``[R, C]``: codes, per-group scales/zeros and per-row bit-widths.

    Attributes:
        codes: uint8 ``[R, C]`` integer codes (unpacked; :mod:`camera_pl.experts.quantized` bit-packs them).
        scale: float16 ``[R, G]`` per-group scales.
        zero: uint8 ``[R, G]`` per-group zero points (0 and unused in 1-bit rows).
        bits: int64 ``[R]`` bit-width of each row.
        group_size: entries per group along ``C`` (already clipped to ``C``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented weights ``[R, C]`` in ``dtype`` (computed in float32, then cast)."""
        return dequantize(self.codes, self.scale, self.zero, self.bits, self.group_size).to(dtype)

    def storage_bits(self) -> int:
        """Bits needed to store this matrix: codes, float16 scales and uint8 zeros (not for 1-bit rows)."""
        groups = self.scale.shape[1]
        per_row = self.bits * self.codes.shape[1] + 16 * groups + 8 * groups * (self.bits > 1)
        return int(per_row.sum())


def _expand(t: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """Per-group values ``[R, G]`` -> per-entry values ``[R, C]``."""
    return t.repeat_interleave(group_size, dim=1)[:, :length]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """Float32 weights from codes: ``(q − z)·s`` (2–8 bits) or ``(2q − 1)·s`` (1 bit)."""
    length = codes.shape[1]
    q = codes.float()
    s = _expand(scale.float(), group_size, length)
    z = _expand(zero.float(), group_size, length)
    sign = (bits == 1)[:, None]
    return torch.where(sign, (2 * q - 1) * s, (q - z) * s)


def _ranges(w: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``min(w, 0)``, ``max(w, 0)`` and mean ``|w|`` ``[N, G]`` of grouped weights ``w [N, G, g]``: what grids
    of every bit-width are fitted from (computed once when several bit-widths are tried)."""
    lo = torch.where(valid, w, torch.inf).amin(-1).clamp(max=0)
    hi = torch.where(valid, w, -torch.inf).amax(-1).clamp(min=0)
    mean_abs = (w.abs() * valid).sum(-1) / valid.sum(-1)
    return lo, hi, mean_abs


def _grid_of(lo: torch.Tensor, hi: torch.Tensor, mean_abs: torch.Tensor, bits: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float16-rounded, as float32) and zeros ``[N, G]`` from group ranges and per-row ``bits [N]``."""
    maxq = (2.0 ** bits.float() - 1)[:, None]
    scale = ((hi - lo) / maxq).clamp_min(_MIN_SCALE)
    sign = (bits == 1)[:, None]
    scale = torch.where(sign, mean_abs, scale).to(SCALE_DTYPE).float()
    zero = torch.where(sign, 0.0, torch.round(-lo / scale).clamp(min=0).minimum(maxq))
    return scale, zero


def _grid(w: torch.Tensor, valid: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float16-rounded, as float32) and zeros ``[N, G]`` of grouped weights ``w [N, G, g]``."""
    return _grid_of(*_ranges(w, valid), bits)


def fake_quantized(rows: torch.Tensor, choices: tuple[int, ...], group_size: int
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(k, RTN-dequantized rows)`` for every bit choice ``k`` of ``rows [N, C]`` (float32).

    Bit-identical to ``rtn(rows, choices[k]).dequantize()``, but the group ranges are found
    once for all choices and nothing is expanded to per-entry grids. Each yielded tensor is
    a fresh buffer the caller may modify.
    """
    n, length = rows.shape
    gs = effective_group_size(group_size, length)
    grouped, valid = _grouped(rows.detach().float(), gs)
    ranges = _ranges(grouped, valid)
    for k, b in enumerate(choices):
        scale, zero = (t[..., None] for t in _grid_of(*ranges, torch.full((n,), b, device=rows.device)))
        if b == 1:
            deq = (grouped >= 0).float().mul_(2).sub_(1).mul_(scale)
        else:  # in place: the same operations as _encode + dequantize, without temporaries
            deq = torch.div(grouped, scale).round_().add_(zero).clamp_(0, 2**b - 1).sub_(zero).mul_(scale)
        yield k, deq.reshape(n, -1)[:, :length]


def squared_errors(rows: torch.Tensor, choices: tuple[int, ...], group_size: int,
                   column_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row squared RTN error of ``rows [N, C]`` at each bit choice ``[N, K]`` (float32), optionally
    weighted per entry by ``column_weight`` (broadcastable to ``rows``)."""
    w = rows.detach().float()
    out = torch.empty(rows.shape[0], len(choices), device=rows.device)
    for k, deq in fake_quantized(w, choices, group_size):
        diff = deq.sub(w).square_()
        out[:, k] = (diff if column_weight is None else diff.mul_(column_weight)).sum(1)
    return out


def _encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Codes of per-entry weights ``w [N, C]`` on per-entry grids (float, not yet uint8)."""
    maxq = (2.0 ** bits.float() - 1)[:, None]
    asym = (torch.round(w / scale) + zero).clamp(min=0).minimum(maxq)
    return torch.where((bits == 1)[:, None], (w >= 0).float(), asym)


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, C]`` -> zero-padded groups ``[N, G, g]`` and the mask of real entries ``[G, g]``."""
    n, length = w.shape
    groups = -(-length // group_size)
    pad = groups * group_size - length
    valid = torch.ones(groups * group_size, dtype=torch.bool, device=w.device)
    if pad:
        valid[length:] = False
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, groups, group_size), valid.reshape(groups, group_size)


def rtn(weight: torch.Tensor, bits: torch.Tensor | int, group_size: int = 128) -> QuantizedRows:
    """Round-to-nearest quantization of ``weight [R, C]`` with per-row ``bits`` (int or ``[R]``)."""
    if weight.dim() != 2:
        raise ValueError(f"rtn quantizes 2-D matrices [rows, columns]; got shape {tuple(weight.shape)}.")
    rows, length = weight.shape
    bits = _per_row(bits, rows, weight.device)
    gs = effective_group_size(group_size, length)
    w = weight.detach().float()
    grouped, valid = _grouped(w, gs)
    scale, zero = _grid(grouped, valid, bits)
    codes = _encode(w, _expand(scale, gs, length), _expand(zero, gs, length), bits)
    return QuantizedRows(codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero.to(torch.uint8), bits, gs)


# ---- GPTQ ---------------------------------------------------------------------------------
def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)^-1`` with ``λ = damp · mean(diag H)`` (float64).

    Inputs never seen (zero diagonal) get a unit diagonal, so their weights are simply
    rounded. If the damped Hessian is still not positive definite, damping grows tenfold
    (up to 4 times) before giving up with an error.
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * (10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_solve(eye, chol)  # faster than cholesky_inverse on CPU builds
            factor, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return factor
    raise ValueError(
        "GPTQ: the Hessian is not positive definite even with 10000x damping; it likely holds NaN/inf "
        "(check the calibration inputs) — or use quantizer='rtn'."
    )


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: torch.Tensor | int, group_size: int = 128, *,
         axis: str = "out", damp: float = 0.01, act_order: bool = False) -> QuantizedRows:
    """GPTQ quantization of a linear layer's ``weight [out, in]`` given ``hessian = Σ x xᵀ [in, in]``.

    Columns (inputs) are quantized one at a time and each column's rounding error is
    spread over the not-yet-quantized columns through the inverse Hessian (Frantar et al.,
    2023). ``axis`` says which side carries the bit-widths and grids:

    * ``"out"``: rows of ``weight`` are quantized rows (``bits [out]``, groups along the
      input dimension) — the standard GPTQ layout. Returns rows of ``weight``.
    * ``"in"``: columns are quantized rows (``bits [in]``, groups along the output
      dimension), e.g. a down projection whose micro-experts are its columns. Each column's
      grid is computed from its error-updated values right before it is rounded. Returns
      rows of ``weight.T``.

    ``act_order`` processes inputs by decreasing Hessian diagonal; with ``axis="out"`` the
    group grids are then fixed up front from the original weights (static groups), so the
    stored layout stays in natural order.
    """
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' (bits per output row) or 'in' (bits per input column), got {axis!r}.")
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq needs weight [out, in] and hessian [in, in]; got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}.")
    if not 0 < damp:
        raise ValueError(f"damp must be positive (fraction of the mean Hessian diagonal), got {damp}.")
    rows, cols = weight.shape
    bits = _per_row(bits, rows if axis == "out" else cols, weight.device)
    h = hessian.to(weight.device)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols, device=h.device)
    w = weight.detach().double()[:, order].clone()
    factor = _inverse_hessian_factor(h[order][:, order], damp)
    if axis == "out":
        quantize_col: _RowGrids | _ColumnGrids = _RowGrids(weight, bits, group_size, order, act_order)
    else:
        quantize_col = _ColumnGrids(bits, group_size, order, rows)
    block = quantize_col.block if axis == "out" and not act_order else 128
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        f1 = factor[i1:i2, i1:i2]
        quantize_col.start_block(i1, w1)
        for i in range(i2 - i1):
            q = quantize_col(i1 + i, w1[:, i].float()).double()
            e = (w1[:, i] - q) / f1[i, i]
            w1[:, i:] -= e[:, None] * f1[i, i:][None]
            err[:, i] = e
        w[:, i2:] -= err @ factor[i1:i2, i2:]
    return quantize_col.result()


class _RowGrids:
    """GPTQ column quantizer for ``axis="out"``: one grid per (row, group of input columns)."""

    def __init__(self, weight: torch.Tensor, bits: torch.Tensor, group_size: int, order: torch.Tensor, static: bool):
        rows, cols = weight.shape
        self.gs = effective_group_size(group_size, cols)
        self.block = self.gs
        self.bits, self.order, self.static = bits, order, static
        groups = -(-cols // self.gs)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=weight.device)
        self.scale = torch.zeros(rows, groups, device=weight.device)
        self.zero = torch.zeros(rows, groups, device=weight.device)
        if static:
            start = rtn(weight, bits, self.gs)
            self.scale, self.zero = start.scale.float(), start.zero.float()

    def start_block(self, i1: int, w1: torch.Tensor) -> None:
        """Without act-order, blocks are the groups: fit the group's grid on its updated weights."""
        if not self.static:
            g = i1 // self.gs
            grouped, valid = _grouped(w1.float(), w1.shape[1])
            scale, zero = _grid(grouped, valid, self.bits)
            self.scale[:, g], self.zero[:, g] = scale[:, 0], zero[:, 0]

    def __call__(self, position: int, col: torch.Tensor) -> torch.Tensor:
        c = int(self.order[position])
        g = c // self.gs
        s, z = self.scale[:, g:g + 1], self.zero[:, g:g + 1]
        q = _encode(col[:, None], s, z, self.bits)
        self.codes[:, c] = q[:, 0].to(torch.uint8)
        return torch.where((self.bits == 1)[:, None], (2 * q - 1) * s, (q - z) * s)[:, 0]

    def result(self) -> QuantizedRows:
        return QuantizedRows(self.codes, self.scale.to(SCALE_DTYPE), self.zero.to(torch.uint8), self.bits, self.gs)


class _ColumnGrids:
    """GPTQ column quantizer for ``axis="in"``: each input column is a row with its own grids.

    A column's grids are fitted on its values at the start of its block (after the error
    propagation from earlier blocks), like standard GPTQ fits a group's grid at the group's
    first column; rounding then uses the column's fully updated values.
    """

    def __init__(self, bits: torch.Tensor, group_size: int, order: torch.Tensor, length: int):
        self.bits, self.order, self.length = bits, order, length
        self.gs = effective_group_size(group_size, length)
        cols, groups = bits.shape[0], -(-length // self.gs)
        self.codes = torch.zeros(cols, length, dtype=torch.uint8, device=bits.device)
        self.scale = torch.zeros(cols, groups, device=bits.device)
        self.zero = torch.zeros(cols, groups, device=bits.device)
        self._block: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def start_block(self, i1: int, w1: torch.Tensor) -> None:
        cols = self.order[i1:i1 + w1.shape[1]]
        grouped, valid = _grouped(w1.t().float(), self.gs)
        scale, zero = _grid(grouped, valid, self.bits[cols])
        self.scale[cols], self.zero[cols] = scale, zero
        self._block = (_expand(scale, self.gs, self.length), _expand(zero, self.gs, self.length), torch.tensor(i1))

    def __call__(self, position: int, col: torch.Tensor) -> torch.Tensor:
        c = int(self.order[position])
        scale, zero, i1 = self._block
        k = position - int(i1)
        s, z, bits = scale[k:k + 1], zero[k:k + 1], self.bits[c:c + 1]
        q = _encode(col[None], s, z, bits)
        self.codes[c] = q[0].to(torch.uint8)
        return torch.where((bits == 1)[:, None], (2 * q - 1) * s, (q - z) * s)[0]

    def result(self) -> QuantizedRows:
        return QuantizedRows(self.codes, self.scale.to(SCALE_DTYPE), self.zero.to(torch.uint8), self.bits, self.gs)
