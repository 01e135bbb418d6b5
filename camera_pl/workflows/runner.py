"""Run a recipe: load model and data, execute its steps, write everything to a run directory.

A run directory holds ``recipe.yaml`` (the resolved recipe), ``metrics.json`` and
``metrics.csv`` (one row per evaluation), ``state.json`` (completed steps), plots, the
analysis report and a checkpoint (model and tokenizer) after every step whose options class
declares ``checkpoint`` (see :class:`camera_pl.workflows.recipe.StepSpec`), so an
interrupted run resumes from its last completed step (``camera-pl run ... --resume``) and
computes what the uninterrupted run computes:

* the model is reloaded from the last checkpoint, and the completed steps that install
  hooks (``installs_hooks``, e.g. ``odp``) are replayed on it, in order, with the statistics
  they used (saved under ``replay/``): hooks are in no checkpoint, whether they were
  installed before or after it, and every one of them is still active in the uninterrupted run;
* statistics still valid at the interruption (collected after the last model-changing step)
  are reloaded from ``stats.safetensors``; when missing they are recollected with the options
  of the recipe's last ``stats`` step, as the uninterrupted run would;
* the RNG states (torch, CUDA, ``random``, NumPy) saved after each step in ``rng_state.pt``
  are restored, so random choices after the resume match.

A run directory that exists and is not empty is only reused with ``resume``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from camera_pl.distill import frozen_copy
from camera_pl.pretrained import ModelNotFoundError, load_pretrained
from camera_pl.workflows.recipe import Recipe, StatsStep, StepSpec

STATE = "state.json"
STATS = "stats.safetensors"
RNG = "rng_state.pt"


class RunDirectoryError(FileExistsError):
    """The run directory holds an earlier run and the run was not asked to resume it."""


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    model: nn.Module
    tokenizer: Any
    datamodule: Any
    stats: Any = None
    stats_options: StatsStep | None = None  # the recipe's last stats step before the current one
    metrics: list[dict] = field(default_factory=list)
    log: Callable[[str], None] = print
    saved_stats: Any = field(default=None, repr=False)  # the statistics state.json records (the run loop's)
    teacher: nn.Module | None = field(default=None, repr=False)  # the recipe's model, frozen, for KD recover steps
    offload: Any = None  # the recipe's OffloadConfig, its execution device resolved: stats/prune/quantize layer by layer

    def loader(self, split: str, batches: int | None):
        source = {"train": self.datamodule.train_dataloader, "validation": self.datamodule.val_dataloader,
                  "test": self.datamodule.test_dataloader}[split]()
        return list(islice(source, batches)) if batches is not None else source


def load_model(spec, log: Callable[[str], None] = print) -> tuple[nn.Module, Any]:
    """Model and tokenizer named by a recipe's ``model`` section (see :func:`camera_pl.pretrained.load_pretrained`)."""
    return load_pretrained(spec.name, spec.dtype, log)


def build_datamodule(spec, tokenizer):
    from camera_pl.data import TextDataModule

    kwargs = dict(block_size=spec.block_size, batch_size=spec.batch_size, max_documents=spec.max_documents,
                  text_column=spec.text_column)
    if spec.source.startswith("hf:"):
        dm = TextDataModule(tokenizer, hf_dataset=spec.source[3:], hf_config=spec.hf_config, **kwargs)
    elif spec.source == "stdlib":
        dm = TextDataModule(tokenizer, **kwargs)
    else:
        dm = TextDataModule(tokenizer, data_files=spec.source, **kwargs)
    dm.setup()
    return dm


def model_size(model: nn.Module) -> dict[str, float]:
    from camera_pl.arch.adapters import moe_layers
    from camera_pl.pruning.api import expert_params

    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params": params, "expert_params": sum(expert_params(l) for l in moe_layers(model)), "bytes": state_bytes}


# ---- steps --------------------------------------------------------------------------------
def step_stats(ctx: RunContext, step) -> None:
    from camera_pl.stats.container import collect_stats

    ctx.stats = collect_stats(ctx.model, ctx.loader("validation", ctx.recipe.data.calib_batches), step.max_tokens,
                              heapr_mode=step.heapr_mode, offload=ctx.offload)
    ctx.stats.save(ctx.run_dir / STATS)
    ctx.log(f"statistics: {ctx.stats.tokens} tokens, {ctx.stats.nbytes() / 1024:.0f} KiB")


def _stats_or_collect(ctx: RunContext):
    """The current statistics; when a model change dropped them, recollect with the last stats step's options."""
    if ctx.stats is None:
        step_stats(ctx, ctx.stats_options or StatsStep())
    return ctx.stats


def step_prune(ctx: RunContext, step) -> None:
    from camera_pl.pruning.api import prune

    calibrated = step.sequential or step.method == "naee"
    stats = None if calibrated else _stats_or_collect(ctx)
    calib = ctx.loader("validation", ctx.recipe.data.calib_batches) if calibrated else None
    report = prune(ctx.model, stats, step, calib_dataloader=calib, offload=ctx.offload)
    ctx.log(report.summary().splitlines()[0])


def step_recover(ctx: RunContext, step) -> None:
    from camera_pl.lightning.finetune import recover

    ctx.model = recover(ctx.model, ctx.loader("train", step.steps), step, accelerator=ctx.recipe.accelerator,
                        progress=True, teacher=ctx.teacher if step.distill else None)


def step_finetune(ctx: RunContext, step) -> None:
    import lightning.pytorch as pl

    from camera_pl.callbacks import CameraPruning, MicroExpertStatsCallback
    from camera_pl.lightning.module import CausalLMModule

    callbacks: list = []
    if step.schedule:
        callbacks = [MicroExpertStatsCallback(max_tokens=20000),
                     CameraPruning(step.schedule, method=step.method, allocation=step.allocation)]
    module = CausalLMModule(ctx.model, lr=step.lr)
    trainer = pl.Trainer(accelerator=ctx.recipe.accelerator, max_epochs=step.epochs,
                         limit_train_batches=step.steps_per_epoch, limit_val_batches=ctx.recipe.data.calib_batches,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, callbacks=callbacks,
                         enable_model_summary=False)
    # validation precedes each epoch's pruning: run one before training starts
    with torch.inference_mode(False):
        if callbacks:
            trainer.validate(module, dataloaders=ctx.datamodule.val_dataloader(), verbose=False)
        trainer.fit(module, train_dataloaders=ctx.datamodule.train_dataloader(),
                    val_dataloaders=ctx.datamodule.val_dataloader())
    ctx.model = module.model.eval()


def step_quantize(ctx: RunContext, step) -> None:
    from camera_pl.quant.api import quantize

    stats = _stats_or_collect(ctx) if step.needs_stats else None
    calib = ctx.loader("validation", ctx.recipe.data.calib_batches) if step.needs_calibration else None
    report = quantize(ctx.model, stats, step, calib_dataloader=calib, offload=ctx.offload)
    ctx.log(str(report).splitlines()[0])


def step_evaluate(ctx: RunContext, step) -> None:
    from camera_pl.eval.evaluation import perplexity

    row: dict[str, Any] = {"label": step.label or f"step{len(ctx.metrics)}", **model_size(ctx.model)}
    if step.perplexity:
        start = time.perf_counter()
        row["perplexity"] = perplexity(ctx.model, ctx.loader("test", ctx.recipe.data.eval_batches))
        row["eval_seconds"] = time.perf_counter() - start  # the forward passes over the test batches
    if step.tasks:
        from camera_pl.eval.harness import evaluate

        for task, metrics in evaluate(ctx.model, ctx.tokenizer, step.tasks, limit=step.examples).items():
            # accuracy where the task has one (multiple choice), else its own metrics (e.g. exact_match)
            shown = {"acc": metrics["acc"]} if "acc" in metrics else {
                k: v for k, v in metrics.items() if k != "n" and not k.endswith("_stderr")}
            row.update({f"{task}_{metric}": value for metric, value in shown.items()})
    ctx.metrics.append(row)
    ctx.log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def step_analyze(ctx: RunContext, step) -> None:
    from camera_pl.stats.analysis import write_report

    path = write_report(_stats_or_collect(ctx), ctx.run_dir / "analysis", step.top_fractions)
    ctx.log(f"analysis report: {path}")


def save_model(ctx: RunContext, path: Path) -> Path:
    """Write the model and its tokenizer to ``path`` (loadable by ``model.name: <path>``)."""
    from camera_pl.serialization import save

    path = save(ctx.model, path)
    ctx.tokenizer.save_pretrained(path)
    return path


def step_save(ctx: RunContext, step) -> None:
    path = save_model(ctx, ctx.run_dir / step.subdir)
    ctx.log(f"saved model to {path}")


def step_odp(ctx: RunContext, step) -> None:
    from camera_pl.odp import apply_odp

    ranked = isinstance(step.layers, int)  # a layer count: ranked on calibration data
    apply_odp(ctx.model, _stats_or_collect(ctx), step,
              calib_dataloader=ctx.loader("validation", ctx.recipe.data.calib_batches) if ranked else None)


def step_compressed_experts(ctx: RunContext, step) -> None:
    from camera_pl.expert_compression import compress_experts
    from camera_pl.lightning.finetune import finetune

    compress_experts(ctx.model, k_main=step.k_main, trainable=step.trainable)
    ctx.model = finetune(ctx.model, ctx.loader("train", step.steps), step.steps, step.lr, ctx.recipe.accelerator,
                         progress=True)


STEPS: dict[str, Callable[[RunContext, Any], None]] = {
    "stats": step_stats, "prune": step_prune, "recover": step_recover, "finetune": step_finetune,
    "quantize": step_quantize, "evaluate": step_evaluate, "analyze": step_analyze, "save": step_save,
    "odp": step_odp, "compressed_experts": step_compressed_experts,
}


# ---- the run ------------------------------------------------------------------------------
def _write_metrics(ctx: RunContext) -> None:
    """Rewrite metrics.json and metrics.csv (label first, columns in first-seen order) from ``ctx.metrics``.

    Not Lightning's CSVLogger: its writer deletes an existing metrics.csv (with a warning) whenever its
    directory is not empty, as a run directory always is, sorts the columns and adds a ``step`` column.
    """
    (ctx.run_dir / "metrics.json").write_text(json.dumps(ctx.metrics, indent=1))
    if ctx.metrics:
        keys = list(dict.fromkeys(k for row in ctx.metrics for k in row))
        with open(ctx.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(ctx.metrics)
        _plot_metrics(ctx)


def _plot_metrics(ctx: RunContext) -> None:
    from camera_pl.plots import MISSING, pyplot

    plt = pyplot()
    if plt is None:
        ctx.log(f"metrics.png skipped: {MISSING}")
        return
    labels = [row["label"] for row in ctx.metrics]
    panels = [k for k in ("perplexity", "params", "bytes") if all(k in row for row in ctx.metrics)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.bar(labels, [row[key] for row in ctx.metrics], color="tab:blue")
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(ctx.run_dir / "metrics.png", dpi=110)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_rng(path: Path, done: int) -> None:
    """Save the torch (CPU and CUDA), ``random`` and NumPy RNG states after step ``done``."""
    rng: dict[str, Any] = {"step": done, "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    torch.save(rng, tmp)
    os.replace(tmp, path)


def _restore_rng(path: Path, done: int, log: Callable[[str], None]) -> None:
    rng = torch.load(path, weights_only=True) if path.is_file() else None
    if rng is None or rng.get("step") != done:
        log(f"warning: no RNG state saved after step {done} in {path}; random choices from here on may differ "
            "from an uninterrupted run")
        return
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume or not run_dir.exists():
        return
    if not run_dir.is_dir() or any(run_dir.iterdir()):
        raise RunDirectoryError(
            f"Run directory {run_dir} already exists and is not empty; nothing in it was changed. "
            f"To continue the run in it, pass --resume (run_recipe(..., resume=True)); to start a new run, "
            f"give another --out directory."
        )


def _load_stats(run_dir: Path, record: dict | None, model: nn.Module, device: str, log: Callable[[str], None]):
    """The statistics ``state.json`` records as valid, if their file still holds them (else None)."""
    if not record:
        return None
    from camera_pl.stats.container import MicroExpertStats, StatsMismatchError

    path = run_dir / record["file"]
    if path.is_file() and _sha256(path) == record["sha256"]:
        try:
            return MicroExpertStats.load(path, model=model, device=device)
        except StatsMismatchError as err:
            log(f"warning: {err}")
    log(f"warning: {path} no longer holds the statistics of step {record['step']}; "
        "they will be recollected when a step needs them")
    return None


def _last_stats_step(recipe: Recipe, before: int) -> StatsStep | None:
    found = [step for _, step in recipe.steps[:before] if isinstance(step, StatsStep)]
    return found[-1] if found else None


def _resume(ctx: RunContext, state: dict, device: str) -> None:
    """Bring a context freshly loaded from the last checkpoint to where the interrupted run stopped."""
    recipe, done = ctx.recipe, state["done"]
    after = int(state["checkpoint"].rsplit("step", 1)[1]) if state["checkpoint"] else 0
    lost = [f"{i + 1} ({kind})" for i, (kind, step) in enumerate(recipe.steps[:done])
            if i >= after and step.changes_model]
    if lost:
        raise ValueError(f"{ctx.run_dir} cannot be resumed: model-changing step(s) {', '.join(lost)} completed after "
                         "the last checkpoint; rerun without --resume in another directory.")
    if len(ctx.metrics) > state.get("metrics", len(ctx.metrics)):
        ctx.metrics = ctx.metrics[: state["metrics"]]  # rows of the step that was interrupted do not count
        _write_metrics(ctx)
    from camera_pl.stats.container import MicroExpertStats

    for entry in state.get("replay", []):
        i = entry["step"] - 1
        kind, step = recipe.steps[i]
        ctx.log(f"replaying step {i + 1} ({kind}): its hooks are not part of the saved weights")
        ctx.stats = MicroExpertStats.load(ctx.run_dir / entry["stats"], device=device) if entry["stats"] else None
        ctx.stats_options = _last_stats_step(recipe, i)
        STEPS[kind](ctx, step)
    ctx.stats = ctx.saved_stats = _load_stats(ctx.run_dir, state.get("stats"), ctx.model, device, ctx.log)
    _restore_rng(ctx.run_dir / RNG, done, ctx.log)


def _finish_step(ctx: RunContext, state: dict, i: int, kind: str, step: StepSpec) -> None:
    """What the run loop does after every step, as the step's options class declares it."""
    run_dir, n = ctx.run_dir, i + 1
    if step.installs_hooks:  # remember the statistics it used, to replay it on resume
        snapshot = None
        if ctx.stats is not None:
            snapshot = f"replay/step{n}.{STATS}"
            ctx.stats.save(run_dir / snapshot)
        state.setdefault("replay", []).append({"step": n, "kind": kind, "stats": snapshot})
    if step.changes_model:
        ctx.stats = None  # statistics of the previous model: later steps recollect
    if step.checkpoint:
        state["checkpoint"] = f"checkpoints/after_step{n}"
        save_model(ctx, run_dir / state["checkpoint"])
    if ctx.stats is None:
        state["stats"] = None
    elif ctx.stats is not ctx.saved_stats:  # collected during this step, into stats.safetensors
        state["stats"] = {"file": STATS, "sha256": _sha256(run_dir / STATS), "step": n}
    ctx.saved_stats = ctx.stats
    if len(ctx.metrics) != state.get("metrics"):  # steps only ever append rows
        _write_metrics(ctx)
    state["metrics"] = len(ctx.metrics)
    state["done"] = n
    _save_rng(run_dir / RNG, n)
    _write_atomic(run_dir / STATE, json.dumps(state, indent=1))


def run_recipe(recipe: Recipe, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print) -> RunContext:
    """Execute ``recipe`` in ``run_dir``; with ``resume``, continue after the steps a previous run completed.

    Raises:
        RunDirectoryError: ``run_dir`` exists and is not empty, and ``resume`` is False.
        ValueError: resuming a run started with a different recipe.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, resume)
    state_path = run_dir / STATE
    resuming = resume and state_path.exists()
    state = json.loads(state_path.read_text()) if resuming else {"done": 0, "checkpoint": None}
    if resume and state["done"] and json.loads((run_dir / "recipe.json").read_text()) != recipe.to_dict():
        raise ValueError(f"{run_dir} was started with a different recipe; resume with the same recipe and --set values.")
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model, log)  # before anything is written: a bad name leaves no run dir
    distills = any(kind == "recover" and step.distill for kind, step in recipe.steps)
    teacher = frozen_copy(model) if distills else None  # the model before any step, also when resuming
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    if state["checkpoint"]:
        from camera_pl.serialization import load

        model = load(run_dir / state["checkpoint"], dtype=getattr(torch, recipe.model.dtype))
        log(f"resuming after step {state['done']} from {state['checkpoint']}")
    elif state["done"]:
        log(f"resuming after step {state['done']} from the recipe's model")
    device = "cuda" if recipe.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    offload = recipe.offload
    if offload is not None:  # the model stays in host memory; stats/prune/quantize onload one layer at a time
        if offload.execution_device == "auto":
            offload = replace(offload, execution_device=device)
        log(f"offload: stats, prune and quantize run layer by layer on {offload.execution_device}; the model and "
            "every other step stay on cpu")
        device = "cpu"
    model = model.to(device)
    ctx = RunContext(recipe, run_dir, model, tokenizer, build_datamodule(recipe.data, tokenizer), log=log,
                     teacher=None if teacher is None else teacher.to(device), offload=offload)
    if resuming and (run_dir / "metrics.json").exists():
        ctx.metrics = json.loads((run_dir / "metrics.json").read_text())
    if state["done"]:
        _resume(ctx, state, device)
    for i, (kind, step) in enumerate(recipe.steps):
        if i < state["done"]:
            continue
        ctx.stats_options = _last_stats_step(recipe, i)
        log(f"[{i + 1}/{len(recipe.steps)}] {kind} {asdict(step)}")
        start = time.perf_counter()
        STEPS[kind](ctx, step)
        log(f"    done in {time.perf_counter() - start:.1f}s")
        _finish_step(ctx, state, i, kind, step)
    return ctx
