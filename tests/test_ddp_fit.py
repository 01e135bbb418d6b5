"""Compressing callbacks inside a 2-process DDP fit (gloo, CPU): both ranks end identical, and runs resume."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

pytestmark = pytest.mark.slow


def run(out: Path, scenario: str, phase: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(HERE / "ddp_fit_script.py"), str(out), scenario, phase], env=env,
                          cwd=out, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"{phase}_rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("scenario", ["prune", "quantize", "recover"])
def test_ddp_fit_with_compression_then_resume(tmp_path, scenario):
    for phase, steps in (("fit", 9), ("resume", 12)):
        ranks = run(tmp_path, scenario, phase)
        assert ranks[0]["step"] == ranks[1]["step"] == steps
        assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
        for name, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][name]), f"{phase}: {name} differs between ranks"
    keys = ranks[0]["state"].keys()
    if scenario == "quantize":
        assert any(k.endswith("up_bits") for k in keys)
    elif scenario == "prune":
        assert any(".channels_" in k for k in keys)  # ragged experts after layer pruning
    else:
        assert not any("lora" in k for k in keys)  # merged back after the recovery steps
