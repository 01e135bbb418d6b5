"""Forward latency and memory of CAMERA-P-pruned models against the dense model.

Either a Qwen3-MoE with random weights (sizes below; statistics from random tokens), or with
``--reference NAME`` a shipped reference model (statistics from 4 validation batches of its own
corpus, timing on one 8x128 test batch). Copies are pruned at each ``--ratios`` with each
``--allocations`` (`layer`/`global`: ragged experts in width buckets; `expert`: fused layout kept)
and measured side by side in one run: median forward latency over repeated rounds (the models
timed in turns), expert-weight bytes and (on CUDA) peak allocated memory of one forward. Dense
runs with transformers' default experts kernels (grouped_mm) and, as the `camera_pl forward` row,
through camera_pl's experts forward; ragged layers run camera_pl's grouped GEMMs per width bucket.

    python benchmarks/pruning_speed.py [--device cuda] [--dtype bfloat16] [--repeats 10] [--threads 1]
    python benchmarks/pruning_speed.py --reference qwen2-moe-64x6 --ratios 0.4 --allocations layer global
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from camera_pl import collect_stats, prune
from camera_pl.arch.forward import use_camera_experts
from camera_pl.pruning.api import expert_params
from camera_pl.arch.adapters import moe_layers
from camera_pl.reference import REFERENCE_MODELS, reference_model, reference_spec

# CPU bf16: the models timed in turns must not evict each other's oneDNN kernels (see compressed_speed.py).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")


def build(args, dtype) -> torch.nn.Module:
    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            moe_intermediate_size=args.inter, num_hidden_layers=args.layers, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=args.hidden // 8, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).eval()


def measure(models: list[torch.nn.Module], batch, device: str, repeats: int) -> list[float]:
    """Median forward seconds of each model, timed in turns (one forward of each per round), so that load
    drifting during the run (a shared machine) hits every model alike."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model(**batch, use_cache=False)
        for _ in range(repeats):
            for model, t in zip(models, times):
                sync()
                start = time.perf_counter()
                model(**batch, use_cache=False)
                sync()
                t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def peak_memory(model, batch, device: str) -> float | None:
    """Peak MiB allocated by one forward beyond the model (CUDA only, else None)."""
    if not device.startswith("cuda"):
        return None
    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(**batch, use_cache=False)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def reference_setup(args, dtype) -> tuple[torch.nn.Module, dict, list[dict], str]:
    """Reference model ``args.reference`` on ``args.device``, one 8x128 test batch, 4 validation batches."""
    from camera_pl.data import TextDataModule

    model, tokenizer = reference_model(args.reference, dtype=dtype)
    dm = TextDataModule(tokenizer, block_size=128, batch_size=8, corpus=reference_spec(args.reference).corpus)
    dm.setup()
    calib = [{"input_ids": b["input_ids"].to(args.device)} for _, b in zip(range(4), dm.val_dataloader())]
    batch = {"input_ids": next(iter(dm.test_dataloader()))["input_ids"].to(args.device)}
    c = model.config
    title = (f"reference model {args.reference} ({type(model).__name__}: {len(moe_layers(model))} layers x "
             f"{c.num_experts} experts (I={c.moe_intermediate_size}, H={c.hidden_size}, top-{c.num_experts_per_tok})")
    return model.to(args.device), batch, calib, title


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reference", choices=sorted(REFERENCE_MODELS), default=None,
                        help="time a shipped reference model instead of the random Qwen3-MoE below")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--allocations", nargs="+", default=["layer", "expert"], choices=["layer", "global", "expert"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.reference is not None:
        dense, batch, calib, title = reference_setup(args, dtype)
    else:
        dense = build(args, dtype)
        gen = torch.Generator().manual_seed(0)
        batch = {"input_ids": torch.randint(0, 8192, (args.batch, args.seq), generator=gen).to(args.device)}
        calib = [batch]
        title = (f"Qwen3-MoE {args.layers} layers x {args.experts} experts (I={args.inter}, H={args.hidden}, "
                 f"top-{args.top_k})")
    stats = collect_stats(dense, calib)
    camera = copy.deepcopy(dense)
    use_camera_experts(camera)
    models = {("dense", "-"): dense, ("dense", "camera_pl forward"): camera}
    for ratio in args.ratios:
        for allocation in args.allocations:
            model = copy.deepcopy(dense)
            prune(model, stats, ratio, allocation=allocation)
            models[(f"{int(ratio * 100)}%", allocation)] = model
    times = measure(list(models.values()), batch, args.device, args.repeats)
    rows = [(name, alloc, t, peak_memory(model, batch, args.device),
             sum(expert_params(l) for l in moe_layers(model)) * dense.dtype.itemsize)
            for ((name, alloc), model), t in zip(models.items(), times)]
    t_dense = times[0]
    tokens = "x".join(str(d) for d in batch["input_ids"].shape)
    print(f"pruning_speed: {title}, {args.dtype} on {args.device}, {torch.get_num_threads()} thread(s), "
          f"batch {tokens} tokens, median of {args.repeats} forwards each, models timed in turns")
    print("| pruned | allocation | forward ms | speed-up vs dense | expert MiB | peak MiB (CUDA) |")
    print("|---|---|---|---|---|---|")
    for name, alloc, t, m, b in rows:
        peak = "n/a" if m is None else f"{m:.0f}"
        print(f"| {name} | {alloc} | {t * 1e3:.1f} | {t_dense / t:.2f}x | {b / 2**20:.1f} | {peak} |")


if __name__ == "__main__":
    main()
