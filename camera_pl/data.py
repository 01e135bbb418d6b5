"""Text data for calibration, training and evaluation of MoE language models.

`TextDataModule` turns raw text into fixed-length causal-LM blocks.  Sources:

* the embedded default corpus: the running interpreter's own standard-library
  ``.py`` files (no download needed, see `stdlib_corpus`);
* local text files or directories (one document per file, or per separator);
* JSON-lines files with a text column;
* a Hugging Face hub dataset (name, config, text column) when the hub is reachable.

Documents are assigned to train/validation/test by a stable hash of a document
key (a relative path, or the text itself), so splits are disjoint and identical
across runs, machines and file orderings.  Each split is tokenized with
``datasets.map`` and packed into ``block_size`` blocks: documents are joined
with the EOS token and only the final block of a split is padded.  Padded
positions have ``attention_mask == 0`` and ``labels == -100``.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from camera_pl.labels import IGNORE_INDEX, causal_labels  # IGNORE_INDEX: part of this module's API

SPLITS = ("train", "validation", "test")

# Parts of the standard library that are not representative source code: test
# suites, generated data tables and bundled third-party packages.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)
_STDLIB_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Test inputs that are not UTF-8 (or not valid source) on purpose.
_UNREADABLE_TEST_FILES = frozenset(
    {"module_iso_8859_1.py", "module_koi8_r.py", "test_source_encoding.py", "badsyntax_pep3120.py"}
)

_TEXT_SUFFIXES = frozenset({".txt", ".py", ".md", ".rst", ".text"})
_JSONL_SUFFIXES = frozenset({".jsonl", ".json"})


def split_of(key: str, fractions: tuple[float, float] = (0.05, 0.05)) -> str:
    """Return the split ('train', 'validation' or 'test') a document key belongs to.

    The key is hashed with SHA-256 and mapped to [0, 1); the top ``fractions[1]``
    goes to test, the ``fractions[0]`` below it to validation, the rest to train.
    SHA-256 (not Python's salted ``hash``) keeps this stable across processes.
    """
    val_frac, test_frac = fractions
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac >= 1:
        raise ValueError(
            f"split fractions {fractions} are invalid: need validation >= 0, test >= 0 and their sum < 1"
        )
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u >= 1 - test_frac:
        return "test"
    if u >= 1 - test_frac - val_frac:
        return "validation"
    return "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(keep: Callable[[tuple[str, ...]], bool], split: str | None,
                  fractions: tuple[float, float], what: str) -> list[Path]:
    """Sorted stdlib ``.py`` files whose relative path parts pass ``keep``, for one split (None: all)."""
    if split is not None:
        _check_split(split)
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} not found; pass explicit data files instead")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts or not keep(rel.parts):
            continue
        if split is None or split_of(rel.as_posix(), fractions) == split:
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no {what} files found under {root} for split {split!r}")
    return files


def _is_library_source(parts: tuple[str, ...]) -> bool:
    if any(part in _STDLIB_EXCLUDED_DIRS for part in parts[:-1]):
        return False
    return not (parts[0].startswith(_STDLIB_EXCLUDED_PREFIXES) or parts[-1].startswith(_STDLIB_EXCLUDED_PREFIXES))


def _is_test_or_doc(parts: tuple[str, ...]) -> bool:
    if parts == ("pydoc_data", "topics.py"):
        return True
    return any(part in _TEST_DIRS for part in parts[:-1]) and parts[-1] not in _UNREADABLE_TEST_FILES


def stdlib_corpus(split: str | None = None, fractions: tuple[float, float] = (0.05, 0.05)) -> list[Path]:
    """Standard-library ``.py`` files of the running interpreter, sorted, for one split.

    Excluded: site-packages, test suites (``test/``, ``tests/``, ``idle_test/``),
    codec tables (``encodings/``), generated data (``pydoc_data/``,
    ``_sysconfigdata*``).  Each file goes to a split by `split_of` on its path
    relative to the stdlib root (about 90/5/5), so the splits are disjoint files
    and stay fixed as long as the interpreter version is the same.
    ``split=None`` returns all files.
    """
    return _stdlib_files(_is_library_source, split, fractions, "standard-library .py")


def stdlib_tests_corpus(split: str | None = None, fractions: tuple[float, float] = (0.05, 0.05)) -> list[Path]:
    """The text `stdlib_corpus` leaves out: the stdlib's test suites plus the English language reference.

    Files under ``test/``, ``tests/`` and ``idle_test/`` (test code, a different
    register from library code) and ``pydoc_data/topics.py`` (the prose of the
    Python reference manual), split by path as in `stdlib_corpus`; no file is in
    both corpora.  A few deliberately non-UTF-8 test inputs are skipped.  Some
    distributions ship Python without its test suite (e.g. Debian's
    ``libpython3.X-testsuite`` package); there this raises FileNotFoundError.
    """
    return _stdlib_files(_is_test_or_doc, split, fractions, "standard-library test-suite")


CORPORA: dict[str, Callable[..., list[Path]]] = {"stdlib": stdlib_corpus, "stdlib-tests": stdlib_tests_corpus}


def _check_corpus(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora are {sorted(CORPORA)}, or pass data_files")


def corpus_files(name: str, split: str | None = None) -> list[Path]:
    """Files of the built-in corpus ``name`` (a key of `CORPORA`) for one split (None: all)."""
    _check_corpus(name)
    return CORPORA[name](split)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path} as UTF-8 text ({err}); fix or remove the file") from err


def _expand(paths: str | Path | Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Expand files/directories into ``(file, key)`` pairs; key is a path relative to its root."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError("data_files is empty; pass at least one file or directory")
    out: list[tuple[Path, str]] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES | _JSONL_SUFFIXES)
            if not found:
                raise ValueError(
                    f"directory {item} contains no text files (suffixes {sorted(_TEXT_SUFFIXES | _JSONL_SUFFIXES)})"
                )
            out += [(p, p.relative_to(item).as_posix()) for p in found]
        elif item.is_file():
            out.append((item, item.name))
        else:
            raise FileNotFoundError(f"data file or directory {item} does not exist")
    return out


def iter_documents(
    paths: str | Path | Sequence[str | Path],
    text_column: str = "text",
    doc_separator: str | None = None,
) -> Iterator[dict[str, str]]:
    """Yield ``{"text", "key"}`` records from text or JSON-lines files.

    Text files give one document per file (key: relative path), or one per
    ``doc_separator``-separated chunk (key: path plus chunk index).  JSON-lines
    rows give one document each, keyed by their text so duplicates share a split.
    """
    for path, key in _expand(paths):
        if path.suffix in _JSONL_SUFFIXES:
            yield from _iter_jsonl(path, text_column)
            continue
        text = _read_text(path)
        chunks = text.split(doc_separator) if doc_separator else [text]
        for i, chunk in enumerate(chunks):
            if chunk.strip():
                yield {"text": chunk, "key": f"{key}#{i}" if doc_separator else key}


def _iter_jsonl(path: Path, text_column: str) -> Iterator[dict[str, str]]:
    """Rows of one JSON-lines file, checked line by line.

    Not ``datasets.load_dataset("json")``: it fills a missing field with None, passes
    non-string values through and reports a parse error by row, not by file line.
    """
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({err}); each line must be one JSON object") from err
        if not isinstance(row, dict) or text_column not in row:
            raise ValueError(
                f"{path}:{lineno} has no {text_column!r} field; set text_column to the field holding the text"
            )
        text = row[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {text_column!r} must be a string, got {type(text).__name__}")
        if text.strip():
            yield {"text": text, "key": text}


def pack_blocks(
    token_lists: Iterable[Sequence[int]], block_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Concatenate token lists and cut them into ``block_size`` training examples.

    Only the last, partial block is padded (with ``pad_id``); its padded
    positions get ``attention_mask = 0`` and ``labels = -100`` so they neither
    attend nor count in the loss.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        full = len(buf) // block_size * block_size
        if full:
            for row in torch.tensor(buf[:full], dtype=torch.long).view(-1, block_size):
                yield {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}
            buf = buf[full:]
    if buf:
        yield _block(buf, block_size, pad_id)


def _block(ids: list[int], block_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    n = len(ids)
    input_ids = torch.full((block_size,), pad_id, dtype=torch.long)
    input_ids[:n] = torch.tensor(ids, dtype=torch.long)
    attention_mask = torch.zeros(block_size, dtype=torch.long)
    attention_mask[:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": causal_labels(input_ids, attention_mask)}


class _BlockList(Dataset):
    """In-memory packed blocks."""

    def __init__(self, blocks: list[dict[str, torch.Tensor]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.blocks[i]


class _StreamingBlocks(IterableDataset):
    """Blocks packed lazily from a streaming (``datasets.IterableDataset``) split."""

    def __init__(self, tokenized: datasets.IterableDataset, block_size: int, pad_id: int) -> None:
        self.tokenized, self.block_size, self.pad_id = tokenized, block_size, pad_id

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        empty = True
        for block in pack_blocks((row["input_ids"] for row in self.tokenized), self.block_size, self.pad_id):
            empty = False
            yield block
        if empty:
            raise ValueError("this streaming split is empty: no non-blank documents were assigned to it; add documents")


class TextDataModule(L.LightningDataModule):
    """Tokenized, packed causal-LM blocks with deterministic train/validation/test splits.

    Args:
        tokenizer: any Hugging Face fast tokenizer, or the name of a model whose tokenizer
            to load (``"reference"``, a model directory, a hub name); needs an EOS token (used
            as document separator and, if there is no pad token, as padding).
        block_size: tokens per example.
        batch_size: examples per batch.
        data_files: file(s)/directory(ies) of text (``.txt``, ``.py``, ``.md``,
            ``.rst``) or JSON lines (``.jsonl``/``.json``).  ``None`` (and no
            ``hf_dataset``) uses the built-in corpus named by ``corpus``.
        corpus: built-in corpus used when neither ``data_files`` nor ``hf_dataset`` is
            given: ``"stdlib"`` (library source) or ``"stdlib-tests"`` (test suites and
            the language reference), see `CORPORA`.
        hf_dataset: hub dataset name, e.g. ``"wikitext"``; needs a reachable hub.
        hf_config: hub dataset configuration, e.g. ``"wikitext-2-raw-v1"``.
        hf_split: hub split whose documents are re-split by hash.
        text_column: field holding the text (JSON lines and hub datasets).
        doc_separator: if set, local text files are cut into documents on it.
        fractions: (validation, test) fractions of documents.
        streaming: tokenize and pack lazily instead of in memory (for corpora
            that do not fit); training batches are then not shuffled.
        num_workers: DataLoader workers.
        seed: seed for the train-batch shuffling order.
        max_documents: keep at most this many documents per split (quick runs).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str,
        block_size: int = 256,
        batch_size: int = 8,
        data_files: str | Path | Sequence[str | Path] | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        text_column: str = "text",
        doc_separator: str | None = None,
        fractions: tuple[float, float] = (0.05, 0.05),
        streaming: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        max_documents: int | None = None,
        corpus: str = "stdlib",
    ) -> None:
        super().__init__()
        if isinstance(tokenizer, str):
            from camera_pl.pretrained import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token (it separates documents)")
        if block_size < 2 or batch_size < 1:
            raise ValueError(f"need block_size >= 2 and batch_size >= 1, got {block_size} and {batch_size}")
        if data_files is not None and hf_dataset is not None:
            raise ValueError("pass either data_files or hf_dataset, not both")
        if streaming and num_workers > 1:
            raise ValueError("streaming reads each split in one pass; use num_workers 0 or 1 with streaming=True")
        _check_corpus(corpus)
        split_of("", fractions)  # validates the fractions early
        self.tokenizer = tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.data_files, self.hf_dataset, self.hf_config, self.hf_split = data_files, hf_dataset, hf_config, hf_split
        self.text_column, self.doc_separator, self.fractions = text_column, doc_separator, fractions
        self.streaming, self.num_workers, self.seed, self.max_documents = streaming, num_workers, seed, max_documents
        self.corpus = corpus
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.splits: dict[str, Dataset] = {}

    def _records(self) -> Iterator[dict[str, str]]:
        if self.hf_dataset is not None:
            return self._hub_records()
        if self.data_files is None:
            root = stdlib_root()
            return ({"text": _read_text(p), "key": p.relative_to(root).as_posix()} for p in corpus_files(self.corpus))
        return iter_documents(self.data_files, self.text_column, self.doc_separator)

    def _hub_records(self) -> Iterator[dict[str, str]]:
        try:
            ds = datasets.load_dataset(self.hf_dataset, self.hf_config, split=self.hf_split, streaming=True)
        except Exception as err:  # network, auth and naming errors all surface here
            raise RuntimeError(
                f"cannot load hub dataset {self.hf_dataset!r} (config {self.hf_config!r}): {err}. "
                "The hub may be unreachable; use data_files with local text or JSON lines instead"
            ) from err
        for row in ds:
            if self.text_column not in row:
                raise ValueError(
                    f"hub dataset {self.hf_dataset!r} has no column {self.text_column!r} "
                    f"(columns: {sorted(row)}); set text_column"
                )
            text = row[self.text_column]
            if isinstance(text, str) and text.strip():
                yield {"text": text, "key": text}

    def _split_documents(self, split: str) -> Iterator[dict[str, str]]:
        count = 0
        for record in self._records():
            if split_of(record["key"], self.fractions) == split:
                yield {"text": record["text"]}
                count += 1
                if self.max_documents is not None and count >= self.max_documents:
                    return

    def _tokenize(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = self.tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [self.tokenizer.eos_token_id] for x in ids]}

    def build_split(self, split: str) -> Dataset:
        """Tokenize and pack one split; raises if it holds no text."""
        _check_split(split)
        if self.streaming:
            docs = datasets.IterableDataset.from_generator(self._split_documents, gen_kwargs={"split": split})
            tokenized = docs.map(self._tokenize, batched=True, remove_columns=["text"])
            return _StreamingBlocks(tokenized, self.block_size, self.pad_id)
        rows = list(self._split_documents(split))
        if not rows:
            raise ValueError(
                f"the {split} split is empty: no non-blank documents were assigned to it "
                f"(fractions={self.fractions}); provide more documents, or set doc_separator to cut text files"
            )
        # The dataset lives in memory, so nothing is cached; an explicit fingerprint
        # spares `datasets` from pickling this module to hash `_tokenize`.
        tokenized = datasets.Dataset.from_list(rows).map(
            self._tokenize, batched=True, remove_columns=["text"], new_fingerprint=f"camera_pl-{split}-tokenized"
        )
        return _BlockList(list(pack_blocks(tokenized["input_ids"], self.block_size, self.pad_id)))

    def setup(self, stage: str | None = None) -> None:
        """Build the splits the stage needs (all of them when ``stage`` is None)."""
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(stage, SPLITS)
        for split in wanted:
            if split not in self.splits:
                self.splits[split] = self.build_split(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup({"train": "fit", "validation": "validate", "test": "test"}[split])
        ds = self.splits[split]
        shuffle = shuffle and not isinstance(ds, IterableDataset)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
