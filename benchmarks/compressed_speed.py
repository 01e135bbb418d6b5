"""Prefill, decode and training speed, compression time and stored bytes of compressed MoE models vs dense bf16.

One bf16 MoE model — a random Qwen3-MoE (``camera_pl.testing.tiny_moe``) of the given sizes, or with
``--reference NAME`` one of camera_pl's trained reference models — and variants of it: dense
(through transformers' default experts kernel, and through camera_pl's experts forward), CAMERA-Q
at 2.5 average bits, uniform 4 bits (both RTN, packed), CAMERA-P 40% with the ``layer`` allocation
(unequal widths: ragged experts), with the ``expert`` allocation (the same fraction from every
expert: fused experts) and REAP removing 40% of the experts (fused, fewer experts). Where the
low-bit kernels run (CUDA), the CAMERA-Q model is also timed without them (the dequantizing
path); it also runs (``--loop``) through the per-expert dequantizing loop (the forward used when
an experts kind offers no grouped weights) for comparison. Statistics come from random tokens.
The random model has a ``--vocab`` of 8192 tokens by default: random tokens then load the experts
about evenly, as a trained router does (with tiny_moe's 96 tokens the first layer sees a few dozen
distinct inputs, and the experts that CAMERA-P keeps wide are the ones those tokens hit, so a 40%
``layer`` pruning removed only ~20% of the FLOPs that the prefill ran), and its LM head weighs against
the 2 MoE layers' routed experts (~22% of their FLOPs) about what Qwen3-30B-A3B's does against its 48 (~17%).

Prefill is one no-grad forward over ``--tokens`` tokens; the median of ``--runs`` forwards per model,
models interleaved (their order rotated by one place every run), after one warm-up forward each;
"prefill experts" is the time those forwards spend inside the routed experts modules (measured in
``--runs`` further forwards with hooks around every MoE layer's experts, synchronized on CUDA): what
compressing the experts can change, next to the attention, routing and LM head that it leaves as they are.
Decode is one no-grad forward of one new token per sequence on a KV cache of
``--context`` tokens, for batches of 1 and 8 sequences (median of ``--runs`` steps; the cache
grows by one token per step). The training step is one forward and backward with labels on
``--train-tokens`` tokens (gradients reach the attention and router weights of every model and
the expert weights of the dense and pruned ones). On CUDA every timing is bracketed by
``torch.cuda.synchronize`` and ``peak MiB`` is the largest memory allocated during the
prefill beyond what the models already held; on CPU it is the process's peak RSS after
building. Compression time is one run. Stored bytes count every parameter and buffer of the
model (``model bytes``) and of its routed experts alone (``expert bytes``).

On a CPU, bf16 GEMMs run through oneDNN, which builds (JIT-compiles) a kernel for every new shape — for the
experts, every new row count of an expert — and keeps the last 1024 (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``).
A new shape costs ~0.6 ms at the reference models' sizes (15x the GEMM itself) and adds 10–60% to one at
Qwen3-30B-A3B's. The models compared here together have more shapes than 1024, so interleaving them would
time the cache's evictions rather than the models (measured: qwen2-moe-64x6's dense experts 2x slower
interleaved than run alone). The benchmark therefore raises the capacity to 16384 unless the environment
sets it: each model is then timed as it runs in a process of its own, with its kernels built.

``--gptq`` adds CAMERA-Q 2.5 bits quantized with GPTQ (calibrated on the statistics' tokens);
``--compress-only`` stops after building, printing each build's seconds (total and per MoE layer)
and stored bytes, e.g. to time GPTQ at real sizes without the forward timings. ``--memory`` instead
quantizes the dense model in place (CAMERA-Q 2.5 bits, RTN; GPTQ with ``--gptq``) and prints the
peak memory of the call against the model's size: the peak of live tensor bytes (torch.profiler's
CPU allocation events, model included) and the process's peak RSS during the call (allocator slack
included; the kernel's peak count is restarted before it where Linux allows, since building the
random model and collecting statistics reach their own peak first).

    python benchmarks/compressed_speed.py                     # small default size (a few minutes on 2 cores)
    python benchmarks/compressed_speed.py --hidden 2048 --experts 128 --width 768 --top-k 8 --layers 2 --no-loop
    python benchmarks/compressed_speed.py --reference qwen2-moe-64x6   # a trained reference model
    python benchmarks/compressed_speed.py --device cuda ...   # the same on a GPU
    python benchmarks/compressed_speed.py --hidden 2048 --experts 128 --width 768 --top-k 8 --layers 1 --gptq --compress-only
    python benchmarks/compressed_speed.py --hidden 2048 --experts 128 --width 768 --top-k 8 --layers 2 --memory
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import time
from typing import Callable

import torch

from camera_pl import collect_stats, moe_layers, prune, quantize, reference_model
from camera_pl.arch.forward import use_camera_experts
from camera_pl.experts import lowbit
from camera_pl.reference import REFERENCE_MODELS
from camera_pl.testing import tiny_moe
from offload_memory import cpu_allocation_peak

# oneDNN reads this when it builds its first kernel, and no kernel has run yet (see the module docstring).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``module``."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())}
    return sum(seen.values())


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def restart_peak_rss() -> Callable[[], float] | None:
    """Restart the kernel's count of this process's peak RSS (Linux ``clear_refs``); returns a reader of the peak
    since then in GiB, or None where the kernel offers no reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None

    def peak() -> float:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 2**20

    return peak


def rotated(models: dict[str, torch.nn.Module], run: int) -> list[tuple[str, torch.nn.Module]]:
    """The models in their order rotated by ``run`` places: over the runs each takes another place in the
    interleaving (timed first in every round, qwen2-moe-64x6's dense model took 1.4x its time in rotated runs)."""
    items = list(models.items())
    shift = run % len(items)
    return items[shift:] + items[:shift]


def drain(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, with the device's queue drained before and after."""
    drain(device)
    start = time.perf_counter()
    fn()
    drain(device)
    return time.perf_counter() - start


def experts_seconds(model: torch.nn.Module, batch: dict, device: torch.device) -> float:
    """Seconds one no-grad forward of ``batch`` spends inside the routed experts modules (all MoE layers summed,
    each bracketed by ``torch.cuda.synchronize`` on CUDA): the part of a prefill that compressing the experts
    can change; the rest is attention, norms, routing, the embeddings and the LM head."""
    spent, started = [0.0], [0.0]

    def before(*_):
        drain(device)
        started[0] = time.perf_counter()

    def after(*_):
        drain(device)
        spent[0] += time.perf_counter() - started[0]

    hooks = [h for layer in moe_layers(model) for h in (layer.module.register_forward_pre_hook(before),
                                                        layer.module.register_forward_hook(after))]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return spent[0]


def prefill_peak_mib(model: torch.nn.Module, batch: dict, device: torch.device) -> float:
    """Largest CUDA memory allocated during one prefill beyond what was held before it (NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        model(**batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - held) / 2**20


def decode_steps(model: torch.nn.Module, prompt: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """Seconds of ``steps`` one-token decode forwards after a prefill of ``prompt`` (KV cache kept)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            def step():
                nonlocal token
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            times.append(timed(step, device))
    return times[1:]


def train_step(model: torch.nn.Module, batch: dict) -> None:
    """One forward and backward with labels; gradients are dropped afterwards."""
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def print_builds(args: argparse.Namespace, models: dict, build_s: dict, rss: dict) -> None:
    """The ``--compress-only`` table: build seconds (total, per MoE layer), peak RSS and stored bytes."""
    print(f"\n{describe(args, models['dense bf16'])}, {args.calib_tokens} calibration tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; one build each\n")
    print("| model | compress s | per layer s | peak RSS after | expert bytes |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        experts = sum(tensor_bytes(layer.module) for layer in moe_layers(model))
        layers = len(moe_layers(model))
        print(f"| {name} | {build_s[name]:.1f} | {build_s[name] / layers:.1f} | {rss[name]:.2f} GB | {experts} |")


def activation_like(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """An empty tensor of the model's activation dtype on ``device`` (to ask whether the low-bit kernels run)."""
    return torch.empty(0, dtype=next(model.parameters()).dtype, device=device)


def dense_model(args: argparse.Namespace) -> torch.nn.Module:
    """The bf16 model every variant is built from: a reference model, or a random Qwen3-MoE of the given sizes."""
    if args.reference:
        return reference_model(args.reference, dtype=torch.bfloat16)[0]
    dims = dict(hidden_size=args.hidden, moe_intermediate_size=args.width, num_experts=args.experts,
                num_experts_per_tok=args.top_k, num_hidden_layers=args.layers, num_attention_heads=8,
                num_key_value_heads=4, head_dim=args.hidden // 8, intermediate_size=args.width, vocab_size=args.vocab,
                max_position_embeddings=max(args.tokens, args.context + 2 * args.runs + 8))
    return tiny_moe("qwen3_moe", dtype=torch.bfloat16, **dims)


def describe(args: argparse.Namespace, model: torch.nn.Module) -> str:
    """What was measured: the model's type and MoE sizes."""
    layer = moe_layers(model)[0].experts
    name = f"reference model {args.reference}" if args.reference else "random"
    return (f"{name} {model.config.model_type} bf16: hidden {layer.hidden_size}, {layer.num_experts} experts of width "
            f"{layer.intermediate_size}, top-{model.config.num_experts_per_tok}, {len(moe_layers(model))} MoE layers")


def print_quantize_memory(args: argparse.Namespace, model: torch.nn.Module, calib: list[dict]) -> None:
    """``--memory``: peak memory of quantizing ``model`` in place against its size (one run)."""
    size = tensor_bytes(model)
    options = dict(quantizer="gptq", calib_dataloader=calib) if args.gptq else {}
    stats = collect_stats(model, calib)
    rss_before = peak_rss_gb()
    peak_since = restart_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        peak = cpu_allocation_peak(lambda: quantize(model, stats, method="camera", avg_bits=2.5, **options))
    seconds = time.perf_counter() - start
    rss = peak_since() if peak_since is not None else peak_rss_gb()
    what = "during quantize" if peak_since is not None else \
        "of the whole process (this kernel cannot restart the count)"
    print(f"\n{describe(args, model)}; quantize(method='camera', avg_bits=2.5, quantizer="
          f"{'gptq' if args.gptq else 'rtn'!r}) in place, {seconds:.1f} s (under the profiler), one run; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| | GB | x model |\n|---|---|---|")
    print(f"| model before (parameters and buffers) | {size / 1e9:.2f} | 1.00 |")
    print(f"| peak live tensors during quantize (model included) | {(size + peak) / 1e9:.2f} | {(size + peak) / size:.2f} |")
    print(f"| process peak RSS {what} (building and statistics had reached {rss_before * 2**30 / 1e9:.2f}) | "
          f"{rss * 2**30 / 1e9:.2f} | {rss * 2**30 / size:.2f} |")
    print(f"| model after | {tensor_bytes(model) / 1e9:.2f} | {tensor_bytes(model) / size:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=192, help="moe_intermediate_size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192,
                        help="vocabulary of the random model (tiny_moe's own 96 tokens would route the first layer's few "
                             "distinct inputs to a few hot experts)")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill tokens (batch of 4 sequences)")
    parser.add_argument("--context", type=int, default=256, help="KV-cache tokens per sequence before decoding")
    parser.add_argument("--train-tokens", type=int, default=1024, help="tokens of the training step (4 sequences)")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True,
                        help="also time CAMERA-Q through the per-expert loop (slow at large sizes)")
    parser.add_argument("--gptq", action="store_true", help="also build CAMERA-Q 2.5 bits with GPTQ (slow)")
    parser.add_argument("--compress-only", action="store_true", help="time the builds only (no forwards)")
    parser.add_argument("--reference", choices=sorted(REFERENCE_MODELS), help="a trained reference model instead of "
                        "a random one of the given sizes")
    parser.add_argument("--memory", action="store_true", help="peak memory of quantizing in place (no forwards)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dense = dense_model(args).to(device)
    gen = torch.Generator().manual_seed(0)
    config = dense.config
    vocab, longest = config.vocab_size, config.max_position_embeddings
    args.context = min(args.context, longest - args.runs - 2)

    def tokens(total: int, rows: int = 4) -> torch.Tensor:
        """``total`` random tokens in at least ``rows`` sequences, none longer than the model's positions."""
        rows = max(rows, -(-total // longest))
        return torch.randint(3, vocab, (rows, total // rows), generator=gen).to(device)

    calib = [{"input_ids": tokens(args.calib_tokens // 4)} for _ in range(4)]
    batch = {"input_ids": tokens(args.tokens)}
    train_batch = {"input_ids": tokens(args.train_tokens)}
    prompts = {rows: tokens(rows * args.context, rows) for rows in (1, 8)}
    if args.memory:
        print_quantize_memory(args, dense, calib)
        return

    start = time.perf_counter()
    stats = collect_stats(dense, calib)
    stats_s = time.perf_counter() - start

    builds = {
        "dense bf16, camera_pl forward": use_camera_experts,  # the same weights through camera_pl's experts forward
        "CAMERA-Q 2.5 bits": lambda m: quantize(m, stats, method="camera", avg_bits=2.5),
        "uniform 4 bits": lambda m: quantize(m, method="uniform", avg_bits=4),
        "CAMERA-P 40% layer (ragged)": lambda m: prune(m, stats, 0.4, allocation="layer"),
        "CAMERA-P 40% expert (fused)": lambda m: prune(m, stats, 0.4, allocation="expert"),
    }
    layer = moe_layers(dense)[0].experts
    if layer.num_experts - round(0.4 * layer.num_experts) >= config.num_experts_per_tok:  # else top-k cannot route
        builds["REAP 40% of experts removed (fused)"] = lambda m: prune(m, stats, 0.4, method="reap")
    if args.gptq:
        builds["CAMERA-Q 2.5 bits, GPTQ"] = lambda m: quantize(m, stats, method="camera", avg_bits=2.5,
                                                               quantizer="gptq", calib_dataloader=calib)
    models, build_s, rss = {"dense bf16": dense}, {"dense bf16": 0.0}, {"dense bf16": peak_rss_gb()}
    for name, build in builds.items():
        model = copy.deepcopy(dense)
        with torch.no_grad():
            build_s[name] = timed(lambda: build(model), device)
        rss[name] = peak_rss_gb()
        models[name] = model
        print(f"built {name} in {build_s[name]:.1f} s (peak RSS so far {rss[name]:.2f} GB)", flush=True)

    if args.compress_only:
        print_builds(args, models, build_s, rss)
        return
    if lowbit.available(activation_like(dense, device)):  # the low-bit kernels ran: also time without them
        plain = copy.deepcopy(models["CAMERA-Q 2.5 bits"])
        for layer in moe_layers(plain):
            layer.module.use_kernels = False
        name = "CAMERA-Q 2.5 bits, dequantizing path"
        models[name], build_s[name], rss[name] = plain, build_s["CAMERA-Q 2.5 bits"], rss["CAMERA-Q 2.5 bits"]
    if args.loop:  # the per-expert dequantizing loop, for comparison
        looped = copy.deepcopy(models["CAMERA-Q 2.5 bits"])
        for layer in moe_layers(looped):
            layer.module.grouped_weights = lambda x, hit=None: None
        name = "CAMERA-Q 2.5 bits, per-expert loop"
        models[name], build_s[name], rss[name] = looped, build_s["CAMERA-Q 2.5 bits"], rss["CAMERA-Q 2.5 bits"]

    phases = ["prefill", "prefill experts", "decode b1", "decode b8", "train step"]
    times: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in phases} for name in models}
    peak = {name: prefill_peak_mib(model, batch, device) for name, model in models.items()}  # also the warm-up
    for name, model in models.items():
        train_step(model, train_batch)  # warm-up
    with torch.no_grad():
        for run in range(args.runs):
            for name, model in rotated(models, run):
                times[name]["prefill"].append(timed(lambda: model(**batch), device))
        for run in range(args.runs):  # separate forwards: the hooks' synchronisation would slow the timed ones on CUDA
            for name, model in rotated(models, run):
                times[name]["prefill experts"].append(experts_seconds(model, batch, device))
    for name, model in models.items():
        for rows, prompt in prompts.items():
            times[name][f"decode b{rows}"] = decode_steps(model, prompt, args.runs, device)
    for run in range(args.runs):
        for name, model in rotated(models, run):
            times[name]["train step"].append(timed(lambda: train_step(model, train_batch), device))

    median = {name: {phase: statistics.median(t) for phase, t in entry.items()} for name, entry in times.items()}
    base = median["dense bf16"]
    base_model, base_experts = tensor_bytes(dense), sum(tensor_bytes(layer.module) for layer in moe_layers(dense))
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\n{describe(args, dense)} on {device.type} ({hardware}); prefill {batch['input_ids'].numel()} tokens, "
          f"decode on a {args.context}-token cache, training step on {train_batch['input_ids'].numel()} tokens; "
          f"median of {args.runs} runs each (models interleaved for prefill and training, their order rotated every run, 1 warm-up); "
          f"torch {torch.__version__}; statistics took {stats_s:.1f} s"
          + (f"; ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']}" if device.type == "cpu" else "")
          + "\n")
    print("| model | experts kind | " + " | ".join(f"{p} ms | x dense" for p in phases)
          + " | compress s | peak | expert bytes | x dense | model bytes | x dense |")
    print("|---|---|" + "---|---|" * len(phases) + "---|---|---|---|---|---|")
    for name, model in models.items():
        experts = sum(tensor_bytes(layer.module) for layer in moe_layers(model))
        total = tensor_bytes(model)
        kind = moe_layers(model)[0].experts.kind
        cells = " | ".join(f"{median[name][p] * 1e3:.1f} | {median[name][p] / base[p]:.2f}" for p in phases)
        memory = f"{peak[name]:.0f} MiB" if device.type == "cuda" else f"{rss[name]:.2f} GB RSS"
        print(f"| {name} | {kind} | {cells} | {build_s[name]:.1f} | {memory} | "
              f"{experts} | {experts / base_experts:.3f} | {total} | {total / base_model:.3f} |")


if __name__ == "__main__":
    main()
