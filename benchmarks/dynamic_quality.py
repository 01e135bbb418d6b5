"""Quality and cost of dynamic expert reduction: full top-k, naive top-k/2, ODP, compressed experts.

Run ``python benchmarks/dynamic_quality.py [--model NAME] [--weights DIR]``. On camera_pl's reference model
(``camera_pl.reference.reference_model``, stdlib-corpus data from ``camera_pl.data``) when its
weights exist, else on a tiny random ``qwen3_moe`` with random tokens (then only the cost
columns mean anything). Rows:

* full top-k — the model as trained;
* naive top-k/2 — each token keeps only its ``k/2`` highest-weight experts, with their
  original weights (computed as compressed experts at θ = 1, which is exactly that) or
  rescaled to the token's top-k total (what a renormalising router computes at top_k = k/2);
* ODP, weight rule only / with token protection (2%) — thresholds are the calibration
  medians of w1/w0 from ``collect_stats`` on training batches;
* compressed experts (``k_main = k/2``) after a short finetune of the θ vectors only, and of
  all parameters; "full top-k, same finetune" is the control for the latter.

Columns: test perplexity; routed-expert weight elements activated per token (summed over MoE
layers; ODP's are measured, the others follow from top-k and the expert widths); forward time
of one evaluation batch, median of ``--runs`` timed runs after one warm-up, all rows timed
round-robin with camera_pl's per-expert experts implementation (the one ODP runs). Writes one Markdown
table to ``benchmarks/results/dynamic_quality.md``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from camera_pl import collect_stats, moe_layers
from camera_pl.expert_compression import compress_experts, routed_parameters_per_token
from camera_pl.odp import apply_odp
from camera_pl.eval.evaluation import perplexity
from camera_pl.lightning.module import CausalLMModule

RESULTS = Path(__file__).resolve().parent / "results" / "dynamic_quality.md"


def load_setup(args: argparse.Namespace) -> tuple[nn.Module, list[dict], list[dict], str]:
    """``(model, train batches, test batches, description)``: the reference model if present, else a tiny one."""
    try:
        from camera_pl.data import TextDataModule
        from camera_pl.reference import reference_model, reference_spec

        model, tokenizer = reference_model(args.model, torch.float32, args.weights)
    except (ImportError, FileNotFoundError) as err:
        print(f"reference model unavailable ({err}); falling back to a tiny random qwen3_moe on random tokens")
        return tiny_setup(args)
    corpus = reference_spec(args.model).corpus
    dm = TextDataModule(tokenizer, block_size=args.block_size, batch_size=args.batch_size,
                        max_documents=args.max_documents, corpus=corpus)
    dm.setup("fit")
    dm.setup("test")
    train = [b for _, b in zip(range(args.finetune_steps + args.calib_batches), dm.train_dataloader())]
    test = [b for _, b in zip(range(args.eval_batches), dm.test_dataloader())]
    source = f"camera_pl's reference model {args.model}" + ("" if args.weights is None else f" from {args.weights}")
    return model, train, test, f"{source} ({corpus}-corpus test split, {args.max_documents} documents per split)"


def tiny_setup(args: argparse.Namespace) -> tuple[nn.Module, list[dict], list[dict], str]:
    from camera_pl.testing import tiny_moe

    model = tiny_moe("qwen3_moe", num_experts_per_tok=4, max_position_embeddings=args.block_size)
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict:
        ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.block_size), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    train = [batch() for _ in range(args.finetune_steps + args.calib_batches)]
    return model, train, [batch() for _ in range(args.eval_batches)], "tiny random qwen3_moe (top-4), random tokens"


@torch.no_grad()
def forward_ms(models: dict[str, nn.Module], batch: dict, runs: int) -> dict[str, float]:
    """Median wall time (ms) of one forward of ``batch`` per model, timed round-robin so load noise is shared."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()(**inputs)  # warm-up
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model(**inputs)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def keep_top(model: nn.Module, keep: int) -> None:
    """Naive top-``keep`` with renormalisation: each token's ``keep`` highest-weight slots, rescaled to the top-k total.

    (What the router itself computes at ``top_k = keep`` when it renormalises top-k weights.) Dropped
    slots get the sentinel index ``num_experts``, which camera_pl's experts implementation skips.
    """
    def hook(module: nn.Module, args: tuple, output: tuple, sentinel: int) -> tuple:
        logits, weights, index = output[:3]
        drop = weights.argsort(-1, descending=True).argsort(-1) >= keep
        kept = weights.masked_fill(drop, 0)
        kept = kept * weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
        return (logits, kept, index.masked_fill(drop, sentinel), *output[3:])

    for layer in moe_layers(model):
        layer.router.register_forward_hook(partial(hook, sentinel=layer.num_experts))


def finetune(model: nn.Module, batches: list[dict], lr: float) -> None:
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(CausalLMModule(model, lr=lr), train_dataloaders=loader)
    model.eval()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-moe-16x2", help="reference model name (camera_pl.reference)")
    parser.add_argument("--weights", type=Path, default=None, help="reference weights directory (default: shipped)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-documents", type=int, default=400, help="documents per split (tokenisation time)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate of all-parameter finetunes")
    parser.add_argument("--lr-vectors", type=float, default=1e-2, help="learning rate of θ-only finetunes")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per row")
    parser.add_argument("--protect-ratio", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    base, train, test, what = load_setup(args)
    calib, tune = train[: args.calib_batches], train[args.calib_batches:]
    k = base.config.num_experts_per_tok
    tokens = sum(int(b["attention_mask"].sum()) for b in test)
    print(f"measuring on {what}: {len(test)} test batches ({tokens} tokens), top-{k}, {args.runs} timed runs per row, "
          f"{args.threads} threads, finetunes of {len(tune)} steps")
    stats = collect_stats(base, calib)
    base.set_experts_implementation("camera_pl")  # every row runs one matmul pair per hit expert, as ODP does
    k_main = max(1, k // 2)
    models: dict[str, nn.Module] = {f"full top-{k}": base}
    models[f"naive top-{k_main}, original weights"] = naive = copy.deepcopy(base)
    compress_experts(naive)  # θ = 1: exactly the top-k_main slots with their original weights
    models[f"naive top-{k_main}, renormalised to the top-{k} total"] = renormalised = copy.deepcopy(base)
    keep_top(renormalised, k_main)
    handles = {}
    odp = (("ODP, weight rule only", 0.0), (f"ODP + token protection ({args.protect_ratio:.0%})", args.protect_ratio))
    for name, ratio in odp:
        models[name] = copy.deepcopy(base)
        handles[name] = apply_odp(models[name], stats, protect_ratio=ratio)
    for trainable in ("vectors", "all"):
        models[f"compressed k_main={k_main}, finetune {trainable}"] = model = copy.deepcopy(base)
        compress_experts(model, trainable=trainable)
        finetune(model, tune, args.lr_vectors if trainable == "vectors" else args.lr)
    models[f"full top-{k}, same finetune (all)"] = control = copy.deepcopy(base)
    finetune(control, tune, args.lr)
    rows = []
    for name, model in models.items():
        ppl = perplexity(model, test)
        if name in handles:
            params = handles[name].activated_params_per_token()[0]
            name = f"{name}: {handles[name].skipped_fraction():.1%} of expert calls skipped"
        elif model is naive or model is renormalised:
            params = routed_parameters_per_token(base) * k_main / k
        else:
            params = routed_parameters_per_token(model)
        rows.append([name, ppl, params])
    for row, ms in zip(rows, forward_ms(models, test[0], args.runs).values()):
        row.append(ms)
        print(f"{row[0]:<58} ppl {row[1]:9.3f}  routed params/token {row[2]:12.0f}  forward {ms:8.1f} ms")

    lines = [
        "# Dynamic expert reduction: quality and cost",
        "",
        f"Measured by `benchmarks/dynamic_quality.py` on {what}: perplexity over {len(test)} test batches "
        f"({tokens} tokens, block {args.block_size}); forward time of one {args.batch_size}×{args.block_size} batch, "
        f"median of {args.runs} round-robin runs after a warm-up, camera_pl experts implementation, "
        f"{args.threads} CPU threads (shared machine: times are noisy); "
        f"ODP thresholds = calibration medians of w1/w0 over {len(calib)} training batches; finetunes: {len(tune)} "
        f"steps of AdamW, lr {args.lr_vectors} (θ only) / {args.lr} (all parameters). Routed params/token: "
        "routed-expert weight elements activated per token, "
        "summed over MoE layers (ODP: measured).",
        "",
        "| method | perplexity | routed params/token | forward ms |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {ppl:.3f} | {params:,.0f} | {ms:.1f} |" for name, ppl, params, ms in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
