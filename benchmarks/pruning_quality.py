"""CAMERA-P against every pruning baseline on both reference models.

For each reference model (``--models``, default both: the 16-expert top-2 one and the
fine-grained 64-expert top-6 one, each with its own corpus' splits), statistics are
collected once on the dense model (validation split), with the
gradient pass HEAPr needs (``--heapr-mode``, default ``auto``: the full curvature at this size); each
method prunes a fresh copy at 20/40/60% and is scored on the held-out test split:
perplexity, the two offline multiple-choice tasks (next_line, docstring_match; accuracy, scored
by lm-eval through camera_pl.evaluate) and the
median CPU forward latency of one evaluation batch, all measured in this one run. Micro-
level methods remove floor(ratio x micro-experts) per layer; expert-level methods remove
round(ratio x E) experts per layer — the table lists the expert parameters each removed,
so unequal counts are visible. Writes benchmarks/results/pruning_quality_<model>.md (or
``--out``, with ``{model}`` in it).

    python benchmarks/pruning_quality.py [--models NAME ...] [--ratios 0.2 0.4 0.6] [--eval-batches 24] [--examples 200]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from camera_pl import collect_stats, evaluate as evaluate_tasks, prune
from camera_pl.data import TextDataModule
from camera_pl.eval.evaluation import perplexity
from camera_pl.reference import REFERENCE_MODELS, reference_model, reference_spec

METHODS = [  # (label, method, allocation)
    ("CAMERA-P layer", "camera", "layer"),
    ("CAMERA-P expert", "camera", "expert"),
    ("CAMERA-P global", "camera", "global"),
    ("HEAPr layer", "heapr", "layer"),
    ("HEAPr global", "heapr", "global"),
    ("magnitude", "magnitude", "layer"),
    ("activation", "activation", "layer"),
    ("random", "random", "layer"),
    ("frequency", "frequency", "layer"),
    ("REAP", "reap", "layer"),
    ("EAN", "ean", "layer"),
    ("NAEE", "naee", "layer"),
]
TASKS = ["next_line", "docstring_match"]  # camera_pl's offline tasks, scored by lm-eval
RESULTS = Path(__file__).parent / "results"


def latency(model, batch, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():
        model(**batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(model, tokenizer, test, tasks, batch) -> dict[str, float]:
    """``tasks``: keywords of camera_pl.evaluate (limit, corpus) for the offline tasks."""
    row = {"ppl": perplexity(model, test)}
    for name, metrics in evaluate_tasks(model, tokenizer, TASKS, **tasks).items():
        row[name] = metrics["acc"]
    row["ms"] = 1e3 * latency(model, batch)
    row["expert_params"] = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    return row


def run(name: str, args: argparse.Namespace) -> None:
    """Every method at every ratio on reference model ``name``; the table is rewritten after each row."""
    torch.manual_seed(0)
    dense, tokenizer = reference_model(name)
    corpus = reference_spec(name).corpus
    dm = TextDataModule(tokenizer, block_size=128, batch_size=8, corpus=corpus)
    dm.setup()
    calib = [b for _, b in zip(range(args.calib_batches), dm.val_dataloader())]
    test = [b for _, b in zip(range(args.eval_batches), dm.test_dataloader())]
    tasks = {"limit": args.examples, "corpus": corpus}  # tasks from the test split of the model's own corpus
    timing_batch = {k: v for k, v in test[0].items() if k != "labels"}
    stats = collect_stats(dense, calib, heapr_mode=args.heapr_mode)
    base = evaluate(dense, tokenizer, test, tasks, timing_batch)
    header = [
        f"# Pruning quality on reference model {name} ({type(dense).__name__}, {corpus} corpus, "
        f"{len(test)}x{test[0]['input_ids'].numel()} test tokens, {args.examples} examples per task, "
        f"stats from {stats.tokens} validation tokens, HEAPr curvature {args.heapr_mode}, CPU latency = median of 3 forwards of one 8x128 batch)",
        "",
        "| method | pruned | perplexity | next_line acc | docstring_match acc | expert params | CPU ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("dense", "-", base)]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out.format(model=name)
    for ratio in args.ratios:
        for label, method, allocation in METHODS:
            if label not in args.methods:
                continue
            model = copy.deepcopy(dense)
            kw = {"calib_dataloader": calib} if method == "naee" else {}
            prune(model, None if method == "naee" else stats, ratio, method=method, allocation=allocation, **kw)
            rows.append((label, f"{int(ratio * 100)}%", evaluate(model, tokenizer, test, tasks, timing_batch)))
            print(f"{name} {label} {ratio}: {rows[-1][2]}", flush=True)
            lines = header + [
                f"| {label} | {r} | {m['ppl']:.2f} | {m['next_line']:.3f} | {m['docstring_match']:.3f} | "
                f"{m['expert_params']:,} | {m['ms']:.1f} | {base['ms'] / m['ms']:.2f}x |" for label, r, m in rows]
            out.write_text("\n".join(lines) + "\n")  # rewritten after every row: partial runs keep their results
    print(out.read_text())
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCE_MODELS), default=list(REFERENCE_MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=24)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS])
    parser.add_argument("--heapr-mode", default="auto", choices=["full", "diag", "auto"])
    parser.add_argument("--out", default="pruning_quality_{model}.md", help="file name under benchmarks/results/")
    args = parser.parse_args()
    for name in args.models:
        run(name, args)


if __name__ == "__main__":
    main()
