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
from camera_pl.observation import observe


def build(device: str, dtype: torch.dtype) -> torch.nn.Module:
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=16, num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


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
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
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
    print(f"stats_overhead: Qwen3-MoE 4 layers x 16 experts (I=128, H=256), {args.dtype} on {args.device}, "
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
