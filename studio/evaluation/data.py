"""Examples the studio feeds models: builtin sets and user files (.txt, .jsonl, .csv).

One `Example` per line/row. Text is required; `label` (class id), `target` (reference output text) and
`text_pair`/`score` (scored sentence pairs) are used when present.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from studio.errors import BadInput
from studio.resources import resource

BUILTIN_DATA = {
    "builtin:sentences": "sentences.txt",
    "builtin:sentence-pairs": "sentence_pairs.jsonl",
    "builtin:sentiment": "sentiment.jsonl",
    "builtin:translation-en-de": "translation_en_de.jsonl",
}

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
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{where}: label {label!r} is not an integer class id", path=path) from exc
    else:
        label = None
    score = row.get("score")
    try:
        score = None if score in (None, "") else float(score)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: score {score!r} is not a number", path=path) from exc
    return Example(
        text=text,
        label=label,
        target=next((row[k] for k in _TARGET_KEYS if isinstance(row.get(k), str)), None),
        text_pair=next((row[k] for k in _PAIR_KEYS if isinstance(row.get(k), str)), None),
        score=score,
    )


def read_examples(path: Path) -> list[Example]:
    if not path.exists():
        raise BadInput("no such data file", path=path)
    if path.is_dir():
        raise BadInput("expected a data file (.txt, .jsonl or .csv), got a folder", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"the data file is not UTF-8 text ({exc.reason} at byte {exc.start})", path=path
        ) from exc
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        examples = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"line {i} is not JSON ({exc.msg})", path=path) from exc
            if not isinstance(row, dict):
                raise BadInput(f"line {i} is not a JSON object", path=path)
            examples.append(_example(row, f"line {i}", path))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise BadInput("the CSV file has no header row", path=path)
        examples = [_example(row, f"row {i}", path) for i, row in enumerate(reader, 2)]
    elif suffix in (".txt", ".text", ""):
        examples = [Example(text=line.strip()) for line in text.splitlines() if line.strip()]
    else:
        raise BadInput(f"unsupported data file type '{suffix}' (expected .txt, .jsonl or .csv)", path=path)
    if not examples:
        raise BadInput("the data file has no examples", path=path)
    return examples


def load_examples(spec: str | Path, max_examples: int | None = None) -> list[Example]:
    """Examples from `builtin:NAME` or a file, the first `max_examples` of them (the files are pre-shuffled)."""
    text = str(spec)
    if text.startswith("builtin:"):
        if text not in BUILTIN_DATA:
            raise BadInput(f"unknown builtin data set (known: {', '.join(BUILTIN_DATA)})", path=text)
        examples = read_examples(resource("data", BUILTIN_DATA[text]))
    else:
        examples = read_examples(Path(text).expanduser())
    if max_examples is not None:
        if max_examples < 1:
            raise BadInput(f"max examples must be at least 1, got {max_examples}")
        examples = examples[:max_examples]
    return examples


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
