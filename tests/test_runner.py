"""Every recipe in recipes/ runs end to end (shortened), with run-directory outputs and resume."""

import dataclasses
import json
from pathlib import Path

import pytest

from camera_pl.workflows.cli import main
from camera_pl.workflows.recipe import load_recipe
from camera_pl.workflows.runner import run_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SHORT = {"evaluate": {"examples": 8}, "stats": {"max_tokens": 512}, "recover": {"steps": 2},
         "finetune": {"epochs": 2, "steps_per_epoch": 2, "schedule": {1: 0.3}}, "compressed_experts": {"steps": 2},
         "quantize": {"quantizer": "rtn"}}  # GPTQ itself is covered by tests/test_quant.py


def short(path: Path):
    recipe = load_recipe(path, ["data.max_documents=24", "data.calib_batches=2", "data.eval_batches=2",
                                "data.batch_size=4", "accelerator=cpu"])
    recipe.steps = [(kind, dataclasses.replace(step, **SHORT.get(kind, {}))) for kind, step in recipe.steps]
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs(path, tmp_path):
    ctx = run_recipe(short(path), tmp_path / path.stem)
    run_dir = tmp_path / path.stem
    assert (run_dir / "recipe.yaml").exists() and json.loads((run_dir / "state.json").read_text())["done"] == len(ctx.recipe.steps)
    if any(kind == "evaluate" for kind, _ in ctx.recipe.steps):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics and all("params" in row for row in metrics)
        assert (run_dir / "metrics.csv").exists() and (run_dir / "metrics.png").exists()
    if path.stem == "analysis":
        assert (run_dir / "analysis" / "analysis.md").exists() and (run_dir / "analysis" / "scores.png").exists()


@pytest.mark.slow
def test_resume_skips_completed_steps(tmp_path):
    recipe = short(ROOT / "recipes" / "compress_recover.yaml")
    run_dir = tmp_path / "run"
    run_recipe(recipe, run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    state["done"] = 5  # pretend the run stopped after recovery
    (run_dir / "state.json").write_text(json.dumps(state))
    logs = []
    run_recipe(recipe, run_dir, resume=True, log=logs.append)
    assert any("resuming after step 5" in line for line in logs)
    assert sum(line.startswith("[") for line in logs) == 2  # only evaluate + save ran again
    with pytest.raises(ValueError, match="different recipe"):
        recipe.data.batch_size = 2
        run_recipe(recipe, run_dir, resume=True)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no recipe file"):
        main(["run", "nonexistent_recipe"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - prune: {ratio: 2}\n  - bogus: {}\n")
    with pytest.raises(SystemExit, match=r"bad.yaml:3: 'prune': PruneStep.ratio=2: must lie in \[0.0, 1.0\)"):
        main(["run", str(bad)])
    bad.write_text("name: x\nsteps:\n  - prune: {ratio: 0.2}\n  - bogus: {}\n")
    with pytest.raises(SystemExit, match="bad.yaml:4: unknown step 'bogus'"):
        main(["run", str(bad)])


# ---- resume computes what the uninterrupted run computes ------------------------------------
INTERRUPTIBLE = """
name: interruptible
model: {name: reference}
data: {source: stdlib, block_size: 32, batch_size: 2, max_documents: 24, calib_batches: 1, eval_batches: 1}
accelerator: cpu
steps:
  - stats: {max_tokens: 64}
  - evaluate: {label: dense, tasks: []}
  - prune: {ratio: 0.4, reduce_ratio: 0.8}
  - odp: {protect_ratio: 0.1}
  - evaluate: {label: odp, tasks: []}
"""


class Interrupted(Exception):
    pass


_BUILT: dict = {}


@pytest.fixture
def shared_data(monkeypatch):
    """Build each data module once (reading the stdlib corpus is slow): the runs read identical data."""
    from dataclasses import astuple

    from camera_pl.workflows import runner

    real = runner.build_datamodule

    def build(spec, tokenizer):
        key = astuple(spec), tokenizer.name_or_path
        if key not in _BUILT:
            _BUILT[key] = real(spec, tokenizer)
        return _BUILT[key]

    monkeypatch.setattr(runner, "build_datamodule", build)


def _recipe(text: str):
    import yaml

    from camera_pl.workflows.recipe import parse_recipe

    return parse_recipe(yaml.safe_load(text))


def _interrupt_at(monkeypatch, recipe, index: int) -> None:
    """Make step ``index`` (0-based) do its work, then raise before the run loop records it (once)."""
    from camera_pl.workflows import runner

    kind, target = recipe.steps[index]
    real = runner.STEPS[kind]

    def interrupted(ctx, step):
        real(ctx, step)
        if step is target:
            monkeypatch.setitem(runner.STEPS, kind, real)
            raise Interrupted(f"killed during step {index + 1}")

    monkeypatch.setitem(runner.STEPS, kind, interrupted)


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [row["label"] for row in got] == [row["label"] for row in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a.keys() - {"eval_seconds"}:  # a wall-clock time: never reproducible
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["label"], key)
            else:
                assert a[key] == b[key], (a["label"], key)


EVERY_OTHER_STEP = INTERRUPTIBLE.split("steps:")[0] + """steps:
  - stats: {max_tokens: 64}
  - quantize: {method: uniform, avg_bits: 4, group_size: 32}
  - analyze: {}
  - recover: {steps: 1, lr: 0.01, rank: 2}
  - compressed_experts: {steps: 1, lr: 0.001}
  - finetune: {epochs: 1, steps_per_epoch: 1, lr: 0.0001}
  - save: {}
  - evaluate: {label: end, tasks: []}
"""


@pytest.mark.slow
@pytest.mark.parametrize("text", [INTERRUPTIBLE, EVERY_OTHER_STEP], ids=["stats-prune-odp", "every-other-step"])
def test_resume_after_every_step_matches_uninterrupted_run(tmp_path, monkeypatch, shared_data, text):
    """Interrupt during every step in turn (after its work, before the run records it), resume each time."""
    recipe = _recipe(text)
    want = run_recipe(recipe, tmp_path / "full", log=lambda line: None).metrics
    run_dir, resume = tmp_path / "interrupted", False
    for done in range(1, len(recipe.steps) + 1):  # the run resumed after step `done` computes step done+1
        if done < len(recipe.steps):
            _interrupt_at(monkeypatch, recipe, done)
        logs = []
        try:
            ctx = run_recipe(recipe, run_dir, resume=resume, log=logs.append)
        except Interrupted:
            pass
        assert json.loads((run_dir / "state.json").read_text())["done"] == done
        assert sum(line.startswith("[") for line in logs) == (2 if done < len(recipe.steps) else 1)
        if done == 2 and text == INTERRUPTIBLE:  # resumed after stats, evaluate: prune used the saved statistics
            assert not any(line.startswith("statistics:") for line in logs)
        resume = True
    assert text != INTERRUPTIBLE or any(line.startswith("replaying step 4 (odp)") for line in logs)
    _assert_same_metrics(ctx.metrics, want)
    _assert_same_metrics(json.loads((run_dir / "metrics.json").read_text()), want)
    logs = []  # resuming a finished run runs nothing and changes nothing
    _assert_same_metrics(run_recipe(recipe, run_dir, resume=True, log=logs.append).metrics, want)
    assert not any(line.startswith("[") for line in logs)


@pytest.mark.slow
def test_resume_restores_rng_state(tmp_path, monkeypatch, shared_data):
    """The second recovery's LoRA initialisation draws from the RNG state the first one left."""
    recipe = _recipe(INTERRUPTIBLE.replace("name: interruptible", "name: random").split("steps:")[0] + """steps:
  - recover: {steps: 1, lr: 0.01, rank: 2}
  - recover: {steps: 1, lr: 0.01, rank: 2}
  - evaluate: {label: recovered, tasks: []}
""")
    want = run_recipe(recipe, tmp_path / "full", log=lambda line: None).metrics
    _interrupt_at(monkeypatch, recipe, 1)
    with pytest.raises(Interrupted):
        run_recipe(recipe, tmp_path / "interrupted", log=lambda line: None)
    assert (tmp_path / "interrupted" / "rng_state.pt").is_file()
    _assert_same_metrics(run_recipe(recipe, tmp_path / "interrupted", resume=True, log=lambda line: None).metrics, want)


def test_nonempty_run_dir_is_refused_without_resume(tmp_path):
    from camera_pl.workflows.runner import RunDirectoryError

    run_dir = tmp_path / "a_finished_run"
    files = {"metrics.json": '[{"label": "dense", "perplexity": 12.5}]', "recipe.yaml": "name: a\n",
             "recipe.json": "{}", "state.json": '{"done": 1, "checkpoint": null}', "checkpoints/after_step1/x": "w"}
    for name, text in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)

    def snapshot():  # every path, with each file's bytes and modification time
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None for p in run_dir.rglob("*")}

    before = snapshot()
    with pytest.raises(SystemExit) as err:
        main(["run", str(ROOT / "recipes" / "eval.yaml"), "--out", str(run_dir)])
    assert str(run_dir) in str(err.value) and "--resume" in str(err.value) and "--out" in str(err.value)
    with pytest.raises(RunDirectoryError, match="not empty"):
        run_recipe(load_recipe(ROOT / "recipes" / "mc_odp.yaml"), run_dir)
    assert snapshot() == before


@pytest.mark.slow
def test_checkpoints_hold_the_tokenizer(tmp_path, shared_data):
    """``camera-pl eval --model runs/X/checkpoints/after_stepN`` loads the checkpoint's own tokenizer."""
    recipe = _recipe(INTERRUPTIBLE.split("steps:")[0] + """steps:
  - prune: {ratio: 0.4}
  - evaluate: {label: pruned, tasks: [next_line], examples: 4}
""")
    want = run_recipe(recipe, tmp_path / "run", log=lambda line: None).metrics
    checkpoint = tmp_path / "run" / "checkpoints" / "after_step1"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "camera_pl.safetensors"} <= {
        p.name for p in checkpoint.iterdir()}  # ragged experts: the weights file plain transformers does not read
    evaluation = load_recipe(ROOT / "recipes" / "eval.yaml", [f"model.name={checkpoint}"])  # what `eval --model` runs
    evaluation.data, evaluation.accelerator = recipe.data, recipe.accelerator
    evaluation.steps[0][1].tasks, evaluation.steps[0][1].examples = ["next_line"], 4
    got = run_recipe(evaluation, tmp_path / "eval", log=lambda line: None).metrics
    assert got[0]["perplexity"] == pytest.approx(want[0]["perplexity"], rel=1e-6)
    assert got[0]["next_line_acc"] == want[0]["next_line_acc"] and got[0]["params"] == want[0]["params"]


def test_kd_recover_step_distils_from_the_recipes_model(tmp_path, monkeypatch, shared_data):
    import torch

    from camera_pl import reference_model
    from camera_pl.lightning import finetune

    teachers = []
    real = finetune.recover

    def spy(model, batches, config, **options):
        teachers.append((options["teacher"], model))
        return real(model, batches, config, **options)

    monkeypatch.setattr(finetune, "recover", spy)
    recipe = _recipe(INTERRUPTIBLE.split("steps:")[0] + """steps:
  - prune: {ratio: 0.4}
  - recover: {steps: 1, lr: 0.01, rank: 2, distill: true, kd_temperature: 2.0, kd_alpha: 0.5}
""")
    run_recipe(recipe, tmp_path / "run", log=lambda line: None)
    (teacher, student), = teachers
    dense, _ = reference_model()
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, dense(input_ids=ids).logits)
        assert not torch.allclose(student(input_ids=ids).logits, dense(input_ids=ids).logits)


@pytest.mark.parametrize("options,match", [("distill: true, kd_temperature: 0", "kd_temperature=0: must lie in"),
                                           ("distill: true, kd_alpha: 1.5", "kd_alpha=1.5: must lie in"),
                                           ("kd_alpha: 0.5", "kd_alpha=0.5: applies to knowledge distillation only")])
def test_bad_kd_recover_steps_are_refused(tmp_path, options, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\nsteps:\n  - recover: {{{options}}}\n")
    with pytest.raises(SystemExit, match=f"bad.yaml:3: 'recover': RecoverStep.{match}"):
        main(["run", str(bad)])
