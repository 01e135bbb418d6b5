"""LightningCLI: camera_pl's callbacks, model and tokenizer configured from YAML, run by `camera-pl fit`."""

from pathlib import Path

import pytest

from camera_pl import moe_layers
from camera_pl.callbacks import CameraPruning, EvaluationCallback, LoRARecovery
from camera_pl.callbacks.quantization import CameraQuantization
from camera_pl.experts.quantized import QuantizedExperts
from camera_pl.lightning.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "camera_pl" / "workflows" / "recipes" / "lightning"
QUICK = ["--trainer.accelerator", "cpu", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar",
         "false", "--data.block_size", "64", "--data.batch_size", "2", "--data.max_documents", "16"]


def callback(cli, kind):
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


def test_fit_from_yaml_with_every_callback(tmp_path):
    cli = main(["fit", "--config", str(EXAMPLES / "prune_recover_quantize.yaml"), *QUICK,
                "--trainer.default_root_dir", str(tmp_path)])
    pruning, recovery = callback(cli, CameraPruning), callback(cli, LoRARecovery)
    assert pruning.current_ratio == pytest.approx(0.3) and pruning.reports[0].params_removed > 0
    assert recovery.recoveries == 1
    assert callback(cli, CameraQuantization).phase == "packed"
    assert all(isinstance(layer.module, QuantizedExperts) for layer in moe_layers(cli.model.model))


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_parse_through_camera_pl_fit(example, capsys):
    from camera_pl.workflows.cli import main as camera_pl_cli

    with pytest.raises(SystemExit) as done:
        camera_pl_cli(["fit", "--config", str(EXAMPLES / example), "--print_config"])
    assert done.value.code == 0 and "camera_pl.callbacks.CameraPruning" in capsys.readouterr().out


def test_misspelt_callback_option_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(EXAMPLES / "gradual_prune.yaml"), *QUICK,
              "--trainer.callbacks+=camera_pl.callbacks.LoRARecovery", "--trainer.callbacks.rnak=2"])
    assert "rnak" in capsys.readouterr().err


def test_evaluation_callback_from_yaml(tmp_path):
    """The callback configured in YAML takes its tokenizer from the datamodule and logs through the Trainer."""
    config = tmp_path / "eval.yaml"
    config.write_text("""
trainer:
  max_epochs: 1
  callbacks:
    - class_path: camera_pl.callbacks.EvaluationCallback
      init_args: {tasks: [next_line], limit: 4}
model: {model: reference}
data: {tokenizer: reference}
""")
    cli = main(["fit", "--config", str(config), *QUICK, "--trainer.default_root_dir", str(tmp_path)])
    evaluation = callback(cli, EvaluationCallback)
    assert evaluation.results[0]["next_line"]["n"] == 4
    assert float(cli.trainer.callback_metrics["eval/next_line/acc"]) == evaluation.results[0]["next_line"]["acc"]
