"""Evaluate a shipped reference model: test perplexity, unigram baseline, zero-shot tasks.

Run ``python -m camera_pl.reference.evaluate [--model NAME] [--weights DIR]``.  It rebuilds
the test split of the model's corpus, scores the held-out multiple-choice tasks built from it
(`camera_pl.eval.tasks`) with lm-evaluation-harness (`camera_pl.evaluate`; needs the ``eval``
extra), prints the figures as JSON and stores them under ``"evaluation"`` in
``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from camera_pl.data import TextDataModule
from camera_pl.eval.evaluation import perplexity, unigram_perplexity
from camera_pl.eval.harness import OFFLINE_TASKS, evaluate as evaluate_tasks
from camera_pl.reference import DEFAULT_REFERENCE, REFERENCE_MODELS, reference_model, reference_spec
from camera_pl.reference.train import config_summary


def evaluate(name: str, weights_dir: Path | None, block_size: int, batch_size: int, n_examples: int) -> dict:
    """Figures of reference model ``name`` (from ``weights_dir`` if given; run in float32 from the bf16 weights)."""
    start = time.time()
    model, tokenizer = reference_model(name, torch.float32, weights_dir)
    corpus = reference_spec(name).corpus
    dm = TextDataModule(tokenizer, block_size=block_size, batch_size=batch_size, corpus=corpus)
    dm.setup()
    figures: dict = {
        "test_perplexity": perplexity(model, dm.test_dataloader()),
        "unigram_perplexity": unigram_perplexity(dm.train_dataloader(), dm.test_dataloader(), len(tokenizer)),
        "test_blocks": len(dm.splits["test"]),
        "block_size": block_size,
    }
    figures.update(evaluate_tasks(model, tokenizer, OFFLINE_TASKS, limit=n_examples, batch_size=batch_size,
                                  corpus=corpus))
    figures["chance_accuracy"] = 0.25
    figures["model_config"] = config_summary(model.config)
    figures["eval_wall_minutes"] = round((time.time() - start) / 60, 2)
    return figures


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default=DEFAULT_REFERENCE)
    parser.add_argument("--weights", type=Path, help="directory written by the train script (default: the shipped one)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--examples", type=int, default=400, help="examples per multiple-choice task (at most)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = evaluate(args.model, args.weights, args.block_size, args.batch_size, args.examples)
    metrics_path = (args.weights or reference_spec(args.model).weights_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["evaluation"] = figures
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
