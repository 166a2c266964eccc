"""Examples the studio feeds models: builtin sets and user files (.txt, .jsonl, .csv).

One `Example` per line/row. Text is required; `label` (class id), `target` (reference output text) and
`text_pair`/`score` (scored sentence pairs) are used when present.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from studio.errors import BadInput
from studio.resources import resource
from studio.safe_files import MB, open_regular, regular_file, text_lines

BUILTIN_DATA = {
    "builtin:sentences": "sentences.txt",
    "builtin:sentence-pairs": "sentence_pairs.jsonl",
    "builtin:sentiment": "sentiment.jsonl",
    "builtin:translation-en-de": "translation_en_de.jsonl",
    "builtin:python-docs": "python_docs.jsonl",
}

DATA_FILE = "data file"
MAX_LINE_BYTES = 16 * MB  # one example; csv.field_size_limit() bounds a quoted field across lines
MAX_DATA_BYTES = 1024 * MB  # read until the examples asked for are there; this bounds a file without them

_TEXT_KEYS = ("text", "sentence", "source", "sentence1", "input", "prompt")
_PAIR_KEYS = ("text_pair", "sentence2")
_TARGET_KEYS = ("target", "reference", "translation", "output")


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None
    target: str | None = None
    text_pair: str | None = None
    score: float | None = None


def _example(row: dict, where: str, path: Path) -> Example:
    text = next((row[k] for k in _TEXT_KEYS if row.get(k) not in (None, "")), None)
    if not isinstance(text, str):
        raise BadInput(f"{where} has no text field (one of: {', '.join(_TEXT_KEYS)})", path=path)
    label = row.get("label")
    if label not in (None, ""):
        try:
            label = int(label)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a JSON Infinity
            raise BadInput(
                f"{where}: label {str(label)[:40]!r} is not an integer class id", path=path
            ) from exc
    else:
        label = None
    score = row.get("score")
    try:
        score = None if score in (None, "") else float(score)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"{where}: score {str(score)[:40]!r} is not a number", path=path) from exc
    if score is not None and not math.isfinite(score):
        raise BadInput(f"{where}: score {score} is not a finite number", path=path)
    return Example(
        text=text,
        label=label,
        target=next((row[k] for k in _TARGET_KEYS if isinstance(row.get(k), str)), None),
        text_pair=next((row[k] for k in _PAIR_KEYS if isinstance(row.get(k), str)), None),
        score=score,
    )


def _jsonl_examples(lines: Iterator[str], path: Path) -> Iterator[Example]:
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"line {i} is not JSON ({exc.msg})", path=path) from exc
        except RecursionError as exc:  # json's decoder recurses once per nesting level
            raise BadInput(f"line {i} is JSON nested too deeply to read", path=path) from exc
        except ValueError as exc:  # an integer of more than 4300 digits
            raise BadInput(f"line {i} is not usable JSON ({str(exc).split(':')[0]})", path=path) from exc
        if not isinstance(row, dict):
            raise BadInput(f"line {i} is not a JSON object", path=path)
        yield _example(row, f"line {i}", path)


def _csv_examples(lines: Iterator[str], path: Path) -> Iterator[Example]:
    reader = csv.DictReader(lines)
    lines_read = reader.reader  # its count is current even when a line fails (DictReader's lags behind)
    try:
        if not reader.fieldnames:
            raise BadInput("the CSV file has no header row", path=path)
        for row in reader:
            yield _example(row, f"row {lines_read.line_num}", path)
    except csv.Error as exc:  # a field over csv.field_size_limit(), a stray quote
        raise BadInput(f"line {lines_read.line_num} is not readable CSV ({exc})", path=path) from exc


def read_examples(path: Path, max_examples: int | None = None) -> list[Example]:
    """The examples of a .txt/.jsonl/.csv file, the first `max_examples` of them: the file is read only
    as far as they go (see studio.safe_files for what else is refused before and while reading)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".txt", ".text", ""):
        regular_file(path, DATA_FILE)
        raise BadInput(f"unsupported data file type '{suffix}' (expected .txt, .jsonl or .csv)", path=path)
    examples: list[Example] = []
    with open_regular(path, DATA_FILE) as fh:
        lines = text_lines(fh, path, DATA_FILE, MAX_LINE_BYTES, MAX_DATA_BYTES)
        if suffix == ".jsonl":
            rows: Iterator[Example] = _jsonl_examples(lines, path)
        elif suffix == ".csv":
            rows = _csv_examples(lines, path)
        else:
            rows = (Example(text=line.strip()) for line in lines if line.strip())
        for example in rows:
            examples.append(example)
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise BadInput("the data file has no examples", path=path)
    return examples


def load_examples(spec: str | Path, max_examples: int | None = None) -> list[Example]:
    """Examples from `builtin:NAME` or a file, the first `max_examples` of them (the files are pre-shuffled)."""
    if max_examples is not None and max_examples < 1:
        raise BadInput(f"max examples must be at least 1, got {max_examples}")
    text = str(spec)
    if text.startswith("builtin:"):
        if text not in BUILTIN_DATA:
            raise BadInput(f"unknown builtin data set (known: {', '.join(BUILTIN_DATA)})", path=text)
        return read_examples(resource("data", BUILTIN_DATA[text]), max_examples)
    return read_examples(Path(text).expanduser(), max_examples)


def timing_examples(examples: Sequence[Example], batch_size: int, seq_len: int) -> list[Example]:
    """`batch_size` examples of real text long enough to fill `seq_len` tokens after truncation."""
    texts = [e.text for e in examples] or ["The quick brown fox jumps over the lazy dog."]
    out = []
    for i in range(batch_size):
        parts, words = [], 0
        j = i
        while words < seq_len * 1.2:  # about 1.3 tokens per word: 1.2 x words is comfortably enough
            text = texts[j % len(texts)]
            parts.append(text)
            words += len(text.split())
            j += 1
        out.append(
            Example(text=" ".join(parts), target=examples[i % len(examples)].target if examples else None)
        )
    return out
