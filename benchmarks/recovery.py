"""How much of CAMERA-P's perplexity gap LoRA recovery closes, per 50 training steps.

On the reference model: statistics from validation batches, CAMERA-P (layer allocation)
at each ratio, then LoRA recovery (rank 8 on attention + expert weights, lr 3e-4, batch
8x128 stdlib train tokens) in chunks of ``--chunk`` steps, each chunk merged before the
next; after every chunk the test perplexity and the fraction of the gap closed,
(pruned - recovered) / (pruned - dense), are printed. One run per ratio. Writes
benchmarks/results/recovery.md.

    python benchmarks/recovery.py [--ratios 0.4 0.6] [--steps 200] [--chunk 50]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from camera_pl import collect_stats, prune
from camera_pl.data import TextDataModule
from camera_pl.eval.evaluation import perplexity
from camera_pl import LoRAConfig, recover
from camera_pl.reference import reference_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, tokenizer = reference_model()
    dm = TextDataModule(tokenizer, block_size=128, batch_size=8)
    dm.setup()
    calib = list(itertools.islice(dm.val_dataloader(), 16))
    test = list(itertools.islice(dm.test_dataloader(), args.eval_batches))
    lines = ["# LoRA recovery after CAMERA-P on the reference model",
             "", f"test perplexity over {args.eval_batches}x1024 tokens; LoRA rank 8, lr {args.lr:g}, chunks of {args.chunk} "
             "steps (each merged), one run per ratio", "",
             "| pruned | steps | perplexity | gap closed |", "|---|---|---|---|"]
    for ratio in args.ratios:
        model, _ = reference_model()
        dense = perplexity(model, test)
        prune(model, collect_stats(model, calib), ratio)
        pruned = perplexity(model, test)
        lines.append(f"| {int(ratio * 100)}% | 0 | {pruned:.2f} (dense {dense:.2f}) | 0% |")
        train = iter(dm.train_dataloader())
        for done in range(args.chunk, args.steps + 1, args.chunk):
            batches = list(itertools.islice(train, args.chunk))
            model = recover(model, batches, LoRAConfig(rank=8, steps=args.chunk, lr=args.lr), accelerator="cpu")
            ppl = perplexity(model, test)
            lines.append(f"| {int(ratio * 100)}% | {done} | {ppl:.2f} | {100 * (pruned - ppl) / (pruned - dense):.0f}% |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
