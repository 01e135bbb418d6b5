"""LoRA recovery on the LM loss against knowledge-distillation (KD) recovery, after CAMERA-P and CAMERA-Q.

On a reference model (``--model``, a key of ``camera_pl.reference.REFERENCE_MODELS``; its data
is the built-in corpus it was trained on): statistics from validation batches, then each
compression — CAMERA-P (layer allocation) at each ``--ratios`` and CAMERA-Q (RTN, packed) at
each ``--bits`` — followed by LoRA recovery (rank 8 on attention + expert weights; attention only
after quantization, whose packed experts cannot be adapted) in chunks of ``--chunk`` steps, each
chunk merged before the next. Two recoveries per compression and run, identical in everything
(the compressed model, training batches, steps, lr, seed of the adapters' initialisation) but
the loss: ``lm`` (next-token loss) and ``kd`` (``kd_alpha · KL(dense ‖ student)`` at temperature
``--kd-temperature`` ``+ (1 − kd_alpha) · LM``, the teacher a frozen copy of the dense model).
After every chunk the test perplexity and the fraction of the compression's gap closed,
(compressed − recovered) / (compressed − dense), are printed as mean ± std over ``--runs`` runs
(seeds 0..runs−1: the adapters' initialisation and the training batches' order).

    python benchmarks/recovery.py [--model qwen3-moe-16x2] [--ratios 0.4 0.6] [--bits 2.5] [--steps 200]
                                  [--chunk 50] [--runs 3] [--save]

``--save`` writes the printed table, with the command line, to
``benchmarks/results/recovery_kd_<model>.md``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import statistics
import sys
from pathlib import Path

import torch

from camera_pl import LoRAConfig, collect_stats, prune, quantize, recover
from camera_pl.data import TextDataModule
from camera_pl.distill import frozen_copy
from camera_pl.eval.evaluation import perplexity
from camera_pl.reference import DEFAULT_REFERENCE, REFERENCE_MODELS, reference_model, reference_spec

RESULTS = Path(__file__).parent / "results"
MODES = ("lm", "kd")


def _compress(model, stats, calib, setting: tuple[str, float]) -> None:
    kind, amount = setting
    if kind == "prune":
        prune(model, stats, amount)
    else:
        quantize(model, stats, method="camera", avg_bits=amount, calib_dataloader=calib)


def _label(setting: tuple[str, float]) -> str:
    kind, amount = setting
    return f"CAMERA-P {amount:.0%}" if kind == "prune" else f"CAMERA-Q {amount:g} bits"


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_REFERENCE, choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.4, 0.6])
    parser.add_argument("--bits", type=float, nargs="*", default=[2.5])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--eval-batches", type=int, default=12)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--max-documents", type=int, default=None, help="per split, for quick checks")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--kd-alpha", type=float, default=1.0)
    parser.add_argument("--save", action="store_true", help="write results/recovery_kd_<model>.md")
    args = parser.parse_args()
    if args.steps % args.chunk:
        parser.error(f"--steps {args.steps} is no multiple of --chunk {args.chunk}")
    spec = reference_spec(args.model)
    _, tokenizer = reference_model(args.model)
    dm = TextDataModule(tokenizer, block_size=128, batch_size=8, corpus=spec.corpus, max_documents=args.max_documents)
    dm.setup()
    calib = list(itertools.islice(dm.val_dataloader(), args.calib_batches))
    test = list(itertools.islice(dm.test_dataloader(), args.eval_batches))
    train = list(itertools.islice(itertools.cycle(dm.train_dataloader()), args.steps))
    settings = [("prune", r) for r in args.ratios] + [("quantize", b) for b in args.bits]
    tokens = sum(int(b["attention_mask"].sum()) for b in test)
    lines = [f"# LM-loss vs KD LoRA recovery on {args.model} ({spec.description})", "",
             f"`python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             f"test perplexity over {len(test)} batches ({tokens} tokens) of the {spec.corpus!r} corpus; LoRA rank 8, "
             f"lr {args.lr:g}, {args.steps} steps of 8x128 tokens in chunks of {args.chunk} (each merged); KD: "
             f"T={args.kd_temperature:g}, kd_alpha={args.kd_alpha:g}, teacher the dense model; mean ± std over "
             f"{args.runs} run(s) (seeds 0..{args.runs - 1})", "",
             "| compression | recovery | steps | perplexity | gap closed | runs |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    dense_model, _ = reference_model(args.model)
    dense = perplexity(dense_model, test)
    stats = collect_stats(dense_model, calib)
    teacher = frozen_copy(dense_model)
    for setting in settings:
        compressed_model = copy.deepcopy(dense_model)
        _compress(compressed_model, stats, calib, setting)
        compressed = perplexity(compressed_model, test)
        lines.append(f"| {_label(setting)} | none | 0 | {compressed:.2f} (dense {dense:.2f}) | 0% | 1 |")
        print(lines[-1], flush=True)
        for mode in MODES:
            ppl = {done: [] for done in range(args.chunk, args.steps + 1, args.chunk)}
            for seed in range(args.runs):
                model = copy.deepcopy(compressed_model)
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
                batches = [train[i] for i in order]
                torch.manual_seed(seed)
                options = dict(distill=True, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha) \
                    if mode == "kd" else {}
                for done in ppl:
                    config = LoRAConfig(rank=8, steps=args.chunk, lr=args.lr, **options)
                    model = recover(model, batches[done - args.chunk:done], config, accelerator="cpu",
                                    teacher=teacher if mode == "kd" else None)
                    ppl[done].append(perplexity(model, test))
            for done, values in ppl.items():
                closed = [100 * (compressed - p) / (compressed - dense) for p in values]
                lines.append(f"| {_label(setting)} | {mode} | {done} | {_mean_std(values, '.2f')} | "
                             f"{_mean_std(closed, '.0f')}% | {len(values)} |")
                print(lines[-1], flush=True)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"recovery_kd_{args.model}.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
