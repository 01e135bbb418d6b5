"""camera_pl's Triton kernels under Triton's interpreter, on CPU tensors (a subprocess each: see the script).

The low-bit GEMMs over packed CAMERA-Q codes and the statistics' micro-sums kernel equal the paths they
replace on every supported architecture, in fp32 and bf16, for ragged experts, decode-sized inputs and
after save/load. Without Triton these are skipped (the kernels run on CUDA only; CPUs use torch ops).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


@pytest.mark.parametrize("scenario", ["architectures", "ragged_bf16_decode", "observation"])
def test_kernels_under_the_triton_interpreter(tmp_path, scenario):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(HERE / "lowbit_interpreter_script.py"), scenario,
                           str(tmp_path / "summary.json")], env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["launches"]["rows"] > 0
