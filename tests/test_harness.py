"""camera_pl.evaluate: lm-eval over models in memory (dense, pruned, quantized, reloaded) and its errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import camera_pl
from camera_pl import collect_stats, prune, quantize
from camera_pl.data import stdlib_corpus
from camera_pl.eval.harness import OFFLINE_TASKS
from camera_pl.eval.tasks import MCExample, build_examples
from camera_pl.experts.quantized import QuantizedExperts

from conftest import make_batch


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, example: MCExample) -> list[float]:
    """Summed log-probabilities of each choice, one unbatched forward per choice.

    The request is built as lm-eval documents it for causal models: whitespace that ends the
    context moves to the front of the continuation, context + continuation is tokenized as
    one string, and the continuation's tokens are those after the context's own tokens. No
    prefix token is added. (camera_pl's former scorer prepended EOS to every context, which
    lm-eval does only for an empty context; otherwise its figures were computed the same way.)
    """
    out = []
    for choice in example.choices:
        cut = len(example.context.rstrip())
        context, continuation = example.context[:cut], example.context[cut:] + choice
        whole = tokenizer(context + continuation)["input_ids"]
        n_context = len(tokenizer(context)["input_ids"])
        log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        out.append(sum(float(log_probs[i - 1, whole[i]]) for i in range(n_context, len(whole))))
    return out


def first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties go to the first, as numpy's argmax


def test_offline_tasks_match_direct_scoring():
    """acc and acc_bytes from lm-eval equal those computed directly from the model on the same items."""
    model, tokenizer = camera_pl.reference_model()
    limit = 24
    got = camera_pl.evaluate(model, tokenizer, list(OFFLINE_TASKS), limit=limit, batch_size=8)
    assert set(got) == set(OFFLINE_TASKS)
    files = stdlib_corpus("test")
    for task in OFFLINE_TASKS:
        examples = build_examples(task, files, n=limit)
        acc = acc_bytes = 0
        for example in examples:
            scores = choice_loglikelihoods(model, tokenizer, example)
            per_byte = [s / len(c.encode("utf-8")) for s, c in zip(scores, example.choices)]
            acc += first_argmax(scores) == example.label
            acc_bytes += first_argmax(per_byte) == example.label
        assert got[task]["n"] == limit
        assert got[task]["acc"] == pytest.approx(acc / limit, abs=1e-12), task
        assert got[task]["acc_bytes"] == pytest.approx(acc_bytes / limit, abs=1e-12), task
        assert got[task]["acc_stderr"] > 0
    assert any(0 < got[t][m] < 1 for t in OFFLINE_TASKS for m in ("acc", "acc_bytes"))  # some right, some wrong


def test_pruned_quantized_and_reloaded_models(tmp_path):
    model, tokenizer = camera_pl.reference_model()
    batches = [make_batch(seed=s, batch=2, seq=32, vocab=model.config.vocab_size, pad_from=None) for s in range(2)]
    prune(model, collect_stats(model, batches), 0.4)
    model.train()
    pruned = camera_pl.evaluate(model, tokenizer, "next_line", limit=4)
    assert model.training and pruned["next_line"]["n"] == 4  # the train/eval mode is kept
    quantize(model.eval(), method="uniform", avg_bits=4, quantizer="rtn", group_size=64)
    assert all(isinstance(layer.module, QuantizedExperts) for layer in camera_pl.moe_layers(model))
    quantized = camera_pl.evaluate(model, tokenizer, ["next_line"], limit=4)
    assert not model.training
    camera_pl.save(model, tmp_path / "model")
    reloaded = camera_pl.load(tmp_path / "model")
    assert camera_pl.evaluate(reloaded, tokenizer, ["next_line"], limit=4) == quantized
    half = camera_pl.evaluate(camera_pl.load(tmp_path / "model", dtype=torch.bfloat16), tokenizer, ["next_line"],
                              limit=4)
    assert 0 <= half["next_line"]["acc"] <= 1


def test_bad_arguments():
    model, tokenizer = camera_pl.reference_model()
    with pytest.raises(ValueError, match="task names"):
        camera_pl.evaluate(model, tokenizer, [])
    with pytest.raises(ValueError, match="limit"):
        camera_pl.evaluate(model, tokenizer, ["next_line"], limit=0)


@pytest.mark.slow  # indexes lm-eval's whole task registry (10-20 s)
def test_unknown_task_names():
    model, tokenizer = camera_pl.reference_model()
    with pytest.raises(ValueError, match="unknown task") as err:
        camera_pl.evaluate(model, tokenizer, ["next_lin", "arc_easyy"], limit=2)
    message = str(err.value)
    assert "'next_line'" in message and "'arc_easy'" in message  # close matches from both kinds of task
    assert "docstring_match" in message and "network" in message


def test_missing_lm_eval_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "camera_pl\[eval\]"'):
        camera_pl.evaluate(torch.nn.Linear(1, 1), None, ["next_line"])


def test_quiet_unless_verbose(capfd):
    model, tokenizer = camera_pl.reference_model()
    capfd.readouterr()  # transformers' weight-loading bar
    quiet = camera_pl.evaluate(model, tokenizer, ["next_line"], limit=3)
    out, err = capfd.readouterr()
    assert out == "" and "it/s" not in err and "pretrained" not in err and "fatal" not in err, (out, err)
    loud = camera_pl.evaluate(model, tokenizer, ["next_line"], limit=3, verbose=True)
    assert "it/s" in capfd.readouterr().err  # lm-eval's own progress bars
    assert quiet == loud
