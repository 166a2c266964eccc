"""Write `builtin:python-docs` (resources/data/python_docs.jsonl): text from `builtin:tinylm`'s own training
corpus, for recovery training (distill, train.lora, quantize.qat) after compressing it.

    python scripts/tinylm_recovery_data.py

Recovering a pruned or quantized model works best on text like what it learnt from; for tinylm that is the
standard library's documentation. The file is a seeded, shuffled sample of the training documents of
scripts/train_tinylm.py (the held-out modules' docstrings, which the LLM bench's perplexity reads, are left
out there and so never appear here), each cut to MAX_CHARS (longer than tinylm's 512-token context).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tinylm import ROOT, SEED, build_corpus

OUT = ROOT / "resources" / "data" / "python_docs.jsonl"
DOCUMENTS = 2000
MAX_CHARS = 2000


def main() -> None:
    corpus = build_corpus()
    train = sorted(set(corpus["train"]))
    random.Random(SEED).shuffle(train)
    rows = [json.dumps({"text": doc[:MAX_CHARS]}, ensure_ascii=False) for doc in train]
    OUT.write_text("\n".join(rows[:DOCUMENTS]) + "\n", encoding="utf-8")
    print(f"{OUT}: {min(len(rows), DOCUMENTS)} of {len(train)} training documents")


if __name__ == "__main__":
    main()
