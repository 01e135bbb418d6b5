"""Next-token labels: the input ids with padding ignored, as every causal-LM loss here computes them."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label of positions that count in no loss (padding): the ``ignore_index`` of transformers' losses."""


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for ``input_ids``: the ids themselves, :data:`IGNORE_INDEX` where ``attention_mask`` is 0."""
    return input_ids.clone() if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
