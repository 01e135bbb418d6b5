"""Triton kernels that multiply by bit-packed mixed-precision experts without dequantizing them to memory.

:class:`~camera_pl.experts.quantized.QuantizedExperts` keeps, per matrix and bit-width, the
rows stored at that width (a *store*): codes bit-packed LSB first (code ``k`` of a row in bits
``[k·b, k·b + b)`` of the row's bytes), float16 scales and uint8 zero points per group of
``group_size`` entries along the row. Two grouped GEMMs over rows sorted by expert read them:

* :func:`rows_matmul` — the stored rows are *output* channels (gate and up rows ``[W, H]``;
  down rows ``[H, W]`` with ``down_axis="out"``): ``out[t, col_r] = Σ_k x[t, k]·ŵ_r[k]``, one launch
  per store, each row's result written to its column ``col_r`` of the expert's output;
* :func:`columns_matmul` — the stored rows are *input* channels (rows of ``down.T``, one per
  micro-expert, ``down_axis="in"``): ``out[t, h] = Σ_r x[t, src_r]·ŵ_r[h]``, one launch for all
  stores, the sum over bit-widths kept in registers.

A program owns a tile of one expert's rows (``BLOCK_M`` tokens) and ``BLOCK_N`` output
columns; it unpacks a ``[BLOCK_K, BLOCK_N]`` tile of codes in registers, dequantizes it with
the arithmetic of :func:`camera_pl.quant.quantizers.dequantize` — ``(q − z)·s`` in float32, or
``(2q − 1)·s`` at 1 bit — casts it to the activations' dtype once (as fake quantization casts
the dequantized weights) and accumulates ``tl.dot`` in float32. Results therefore equal the
fake-quantized model up to the summation order of the GEMM.

Why a kernel of camera_pl's own rather than a maintained low-bit GEMM: gemlite's Triton kernels
(and torchao's low-bit configs built on them or on tinygemm) multiply one dense matrix of a
single bit-width (8, 4, 2 or 1; 3 bits experimental) with scale groups along the input
dimension. CAMERA-Q needs a different bit-width per row inside every expert, 3-bit rows, scale
groups along the *output* dimension for the down projection's micro-expert rows, and one launch
over all 128 experts of a layer: with those libraries that is one matrix per (expert, matrix,
bit-width) — up to 1,920 launches a layer — after re-packing into their formats.

Tiles come from the routing's host-side row counts (:func:`row_tiles`): no device sync. With
``TRITON_INTERPRET=1`` in the environment before anything imports Triton, Triton runs the kernels
on CPU tensors (the tests do so in a subprocess; slow); two workarounds for the interpreter are
confined to :mod:`camera_pl.kernels.lowbit` (``INTERPRETED``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from camera_pl.kernels import interpreting

BLOCK_N = 64
BLOCK_K = 64
MIN_TRITON = (3, 3)  # tuples of tensors as kernel arguments (columns_matmul)


@dataclass
class Store:
    """One (matrix, bit-width) store of a quantized layer, on the device the kernels run on.

    ``codes`` uint8 ``[N, row_bytes]``; ``scale`` float16 ``[N, G]``; ``zero`` uint8 ``[N, G]`` (None at
    1 bit); ``starts`` int32 ``[E + 1]``: expert ``e``'s rows are ``starts[e]:starts[e + 1]``;
    ``cols`` int32 ``[N]``: each row's column within its expert (output column for
    :func:`rows_matmul`, input column for :func:`columns_matmul`); ``most``: the most rows any
    expert has here (host-side, sizes the grid); ``length``: entries per row, in groups of ``group_size``.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    starts: torch.Tensor
    cols: torch.Tensor
    most: int
    length: int
    group_size: int


@dataclass
class Tiles:
    """Row tiles of a forward: tile ``i`` covers sorted rows ``start[i]:end[i]``, all of expert ``expert[i]``."""

    expert: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    block_m: int

    def __len__(self) -> int:
        return self.expert.numel()


def available(x: torch.Tensor) -> bool:
    """Whether the kernels run on ``x``'s device and dtype: CUDA with Triton >= 3.3 (bf16 from compute capability
    8.0, fp16 and fp32 from 7.0), or any tensor under the interpreter."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < ((8, 0) if x.dtype == torch.bfloat16 else (7, 0)):
            return False
    elif not interpreting():
        return False
    return _kernels() is not None


def row_tiles(ends: list[int], device: torch.device) -> Tiles:
    """Tiles of at most ``block_m`` rows over experts whose sorted rows end at ``ends`` (host-side counts; one
    small host-to-device copy).

    ``block_m`` is 16 (``tl.dot``'s smallest) when experts average fewer than 64 rows (decoding), else 64.
    """
    last = torch.tensor(ends, dtype=torch.int64)
    counts = last.diff(prepend=last.new_zeros(1))
    hit = int((counts > 0).sum())
    block_m = 64 if hit and int(last[-1]) >= 64 * hit else 16
    per = (counts + block_m - 1) // block_m  # tiles of each expert
    expert = torch.repeat_interleave(torch.arange(len(ends)), per)
    within = torch.arange(expert.numel()) - torch.repeat_interleave(per.cumsum(0) - per, per)
    start = (last - counts)[expert] + within * block_m
    end = torch.minimum(start + block_m, last[expert])
    table = torch.stack([expert, start, end]).to(device=device, dtype=torch.int32, non_blocking=True)
    return Tiles(table[0], table[1], table[2], block_m)


def rows_matmul(x: torch.Tensor, tiles: Tiles, store: Store, out: torch.Tensor) -> None:
    """``out[t, cols[r]] = x[t, :length] · ŵ_r`` for every stored row ``r`` of each tile's expert (in place)."""
    if not len(tiles) or not store.most:
        return
    x = _unit_columns(x)
    kernel = _kernels().rows_kernel
    grid = (len(tiles), -(-store.most // BLOCK_N))
    zero = store.scale if store.zero is None else store.zero
    kernel[grid](x, x.stride(0), out, out.stride(0), tiles.expert, tiles.start, tiles.end,
                 store.codes, store.codes.stride(0), store.scale, zero, store.scale.shape[1], store.group_size,
                 store.starts, store.cols, store.length,
                 BITS=store.bits, BLOCK_M=tiles.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                 INTERPRETED=interpreting(), PRECISION=_precision(x))


def columns_matmul(x: torch.Tensor, tiles: Tiles, stores: list[Store], out: torch.Tensor) -> None:
    """``out[t, h] = Σ_stores Σ_r x[t, cols[r]] · ŵ_r[h]`` over each tile's expert's stored rows (``out`` overwritten)."""
    if not len(tiles):
        return
    x = _unit_columns(x)
    kernel = _kernels().columns_kernel
    length = stores[0].length
    grid = (len(tiles), -(-length // BLOCK_N))
    kernel[grid](x, x.stride(0), out, out.stride(0), tiles.expert, tiles.start, tiles.end,
                 tuple(s.codes for s in stores), tuple(s.codes.stride(0) for s in stores),
                 tuple(s.scale for s in stores), tuple(s.scale if s.zero is None else s.zero for s in stores),
                 tuple(s.starts for s in stores), tuple(s.cols for s in stores),
                 stores[0].scale.shape[1], stores[0].group_size, length,
                 BITS=tuple(s.bits for s in stores), BLOCK_M=tiles.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                 INTERPRETED=interpreting(), PRECISION=_precision(x))


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit column stride, as the kernels address rows (a copy only where it has another)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(x: torch.Tensor) -> str | None:
    """``tl.dot``'s input precision: exact float32 products for float32 activations (not TF32); the default
    (irrelevant) for 16-bit ones."""
    return "ieee" if x.dtype == torch.float32 else None


@functools.cache
def _kernels() -> ModuleType | None:
    """:mod:`camera_pl.kernels.lowbit`, imported on first use; None without Triton or with a Triton older than
    :data:`MIN_TRITON`."""
    try:
        import triton
    except ImportError:
        return None
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < MIN_TRITON:
        return None
    from camera_pl.kernels import lowbit

    return lowbit
