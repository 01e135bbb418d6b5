"""Shared fixtures: tiny models of every supported architecture and token batches."""

import pytest
import torch

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
