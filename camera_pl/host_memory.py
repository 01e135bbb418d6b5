"""Handing the host memory that freed tensors leave behind back to the operating system.

Quantizing a layer on a CPU allocates and frees thousands of temporaries of 0.1–30 MB (one expert's
float copies, codes, scales). glibc's allocator keeps the freed blocks inside its heaps, fragmented,
and raises its mmap threshold with every large block freed, so more and more temporaries land in
those heaps: the process's resident memory grew to 1.7–4.3x a 2-layer Qwen3-30B-A3B-sized model,
different in every run, while the live tensors never exceeded 1.42x. ``malloc_trim`` returns the
free pages of every heap, so calling it between chunks of work bounds the resident memory by what
is live. Other C libraries (musl, macOS, Windows) have no such call; there this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import time
from collections.abc import Callable

TRIM_INTERVAL_S = 0.25
"""Least time between two trims: a trim of a heap of a few GB takes ~6 ms, so this bounds its cost to ~2%."""

_last_trim = [float("-inf")]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_host_memory(force: bool = False) -> bool:
    """Return the C heap's free pages to the OS, at most once per :data:`TRIM_INTERVAL_S` unless ``force``.

    Called between chunks of memory-heavy work (quantizing experts); the tensors are untouched, and
    device (CUDA) memory is not concerned. Returns whether a trim ran.
    """
    trim = _malloc_trim()
    now = time.monotonic()
    if trim is None or (not force and now - _last_trim[0] < TRIM_INTERVAL_S):
        return False
    trim(0)
    _last_trim[0] = time.monotonic()
    return True
