"""Peak memory of layer-by-layer statistics collection against the in-memory path and the model size.

    python benchmarks/offload_memory.py                 # CPU, see below
    python benchmarks/offload_memory.py --device cuda   # device memory

The model is a random Qwen3-MoE (``camera_pl.testing.tiny_moe``) at a realistic layer size (default:
hidden 2048, 128 experts of width 768, top-8, bf16, 4 layers). Both paths run ``collect_stats`` on
the same calibration batches.

* ``--device cuda`` (any accelerator): the in-memory path moves the model to the device, the
  layer-by-layer path keeps it on CPU (``offload=device``); each figure is
  ``torch.<device>.max_memory_allocated`` over the call, weights included.
* CPU: there is no separate device memory, so the figure is what the path needs on its execution
  device: the weights it keeps there (the whole model in memory; the largest decoder layer, or the
  modules before the layers while caching, layer by layer) plus the peak of tensor memory allocated
  during the call, from torch.profiler's CPU allocation events (activations, cached hidden states,
  statistics). The cached hidden states stay on the execution device (``cache_device`` unset).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from camera_pl import collect_stats
from camera_pl.arch.adapters import decoder_layers, outer_modules
from camera_pl.offload import OffloadConfig
from camera_pl.testing import tiny_moe

GIB = 1024**3


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cpu_allocation_peak(fn) -> int:
    """Peak of live tensor bytes allocated while ``fn`` runs (profiler allocation/free events in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def device_peak(device: torch.device, fn) -> int:
    module = getattr(torch, device.type)
    module.synchronize()
    module.reset_peak_memory_stats()
    fn()
    module.synchronize()
    return module.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--expert-width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)

    start = time.perf_counter()
    model = tiny_moe("qwen3_moe", hidden_size=args.hidden, moe_intermediate_size=args.expert_width,
                     num_experts=args.experts, num_experts_per_tok=args.top_k, num_hidden_layers=args.layers,
                     intermediate_size=4 * args.hidden, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                     vocab_size=32000, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 32000, (args.batch_size, args.seq), generator=gen),
                "attention_mask": torch.ones(args.batch_size, args.seq, dtype=torch.long)} for _ in range(args.batches)]
    model_bytes = nbytes([*model.parameters(), *model.buffers()])
    layer_bytes = max(nbytes([*layer.parameters(), *layer.buffers()]) for layer in decoder_layers(model))
    outer_bytes = sum(nbytes([*m.parameters(recurse=False), *m.buffers(recurse=False)]) for m in outer_modules(model))
    tokens = args.batches * args.batch_size * args.seq
    print(f"model: qwen3_moe bf16, {args.layers} layers, hidden {args.hidden}, {args.experts} experts x "
          f"{args.expert_width}, top-{args.top_k}; built in {time.perf_counter() - start:.0f}s")
    print(f"calibration: {args.batches} batches x {args.batch_size} x {args.seq} = {tokens} tokens; "
          f"device {device}\n")

    offload = OffloadConfig(execution_device=str(device))
    timings = {}

    def run(name, fn):
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start

    if device.type == "cpu":
        label = "weights kept on the execution device + profiler peak of tensors allocated during the call"
        full = model_bytes + cpu_allocation_peak(lambda: run("in memory", lambda: collect_stats(model, batches)))
        layerwise = max(layer_bytes, outer_bytes) + cpu_allocation_peak(
            lambda: run("layer by layer", lambda: collect_stats(model, batches, offload=offload)))
    else:
        label = f"torch.{device.type}.max_memory_allocated over the call, weights included"
        layerwise = device_peak(device, lambda: run("layer by layer", lambda: collect_stats(model, batches,
                                                                                              offload=offload)))
        model.to(device)
        full = device_peak(device, lambda: run("in memory", lambda: collect_stats(
            model, [{k: v.to(device) for k, v in b.items()} for b in batches])))

    print(f"peak memory ({label}):\n")
    print("| | GiB | vs model size |")
    print("|---|---|---|")
    print(f"| model size (parameters and buffers) | {model_bytes / GIB:.3f} | 1.00 |")
    print(f"| largest decoder layer | {layer_bytes / GIB:.3f} | {layer_bytes / model_bytes:.2f} |")
    print(f"| in-memory collect_stats | {full / GIB:.3f} | {full / model_bytes:.2f} |")
    print(f"| layer-by-layer collect_stats | {layerwise / GIB:.3f} | {layerwise / model_bytes:.2f} |")
    print("\n" + ", ".join(f"{name}: {seconds:.1f}s" for name, seconds in timings.items()) + " (one run each)")


if __name__ == "__main__":
    main()
