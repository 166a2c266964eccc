"""`builtin:tinylm`, the small causal LM the studio ships (scripts/train_tinylm.py): it loads offline with
plain transformers, it is Llama-style with grouped-query attention, its tokenizer is a byte-level BPE with
BOS/EOS/PAD, the studio opens and inspects it as a causal LM, and it is genuinely trained (its perplexity
on sentences it never saw is far below that of the same architecture at random initialisation)."""

from __future__ import annotations

import json
import math

import pytest

from studio.checkpoints import BUILTIN_MODELS, builtin_tinylm_path, open_checkpoint
from studio.cli import main
from studio.errors import BadInput
from studio.resources import resource

# Held-out stdlib modules (training.json lists them): the training script never trains on their docstrings,
# which are ordinary English technical prose.
HELD_OUT_MODULES = ("codeop", "plistlib", "pyclbr", "zipimport")
# Everyday sentences from the studio's evaluation set, kept out of the training text too; the training text
# is Python's documentation, so these are out of its domain and the model is only ~10x better than random.
SENTENCES = (
    "A search engine ranks web pages based on how relevant they are to a query.",
    "Machine learning models need large amounts of data to learn useful patterns.",
    "Open-source software can be inspected, modified, and shared by anyone.",
    "Programmers often use version control systems to track changes in their code.",
)


@pytest.fixture(scope="module")
def folder():
    return builtin_tinylm_path()


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def lm(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()


def test_the_folder_is_small_and_complete(folder):
    names = {p.name for p in folder.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert expected <= names
    assert (folder / "model.safetensors").stat().st_size <= 10.5e6


def test_loads_offline_as_a_llama_with_grouped_query_attention(lm):
    cfg = lm.config
    assert type(lm).__name__ == "LlamaForCausalLM" and cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.hidden_act == "silu"  # SwiGLU MLP
    assert str(lm.dtype) == "torch.float32"
    assert type(lm.model.norm).__name__ == "LlamaRMSNorm"


def test_tokenizer_is_byte_level_bpe_with_bos_eos_pad(tokenizer, lm):
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert 4096 <= len(tokenizer) <= 8192 and len(tokenizer) == lm.config.vocab_size
    text = "naïve café: 5 € — 日本"  # characters the training text may never contain: bytes cover them
    enc = tokenizer(text)["input_ids"]
    assert enc[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in enc
    assert tokenizer.decode(enc, skip_special_tokens=True) == text
    batch = tokenizer(["one", "a longer sentence here"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id and batch["attention_mask"][0][-1] == 0


def _perplexity(model, tokenizer, texts, max_tokens: int = 96) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            x = torch.tensor([tokenizer(text)["input_ids"][:max_tokens]])
            total += float(model(input_ids=x, labels=x).loss) * (x.shape[1] - 1)
            count += x.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def random_init(lm):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(lm.config).eval()


def test_it_is_trained_far_below_a_random_init_on_technical_prose_it_never_saw(
    folder, lm, tokenizer, random_init
):
    import importlib
    import inspect

    record = json.loads((folder / "training.json").read_text())
    assert set(HELD_OUT_MODULES) <= set(record["held_out_modules"])  # never trained on
    docs = [inspect.getdoc(importlib.import_module(name)) for name in HELD_OUT_MODULES]
    assert all(doc and len(doc.split()) > 50 for doc in docs)
    trained, untrained = _perplexity(lm, tokenizer, docs), _perplexity(random_init, tokenizer, docs)
    assert untrained > 1000  # about the vocabulary size: a random model guesses uniformly
    assert trained < untrained / 20, (trained, untrained)


def test_everyday_sentences_it_never_saw_are_still_well_below_random(lm, tokenizer, random_init):
    sentences = set(resource("data", "sentences.txt").read_text(encoding="utf-8").splitlines())
    assert set(SENTENCES) <= sentences  # the evaluation sentences, which training never sees
    trained, untrained = _perplexity(lm, tokenizer, SENTENCES), _perplexity(random_init, tokenizer, SENTENCES)
    assert trained < untrained / 5, (trained, untrained)


def test_generates_english_looking_text(lm, tokenizer):
    enc = tokenizer("Return the number of", return_tensors="pt")
    out = lm.generate(**enc, min_new_tokens=16, max_new_tokens=24, do_sample=False, repetition_penalty=1.2)
    new = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    words = new.split()
    assert len(words) >= 4, new
    assert sum(w.strip(".,;:()'\"").isalpha() for w in words) >= len(words) / 2, new


def test_studio_opens_it_as_a_causal_lm():
    assert "builtin:tinylm" in BUILTIN_MODELS
    model = open_checkpoint("builtin:tinylm")
    assert model.family == "causal-lm" and model.format == "builtin"
    assert model.architecture == "LlamaForCausalLM"


def test_inspect_json_reports_the_folder(capsys, folder):
    assert main(["inspect", "builtin:tinylm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["path"] == str(folder) and out["model"]["family"] == "causal-lm"
    assert out["model"]["parameters"] == sum(x["params"] for x in out["layers"])


def test_an_unknown_builtin_names_the_known_ones():
    with pytest.raises(BadInput, match=r"builtin:minilm, builtin:tinylm"):
        open_checkpoint("builtin:tinylm2")
