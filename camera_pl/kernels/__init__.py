"""camera_pl's Triton kernels, one module per kernel family; imported on first use (they need Triton).

The kernels live at module level because Triton's interpreter (``TRITON_INTERPRET=1``, set before
anything imports Triton) patches ``triton.language`` in a kernel's module globals. Their callers —
:mod:`camera_pl.experts.lowbit` and :mod:`camera_pl.stats.reductions` — decide when they run and
say what they compute.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
