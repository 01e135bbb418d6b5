"""camera_pl's Triton kernels without a GPU: run by Triton's interpreter, and compiled for CUDA targets.

Under the interpreter, on CPU tensors (a subprocess each: see the script), the low-bit GEMMs over
packed CAMERA-Q codes and the statistics' micro-sums kernel equal the paths they replace on every
supported architecture, in fp32 and bf16, for ragged experts, decode-sized inputs and after
save/load. Compiled by Triton's NVIDIA backend for sm_80 and sm_90, the GEMMs run their tiles on
tensor cores without register spills. Without Triton these are skipped (the kernels run on CUDA
only; CPUs use torch ops).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


@pytest.mark.parametrize("scenario", ["architectures", "ragged_bf16_decode", "switch_and_fallback", "observation"])
def test_kernels_under_the_triton_interpreter(tmp_path, scenario):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(HERE / "lowbit_interpreter_script.py"), scenario,
                           str(tmp_path / "summary.json")], env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["launches"]["rows"] > 0


SIGNATURE = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
             torch.int32: "*i32"}


def _ptx(kernel, args: dict, constexprs: dict, arch: int) -> str:
    """PTX of ``kernel`` compiled for CUDA compute capability ``arch`` by Triton's NVIDIA backend (no GPU needed)."""
    from triton import compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def kind(value):
        if isinstance(value, tuple):
            return tuple(kind(v) for v in value)
        return SIGNATURE[value] if isinstance(value, torch.dtype) else "i32"

    signature = {**{k: kind(v) for k, v in args.items()}, **{k: "constexpr" for k in constexprs}}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_cuda_to_tensor_core_code_without_spills(arch):
    """Compiled (not interpreted) for A100/H100-class targets: bf16 tiles on tensor cores (mma, or wgmma for
    64-row tiles on sm_90), no local-memory spills."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    from camera_pl.kernels import lowbit

    u8, f16, i32, bf16 = torch.uint8, torch.float16, torch.int32, torch.bfloat16
    common = dict(x=bf16, x_stride=0, out=bf16, out_stride=0, tile_expert=i32, tile_start=i32, tile_end=i32)
    rows = dict(**common, codes=u8, row_bytes=0, scale=f16, zero=u8, groups=0, group_size=0, starts=i32, cols=i32,
                length=0)
    columns = dict(**common, codes=(u8,) * 3, row_bytes=(0,) * 3, scale=(f16,) * 3, zero=(f16, u8, u8),
                   starts=(i32,) * 3, cols=(i32,) * 3, groups=0, group_size=0, length=0)
    blocks = dict(BLOCK_N=64, BLOCK_K=64, INTERPRETED=False, PRECISION=None)
    for kernel, args, constexprs in ((lowbit.rows_kernel, rows, dict(BITS=3, BLOCK_M=64, **blocks)),
                                     (lowbit.columns_kernel, columns, dict(BITS=(1, 3, 4), BLOCK_M=16, **blocks))):
        ptx = _ptx(kernel, args, constexprs, arch)
        ops = ("mma.sync.aligned", "mma_async.sync.aligned")
        assert any(op in ptx for op in ops), f"{kernel.__name__}: no tensor-core instruction for sm_{arch}"
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{kernel.__name__} spills registers on sm_{arch}"
