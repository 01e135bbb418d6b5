"""Cost of observing micro-expert statistics during a validation pass.

Runs the same validation batches through a small Qwen3-MoE three ways, interleaved,
and prints medians over repeated runs plus their ratios:
  default   transformers' default experts kernels (grouped_mm on CPU/CUDA), no observation
  camera_pl camera_pl's experts implementation, no observation
  observed  camera_pl's implementation with statistics collection (what the callback does)
Also prints the statistics' memory against the model's.

    python benchmarks/stats_overhead.py [--device cuda] [--dtype bfloat16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from camera_pl import collect_stats
from camera_pl.stats.observation import observe


def build(args, dtype: torch.dtype) -> torch.nn.Module:
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            moe_intermediate_size=args.inter, num_hidden_layers=args.layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_pass(model, batches, device, observed: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        if observed:
            with observe(model) as obs:
                for b in batches:
                    obs.set_attention_mask(b["attention_mask"], b["input_ids"])
                    model(**b, use_cache=False)
        else:
            for b in batches:
                model(**b, use_cache=False)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args, dtype)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 4096, (args.batch_size, args.seq), generator=gen).to(args.device),
                "attention_mask": torch.ones(args.batch_size, args.seq, dtype=torch.long, device=args.device)}
               for _ in range(args.batches)]
    default_impl = model.config._experts_implementation
    times: dict[str, list[float]] = {"default": [], "camera_pl": [], "observed": []}
    run_pass(model, batches[:1], args.device, observed=False)  # warm-up
    for _ in range(args.repeats):
        model.set_experts_implementation(default_impl)
        times["default"].append(run_pass(model, batches, args.device, observed=False))
        model.set_experts_implementation("camera_pl")
        times["camera_pl"].append(run_pass(model, batches, args.device, observed=False))
        model.set_experts_implementation(default_impl)
        times["observed"].append(run_pass(model, batches, args.device, observed=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batches * args.batch_size * args.seq
    stats = collect_stats(model, batches[:1])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"stats_overhead: Qwen3-MoE {args.layers} layers x {args.experts} experts (I={args.inter}, H={args.hidden}, "
          f"top-{args.top_k}), {args.dtype} on {args.device}, "
          f"{tokens} tokens per validation pass, median of {args.repeats} interleaved runs "
          f"(default experts implementation: {default_impl})")
    for name, value in med.items():
        print(f"  {name:10s} {value * 1e3:9.1f} ms  ({tokens / value:,.0f} tok/s)")
    print(f"  ratio observed / default   = {med['observed'] / med['default']:.3f}")
    print(f"  ratio observed / camera_pl = {med['observed'] / med['camera_pl']:.3f}  (observation alone)")
    print(f"  statistics: {stats.nbytes() / 1024:.1f} KiB vs model {model_bytes / 2**20:.1f} MiB "
          f"({100 * stats.nbytes() / model_bytes:.2f}%)")


if __name__ == "__main__":
    main()
