"""Saved directories and plain transformers: what it can represent loads there, nothing loads silently wrong."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import camera_pl
from camera_pl import collect_stats, prune, quantize
from camera_pl.testing import tiny_moe

from conftest import make_batch


def compressed(kind: str):
    model = tiny_moe("qwen2_moe")
    stats = collect_stats(model, [make_batch()])
    if kind == "ragged":
        prune(model, stats, 0.4, allocation="layer")
    elif kind == "quantized":
        quantize(model, stats, method="camera", avg_bits=3)
    else:
        prune(model, stats, 0.4, allocation="expert")
    return model


@pytest.mark.parametrize("kind", ["ragged", "quantized"])
def test_experts_transformers_cannot_build_fail_there_and_load_with_remote_code(kind, tmp_path):
    batch = make_batch()
    model = compressed(kind)
    camera_pl.save(model, tmp_path)
    with pytest.raises(OSError, match="model.safetensors"):  # not random experts and a printed report
        AutoModelForCausalLM.from_pretrained(tmp_path)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)  # through camera_pl.load
    loaded = camera_pl.load(tmp_path)
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(remote(**batch).logits, expected) and torch.equal(loaded(**batch).logits, expected)
    assert getattr(loaded.config, "auto_map", None) is None  # a later save_pretrained does not point at the loader


def test_fused_experts_load_plainly_and_resaving_replaces_the_weights_file(tmp_path):
    batch = make_batch()
    ragged = compressed("ragged")
    camera_pl.save(ragged, tmp_path)
    fused = compressed("expert")
    camera_pl.save(fused, tmp_path)  # the same directory: the earlier weights and loader go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camera_pl.json", "config.json", "model.safetensors"]
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, fused(**batch).logits, rtol=0, atol=1e-6)
