"""Per-(expert, micro-expert) sums and maxima of squared activations (see :mod:`camera_pl.stats.reductions`)."""

import triton
import triton.language as tl


@triton.jit
def micro_sums_kernel(acts_ptr, row_stride, bounds_ptr, keep_ptr, g2_ptr, out_ptr, num_experts, width, split,
                      BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    # program (expert e, column block, split s): rows [lo, hi) of e's segment -> partial[:, s, e, cols]
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    s = tl.program_id(2)
    start = tl.load(bounds_ptr + e)
    end = tl.load(bounds_ptr + e + 1)
    chunk = tl.cdiv(tl.cdiv(end - start, split), BLOCK_R) * BLOCK_R
    lo = start + s * chunk
    hi = tl.minimum(lo + chunk, end)
    col_ok = cols < width
    act_sq = tl.zeros([BLOCK_I], dtype=tl.float32)
    sq = tl.zeros([BLOCK_I], dtype=tl.float32)
    sq_max = tl.zeros([BLOCK_I], dtype=tl.float32)
    for r in range(lo, hi, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        row_ok = rows < hi
        a = tl.load(acts_ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        a2 = a * a * tl.load(keep_ptr + rows, mask=row_ok, other=0.0)[:, None]
        ga2 = a2 * tl.load(g2_ptr + rows, mask=row_ok, other=0.0)[:, None]
        act_sq += tl.sum(a2, axis=0)
        sq += tl.sum(ga2, axis=0)
        sq_max = tl.maximum(sq_max, tl.max(ga2, axis=0))
    out = out_ptr + (s * num_experts + e) * width + cols
    plane = split * num_experts * width
    tl.store(out, act_sq, mask=col_ok)
    tl.store(out + plane, sq, mask=col_ok)
    tl.store(out + 2 * plane, sq_max, mask=col_ok)
