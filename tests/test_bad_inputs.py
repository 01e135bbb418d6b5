"""Bad inputs get clear errors that name the problem and the fix, and leave the model as it was.

Table-driven: each case builds its inputs, calls the public API and expects an exception type
and a phrase of its message.
"""

import pytest
import torch

import camera_pl
from camera_pl import apply_odp, collect_stats, compress_experts, prune, quantize
from camera_pl.callbacks import CameraPruning, CameraQuantization, LoRARecovery, MicroExpertStatsCallback
from camera_pl.testing import tiny_moe

from conftest import make_batch

BATCHES = [make_batch(0), make_batch(1)]


def stats_of(model):
    return collect_stats(model, BATCHES)


def nan_down_projection():
    model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        camera_pl.moe_layers(model)[1].module.down_proj[3, 0, 0] = float("nan")
    return collect_stats(model, BATCHES)


def deepseek_layer_removal():
    model = tiny_moe("deepseek_v3")  # 8 experts, n_group=4: removal must keep a multiple of 4
    return prune(model, stats_of(model), 0.9, allow_expert_removal=True)


CASES = [
    ("prune: misspelt option", lambda: prune(tiny_moe("qwen3_moe"), None, 0.3, alocation="global"),
     camera_pl.ConfigError, "Did you mean 'allocation'"),
    ("prune: ratio 1", lambda: prune(tiny_moe("qwen3_moe"), None, 1.0), camera_pl.ConfigError, r"\[0.0, 1.0\)"),
    ("prune: nan ratio", lambda: prune(tiny_moe("qwen3_moe"), None, float("nan")), camera_pl.ConfigError,
     "expected a number"),
    ("prune: expert method with an allocation", lambda: camera_pl.PruneConfig(method="frequency", allocation="global"),
     camera_pl.ConfigError, "removes whole experts"),
    ("prune: unknown method", lambda: camera_pl.PruneConfig(method="camrea"), camera_pl.ConfigError,
     "Did you mean 'camera'"),
    ("prune: ratio emptying experts", lambda: prune(m := tiny_moe("qwen3_moe"), stats_of(m), 0.99),
     ValueError, "allow_expert_removal=True"),
    ("prune: group-limited routing", deepseek_layer_removal, ValueError, "n_group=4"),
    ("prune: no statistics", lambda: prune(tiny_moe("qwen3_moe"), None, 0.3), ValueError, "collect_stats"),
    ("prune: other model's statistics", lambda: prune(tiny_moe("qwen3_moe"), stats_of(tiny_moe("mixtral")), 0.3),
     camera_pl.StatsMismatchError, "different model"),
    ("scores: misspelt option", lambda: stats_of(tiny_moe("qwen3_moe")).scores("camera", reduce_ratoi=0.0),
     camera_pl.ConfigError, "Did you mean 'reduce_ratio'"),
    ("stats: nan weight", nan_down_projection, ValueError, r"MoE layer 1: statistic .* not finite, experts \[3\]"),
    ("stats: nan max_tokens", lambda: collect_stats(tiny_moe("qwen3_moe"), BATCHES, max_tokens=float("nan")),
     ValueError, "positive integer"),
    ("quantize: misspelt option", lambda: quantize(tiny_moe("qwen3_moe"), None, avg_bit=2.5), camera_pl.ConfigError,
     "Did you mean 'avg_bits'"),
    ("quantize: fractional uniform", lambda: quantize(tiny_moe("qwen3_moe"), None, method="uniform", avg_bits=2.5),
     camera_pl.ConfigError, "whole bits"),
    ("quantize: bit choices", lambda: camera_pl.QuantizeConfig(avg_bits=2, bit_choices=(3, 2)),
     camera_pl.ConfigError, "ascending"),
    ("odp: threshold for a missing layer", lambda: apply_odp(tiny_moe("qwen3_moe"), None, thresholds={7: 0.5}),
     ValueError, r"MoE layers \[7\]"),
    ("odp: boolean threshold", lambda: apply_odp(tiny_moe("qwen3_moe"), None, thresholds=True),
     camera_pl.ConfigError, "expected a number"),
    ("odp: protect ratio", lambda: apply_odp(tiny_moe("qwen3_moe"), None, protect_ratio=2.0, thresholds=0.5),
     camera_pl.ConfigError, "protect_ratio"),
    ("compressed experts: k_main above top_k", lambda: compress_experts(tiny_moe("qwen3_moe"), k_main=5),
     ValueError, "top_k=2"),
    ("compressed experts: trainable", lambda: compress_experts(tiny_moe("qwen3_moe"), trainable="vector"),
     camera_pl.ConfigError, "Did you mean 'vectors'"),
    ("LoRA: misspelt option", lambda: LoRARecovery(rnak=4), camera_pl.ConfigError, "Did you mean 'rank'"),
    ("CameraPruning: misspelt option", lambda: CameraPruning({1: 0.3}, metod="camera"), camera_pl.ConfigError,
     "Did you mean 'method'"),
    ("CameraPruning: bad ratio", lambda: CameraPruning({1: 1.5}), camera_pl.ConfigError, "epoch 1"),
    ("CameraQuantization: misspelt option", lambda: CameraQuantization(1, metod="camera"), camera_pl.ConfigError,
     "Did you mean 'method'"),
    ("stats callback: nan max_tokens", lambda: MicroExpertStatsCallback(max_tokens=float("nan")), ValueError,
     "positive integer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(case):
    _, call, error, phrase = case
    with pytest.raises(error, match=phrase):
        call()


def test_failed_calls_leave_the_model_unchanged():
    model = tiny_moe("deepseek_v3")
    stats = stats_of(model)
    with torch.no_grad():
        before = model(**BATCHES[0]).logits
    for call in (lambda: prune(model, stats, 0.9, allow_expert_removal=True), lambda: prune(model, stats, 0.99),
                 lambda: quantize(model, stats, method="channel", avg_bits=9)):
        with pytest.raises(ValueError):
            call()
    with torch.no_grad():
        assert torch.equal(model(**BATCHES[0]).logits, before)


def test_schedule_beyond_max_epochs_is_refused_at_fit_start():
    import lightning.pytorch as pl

    from camera_pl.lightning.module import CausalLMModule

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[CameraQuantization(5, avg_bits=3)])
    loader = torch.utils.data.DataLoader([{k: v[0] for k, v in BATCHES[0].items()}], batch_size=1)
    with pytest.raises(camera_pl.ConfigError, match="max_epochs=2"):
        trainer.fit(CausalLMModule(tiny_moe("qwen3_moe")), train_dataloaders=loader)


def test_load_in_another_dtype_keeps_float32_buffers(tmp_path):
    model = tiny_moe("qwen3_moe")
    path = camera_pl.save(model, tmp_path / "m")
    loaded = camera_pl.load(path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    rotary = [b for name, b in loaded.named_buffers() if name.endswith("inv_freq")]
    assert rotary and all(b.dtype == torch.float32 for b in rotary)


def test_reference_model_generates_batched_left_padded():
    model, tokenizer = camera_pl.reference_model()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["def main():", "import os\nimport sys\nprint("], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_statistics_of_another_model_are_refused(tmp_path):
    model, other = tiny_moe("qwen3_moe"), tiny_moe("qwen3_moe")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    path = stats_of(other).save(tmp_path / "s.safetensors")
    with pytest.raises(camera_pl.StatsMismatchError, match="other weights"):
        camera_pl.MicroExpertStats.load(path, model=model)
    camera_pl.MicroExpertStats.load(path, model=other)  # the model they came from
    pruned = tiny_moe("qwen3_moe")
    prune(pruned, stats_of(pruned), 0.4)
    with pytest.raises(camera_pl.StatsMismatchError, match="more pruned model"):
        prune(model, stats_of(pruned), 0.4)  # statistics of a pruned model do not describe the dense one
    with pytest.raises(camera_pl.StatsMismatchError, match="different model"):
        apply_odp(model, stats_of(tiny_moe("mixtral")))


def test_unaligned_fused_widths_are_refused():
    model = tiny_moe("qwen3_moe")  # expert width 16: 40% leaves 10 (40 bytes in float32) with width_multiple=1
    with pytest.raises(ValueError, match="width_multiple of 4"):
        prune(model, stats_of(model), 0.4, allocation="expert", width_multiple=1)
    prune(model, stats_of(model), 0.4, allocation="expert", width_multiple=4)
    model(**BATCHES[0])  # transformers' default grouped GEMM runs on the result


@pytest.mark.parametrize("damage, phrase", [
    (lambda m: m.write_text("{not json"), "not valid JSON"),
    (lambda m: m.write_text(m.read_text().replace('"num_experts"', '"num_expert"')), r"lacks \['num_experts'\]"),
    (lambda m: m.write_text(m.read_text().replace('"torch.float32"', '"torch.float99"')), "not a torch dtype"),
])
def test_damaged_manifest_is_named(tmp_path, damage, phrase):
    model = tiny_moe("qwen3_moe")
    prune(model, stats_of(model), 0.3)
    path = camera_pl.save(model, tmp_path / "m")
    damage(path / "camera_pl.json")
    with pytest.raises(camera_pl.CheckpointError, match=f"camera_pl.json.*{phrase}|{phrase}"):
        camera_pl.load(path)


@pytest.mark.parametrize("override, phrase", [
    ("model.dtype=float99", "float99.*choose one of"),
    ("data.eval_batches=0", "eval_batches=0: must be a positive integer"),
    ("data.batch_size=[1", "not valid YAML"),
    ("data.batch_size.x=1", "which has no options"),
    ("steps.0.stats.max_tokens=-3", "that step is 'evaluate', not 'stats'"),
    ("steps.1.stats.max_tokens=-3", "max_tokens"),
    ("steps.4.recover.steps=-5", r"RecoverStep.steps=-5: must lie in \[1, inf\]"),
])
def test_recipe_values_are_validated_up_front(override, phrase):
    from camera_pl.workflows.recipe import RecipeError, load_recipe

    path = __import__("pathlib").Path(__file__).parent.parent / "recipes" / "compress_recover.yaml"
    with pytest.raises(RecipeError, match=phrase):
        load_recipe(path, [override])


def test_missing_model_directory_is_not_looked_up_on_the_hub(tmp_path):
    from camera_pl.workflows.recipe import ModelSpec
    from camera_pl.workflows.runner import load_model

    with pytest.raises(FileNotFoundError, match="No model directory"):
        load_model(ModelSpec(name=str(tmp_path / "nonexistent")))


@pytest.mark.parametrize("argv, phrase", [
    (["eval", "--model", "/nonexistent/model"], "camera-pl: No model directory at /nonexistent/model"),
    (["analyze", "--model", "./typo"], "camera-pl: No model directory at ./typo"),
    (["run", "compress_recover", "--set", "steps.2.prune.ratio=1.5"], "PruneStep.ratio=1.5"),
    (["run", "no_such_recipe"], "no recipe file 'no_such_recipe'"),
])
def test_cli_bad_inputs_exit_with_a_message_and_leave_no_run_dir(argv, phrase, tmp_path, monkeypatch):
    from camera_pl.workflows.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=phrase):
        main(argv + ["--out", str(tmp_path / "out")] if argv[0] != "run" or len(argv) > 2 else argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_damaged_payload_bytes_are_detected(tmp_path):
    model = tiny_moe("qwen3_moe")
    stats = stats_of(model)
    for path, load, error in ((camera_pl.save(model, tmp_path / "m") / "model.safetensors", camera_pl.load,
                               camera_pl.CheckpointError),
                              (stats.save(tmp_path / "s.safetensors"), camera_pl.MicroExpertStats.load,
                               camera_pl.StatsMismatchError)):
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40  # one bit of the last tensor's payload
        path.write_bytes(bytes(data))
        with pytest.raises(error, match="checksum"):
            load(path.parent if path.name == "model.safetensors" else path)


def test_odp_usage_follows_pruning_while_installed():
    model = tiny_moe("qwen3_moe")
    stats = stats_of(model)
    handle = apply_odp(model, stats, protect_ratio=0.0)
    model(**BATCHES[0])
    _, full_dense = handle.activated_params_per_token()
    prune(model, stats, 0.5)
    handle.reset()
    model(**BATCHES[0])
    _, full_pruned = handle.activated_params_per_token()
    assert full_pruned < 0.6 * full_dense  # the counts are of the pruned experts
    handle.remove()


def test_model_directory_without_its_tokenizer_is_refused(tmp_path):
    from camera_pl.workflows.recipe import ModelSpec
    from camera_pl.workflows.runner import load_model

    model, _ = camera_pl.reference_model()
    path = camera_pl.save(model, tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model's vocabulary is 4096"):
        load_model(ModelSpec(name=str(path)))


def test_damaged_statistics_header_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = stats_of(tiny_moe("qwen3_moe")).save(tmp_path / "s.safetensors")
    save_file(load_file(str(path)), str(path), metadata={"camera_pl": "{broken"})
    with pytest.raises(camera_pl.StatsMismatchError, match="s.safetensors: the camera_pl header is not valid JSON"):
        camera_pl.MicroExpertStats.load(path)
