"""Train a reference MoE (tokenizer + small MoE) from scratch on its built-in corpus.

Run ``python -m camera_pl.reference.train --model NAME --out DIR`` (NAME: a key of
`camera_pl.reference.REFERENCE_MODELS`).  Steps:

1. train a byte-level BPE tokenizer on the train split of the model's corpus;
2. train the model of `reference_config` (router aux loss on) with the
   Lightning Trainer for ``--max-steps`` steps (``--max-minutes`` caps wall time);
3. measure test perplexity and the add-one-smoothed unigram baseline on the
   same test tokens, and write ``config.json``, ``model.safetensors`` (bf16),
   the tokenizer files and ``metrics.json`` to ``DIR``.

The defaults are sized so that the run fits in about 30 minutes on 2 CPU cores.
On a machine shared with other jobs, export ``OMP_WAIT_POLICY=PASSIVE``: with
the default busy-waiting, two OpenMP threads competing for two cores can make
each step several times slower.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen3MoeConfig

from camera_pl.data import TextDataModule, corpus_files
from camera_pl.reference import DEFAULT_REFERENCE, REFERENCE_MODELS, reference_spec
from camera_pl.eval.evaluation import perplexity, unigram_perplexity
from camera_pl.lightning.module import CausalLMModule

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(files: Sequence[Path], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (no prefix space, EOS and PAD specials) on ``files``."""
    if not files:
        raise ValueError("no files to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


_COMMON = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    decoder_sparse_step=1,
    tie_word_embeddings=True,
    output_router_logits=True,
    router_aux_loss_coef=0.01,
    use_cache=False,
)
# Same hidden size, depth and total routed width (2048 channels a layer); they differ in granularity.
_ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "qwen3-moe-16x2": (
        Qwen3MoeConfig,
        dict(head_dim=32, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=2, norm_topk_prob=True),
    ),
    "qwen2-moe-64x6": (
        Qwen2MoeConfig,
        dict(
            moe_intermediate_size=32,
            num_experts=64,
            num_experts_per_tok=6,
            norm_topk_prob=False,
            shared_expert_intermediate_size=64,
        ),
    ),
}


def reference_config(
    tokenizer: PreTrainedTokenizerFast, block_size: int, name: str = DEFAULT_REFERENCE, **overrides: object
) -> PretrainedConfig:
    """Config of reference model ``name``: 4 layers, hidden 192, aux loss on; experts as the name says."""
    reference_spec(name)
    config_cls, arch = _ARCHITECTURES[name]
    params = dict(
        _COMMON,
        **arch,
        vocab_size=len(tokenizer),
        max_position_embeddings=block_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    params.update(overrides)
    return config_cls(**params)


class WallClockCosineModule(CausalLMModule):
    """`CausalLMModule` whose cosine schedule also follows wall time.

    Progress is the larger of the step fraction and ``elapsed / max_seconds``,
    so a run capped by wall time (e.g. on a busy machine) still anneals its
    learning rate fully.
    """

    def __init__(self, model: torch.nn.Module, max_seconds: float, **kwargs: object) -> None:
        super().__init__(model, **kwargs)
        self.max_seconds = max_seconds
        self.start_time = time.time()

    def on_train_start(self) -> None:
        self.start_time = time.time()

    def progress(self, step: int) -> float:
        return min(1.0, max(super().progress(step), (time.time() - self.start_time) / self.max_seconds))


def config_summary(config: PretrainedConfig) -> dict[str, int]:
    """The architecture figures worth reporting next to the metrics."""
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "max_position_embeddings",
    )
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def save_bf16(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write config.json, model.safetensors (bf16) and tokenizer files to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # the aux loss is for training; batched generate breaks on it
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default=DEFAULT_REFERENCE)
    parser.add_argument("--out", type=Path, required=True, help="output directory for weights and metrics")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--max-minutes", type=float, default=33.0, help="wall-clock cap on the training loop")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    parser.add_argument("--log-dir", type=Path, default=Path("lightning_logs/reference"), help="CSV training logs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.max_minutes <= 0:
        parser.error("--max-steps must be >= 1 and --max-minutes > 0")

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed)
    start = time.time()
    corpus = reference_spec(args.model).corpus
    tokenizer = train_tokenizer(corpus_files(corpus, "train"), args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens in {time.time() - start:.0f}s", flush=True)

    dm = TextDataModule(
        tokenizer, block_size=args.block_size, batch_size=args.batch_size, seed=args.seed, corpus=corpus
    )
    dm.setup()
    config = reference_config(tokenizer, args.block_size, args.model)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {len(dm.splits['train'])} train blocks", flush=True)

    module = WallClockCosineModule(
        model,
        max_seconds=args.max_minutes * 60,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        cosine_steps=max(args.max_steps, args.warmup + 1),
        min_lr_ratio=0.1,
        betas=(0.9, 0.95),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        max_time={"minutes": args.max_minutes},
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=10,
        gradient_clip_val=1.0,
        log_every_n_steps=20,
        logger=L.pytorch.loggers.CSVLogger(args.log_dir, name=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    train_start = time.time()
    trainer.fit(module, datamodule=dm)
    train_minutes = (time.time() - train_start) / 60

    model.eval()
    save_bf16(model, tokenizer, args.out)
    # Evaluate the bf16 weights as shipped, upcast to float32.
    shipped = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    test_loader = dm.test_dataloader()
    metrics = {
        "test_perplexity": perplexity(shipped, test_loader),
        "unigram_perplexity": unigram_perplexity(dm.train_dataloader(), test_loader, len(tokenizer)),
        "test_tokens": int(sum(b["attention_mask"].sum() for b in test_loader)),
        "steps": trainer.global_step,
        "tokens_trained": trainer.global_step * args.batch_size * args.block_size,
        "train_wall_minutes": round(train_minutes, 2),
        "total_wall_minutes": round((time.time() - start) / 60, 2),
        "parameters": n_params,
        "model_config": config_summary(config),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_version": torch.__version__,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2), flush=True)
    return metrics


if __name__ == "__main__":
    main()
