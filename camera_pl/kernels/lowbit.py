"""Grouped GEMMs over bit-packed mixed-precision expert rows (see :mod:`camera_pl.experts.lowbit`)."""

import triton
import triton.language as tl


@triton.jit
def dequantized(codes, row_bytes, scale, zero, groups, group_size, row, pos, mask, BITS: tl.constexpr):
    """Float32 weights ``ŵ[row, pos]`` (broadcast index tiles) of one store; 0 where ``mask`` is off."""
    bit = pos * BITS
    byte = bit >> 3
    word = tl.load(codes + row * row_bytes + byte, mask=mask, other=0).to(tl.int32)
    if BITS % 8 != 0 and 8 % BITS != 0:  # 3, 5, 6, 7 bits: a code may reach into the next byte
        nxt = tl.load(codes + row * row_bytes + byte + 1, mask=mask & (byte + 1 < row_bytes), other=0)
        word = word | (nxt.to(tl.int32) << 8)
    q = ((word >> (bit & 7)) & ((1 << BITS) - 1)).to(tl.float32)
    meta = row * groups + pos // group_size
    s = tl.load(scale + meta, mask=mask, other=0.0).to(tl.float32)
    if BITS == 1:
        w = (q * 2.0 - 1.0) * s
    else:
        w = (q - tl.load(zero + meta, mask=mask, other=0).to(tl.float32)) * s
    return w


@triton.jit
def cast(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """Float32 ``v`` rounded to ``dtype``. Triton's interpreter truncates float32 -> bfloat16 (3.9), so there
    bfloat16 is rounded to nearest even by bit arithmetic first, as the GPU's conversion rounds."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def product(a, w, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """``tl.dot(a, w)`` accumulated in float32; the interpreter gets float32 tiles (it mishandles bfloat16 dots;
    products of 16-bit values are exact in float32, so only the summation order differs)."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return tl.dot(a, w, input_precision=PRECISION)


@triton.jit
def rows_kernel(x, x_stride, out, out_stride, tile_expert, tile_start, tile_end,
                codes, row_bytes, scale, zero, groups, group_size, starts, cols, length,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row tile t, column tile n): ``out[rows, cols[r]] = x[rows, :length] · ŵ_r`` for ``BLOCK_N`` of
    the tile's expert's rows ``r`` in this store."""
    t = tl.program_id(0)
    e = tl.load(tile_expert + t)
    first = tl.load(starts + e)
    count = tl.load(starts + e + 1) - first
    if tl.program_id(1) * BLOCK_N < count:  # the expert's rows at this width reach this column tile
        rows = tl.load(tile_start + t) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(tile_end + t)
        local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = local < count
        stored = (first + local).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, length, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < length
            a = tl.load(x + rows.to(tl.int64)[:, None] * x_stride + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = dequantized(codes, row_bytes, scale, zero, groups, group_size, stored[None, :], k[:, None],
                            k_ok[:, None] & n_ok[None, :], BITS)
            acc += product(a, cast(w, a.dtype, INTERPRETED), INTERPRETED, PRECISION)
        col = tl.load(cols + stored, mask=n_ok, other=0)
        tl.store(out + rows.to(tl.int64)[:, None] * out_stride + col[None, :],
                 cast(acc, out.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def columns_kernel(x, x_stride, out, out_stride, tile_expert, tile_start, tile_end,
                   codes, row_bytes, scale, zero, starts, cols, groups, group_size, length,
                   BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """Program (row tile t, column tile n): ``out[rows, h] = Σ_i Σ_r x[rows, cols_i[r]] · ŵ_r[h]`` over the tile's
    expert's rows ``r`` of every store ``i`` (tuples of per-store arguments), summed in registers."""
    t = tl.program_id(0)
    e = tl.load(tile_expert + t)
    rows = tl.load(tile_start + t) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(tile_end + t)
    h = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ok = h < length
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(len(BITS)):
        first = tl.load(starts[i] + e)
        last = tl.load(starts[i] + e + 1)
        for r0 in range(first, last, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < last
            src = tl.load(cols[i] + r, mask=r_ok, other=0)
            a = tl.load(x + rows.to(tl.int64)[:, None] * x_stride + src[None, :],
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            w = dequantized(codes[i], row_bytes[i], scale[i], zero[i], groups, group_size,
                            r.to(tl.int64)[:, None], h[None, :], r_ok[:, None] & h_ok[None, :], BITS[i])
            acc += product(a, cast(w, a.dtype, INTERPRETED), INTERPRETED, PRECISION)
    tl.store(out + rows.to(tl.int64)[:, None] * out_stride + h[None, :], cast(acc, out.dtype.element_ty, INTERPRETED),
             mask=row_ok[:, None] & h_ok[None, :])
