"""Giving freed host memory back to the OS (glibc's malloc_trim), as quantize does between chunks."""

import ctypes
import os

import pytest

from camera_pl import host_memory
from camera_pl.host_memory import release_freed_host_memory

glibc = pytest.mark.skipif(host_memory._malloc_trim() is None, reason="needs glibc's malloc_trim")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_freed_heap_pages_are_returned():
    """Blocks below glibc's mmap threshold live in the heap; freed behind a live block they stay resident
    until trimmed."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 << 10, 2048  # 128 MiB in blocks of 64 KiB (the threshold is never below 128 KiB)
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:
        libc.free(b)  # the last block stays live and pins the heap's top: free() alone cannot shrink it
    held = _rss_bytes()
    assert release_freed_host_memory(force=True)
    released = held - _rss_bytes()
    libc.free(blocks[-1])
    assert released > 0.8 * size * count, f"only {released / 2**20:.1f} MiB of {size * count / 2**20:.0f} returned"


@glibc
def test_trims_at_most_once_per_interval(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: calls.append)
    monkeypatch.setattr(host_memory, "_last_trim", [float("-inf")])
    assert release_freed_host_memory()
    assert not release_freed_host_memory()  # within TRIM_INTERVAL_S of the first
    assert release_freed_host_memory(force=True)
    assert calls == [0, 0]


def test_no_op_without_glibc(monkeypatch):
    host_memory._malloc_trim.cache_clear()
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    try:
        assert host_memory._malloc_trim() is None
        assert not release_freed_host_memory(force=True)
    finally:
        host_memory._malloc_trim.cache_clear()


def test_quantize_returns_the_heap_between_layers(monkeypatch):
    """quantize trims before every MoE layer and once at the end, whatever the C library (counted here)."""
    import torch

    from camera_pl import collect_stats, moe_layers, quantize
    from camera_pl.testing import tiny_moe

    model = tiny_moe("qwen3_moe", num_hidden_layers=3)
    calib = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 16))}]
    stats = collect_stats(model, calib)
    forced = []
    real = host_memory.release_freed_host_memory

    def counting(force: bool = False) -> bool:
        forced.append(force)
        return real(force)

    monkeypatch.setattr("camera_pl.quant.api.release_freed_host_memory", counting)
    quantize(model, stats, method="camera", avg_bits=2.5)
    assert forced.count(True) == len(moe_layers(model)) + 1
