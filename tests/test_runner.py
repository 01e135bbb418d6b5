"""Every recipe in recipes/ runs end to end (shortened), with run-directory outputs and resume."""

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
    for kind, step in recipe.steps:
        for key, value in SHORT.get(kind, {}).items():
            setattr(step, key, value)
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
    with pytest.raises(SystemExit, match="bad.yaml:4: unknown step 'bogus'"):
        main(["run", str(bad)])
