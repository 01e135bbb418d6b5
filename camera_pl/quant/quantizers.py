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

    def select_rows(self, start: int, stop: int) -> QuantizedRows:
        """Rows ``start:stop`` (views), e.g. the gate or the up half of a jointly quantized gate/up matrix."""
        return QuantizedRows(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop],
                             self.bits[start:stop], self.group_size)

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
    return _values(q, s, z, (bits == 1)[:, None])


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
    return _codes(w, scale, zero, (2.0 ** bits.float() - 1)[:, None], (bits == 1)[:, None])


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor, sign: torch.Tensor
           ) -> torch.Tensor:
    """Codes of ``w`` on grids given per entry (``maxq = 2^b − 1``, ``sign``: 1-bit entries; all broadcastable)."""
    asym = torch.div(w, scale).round_().add_(zero).clamp_(min=0)
    return torch.where(sign, (w >= 0).float(), torch.minimum(asym, maxq))


def _values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Represented values of codes ``q``: ``(q − z)·s``, or ``(2q − 1)·s`` where ``sign`` (1 bit)."""
    return torch.where(sign, 2 * q - 1, q - zero).mul_(scale)


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
GPTQ_CHUNK_BYTES = 512 * 2**20
"""Float64 working set allowed for one :func:`gptq_batched` call (see :func:`gptq_chunk_size`).

Callers quantize many experts in chunks of this size, so memory stays bounded by one chunk
instead of growing with the number of experts."""

_BLOCK = 128  # columns per block (grids of axis="in" and act-order are fitted per block)
_SUB_BLOCK = 16  # columns inside a block that exchange feedback one by one (then one GEMM per sub-block)


def gptq_chunk_size(rows: int, cols: int) -> int:
    """How many ``[rows, cols]`` matrices one :func:`gptq_batched` call may take within :data:`GPTQ_CHUNK_BYTES`.

    Counted per matrix: three float64 ``[cols, cols]`` copies of its Hessian while it is
    factored and two float64 ``[rows, cols]`` buffers (block values, rounding errors). At least 1.
    """
    return max(1, GPTQ_CHUNK_BYTES // (8 * (3 * cols * cols + 2 * rows * cols)))


def _reverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper triangular ``M [B, C, C]`` (float64) with ``H + λI = M Mᵀ`` for damped Hessians ``H [B, C, C]``.

    GPTQ spreads rounding errors through ``U``, the upper Cholesky factor of ``(H + λI)^-1``;
    ``U = M^-1``, so ``M`` carries the same information at the cost of one Cholesky
    factorization (of the Hessian with rows and columns reversed) and no inverse; see
    :func:`gptq_batched` for how it is used.

    ``λ = damp · mean(diag H)``. Inputs never seen (zero diagonal) get a unit diagonal, so
    their weights are simply rounded. Each Hessian that is still not positive definite gets
    tenfold damping, on its own, up to 4 times before an error.
    """
    h = hessian.to(torch.float64).flip(-2, -1)
    diag = h.diagonal(dim1=-2, dim2=-1)
    undamped = diag.masked_fill(diag <= 0, 1.0)
    mean_diag = undamped.mean(-1)
    diag.copy_(undamped + (damp * mean_diag)[:, None])
    lower, info = torch.linalg.cholesky_ex(h)
    for attempt in range(1, 5):
        failed = torch.nonzero(info).flatten()
        if failed.numel() == 0:
            return lower.flip(-2, -1)
        diag[failed] = undamped[failed] + (damp * 10**attempt * mean_diag[failed])[:, None]
        lower[failed], info[failed] = torch.linalg.cholesky_ex(h[failed])
    if bool((info == 0).all()):
        return lower.flip(-2, -1)
    raise ValueError(
        f"GPTQ: the Hessian of matrix {torch.nonzero(info).flatten().tolist()} of this batch is not positive definite "
        "even with 10000x damping; it likely holds NaN/inf (check the calibration inputs) — or use quantizer='rtn'."
    )


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: torch.Tensor | int, group_size: int = 128, *,
         axis: str = "out", damp: float = 0.01, act_order: bool = False) -> QuantizedRows:
    """GPTQ quantization of a linear layer's ``weight [out, in]`` given ``hessian = Σ x xᵀ [in, in]``.

    ``bits``: one int, or one per quantized row (``[out]`` with ``axis="out"``, ``[in]`` with
    ``"in"``). The one-matrix case of :func:`gptq_batched`, which documents the algorithm.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq needs weight [out, in] and hessian [in, in]; got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}.")
    _check_axis(axis)
    bits = _per_row(bits, weight.shape[0] if axis == "out" else weight.shape[1], weight.device)
    return gptq_batched(weight[None], hessian[None], bits[None], group_size, axis=axis, damp=damp,
                        act_order=act_order)[0]


def _check_axis(axis: str) -> None:
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' (bits per output row) or 'in' (bits per input column), got {axis!r}.")


def gptq_batched(weight: torch.Tensor, hessian: torch.Tensor, bits: torch.Tensor, group_size: int = 128, *,
                 axis: str = "out", damp: float = 0.01, act_order: bool = False) -> list[QuantizedRows]:
    """GPTQ of ``B`` linear layers at once: ``weight [B, out, in]``, ``hessian = Σ x xᵀ [B, in, in]``.

    Every matrix is quantized exactly as on its own (its own Hessian, damping, order and
    grids); batching turns the per-column work into a few batched ops over all ``B``
    matrices. Columns (inputs) are quantized one at a time and each column's rounding error
    is spread over the not-yet-quantized columns through ``U``, the upper Cholesky factor of
    ``(H + λI)^-1`` (Frantar et al., 2023): column ``j`` is rounded to ``q_j`` and its scaled
    error ``e_j = (w_j − q_j) / U_jj`` is subtracted as ``e_j U_jk`` from every later column
    ``k``. Columns are processed in blocks: inside a block this runs column by column on the
    block's own ``U`` entries; the feedback of all earlier columns reaches a block at its
    start in two GEMMs. With ``M = U^-1`` (:func:`_reverse_cholesky`), the columns quantized
    so far satisfy ``W − Q = E U``, and their feedback ``−E U[:, block]`` equals
    ``(W − Q) M[:, block] · M[block, block]^-1``: only ``M``, ``W − Q`` and the inverse of each
    block's own triangle are needed, never a full inverse.
    ``axis`` says which side carries bit-widths and grids:

    * ``"out"``: rows of ``weight`` are quantized rows (``bits [B, out]``, groups along the
      input dimension) — the standard GPTQ layout; blocks are the groups, whose grids are
      fitted on their error-updated values. Returns rows of ``weight[b]``.
    * ``"in"``: columns are quantized rows (``bits [B, in]``, groups along the output
      dimension), e.g. a down projection whose micro-experts are its columns. Each column's
      grid is fitted on its values at the start of its block (after the feedback of earlier
      blocks); rounding then uses its fully updated values. Returns rows of ``weight[b].T``.

    ``act_order`` processes each matrix's inputs by decreasing Hessian diagonal; with
    ``axis="out"`` the group grids are then fixed up front from the original weights
    (static groups), so the stored layout stays in natural order.

    Memory: float64 copies of the Hessians and weights (:func:`gptq_chunk_size` says how many
    matrices fit :data:`GPTQ_CHUNK_BYTES`).
    """
    _check_axis(axis)
    if weight.dim() != 3 or hessian.shape != (weight.shape[0], weight.shape[2], weight.shape[2]):
        raise ValueError(f"gptq_batched needs weight [B, out, in] and hessian [B, in, in]; got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}.")
    if not 0 < damp:
        raise ValueError(f"damp must be positive (fraction of the mean Hessian diagonal), got {damp}.")
    n_mat, rows, cols = weight.shape
    bits = check_bits(bits).to(weight.device)
    expected = (n_mat, rows if axis == "out" else cols)
    if bits.shape != expected:
        raise ValueError(f"bits must have one value per quantized row of each matrix, [B, {axis}] = {list(expected)} "
                         f"with axis={axis!r}; got {list(bits.shape)}.")
    w = weight.detach()
    h = hessian.to(weight.device)
    order = None
    if act_order:
        order = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        h = h.gather(1, order[:, :, None].expand_as(h)).gather(2, order[:, None, :].expand_as(h))
        w = w.gather(2, order[:, None, :].expand_as(w))
    m = _reverse_cholesky(h, damp)
    grids: _RowGrids | _ColumnGrids = (_RowGrids(weight.detach(), bits, group_size, order) if axis == "out"
                                       else _ColumnGrids(bits, group_size, order, rows))
    block = grids.gs if axis == "out" and order is None else _BLOCK
    eye = torch.eye(block, dtype=torch.float64, device=w.device)
    codes = torch.empty(n_mat, rows, cols, dtype=torch.uint8, device=w.device)
    diff = torch.empty(n_mat, rows, cols, dtype=torch.float64, device=w.device)  # W − Q, in processing order
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        width = i2 - i1
        u = torch.linalg.solve_triangular(m[:, i1:i2, i1:i2], eye[:width, :width].expand(n_mat, -1, -1), upper=True)
        original = w[:, :, i1:i2].double()
        values = original.clone()  # the block after the feedback of all earlier columns
        if i1:
            values.baddbmm_(torch.bmm(diff[:, :, :i1], m[:, :i1, i1:i2]), u)
        scale, zero, maxq, sign = grids.start_block(i1, values)
        # The column loop runs on column-major copies ([B, w, R]: a column is contiguous, 2x faster per op).
        values = values.transpose(1, 2).contiguous()
        rounded = torch.empty(n_mat, width, rows, device=w.device)
        errors = torch.empty_like(values)  # e of the block's columns
        block_codes = torch.empty(n_mat, width, rows, dtype=torch.uint8, device=w.device)
        for s1 in range(0, width, _SUB_BLOCK):  # feedback inside a block: column by column within sub-blocks
            s2 = min(s1 + _SUB_BLOCK, width)
            for k in range(s1, s2):
                s, z, one_bit = scale[:, :, k], zero[:, :, k], sign[:, :, k]
                q = _codes(values[:, k].float(), s, z, maxq[:, :, k], one_bit)
                block_codes[:, k] = q
                rounded[:, k] = _values(q, s, z, one_bit)
                errors[:, k] = (values[:, k] - rounded[:, k]).div_(u[:, k, k:k + 1])
                values[:, k + 1:s2] -= u[:, k, k + 1:s2, None] * errors[:, k, None]
            values[:, s2:].baddbmm_(u[:, s1:s2, s2:].transpose(1, 2), errors[:, s1:s2], alpha=-1)  # and between them
        codes[:, :, i1:i2] = block_codes.transpose(1, 2)
        diff[:, :, i1:i2] = original - rounded.transpose(1, 2)
    return grids.result(codes)


def _unpermute(t: torch.Tensor, order: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Entries of ``t`` kept along ``dim`` in processing ``order [B, n]`` put back in natural order."""
    if order is None:
        return t.contiguous()
    shape = [order.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = order.shape[1]
    return torch.empty_like(t).scatter_(dim, order.reshape(shape).expand_as(t), t)


class _RowGrids:
    """GPTQ grids for ``axis="out"``: one grid per (row, group of input columns).

    Without act-order, blocks are the groups and a group's grid is fitted on its values at
    the block start; with act-order (``order`` given) the grids are static, fitted up front.
    """

    def __init__(self, weight: torch.Tensor, bits: torch.Tensor, group_size: int, order: torch.Tensor | None):
        n_mat, rows, cols = weight.shape
        self.gs = effective_group_size(group_size, cols)
        self.bits, self.order = bits, order
        self.maxq = (2.0 ** bits.float() - 1)[:, :, None]
        self.sign = (bits == 1)[:, :, None]
        if order is None:
            groups = -(-cols // self.gs)
            self.scale = torch.zeros(n_mat, rows, groups, device=weight.device)
            self.zero = torch.zeros(n_mat, rows, groups, device=weight.device)
        else:
            start = rtn(weight.reshape(n_mat * rows, cols), bits.reshape(-1), self.gs)
            self.scale = start.scale.float().reshape(n_mat, rows, -1)
            self.zero = start.zero.float().reshape(n_mat, rows, -1)
            index = order[:, None, :].expand(n_mat, rows, cols)  # per-entry grids in processing order
            self.entry_scale = _expand(self.scale.flatten(0, 1), self.gs, cols).reshape(n_mat, rows, cols).gather(2, index)
            self.entry_zero = _expand(self.zero.flatten(0, 1), self.gs, cols).reshape(n_mat, rows, cols).gather(2, index)

    def start_block(self, i1: int, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-entry ``scale, zero, maxq, sign`` of the block whose (updated) values are ``values [B, R, w]``."""
        n_mat, rows, width = values.shape
        if self.order is None:
            grouped, valid = _grouped(values.float().reshape(n_mat * rows, width), width)
            scale, zero = (t.reshape(n_mat, rows, 1) for t in _grid(grouped, valid, self.bits.reshape(-1)))
            self.scale[:, :, i1 // self.gs], self.zero[:, :, i1 // self.gs] = scale[:, :, 0], zero[:, :, 0]
        else:
            scale, zero = self.entry_scale[:, :, i1:i1 + width], self.entry_zero[:, :, i1:i1 + width]
        shape = (n_mat, rows, width)
        return scale.expand(shape), zero.expand(shape), self.maxq.expand(shape), self.sign.expand(shape)

    def result(self, codes: torch.Tensor) -> list[QuantizedRows]:
        codes = _unpermute(codes, self.order, 2)
        return [QuantizedRows(codes[b], self.scale[b].to(SCALE_DTYPE), self.zero[b].to(torch.uint8), self.bits[b],
                              self.gs) for b in range(codes.shape[0])]


class _ColumnGrids:
    """GPTQ grids for ``axis="in"``: each input column is a quantized row with its own grids along the outputs.

    A column's grids are fitted on its values at the start of its block (after the error
    feedback of earlier blocks), like standard GPTQ fits a group's grid at the group's
    first column; rounding then uses the column's fully updated values.
    """

    def __init__(self, bits: torch.Tensor, group_size: int, order: torch.Tensor | None, length: int):
        self.bits, self.order, self.length = bits, order, length
        self.gs = effective_group_size(group_size, length)
        self.processed_bits = bits if order is None else bits.gather(1, order)
        self.maxq = (2.0 ** self.processed_bits.float() - 1)[:, None, :]
        self.sign = (self.processed_bits == 1)[:, None, :]
        n_mat, cols = bits.shape
        self.scale = torch.zeros(n_mat, cols, -(-length // self.gs), device=bits.device)  # in processing order
        self.zero = torch.zeros_like(self.scale)

    def start_block(self, i1: int, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_mat, rows, width = values.shape
        grouped, valid = _grouped(values.transpose(1, 2).float().reshape(n_mat * width, rows), self.gs)
        scale, zero = _grid(grouped, valid, self.processed_bits[:, i1:i1 + width].reshape(-1))
        self.scale[:, i1:i1 + width] = scale.reshape(n_mat, width, -1)
        self.zero[:, i1:i1 + width] = zero.reshape(n_mat, width, -1)
        scale, zero = (_expand(t, self.gs, rows).reshape(n_mat, width, rows).transpose(1, 2) for t in (scale, zero))
        shape = (n_mat, rows, width)
        return scale, zero, self.maxq[:, :, i1:i1 + width].expand(shape), self.sign[:, :, i1:i1 + width].expand(shape)

    def result(self, codes: torch.Tensor) -> list[QuantizedRows]:
        codes = _unpermute(codes.transpose(1, 2), self.order, 1)
        scale, zero = (_unpermute(t, self.order, 1) for t in (self.scale, self.zero))
        return [QuantizedRows(codes[b], scale[b].to(SCALE_DTYPE), zero[b].to(torch.uint8), self.bits[b], self.gs)
                for b in range(codes.shape[0])]
