"""``camera_pl.evaluate``: lm-evaluation-harness run on a model held in memory.

Task accuracies are computed by lm-eval, so they are the numbers papers report (BoolQ, ARC,
PIQA, HellaSwag, WinoGrande, ...). The model is wrapped in lm-eval's ``HFLM``, which needs only
a causal LM's ``forward(input_ids).logits``, ``config`` and ``device``. Dense, pruned,
quantized and reloaded camera_pl models all qualify, and the model stays on its own device.

Two kinds of task names are accepted:

* camera_pl's offline tasks (`OFFLINE_TASKS`, built by `camera_pl.eval.tasks` from the test
  split of a built-in corpus, by default the stdlib source). Their lm-eval definition is ``lm_eval_tasks/offline_mc.yaml``. Each run writes
  the task data as JSON lines into a temporary directory, together with one small YAML per
  task that includes the shipped definition and adds the absolute data path. lm-eval finds
  them through ``TaskManager(include_path=...)``. They need no network.
* any task in lm-eval's registry. Those download their datasets from the Hugging Face hub, so
  they need network access.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml
from torch import nn

from camera_pl.eval.tasks import DEFAULT_EXAMPLES, TASKS, build_examples, write_task

OFFLINE_TASKS = TASKS
TASK_DEFINITION = Path(__file__).resolve().parent / "lm_eval_tasks" / "offline_mc.yaml"
INSTALL_HINT = 'pip install "camera_pl[eval]"'


def require_lm_eval() -> None:
    """Raise a clear ImportError when lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(f"camera_pl's task evaluation runs lm-evaluation-harness, which is not installed: "
                          f"{INSTALL_HINT} (or pip install 'lm-eval>=0.4.10,<0.5').")


def task_names(tasks: str | Sequence[str]) -> list[str]:
    """``tasks`` as a list of names (a single name is accepted), refusing an empty or non-string entry."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"tasks must be one or more task names, got {tasks!r}; camera_pl's offline tasks are "
                         f"{list(OFFLINE_TASKS)}, other names are lm-eval tasks (hub datasets, need network).")
    return names


def write_offline_tasks(names: Sequence[str], out_dir: Path, examples: int = DEFAULT_EXAMPLES,
                        corpus: str = "stdlib") -> Path:
    """Build the offline tasks ``names`` from ``corpus``' test split into ``out_dir``: data, lm-eval
    task YAMLs and a datasets cache. Returns the directory to give ``TaskManager(include_path=...)``.
    """
    from camera_pl.data import corpus_files

    tasks_dir, cache_dir = out_dir / "tasks", out_dir / "datasets_cache"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    files = corpus_files(corpus, "test")
    for name in names:
        data = write_task(tasks_dir / f"{name}.jsonl", build_examples(name, files, n=examples))
        definition = {"include": str(TASK_DEFINITION), "task": name,
                      "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache_dir)}}
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(definition, sort_keys=False), encoding="utf-8")
    return tasks_dir


def _unknown_tasks_error(unknown: list[str], known: Sequence[str]) -> ValueError:
    close = {name: difflib.get_close_matches(name, [*OFFLINE_TASKS, *known], n=3) for name in unknown}
    hints = "; ".join(f"{name!r}: did you mean {', '.join(map(repr, c))}?" for name, c in close.items() if c)
    return ValueError(
        f"unknown task(s) {unknown}{' (' + hints + ')' if hints else ''}. camera_pl's offline tasks are "
        f"{list(OFFLINE_TASKS)}; any other name must be a task, group or tag of lm-eval's registry "
        "(`lm-eval ls tasks` lists them), and those read their datasets from the Hugging Face hub, "
        "so they need network access."
    )


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Silence what lm-eval prints beside the scores, for the time of one evaluation.

    Its logger's notes (e.g. that it was handed a model object, which camera_pl does on
    purpose), the progress bars of reading the task data and building its requests, and the run
    metadata it gathers
    for a results file camera_pl does not write: the working directory's git commit (a
    ``git`` subprocess that prints "fatal: not a git repository" outside a checkout) and
    torch's environment report (several subprocesses, seconds per call). Errors still surface.
    """
    import datasets
    import tqdm
    from lm_eval import evaluator
    from lm_eval.api import task

    logger, level = logging.getLogger("lm_eval"), logging.getLogger("lm_eval").level
    bars = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with mock.patch.object(evaluator, "get_git_commit_hash", return_value=None), \
                mock.patch.object(evaluator, "add_env_info", return_value=None), \
                mock.patch.object(task, "tqdm", functools.partial(tqdm.tqdm, disable=True)):
            yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _quiet_model(base: type) -> type:
    """A subclass of lm-eval's ``HFLM`` whose scoring passes run without progress bars."""

    class QuietHFLM(base):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _flatten(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, "n": items}}`` from lm-eval's output, without the ``,none`` filter suffix."""
    counts = results.get("n-samples", {})
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        row = {key.removesuffix(",none"): float(value) for key, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len"}
        n = counts[task]["effective"] if task in counts else metrics.get("sample_len")  # groups: sample_len
        if n is not None:
            row["n"] = float(n)
        out[task] = row
    return out


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    corpus: str = "stdlib",
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model`` and return ``{task: {metric: value, ..., "n": items}}``.

    Args:
        model: a transformers-style causal LM (``model(input_ids).logits``, ``.config``,
            ``.device``): dense, or pruned/quantized/reloaded by camera_pl. It is run where it lies
            and left in the train/eval mode it had.
        tokenizer: its Hugging Face tokenizer.
        tasks: names of camera_pl's offline tasks (`OFFLINE_TASKS`) and/or of lm-eval tasks,
            groups or tags (e.g. ``"arc_easy"``, ``"hellaswag"``; these need network access).
        limit: score only the first ``limit`` items of each task (None: all of them).
        batch_size: sequences per forward pass.
        max_length: context length in tokens (default: the model's ``max_position_embeddings``).
        num_fewshot: few-shot examples per prompt (default: each task's own setting, 0 for the offline tasks).
        corpus: the built-in corpus (`camera_pl.data.CORPORA`) whose test split the offline tasks
            are built from; use the one the model was not trained on, or its held-out split.
        verbose: let lm-eval print its logs, progress bars and run metadata (default: only the
            results come back; see `_quiet_lm_eval`).

    Multiple-choice tasks report ``acc`` (highest summed continuation log-likelihood) and, per
    their definition, ``acc_norm`` (divided by the choice's length in characters) or
    ``acc_bytes`` (divided by its length in UTF-8 bytes; the offline tasks report ``acc_bytes``).
    Standard errors are given as ``<metric>_stderr``.
    """
    names = task_names(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of items per task or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    offline = [name for name in names if name in OFFLINE_TASKS]
    registry = [name for name in names if name not in OFFLINE_TASKS]
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="camera_pl_eval_") as tmp:
        include = write_offline_tasks(offline, Path(tmp), limit or DEFAULT_EXAMPLES, corpus) if offline else None
        # Indexing lm-eval's own task registry takes seconds: only when a registry task is asked for.
        manager = TaskManager(include_path=str(include) if include else None, include_defaults=bool(registry))
        unknown = [name for name in registry if name not in manager.all_tasks]
        if unknown:
            raise _unknown_tasks_error(unknown, manager.all_tasks)
        quiet = contextlib.nullcontext() if verbose else _quiet_lm_eval()
        try:
            with quiet:
                lm = (HFLM if verbose else _quiet_model(HFLM))(
                    pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                    max_length=max_length, softmax_dtype=torch.float32)
                # No seeding: a callback's evaluation must not reset the training run's random state.
                results = simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                          task_manager=manager, log_samples=False, random_seed=None,
                                          numpy_random_seed=None, torch_random_seed=None)
        finally:
            model.train(was_training)  # HFLM puts the model in eval mode
    return _flatten(results)
