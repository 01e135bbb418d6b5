"""The notebooks run end to end on the reference model (so they cannot rot)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
REFERENCE = Path(__file__).parent.parent / "camera_pl" / "reference" / "weights" / "model.safetensors"
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference weights not built")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
