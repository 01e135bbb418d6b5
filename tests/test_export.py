"""compressed-tensors export: what transformers + compressed-tensors load gives camera_pl's logits; the rest is refused."""

import pytest
import torch

pytest.importorskip("compressed_tensors", reason="the export tests need compressed-tensors (the dev extra)")

from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from camera_pl import moe_layers, quantize, reference_model  # noqa: E402
from camera_pl.quant.export import ExportError, export_compressed_tensors  # noqa: E402
from camera_pl.testing import tiny_moe  # noqa: E402


def _tokens(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def _load_and_compare(model, path, **load_options):
    x = _tokens(model)
    with torch.no_grad():
        expected = model(x).logits
        loaded = AutoModelForCausalLM.from_pretrained(path, **load_options).eval()
        got = loaded(x).logits
    layer = moe_layers(loaded)[0]
    assert layer.experts.kind == "fused"  # the loader fused the per-expert tensors into transformers' experts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # other kernels: ~1e-6 apart
    return loaded


@pytest.mark.parametrize("arch,bits", [("qwen3_moe", 1), ("qwen3_moe", 2), ("qwen3_moe", 4), ("qwen2_moe", 3),
                                       ("mixtral", 4)])
def test_uniform_export_loads_in_transformers_with_equal_logits(tmp_path, arch, bits):
    model = tiny_moe(arch)
    quantize(model, None, method="uniform", avg_bits=bits, group_size=16)
    out = export_compressed_tensors(model, tmp_path / "ct")
    _load_and_compare(model, out)


def test_uniform_export_of_reference_model_loads_dequantized_and_compressed(tmp_path):
    model, _ = reference_model()
    quantize(model, None, method="uniform", avg_bits=4, group_size=64)
    out = export_compressed_tensors(model, tmp_path / "ct")
    _load_and_compare(model, out)
    loaded = _load_and_compare(model, out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight.data_ptr() == \
        loaded.model.embed_tokens.weight.data_ptr()


def test_export_writes_compressed_tensors_packing(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    model = tiny_moe("qwen3_moe")
    quantize(model, None, method="uniform", avg_bits=3, group_size=16)
    out = export_compressed_tensors(model, tmp_path / "ct")
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.down_proj"
    shape = tensors[f"{name}.weight_shape"]
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32 and f"{name}.weight_zero_point" not in tensors
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size(shape.tolist())).float()
    assert codes.abs().max() <= 7  # q - z of 3-bit codes, as 4-bit symmetric integers
    weight = codes * tensors[f"{name}.weight_scale"].repeat_interleave(16, 1)
    torch.testing.assert_close(weight, moe_layers(model)[1].experts.weights(2).down, rtol=0, atol=0)


def test_group_size_must_divide_row_lengths(tmp_path):
    model, _ = reference_model()  # rows of 192 (hidden) and 128 (expert width)
    quantize(model, None, method="uniform", avg_bits=4, group_size=128)
    with pytest.raises(ExportError, match=r"group_size in \[1, 2, 4, 8, 16, 32, 64\]"):
        export_compressed_tensors(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_mixed_bit_widths_are_refused_with_the_alternative(tmp_path, stats_of_qwen3):
    model = tiny_moe("qwen3_moe")
    stats, calib = stats_of_qwen3
    quantize(model, stats, method="pmq", avg_bits=2.5, group_size=16, calib_dataloader=calib)
    with pytest.raises(ExportError, match="mixes bit-widths.*camera_pl.save"):
        export_compressed_tensors(model, tmp_path / "pmq")
    camera = tiny_moe("qwen3_moe")
    quantize(camera, stats, group_size=16)
    with pytest.raises(ExportError, match="micro-expert columns"):
        export_compressed_tensors(camera, tmp_path / "camera")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case,match", [("dense", "is not quantized"), ("8bit", "9-bit"),
                                        ("gpt_oss", "biases")])
def test_unloadable_forms_are_refused(tmp_path, case, match):
    model = tiny_moe("gpt_oss" if case == "gpt_oss" else "qwen3_moe")
    if case != "dense":
        quantize(model, None, method="uniform", avg_bits=8 if case == "8bit" else 4, group_size=16)
    with pytest.raises(ExportError, match=match):
        export_compressed_tensors(model, tmp_path / "bad")


@pytest.fixture(scope="module")
def stats_of_qwen3():
    from camera_pl import collect_stats
    from conftest import make_batch

    model = tiny_moe("qwen3_moe")
    calib = [make_batch(seed=i, batch=4, seq=24) for i in range(3)]
    return collect_stats(model, calib), calib


def test_model_types_without_per_expert_conversion_are_refused():
    from camera_pl.quant.export import expert_module_names

    assert expert_module_names(tiny_moe("mixtral")) == {"gate": "w1", "up": "w3", "down": "w2"}
    with pytest.raises(ExportError, match="no per-expert checkpoint conversion for model type 'gpt_oss'"):
        expert_module_names(tiny_moe("gpt_oss"))
