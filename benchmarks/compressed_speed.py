"""Prefill speed, compression time and stored bytes of compressed MoE models against the dense bf16 model.

One random bf16 Qwen3-MoE model (``camera_pl.testing.tiny_moe`` with the given sizes) and five
variants of it: dense, CAMERA-Q at 2.5 average bits, uniform 4 bits (both RTN, packed),
CAMERA-P 40% with the ``layer`` allocation (unequal widths: ragged experts) and with the
``expert`` allocation (the same fraction from every expert: fused experts). The CAMERA-Q
model also runs (``--loop``) through the per-expert dequantizing loop (the forward used when
an experts kind offers no grouped weights) for comparison. Statistics come
from random tokens. Prefill is one no-grad forward over ``--tokens`` tokens; the median of
``--runs`` forwards per model, models interleaved, after one warm-up forward each.
Compression time is one run. Stored bytes count every parameter and buffer of the model
(``model bytes``) and of its routed experts alone (``expert bytes``).

    python benchmarks/compressed_speed.py                     # small default size (a few minutes on 2 cores)
    python benchmarks/compressed_speed.py --hidden 2048 --experts 128 --width 768 --top-k 8 --layers 2 --no-loop
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import time

import torch

from camera_pl import collect_stats, moe_layers, prune, quantize
from camera_pl.testing import tiny_moe


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``module``."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())}
    return sum(seen.values())


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=192, help="moe_intermediate_size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="prefill tokens (batch of 4 sequences)")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True,
                        help="also time CAMERA-Q through the per-expert loop (slow at large sizes)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dims = dict(hidden_size=args.hidden, moe_intermediate_size=args.width, num_experts=args.experts,
                num_experts_per_tok=args.top_k, num_hidden_layers=args.layers, num_attention_heads=8,
                num_key_value_heads=4, head_dim=args.hidden // 8, intermediate_size=args.width,
                max_position_embeddings=args.tokens)
    dense = tiny_moe("qwen3_moe", dtype=torch.bfloat16, **dims)
    gen = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    calib = [{"input_ids": torch.randint(3, vocab, (4, args.calib_tokens // 16), generator=gen)} for _ in range(4)]
    batch = {"input_ids": torch.randint(3, vocab, (4, args.tokens // 4), generator=gen)}

    start = time.perf_counter()
    stats = collect_stats(dense, calib)
    stats_s = time.perf_counter() - start

    builds = {
        "CAMERA-Q 2.5 bits": lambda m: quantize(m, stats, method="camera", avg_bits=2.5),
        "uniform 4 bits": lambda m: quantize(m, method="uniform", avg_bits=4),
        "CAMERA-P 40% layer (ragged)": lambda m: prune(m, stats, 0.4, allocation="layer"),
        "CAMERA-P 40% expert (fused)": lambda m: prune(m, stats, 0.4, allocation="expert"),
    }
    models, build_s, rss = {"dense bf16": dense}, {"dense bf16": 0.0}, {"dense bf16": peak_rss_gb()}
    for name, build in builds.items():
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        with torch.no_grad():
            build(model)
        build_s[name], rss[name] = time.perf_counter() - start, peak_rss_gb()
        models[name] = model
        print(f"built {name} in {build_s[name]:.1f} s (peak RSS so far {rss[name]:.2f} GB)", flush=True)

    if args.loop:  # the per-expert dequantizing loop, for comparison
        looped = copy.deepcopy(models["CAMERA-Q 2.5 bits"])
        for layer in moe_layers(looped):
            layer.module.grouped_weights = lambda x: None
        name = "CAMERA-Q 2.5 bits, per-expert loop"
        models[name], build_s[name], rss[name] = looped, build_s["CAMERA-Q 2.5 bits"], rss["CAMERA-Q 2.5 bits"]

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(**batch)
        for _ in range(args.runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)

    base_t = statistics.median(times["dense bf16"])
    base_model, base_experts = tensor_bytes(dense), sum(tensor_bytes(layer.module) for layer in moe_layers(dense))
    print(f"\nqwen3_moe bf16: hidden {args.hidden}, {args.experts} experts of width {args.width}, top-{args.top_k}, "
          f"{args.layers} layers; prefill {batch['input_ids'].numel()} tokens, median of {args.runs} forwards "
          f"(interleaved, 1 warm-up); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; statistics took {stats_s:.1f} s\n")
    print("| model | experts kind | prefill ms | x dense | compress s | peak RSS GB | expert bytes | x dense | "
          "model bytes | x dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        t = statistics.median(times[name])
        experts = sum(tensor_bytes(layer.module) for layer in moe_layers(model))
        total = tensor_bytes(model)
        kind = moe_layers(model)[0].experts.kind
        print(f"| {name} | {kind} | {t * 1e3:.0f} | {t / base_t:.2f} | {build_s[name]:.1f} | {rss[name]:.2f} | "
              f"{experts} | {experts / base_experts:.3f} | {total} | {total / base_model:.3f} |")


if __name__ == "__main__":
    main()
