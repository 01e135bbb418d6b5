"""Shared fixtures: tiny models of every supported architecture and token batches."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from camera_pl.testing import TINY_CONFIGS, tiny_moe

ARCHITECTURES = list(TINY_CONFIGS)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


def make_batch(seed: int = 0, batch: int = 3, seq: int = 10, vocab: int = 96, pad_from: int | None = 6) -> dict:
    """Random ids; the last row is right-padded from ``pad_from`` (mask 0, junk ids)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def model(arch):
    return tiny_moe(arch)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (no merges) plus EOS and PAD: token counts are predictable."""
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({"<eos>": len(vocab), "<pad>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
