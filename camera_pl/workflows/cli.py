"""``camera-pl``: run recipes, the demo, analysis and evaluation from the command line; ``fit``,
``validate`` and ``test`` hand over to Lightning's CLI (:mod:`camera_pl.lightning.cli`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")


def _recipe_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise SystemExit(f"camera-pl: no recipe file {name!r}; give a path or one of the bundled recipes: {known}.")


def _run(recipe_name: str, overrides: list[str], out: str | None, resume: bool):
    from camera_pl.workflows.recipe import RecipeError, load_recipe
    from camera_pl.config import ConfigError
    from camera_pl.serialization import CheckpointError
    from camera_pl.stats.container import StatsMismatchError
    from camera_pl.pretrained import ModelNotFoundError
    from camera_pl.workflows.runner import RunDirectoryError, run_recipe

    try:
        recipe = load_recipe(_recipe_path(recipe_name), overrides)
    except RecipeError as err:
        raise SystemExit(f"camera-pl: {err}") from None
    run_dir = Path(out) if out else Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"camera-pl: running recipe {recipe.name!r} -> {run_dir}")
    try:
        return run_recipe(recipe, run_dir, resume=resume), run_dir
    except (RunDirectoryError, ModelNotFoundError, ConfigError, CheckpointError, StatsMismatchError) as err:
        raise SystemExit(f"camera-pl: {err}") from None


def _table(metrics: list[dict]) -> str:
    """The run's evaluations side by side; sizes in MiB and forward time relative to the first evaluation."""
    base = next((row["eval_seconds"] for row in metrics if row.get("eval_seconds")), None)
    rows = [{**row, "MiB": row["bytes"] / 2**20 if "bytes" in row else None,
             "time x first": row["eval_seconds"] / base if base and row.get("eval_seconds") else None}
            for row in metrics]
    accuracies = dict.fromkeys(k for row in rows for k in row if k.endswith("_acc"))  # one column per task
    formats = {"params": "{:,.0f}", "expert_params": "{:,.0f}", "MiB": "{:.1f}", "perplexity": "{:.3f}",
               **{k: "{:.3f}" for k in accuracies}, "time x first": "{:.2f}"}
    cols = [c for c in formats if any(row.get(c) is not None for row in rows)]
    lines = ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        cells = ["" if row.get(c) is None else formats[c].format(row[c]) for c in cols]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """No per-file progress bars from transformers (weight loading) and datasets (tokenising): the
    runner prints one line per step and Lightning's bar shows training."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:  # Lightning's own CLI (LightningCLI YAML configs)
        from camera_pl.lightning.cli import main as lightning_main

        lightning_main(argv)
        return
    parser = argparse.ArgumentParser(prog="camera-pl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (a YAML file, or a bundled recipe name)")
    run.add_argument("recipe")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.batch_size=4")
    run.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    demo = sub.add_parser("demo", help="compress_recover on the reference model and the stdlib corpus")
    demo.add_argument("--out")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    analyze = sub.add_parser("analyze", help="statistics + the micro-expert analysis report")
    analyze.add_argument("--model", default="reference")
    analyze.add_argument("--out")
    for name in LIGHTNING_SUBCOMMANDS:  # listed for --help; main() hands them to LightningCLI before parsing
        sub.add_parser(name, help=f"LightningCLI {name}: camera-pl {name} --config CONFIG.yaml (see --help there)")
    evaluate = sub.add_parser("eval", help="perplexity and multiple-choice accuracy of a model")
    evaluate.add_argument("--model", default="reference")
    evaluate.add_argument("--out")
    args = parser.parse_args(argv)
    _quiet_libraries()

    if args.command == "run":
        if args.resume and not args.out:
            raise SystemExit("camera-pl: --resume needs --out naming the interrupted run's directory.")
        ctx, run_dir = _run(args.recipe, args.set, args.out, args.resume)
    elif args.command == "demo":
        ctx, run_dir = _run("compress_recover", args.set, args.out, False)
    elif args.command == "analyze":
        ctx, run_dir = _run("analysis", [f"model.name={args.model}"], args.out, False)
    else:
        ctx, run_dir = _run("eval", [f"model.name={args.model}"], args.out, False)
    if ctx.metrics:
        print(_table(ctx.metrics))
    print(f"camera-pl: outputs in {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
