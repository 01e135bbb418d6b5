"""Sharded runs (FSDP2 through ModelParallelStrategy; FSDP1 through FSDPStrategy, GPUs only) against one process.

Each check launches ``fsdp_fit_script.py`` (2 processes: gloo on CPU, NCCL on CUDA) and the same
script on one process, and compares the statistics and the directory ``camera_pl.save`` wrote. The
fits train at learning rate 0, so the weights change only through the compression and must come
out the same however the data is split across processes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camera_pl
from camera_pl.stats.container import MicroExpertStats

HERE = Path(__file__).parent

pytestmark = pytest.mark.slow

ACCELERATORS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]),
]


def run(out: Path, strategy: str, scenario: str, devices: int, accelerator: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, str(HERE / "fsdp_fit_script.py"), str(out), strategy, scenario,
                           str(devices), "gpu" if accelerator == "cuda" else "cpu"], env=env, cwd=out, timeout=600,
                          capture_output=True, text=True)


def checked(out: Path, *args) -> Path:
    done = run(out, *args)
    error = out / "error.txt"
    assert done.returncode == 0, error.read_text() if error.is_file() else done.stderr[-3000:]
    return out


def assert_same(sharded: Path, single: Path) -> None:
    a, b = MicroExpertStats.load(sharded / "stats.safetensors"), MicroExpertStats.load(single / "stats.safetensors")
    assert a.tokens == b.tokens and a.signature == b.signature
    for index, entry in b.layers.items():
        for name, value in entry.items():
            torch.testing.assert_close(a.layers[index][name], value, rtol=1e-5, atol=1e-6, msg=f"{index}.{name}")
    mine, theirs = camera_pl.load(sharded / "model").state_dict(), camera_pl.load(single / "model").state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("scenario", ["stats", "prune", "quantize", "recover"])
def test_fsdp2_fit_matches_one_process(tmp_path, scenario, accelerator):
    sharded = checked(tmp_path / "fsdp2", "fsdp2", scenario, 2, accelerator)
    single = checked(tmp_path / "single", "single", scenario, 1, accelerator)
    assert_same(sharded, single)
    structure = camera_pl.load(sharded / "model")
    if scenario == "prune":
        assert any(".channels_" in k for k in structure.state_dict())
    elif scenario == "quantize":
        assert any(k.endswith("up_bits") for k in structure.state_dict())


@pytest.mark.parametrize("accelerator", ACCELERATORS[1:])  # Lightning's FSDPStrategy refuses accelerator="cpu"
def test_fsdp1_stats_and_save_match_one_process_and_compression_names_the_alternative(tmp_path, accelerator):
    sharded = checked(tmp_path / "fsdp1", "fsdp1", "stats", 2, accelerator)
    single = checked(tmp_path / "single", "single", "stats", 1, accelerator)
    assert_same(sharded, single)
    done = run(tmp_path / "fsdp1_prune", "fsdp1", "prune", 2, accelerator)
    assert done.returncode != 0
    assert "ModelParallelStrategy" in (tmp_path / "fsdp1_prune" / "error.txt").read_text()
