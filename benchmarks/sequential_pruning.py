"""One-shot against sequential calibration for CAMERA-P, on both reference models.

One-shot: statistics of the dense model, every layer pruned from them. Sequential
(``PruneConfig.sequential``, as CAMERA's published numbers are produced): layer l's
statistics are collected after layers 0..l-1 were pruned, so each layer is scored on the
inputs it will see. Both use the same calibration batches (validation split) and
per-layer allocation; each pruned copy is scored on the test split (perplexity and mean
KL of next-token distributions from the dense model). One run per row; the data decide
``PruneConfig.sequential``'s default.

    python benchmarks/sequential_pruning.py [--models NAME ...] [--ratios 0.4 0.6] [--methods camera heapr]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from camera_pl import collect_stats, prune
from camera_pl.data import TextDataModule
from camera_pl.eval.evaluation import mean_kl, perplexity
from camera_pl.reference import REFERENCE_MODELS, reference_model, reference_spec

OUT = Path(__file__).parent / "results" / "sequential_pruning.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCE_MODELS), default=list(REFERENCE_MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--methods", nargs="+", default=["camera"])
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=24)
    args = parser.parse_args()
    lines = ["# CAMERA-P: one-shot vs sequential calibration", "",
             f"Layer allocation; calibration {args.calib_batches} validation batches of 8 x 128 tokens, test "
             f"{args.eval_batches} batches of 8 x 128 tokens; one run per row.", "",
             "| model | method | pruned | calibration | perplexity | KL vs dense | prune s |", "|---|---|---|---|---|---|---|"]
    for name in args.models:
        torch.manual_seed(0)
        dense, tokenizer = reference_model(name)
        dm = TextDataModule(tokenizer, block_size=128, batch_size=8, corpus=reference_spec(name).corpus)
        calib = [b for _, b in zip(range(args.calib_batches), dm.val_dataloader())]
        test = [b for _, b in zip(range(args.eval_batches), dm.test_dataloader())]
        with torch.no_grad():
            base = [dense(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in test]
        lines.append(f"| {name} | dense | - | - | {perplexity(dense, test):.3f} | 0 | - |")
        stats = collect_stats(dense, calib)
        for method in args.methods:
            for ratio in args.ratios:
                for sequential in (False, True):
                    model = copy.deepcopy(dense)
                    start = time.perf_counter()
                    prune(model, None if sequential else stats, ratio, method=method, allocation="layer",
                          sequential=sequential, calib_dataloader=calib)
                    seconds = time.perf_counter() - start
                    lines.append(f"| {name} | {method} | {ratio:.0%} | {'sequential' if sequential else 'one-shot'} "
                                 f"| {perplexity(model, test):.3f} | {mean_kl(base, model, test):.3e} | {seconds:.1f} |")
                    print(lines[-1], flush=True)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
