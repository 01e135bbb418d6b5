"""Quality of mixed-precision expert quantization at 2.0 / 2.5 / 3.0 average bits.

For each budget and allocation method (CAMERA-Q with its measured costs — in the loss metric and
in the layer output —, with the proxy cost, and with the proxy cost on HEAPr's score; pmq,
uniform, matrix, channel) the experts
of a fresh copy of the model are quantized (RTN, and GPTQ with ``--gptq``) and packed;
the script measures test perplexity, the mean KL divergence of next-token distributions
from the unquantized model, and the packed routed-expert bytes (scales, zeros and bit maps
included). Uniform quantization has no 2.5-bit point.

Models: both reference models (``--models``; `camera_pl.reference.REFERENCE_MODELS`: the
16-expert top-2 Qwen3-MoE and the fine-grained 64-expert top-6 Qwen2-MoE), each on its own
corpus' validation (calibration) and test splits; with ``--fallback`` a small byte-level
Qwen3-MoE trained by this script for ``--steps`` steps on stdlib files instead. Writes
``benchmarks/results/quant_quality_<model>.md`` per model.

Run: ``python benchmarks/quant_quality.py [--gptq] [--models NAME ...] [--methods ...] [--budgets ...]``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from camera_pl import collect_stats, moe_layers
from camera_pl.eval.evaluation import mean_kl, perplexity
from camera_pl import quantize

BUDGETS = (2.0, 2.25, 2.5, 3.0)
METHODS = ("camera@loss", "camera@output", "camera@proxy", "camera:heapr@proxy", "pmq", "uniform", "matrix", "channel")
"""Bit allocations compared, as ``method[:score][@cost]``: ``camera@loss`` / ``camera@output`` / ``camera@proxy`` is
CAMERA-Q with that ``cost`` (``loss`` is what ``auto`` picks here); ``camera:heapr@proxy`` ranks micro-experts by
HEAPr's score instead of CAMERA's."""
RESULTS = Path(__file__).parent / "results"


def reference_setup(name: str, batches: int, test_batches: int, block: int):
    """(model, calibration batches, test batches, description) for reference model ``name``."""
    from camera_pl.data import TextDataModule
    from camera_pl.reference import reference_model, reference_spec

    model, tokenizer = reference_model(name)
    corpus = reference_spec(name).corpus
    data = TextDataModule(tokenizer, block_size=block, batch_size=4, max_documents=200, corpus=corpus)
    calib = [b for _, b in zip(range(batches), data.val_dataloader())]
    test = [b for _, b in zip(range(test_batches), data.test_dataloader())]
    return model, calib, test, f"camera_pl reference model {name} ({model.config.model_type}), {corpus} corpus"


def byte_setup(batches: int, test_batches: int, block: int, steps: int):
    """Fallback when no reference weights exist: a small byte-level Qwen3-MoE trained here for ``steps`` steps."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from camera_pl.data import stdlib_corpus

    def tokens(split: str, limit: int) -> torch.Tensor:
        data = b"".join(p.read_bytes() for p in stdlib_corpus(split)[:limit])
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                            num_experts=16, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, max_position_embeddings=block, norm_topk_prob=True,
                            output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    train, held_out = tokens("train", 300), tokens("test", 40)
    gen = torch.Generator().manual_seed(0)

    def batch(source: torch.Tensor) -> dict:
        starts = torch.randint(0, source.numel() - block, (4,), generator=gen)
        ids = torch.stack([source[s:s + block] for s in starts.tolist()])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**batch(train)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"  training fallback model: step {step} loss {loss.item():.3f}")
    model.eval()
    calib = [batch(train) for _ in range(batches)]
    test = [batch(held_out) for _ in range(test_batches)]
    return model, calib, test, (f"byte-level Qwen3-MoE (H=128, 2 MoE layers x 16 experts x I=128, top-2) trained "
                                f"{steps} steps here on stdlib train files; held-out stdlib test files")


def run(model, calib, test, what: str, args: argparse.Namespace, out: Path) -> None:
    """Every method x budget x quantizer on one model; the table is rewritten after each row."""
    stats = collect_stats(model, calib, heapr_mode="auto")  # HEAPr's curvature too, for camera:heapr
    with torch.no_grad():
        base_logits = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in test]
    dense_ppl = perplexity(model, test)
    dense_bytes = sum(2 * p.numel() for layer in moe_layers(model) for p in layer.experts.module.parameters())
    rows = [("dense (bytes at bf16)", "-", "16", "16/16", f"{dense_ppl:.3f}", "0", str(dense_bytes), "-")]
    print(f"measured on: {what}; calibration {len(calib)} and test {len(test)} batches of {args.block} tokens")
    print(f"dense: ppl {dense_ppl:.3f}")
    header = ["method", "quantizer", "budget", "avg bits / bits per param", "ppl", "KL vs dense", "expert bytes",
              "quantize s"]
    intro = (f"# Expert quantization quality\n\nModel: {what}. Calibration: {len(calib)} batches, test: {len(test)} "
             f"batches of 4 x {args.block} tokens. Group size 128 (row length where smaller); routed experts packed; "
             "shared experts at the budget rounded half up. `avg bits` = code bits per routed weight; `bits per "
             "param` adds float16 scales, uint8 zeros and the per-row bit map; the budget counts code bits, so layouts "
             "with more scales (the baselines' per-output-row down projections) store more: the `storage-matched` row "
             "gives CAMERA-Q the code bits that store as much as the largest baseline at that budget. One run per "
             "row.\n")
    def measure(label: str, quantizer: str, budget: float, avg_bits: float, cost: str | None) -> float:
        """Quantize a copy at ``avg_bits``, add its row, rewrite the table; returns its stored bits per param."""
        method, _, score = label.partition("@")[0].partition(":")
        q = copy.deepcopy(model)
        start = time.perf_counter()
        report = quantize(q, stats, method=method, avg_bits=avg_bits, quantizer=quantizer, calib_dataloader=calib,
                          **({"cost": cost} if cost else {}), **({"score": score} if score else {}))
        seconds = time.perf_counter() - start
        ppl, kl = perplexity(q, test), mean_kl(base_logits, q, test)
        rows.append((label, quantizer, f"{budget}", f"{report.avg_bits:.3f}/{report.bits_per_param:.3f}",
                     f"{ppl:.3f}", f"{kl:.2e}", str(report.expert_bytes), f"{seconds:.1f}"))
        print(" | ".join(rows[-1]), flush=True)
        lines = [intro, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out.write_text("\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n")
        return report.bits_per_param

    for budget in args.budgets:
        for quantizer in ("rtn", "gptq") if args.gptq else ("rtn",):
            stored = {}
            for label in args.methods:
                method, _, cost = label.partition("@")
                if method == "uniform" and budget != int(budget):
                    continue
                stored[label] = measure(label, quantizer, budget, budget, cost or None)
            # Layouts differ in scale overhead (down rows of a fine-grained expert are short, so their
            # groups are small): CAMERA-Q again at the code bits that store as much as the largest baseline.
            baselines = [v for k, v in stored.items() if not k.startswith("camera")]
            if "camera@loss" in stored and baselines and max(baselines) > stored["camera@loss"]:
                extra = max(baselines) - stored["camera@loss"]
                measure("camera@loss, storage-matched", quantizer, budget, budget + extra, "loss")
    print(f"wrote {out}")


def main() -> None:
    from camera_pl.reference import REFERENCE_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq", action="store_true", help="also run GPTQ (slower)")
    parser.add_argument("--models", nargs="+", choices=sorted(REFERENCE_MODELS), default=list(REFERENCE_MODELS))
    parser.add_argument("--fallback", action="store_true", help="the byte-level fallback model instead")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--steps", type=int, default=400, help="training steps of the fallback model")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches (4 blocks each)")
    parser.add_argument("--test-batches", type=int, default=16, help="test batches (4 blocks each)")
    parser.add_argument("--block", type=int, default=128, help="tokens per block")
    args = parser.parse_args()
    if args.fallback:
        setup = byte_setup(args.batches, args.test_batches, args.block, args.steps)
        run(*setup, args, RESULTS / "quant_quality_fallback.md")
        return
    for name in args.models:
        run(*reference_setup(name, args.batches, args.test_batches, args.block), args,
            RESULTS / f"quant_quality_{name}.md")


if __name__ == "__main__":
    main()
