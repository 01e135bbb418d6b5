"""matplotlib, when installed (the ``plots`` extra): figures are a convenience, never a requirement."""

from __future__ import annotations

from types import ModuleType

MISSING = "matplotlib is not installed; `pip install 'camera_pl[plots]'` adds the figures"


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
