"""The reference MoEs shipped with camera_pl, trained by the project on text every Python install has.

Two models, so that no quality claim rests on one architecture or one corpus:

* ``"qwen3-moe-16x2"`` (the default, ``weights/``): Qwen3-MoE, 16 routed experts of
  width 128, top-2 (Mixtral-like granularity), trained on the stdlib library
  source (`camera_pl.data.stdlib_corpus`).
* ``"qwen2-moe-64x6"`` (``weights_fine/``): Qwen2-MoE with fine-grained experts,
  64 routed experts of width 32, top-6, plus a gated shared expert (the
  DeepSeek-MoE / Qwen2-57B granularity), trained on other text: the stdlib test
  suites and the language reference (`camera_pl.data.stdlib_tests_corpus`).

Each directory (config.json, bf16 model.safetensors, tokenizer files,
metrics.json) is produced by ``python -m camera_pl.reference.train --model NAME``;
metrics.json records the exact arguments and the measured figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

_HERE = Path(__file__).resolve().parent
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class ReferenceSpec:
    """Where a reference model lives and which built-in corpus (`camera_pl.data.CORPORA`) it was trained on."""

    weights_dir: Path
    corpus: str
    description: str


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    "qwen3-moe-16x2": ReferenceSpec(_HERE / "weights", "stdlib", "Qwen3-MoE, 16 experts top-2, stdlib source"),
    "qwen2-moe-64x6": ReferenceSpec(
        _HERE / "weights_fine", "stdlib-tests", "Qwen2-MoE, 64 fine-grained experts top-6 + shared, stdlib tests"
    ),
}
DEFAULT_REFERENCE = "qwen3-moe-16x2"
WEIGHTS_DIR = REFERENCE_MODELS[DEFAULT_REFERENCE].weights_dir


def reference_spec(name: str = DEFAULT_REFERENCE) -> ReferenceSpec:
    """The `ReferenceSpec` registered as ``name``; unknown names get the list of known ones."""
    if not isinstance(name, str) or name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose one of {sorted(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]


def reference_model(
    name: str = DEFAULT_REFERENCE, dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load reference model ``name`` (in eval mode, on CPU, cast to ``dtype``) and its tokenizer.

    Nothing is downloaded: only the local weights directory (``weights_dir``, by
    default the one shipped for ``name``) is read.
    """
    spec = reference_spec(name)
    weights_dir = Path(weights_dir) if weights_dir is not None else spec.weights_dir
    missing = [f for f in _REQUIRED if not (weights_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"reference weights incomplete in {weights_dir}: missing {missing}; "
            f"create them with `python -m camera_pl.reference.train --model {name} --out {weights_dir}`"
        )
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(weights_dir, local_files_only=True)
    return model.eval(), tokenizer
