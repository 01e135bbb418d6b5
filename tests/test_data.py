"""Tests of camera_pl.data: corpus splits, packing/masks, sources and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from camera_pl.data import (IGNORE_INDEX, TextDataModule, corpus_files, pack_blocks, split_of, stdlib_corpus,
                            stdlib_root, stdlib_tests_corpus)


FRACTIONS = (0.2, 0.2)  # small corpora need larger held-out shares


def _docs(tmp_path: Path, n: int = 60) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"document number {i} " * (1 + i % 5))
    return root


def test_split_of_is_stable_and_proportional() -> None:
    keys = [f"pkg/module_{i}.py" for i in range(4000)]
    first = [split_of(k) for k in keys]
    assert first == [split_of(k) for k in keys]
    share = {s: first.count(s) / len(keys) for s in ("train", "validation", "test")}
    assert 0.87 < share["train"] < 0.93 and 0.03 < share["validation"] < 0.07 and 0.03 < share["test"] < 0.07


def test_split_of_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_of("x", (0.6, 0.5))


def test_stdlib_corpus_splits_disjoint_complete_and_clean() -> None:
    splits = {s: stdlib_corpus(s) for s in ("train", "validation", "test")}
    assert splits["test"] == stdlib_corpus("test")
    sets = {s: set(f) for s, f in splits.items()}
    assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"] or sets["validation"] & sets["test"])
    assert set().union(*sets.values()) == set(stdlib_corpus())
    assert len(splits["train"]) > 10 * len(splits["test"]) > 0
    for path in stdlib_corpus():
        parts = path.relative_to(stdlib_root()).parts
        assert "site-packages" not in parts and "test" not in parts and "tests" not in parts


def test_stdlib_tests_corpus_is_other_text_with_disjoint_splits() -> None:
    library = set(stdlib_corpus())
    splits = {s: set(stdlib_tests_corpus(s)) for s in ("train", "validation", "test")}
    every = set(stdlib_tests_corpus())
    assert set().union(*splits.values()) == every and not (library & every)
    assert not (splits["train"] & splits["test"] or splits["validation"] & splits["test"])
    assert stdlib_root() / "pydoc_data" / "topics.py" in every
    for path in every:  # all of it reads as UTF-8, so TextDataModule never trips on a file
        path.read_text(encoding="utf-8")
    assert corpus_files("stdlib-tests", "test") == stdlib_tests_corpus("test")


def test_unknown_corpus_is_named(tokenizer) -> None:
    with pytest.raises(ValueError, match="built-in corpora are"):
        corpus_files("wiki")
    with pytest.raises(ValueError, match="built-in corpora are"):
        TextDataModule(tokenizer, corpus="stdlib-test")


def test_stdlib_corpus_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        stdlib_corpus("dev")


def test_pack_blocks_pads_only_the_last_block() -> None:
    blocks = list(pack_blocks([[1, 2, 3], [4, 5, 6, 7], [8, 9]], block_size=4, pad_id=0))
    assert [b["input_ids"].tolist() for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert blocks[0]["attention_mask"].tolist() == [1, 1, 1, 1]
    assert blocks[2]["attention_mask"].tolist() == [1, 0, 0, 0]
    assert blocks[2]["labels"].tolist() == [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert blocks[1]["labels"].tolist() == [5, 6, 7, 8]


def test_datamodule_batches_and_disjoint_documents(tokenizer, tmp_path) -> None:
    dm = TextDataModule(tokenizer, block_size=32, batch_size=4, data_files=_docs(tmp_path), fractions=FRACTIONS)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 32)
    for split in ("train", "validation", "test"):
        for block in dm.splits[split]:
            mask = block["attention_mask"].bool()
            assert torch.equal(block["labels"][mask], block["input_ids"][mask])
            assert (block["labels"][~mask] == IGNORE_INDEX).all()
            assert (block["input_ids"][~mask] == tokenizer.pad_token_id).all()

    def texts(split: str) -> set[str]:
        ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in dm.splits[split]])
        return {t.strip() for t in tokenizer.decode(ids).split("<eos>") if t.strip()}

    train, val, test = texts("train"), texts("validation"), texts("test")
    assert val and test and not (train & val or train & test or val & test)


def test_datamodule_is_deterministic(tokenizer, tmp_path) -> None:
    root = _docs(tmp_path)
    a = TextDataModule(tokenizer, block_size=16, batch_size=2, data_files=root, fractions=FRACTIONS)
    b = TextDataModule(tokenizer, block_size=16, batch_size=2, data_files=root, fractions=FRACTIONS)
    for batch_a, batch_b in zip(a.train_dataloader(), b.train_dataloader()):
        assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])


def test_streaming_yields_the_same_blocks(tokenizer, tmp_path) -> None:
    root = _docs(tmp_path)
    eager = TextDataModule(tokenizer, block_size=16, batch_size=3, data_files=root, fractions=FRACTIONS)
    lazy = TextDataModule(tokenizer, block_size=16, batch_size=3, data_files=root, fractions=FRACTIONS, streaming=True)
    for batch_a, batch_b in zip(eager.test_dataloader(), lazy.test_dataloader(), strict=True):
        assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
        assert torch.equal(batch_a["labels"], batch_b["labels"])


def test_jsonl_source_and_its_errors(tokenizer, tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"body": f"row {i} text"}) + "\n" for i in range(200)))
    dm = TextDataModule(tokenizer, block_size=16, batch_size=2, data_files=good, text_column="body")
    dm.setup("test")
    assert len(dm.splits["test"]) > 0
    with pytest.raises(ValueError, match="no 'text' field"):
        TextDataModule(tokenizer, data_files=good).setup("fit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        TextDataModule(tokenizer, data_files=bad).setup("fit")


def test_clear_errors_for_empty_or_missing_input(tokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextDataModule(tokenizer, data_files=tmp_path / "nope.txt").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no text files"):
        TextDataModule(tokenizer, data_files=tmp_path / "empty").setup("fit")
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    with pytest.raises(ValueError, match="split is empty"):
        TextDataModule(tokenizer, data_files=blank).setup("fit")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read .* as UTF-8"):
        TextDataModule(tokenizer, data_files=binary).setup("fit")


def test_doc_separator_splits_a_single_file(tokenizer, tmp_path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(f"paragraph {i}" for i in range(300)))
    dm = TextDataModule(tokenizer, block_size=16, batch_size=2, data_files=one, doc_separator="\n\n")
    dm.setup()
    assert all(len(dm.splits[s]) > 0 for s in ("train", "validation", "test"))


def test_constructor_validation(tokenizer) -> None:
    with pytest.raises(ValueError, match="block_size"):
        TextDataModule(tokenizer, block_size=1)
    with pytest.raises(ValueError, match="either data_files or hf_dataset"):
        TextDataModule(tokenizer, data_files="x", hf_dataset="y")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no eos_token"):
        TextDataModule(no_eos)


def test_default_corpus_quick(tokenizer) -> None:
    dm = TextDataModule(tokenizer, block_size=64, batch_size=2, max_documents=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (2, 64)
