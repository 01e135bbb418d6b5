"""Tests of camera_pl.eval.evaluation (perplexity) and camera_pl.eval.tasks on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from camera_pl.eval.evaluation import perplexity, unigram_perplexity
from camera_pl.eval.tasks import TASKS, MCExample, build_examples, write_task

IGNORE = -100


@pytest.fixture(scope="module")
def tiny_moe(tokenizer) -> Qwen3MoeForCausalLM:
    return _tiny_moe(tokenizer)


def _tiny_moe(tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeForCausalLM:
    """A randomly initialised 2-layer, 4-expert, top-2 Qwen3-MoE."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3MoeForCausalLM(config).eval()


def _batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, cols, valid in ((2, 10, (10, 6)), (3, 7, (7, 2, 5))):
        ids = torch.randint(0, vocab, (rows, cols), generator=g)
        mask = torch.zeros(rows, cols, dtype=torch.long)
        for r, n in enumerate(valid):
            mask[r, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)})
    return out


def test_perplexity_matches_hand_computation(tiny_moe) -> None:
    batches = _batches(tiny_moe.config.vocab_size)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for row in range(len(b["input_ids"])):
                n = int(b["attention_mask"][row].sum())
                logp = torch.log_softmax(tiny_moe(input_ids=b["input_ids"][row : row + 1, :n]).logits[0], -1)
                nll -= sum(float(logp[t - 1, b["input_ids"][row, t]]) for t in range(1, n))
                count += n - 1
    assert perplexity(tiny_moe, batches) == pytest.approx(math.exp(nll / count), rel=1e-4)


def _shifted_nll(model, batches) -> tuple[float, int]:
    """Summed float64 cross-entropy of position t's logits against labels[t + 1] (-100 skipped)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
            target = b["labels"][:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
            count += int((target != IGNORE).sum())
    return nll, count


def test_perplexity_ignores_masked_labels_and_rejects_nothing_scored() -> None:
    class Uniform(torch.nn.Module):
        """Equal logits over 4 tokens: the perplexity of every scored token is 4."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 4) + self.w})

    ids = torch.tensor([[0, 1, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[0, 1, IGNORE]])}
    assert perplexity(Uniform(), [batch]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no tokens were scored"):
        perplexity(Uniform(), [dict(batch, labels=torch.full_like(ids, IGNORE))])


def _reference_with_data(name: str):
    """Reference model ``name``, its tokenizer, a small data module of its own corpus and 2 test batches."""
    from camera_pl.data import TextDataModule
    from camera_pl.reference import reference_model, reference_spec

    model, tok = reference_model(name)
    dm = TextDataModule(tok, block_size=128, batch_size=4, max_documents=20, corpus=reference_spec(name).corpus)
    return model, tok, dm, list(dm.test_dataloader())[:2]


@pytest.mark.parametrize("name", ["qwen3-moe-16x2", "qwen2-moe-64x6"])
def test_perplexity_equals_float64_cross_entropy_on_reference_model(name) -> None:
    """torchmetrics' Perplexity (shifted, float64 sums) equals a float64 cross-entropy over the same tokens."""
    model, _, _, test = _reference_with_data(name)
    nll, count = _shifted_nll(model, test)
    assert perplexity(model, test) == pytest.approx(math.exp(nll / count), rel=1e-6)


@pytest.mark.slow
def test_perplexity_metric_reduces_across_processes(tmp_path, tiny_moe) -> None:
    """Two gloo processes each scoring half the batches give the single-process perplexity."""
    import socket

    import torch.multiprocessing as mp

    batches = _batches(tiny_moe.config.vocab_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(tiny_moe, batches, str(tmp_path), port), nprocs=2, join=True)
    values = [float((tmp_path / f"{rank}.txt").read_text()) for rank in range(2)]
    nll, count = _shifted_nll(tiny_moe, batches)
    assert values[0] == values[1] == pytest.approx(math.exp(nll / count), rel=1e-6)


def _ddp_worker(rank: int, model, batches, out: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        Path(out, f"{rank}.txt").write_text(repr(perplexity(model, batches[rank::2])))
    finally:
        dist.destroy_process_group()


def test_unigram_perplexity_by_hand() -> None:
    train = [{"labels": torch.tensor([[0, 0, 1, IGNORE]])}]
    test = [{"labels": torch.tensor([[2, 0, 1, IGNORE]])}]
    # add-one counts: [3, 2, 1] / 6; scored test positions: tokens 0 and 1.
    expected = math.exp(-(math.log(3 / 6) + math.log(2 / 6)) / 2)
    assert unigram_perplexity(train, test, 3) == pytest.approx(expected)


def test_mc_example_validation_and_task_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        MCExample("c", ("a", "b"), 2)
    with pytest.raises(ValueError, match="at least 2"):
        MCExample("c", ("a",), 0)
    path = write_task(tmp_path / "t.jsonl", [MCExample("c\n", ("a", "b"), 1)])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"context": "c\n", "choices": ["a", "b"], "label": 1}]


def _source_files(tmp_path: Path) -> list[Path]:
    files = []
    for k in range(3):
        body = "".join(
            f'def func_{k}_{i}(arg):\n    """Compute value number {i} of module {k} here."""\n'
            f"    result = arg * {i} + {k}\n    return result + {i}\n\n"
            for i in range(6)
        )
        files.append(tmp_path / f"mod{k}.py")
        files[-1].write_text(body)
    return files


def test_build_examples_deterministic_and_well_formed(tmp_path) -> None:
    files = _source_files(tmp_path)
    for task in TASKS:
        first = build_examples(task, files, n=20)
        assert first == build_examples(task, files, n=20) and len(first) > 5
        for e in first:
            assert len(e.choices) == 4 and len({c.strip() for c in e.choices}) == 4
        assert len({e.label for e in first}) > 1
    example = build_examples("docstring_match", files, n=1)[0]
    assert example.context.endswith('"""') and example.choices[example.label].startswith("Compute value")
    with pytest.raises(ValueError, match="unknown task"):
        build_examples("nope", files)


def test_reference_model_beats_unigram() -> None:
    from camera_pl.reference import WEIGHTS_DIR, reference_model

    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.skip("reference weights not trained yet")
    from camera_pl.data import TextDataModule

    model, tok = reference_model()
    dm = TextDataModule(tok, block_size=128, batch_size=4, max_documents=20)
    dm.setup()
    test = list(dm.test_dataloader())[:2]
    model_ppl = perplexity(model, test)
    assert model_ppl < 0.2 * unigram_perplexity(dm.train_dataloader(), test, len(tok))


def test_reference_model_reports_missing_weights(tmp_path) -> None:
    from camera_pl.reference import reference_model

    with pytest.raises(FileNotFoundError, match="camera_pl.reference.train --model qwen2-moe-64x6"):
        reference_model("qwen2-moe-64x6", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="choose one of"):
        reference_model("qwen3-moe")
    with pytest.raises(ValueError, match="choose one of"):
        reference_model(torch.float32)  # the name comes first


@pytest.mark.parametrize("name", ["qwen3-moe-16x2", "qwen2-moe-64x6"])
def test_each_reference_model_loads_with_its_own_corpus(name) -> None:
    model, tok, dm, test = _reference_with_data(name)
    assert perplexity(model, test) < 0.2 * unigram_perplexity(dm.train_dataloader(), test, len(tok))


def test_mean_kl_is_zero_against_itself_and_a_masked_kl_otherwise() -> None:
    from camera_pl.eval.evaluation import mean_kl
    from camera_pl.testing import tiny_moe

    from conftest import make_batch

    batches = [make_batch(seed=s) for s in range(2)]  # the last row of each is padded
    model, other = tiny_moe("qwen3_moe"), tiny_moe("qwen3_moe", seed=1)
    with torch.no_grad():
        own = [model(**b).logits for b in batches]
        theirs = [other(**b).logits for b in batches]
    assert mean_kl(own, model, batches) == pytest.approx(0.0, abs=1e-9)
    mask = torch.cat([b["attention_mask"].bool().flatten() for b in batches])
    p = torch.cat([t.flatten(0, 1) for t in own])[mask].log_softmax(-1)
    q = torch.cat([t.flatten(0, 1) for t in theirs])[mask].log_softmax(-1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
    assert mean_kl(own, other, batches) == pytest.approx(float(expected), rel=1e-5)
