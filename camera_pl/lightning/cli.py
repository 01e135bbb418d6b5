"""``camera-pl fit|validate|test``: Lightning's own CLI over :class:`CausalLMModule` and :class:`TextDataModule`.

Everything is configured in a LightningCLI YAML file — the Trainer, camera_pl's callbacks by
``class_path`` with their config objects as nested ``init_args``, the model and tokenizer by
name — see the examples in ``camera_pl/workflows/recipes/lightning/``. Any LightningModule of the
user's own works the same way with ``LightningCLI(MyModule, ...)``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from camera_pl.data import TextDataModule
from camera_pl.lightning.module import CausalLMModule

def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI with ``args`` (e.g. ``["fit", "--config", "prune_recover.yaml"]``); returns the CLI."""
    return LightningCLI(CausalLMModule, TextDataModule, args=args, save_config_kwargs={"overwrite": True})
