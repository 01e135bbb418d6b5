"""Models and tokenizers by name: ``"reference"`` (or a reference model's name, e.g. ``"qwen2-moe-64x6"``), a directory written by ``camera_pl.save`` or
``save_pretrained``, or a hub name — what recipes, ``CausalLMModule`` and ``TextDataModule`` accept,
so a YAML file (a recipe or a LightningCLI config) can name a model instead of building it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class ModelNotFoundError(FileNotFoundError):
    """A model name is neither a model directory nor a loadable hub name."""


def load_pretrained(name: str, dtype: str | torch.dtype = "float32",
                    log: Callable[[str], None] = print) -> tuple[nn.Module, Any]:
    """Model and tokenizer named ``name``; camera_pl directories (``camera_pl.json``) go through ``camera_pl.load``."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    reference = _reference_name(name)
    if reference is not None:
        from camera_pl.reference import reference_model

        return reference_model(reference, dtype=dtype)
    from transformers import AutoModelForCausalLM

    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelNotFoundError(f"No model directory at {name}: give a directory written by camera_pl.save or "
                                 "save_pretrained, 'reference', or a hub name such as 'org/model'.")
    if (path / "camera_pl.json").exists():
        from camera_pl.serialization import load

        return _checked(load(path, dtype=dtype), load_tokenizer(name), name)
    log(f"loading {name} with transformers")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as err:  # transformers' answer for a name that is neither a directory nor a reachable hub repo
        raise ModelNotFoundError(f"Cannot load model {name!r}: it is not a local directory, and loading it as a "
                                 f"hub name failed ({str(err).splitlines()[0]}). Give a model directory, "
                                 "'reference', or a hub name reachable from this machine.") from None
    return _checked(model, load_tokenizer(name), name)


def _reference_name(name: str) -> str | None:
    """The reference model ``name`` stands for (``"reference"``: the default one), or None."""
    from camera_pl.reference import DEFAULT_REFERENCE, REFERENCE_MODELS

    return DEFAULT_REFERENCE if name == "reference" else name if name in REFERENCE_MODELS else None


def load_tokenizer(name: str) -> Any:
    """The tokenizer of the model named ``name`` (see :func:`load_pretrained`)."""
    from transformers import AutoTokenizer

    reference = _reference_name(name)
    if reference is not None:
        from camera_pl.reference import reference_spec

        return AutoTokenizer.from_pretrained(reference_spec(reference).weights_dir, local_files_only=True)
    path = Path(name).expanduser()
    try:
        return AutoTokenizer.from_pretrained(path if path.is_dir() else name)
    except OSError as err:
        raise ModelNotFoundError(f"Cannot load a tokenizer for {name!r} ({str(err).splitlines()[0]}): give a model "
                                 "directory with tokenizer files, 'reference', or a reachable hub name.") from None


def _checked(model: nn.Module, tokenizer: Any, name: str) -> tuple[nn.Module, Any]:
    """Refuse a tokenizer whose vocabulary does not fit the model (e.g. a directory without tokenizer files)."""
    vocab, size = len(tokenizer), model.config.vocab_size
    if vocab > size or vocab < size // 2:
        raise ValueError(f"{name}: the tokenizer has {vocab} tokens but the model's vocabulary is {size}; the "
                         "directory lacks the model's tokenizer files (save them with tokenizer.save_pretrained).")
    return model, tokenizer
