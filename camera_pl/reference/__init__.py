"""The reference MoE shipped with camera_pl: a small Qwen3-MoE trained on the stdlib corpus.

The files in ``weights/`` (config.json, bf16 model.safetensors, tokenizer files,
metrics.json) are produced by ``python -m camera_pl.reference.train``; see
``README_section.md`` for the exact command and the measured figures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeForCausalLM

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def reference_model(
    dtype: torch.dtype = torch.float32, weights_dir: str | Path = WEIGHTS_DIR
) -> tuple[Qwen3MoeForCausalLM, PreTrainedTokenizerFast]:
    """Load the reference model (in eval mode, on CPU, cast to ``dtype``) and its tokenizer.

    Nothing is downloaded: only the local ``weights_dir`` is read.
    """
    weights_dir = Path(weights_dir)
    missing = [name for name in _REQUIRED if not (weights_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"reference weights incomplete in {weights_dir}: missing {missing}; "
            f"create them with `python -m camera_pl.reference.train --out {weights_dir}`"
        )
    model = Qwen3MoeForCausalLM.from_pretrained(weights_dir, dtype=dtype, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(weights_dir, local_files_only=True)
    return model.eval(), tokenizer
