"""Zero-shot multiple-choice tasks built from held-out Python source files.

Both tasks are built deterministically (fixed seed, sorted files) from the test
split of the stdlib corpus by default, so a model trained on the train split
has never seen the files they quote.

* ``next_line``: given up to 6 lines of code, pick the true next line among 4;
  the 3 distractors are lines from *other* files, re-indented like the true
  line so indentation gives nothing away.
* ``docstring_match``: given a function's ``def`` header up to its opening
  triple quote, pick the first line of its own docstring among 4; distractors
  are docstring first lines of functions in other files.

`write_task` stores them as JSON lines, which ``camera_pl.evaluate`` hands to
lm-evaluation-harness (task definition: ``lm_eval_tasks/offline_mc.yaml``).
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TASKS = ("next_line", "docstring_match")
NUM_CHOICES = 4
DEFAULT_EXAMPLES = 400  # items per task unless asked otherwise (docstring_match has fewer)
CONTEXT_LINES = 6
MIN_LINE_CHARS = 12


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: the model scores ``context + choices[i]`` for each i."""

    context: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"need at least 2 non-empty string choices, got {self.choices!r}")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} is out of range for {len(self.choices)} choices")


def write_task(path: str | Path, examples: Sequence[MCExample]) -> Path:
    """Write examples as JSON lines (``context``, ``choices``, ``label``), the format lm-eval reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (json.dumps({"context": e.context, "choices": list(e.choices), "label": e.label}) for e in examples)
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _candidates_next_line(source: str) -> list[tuple[str, str]]:
    """``(context, line)`` pairs for every substantial line with enough preceding lines."""
    lines = source.splitlines()
    out = []
    for i in range(CONTEXT_LINES, len(lines)):
        if len(lines[i].strip()) >= MIN_LINE_CHARS:
            out.append(("\n".join(lines[i - CONTEXT_LINES : i]) + "\n", lines[i]))
    return out


def _candidates_docstring(source: str) -> list[tuple[str, str]]:
    """``(header up to opening quotes, docstring first line)`` for documented functions."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = node.body[0]
        line = lines[doc.lineno - 1]
        quote = line[doc.col_offset : doc.col_offset + 3]
        rest = line[doc.col_offset + 3 :]
        if quote not in ('"""', "'''") or len(rest.strip()) < MIN_LINE_CHARS:
            continue
        header = "\n".join(lines[node.lineno - 1 : doc.lineno - 1] + [line[: doc.col_offset + 3]])
        out.append((header, rest))
    return out


_BUILDERS = {"next_line": _candidates_next_line, "docstring_match": _candidates_docstring}


def _reindent(line: str, like: str) -> str:
    return like[: len(like) - len(like.lstrip())] + line.lstrip()


def build_examples(task: str, files: Sequence[Path], n: int = DEFAULT_EXAMPLES, seed: int = 0) -> list[MCExample]:
    """Up to ``n`` examples of ``task`` from ``files``, drawn evenly across files with a fixed seed."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    per_file = [_BUILDERS[task](Path(f).read_text(encoding="utf-8")) for f in sorted(map(Path, files))]
    per_file = [c for c in per_file if c]
    if len(per_file) < 2:
        raise ValueError(f"{task}: need candidates from at least 2 files to draw distractors, got {len(per_file)}")
    rng = random.Random(f"{task}-{seed}")
    for cands in per_file:
        rng.shuffle(cands)
    examples: list[MCExample] = []
    rounds = max(len(c) for c in per_file)
    for r in range(rounds):
        for f, cands in enumerate(per_file):
            if len(examples) >= n:
                return examples
            if r >= len(cands):
                continue
            context, answer = cands[r]
            distractors: list[str] = []
            while len(distractors) < NUM_CHOICES - 1:
                other = rng.choice([g for g in range(len(per_file)) if g != f])
                line = rng.choice(per_file[other])[1]
                if task == "next_line":
                    line = _reindent(line, answer)
                if line.strip() != answer.strip() and line not in distractors:
                    distractors.append(line)
            label = rng.randrange(NUM_CHOICES)
            choices = distractors[:label] + [answer] + distractors[label:]
            examples.append(MCExample(context, tuple(choices), label))
    return examples
