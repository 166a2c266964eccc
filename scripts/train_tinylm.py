"""Train `builtin:tinylm`: a small Llama-style causal LM on English text that ships with Python itself.

    OMP_NUM_THREADS=1 python scripts/train_tinylm.py            # writes resources/models/tinylm/

Why this exists: the studio needs a generative model that ships with it (nothing downloads at run time), is
small enough to commit, and is genuinely trained, so that quantizing or pruning it has a visible cost in
quality. Anyone can rebuild it from this script alone: the training text is the standard library's own
documentation (docstrings of the .py files under the stdlib directory, read with `ast`, plus the
`pydoc_data` topics), the tokenizer is trained on that text, and every random choice is seeded.

Held out, never trained on: (1) the docstrings of a fixed, hash-chosen set of stdlib modules (and any
paragraph of theirs that also occurs in the training text is dropped), and (2) the studio's own evaluation
sentences (resources/data/sentences.txt, written for the project; any training document containing one of
them would be dropped). The script reports the perplexity of the trained model and of the same
architecture at random initialisation on both.

The result depends on the Python version whose stdlib is read (recorded in training.json); the corpus,
tokenizer and training are deterministic for a given Python, torch and thread count.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import random
import sys
import sysconfig
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "resources" / "models" / "tinylm"
SENTENCES = ROOT / "resources" / "data" / "sentences.txt"

SEED = 0
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Directories whose docstrings are test scaffolding rather than documentation.
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HELD_OUT_BUCKETS = 16  # a top-level module is held out when crc32(name) % 16 == 0 (about 1 in 16)


# ------------------------------------------------------------------------------------------------ corpus


def _module_name(path: Path, stdlib: Path) -> str:
    first = path.relative_to(stdlib).parts[0]
    return first[:-3] if first.endswith(".py") else first


def held_out(module: str) -> bool:
    return zlib.crc32(module.encode()) % HELD_OUT_BUCKETS == 0


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(top-level module, docstring) for every module, class and function docstring of the stdlib's .py
    files, in sorted file order; exact duplicates are kept once (many methods share 'Return self.')."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_PARTS & set(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # lib2to3 fixtures, non-UTF-8 files
            continue
        module = _module_name(path, stdlib)
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.split()) >= 4 and doc not in seen:
                    seen.add(doc)
                    docs.append((module, doc))
    return docs


def pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        return []
    return [topics[key].strip() for key in sorted(topics)]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 60]


def build_corpus() -> dict[str, list[str]]:
    docstrings = stdlib_docstrings()
    train = [doc for module, doc in docstrings if not held_out(module)] + pydoc_topics()
    sentences = [s.strip() for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    # The evaluation sentences were written for the project, so none should occur; make sure of it.
    train = [doc for doc in train if not any(s in doc for s in sentences)]
    train_paragraphs = {p for doc in train for p in _paragraphs(doc)}
    held = [
        doc
        for module, doc in docstrings
        if held_out(module) and not any(p in train_paragraphs for p in _paragraphs(doc))
    ]
    modules = sorted({module for module, _ in docstrings if held_out(module)})
    return {"train": train, "held_out": held, "held_out_modules": modules, "sentences": sentences}


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # Every encoded text starts with BOS, so the first real token is predicted too (the studio scores
    # tokens 1.. of each example) and generation from a prompt starts the way training did.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )
    fast.save_pretrained(str(out))
    # AutoTokenizer would otherwise pick the class from config.json's model_type (Llama's tokenizer),
    # which rebuilds a SentencePiece-style pipeline instead of this byte-level BPE.
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


# ------------------------------------------------------------------------------------------------ model


def model_config(tokenizer, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documents back to back, each as BOS ... EOS (the tokenizer adds the BOS)."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]:
        ids += [*enc, tokenizer.eos_token_id]
    return ids


def blocks(stream: list[int], length: int):
    import torch

    n = len(stream) // length
    return torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)


def stream_perplexity(model, data, batch: int = 16) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = data[i : i + batch]
            out = model(input_ids=x, labels=x)
            n = x.numel() - x.shape[0]  # the first token of each block is not predicted
            total += float(out.loss) * n
            count += n
    model.train()
    return math.exp(total / count)


def sentence_perplexity(model, tokenizer, sentences: list[str]) -> float:
    """Per-token perplexity of each sentence after BOS (the way the studio scores an example)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in sentences:
            x = torch.tensor([tokenizer(s)["input_ids"]])
            out = model(input_ids=x, labels=x)
            n = x.shape[1] - 1
            total += float(out.loss) * n
            count += n
    model.train()
    return math.exp(total / count)


def evaluate(model, tokenizer, held_blocks, sentences) -> dict[str, float]:
    return {
        "held_out_modules": round(stream_perplexity(model, held_blocks), 3),
        "sentences": round(sentence_perplexity(model, tokenizer, sentences), 3),
    }


def train(args) -> None:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    corpus = build_corpus()
    train_chars = sum(len(t) for t in corpus["train"])
    print(
        f"corpus: {len(corpus['train'])} training documents ({train_chars:,} characters), "
        f"{len(corpus['held_out'])} held-out docstrings from {len(corpus['held_out_modules'])} modules: "
        f"{', '.join(corpus['held_out_modules'])}",
        flush=True,
    )
    tokenizer = train_tokenizer(corpus["train"], args.vocab, out)
    train_ids = token_stream(tokenizer, corpus["train"])
    held_ids = token_stream(tokenizer, corpus["held_out"])
    train_blocks = blocks(train_ids, args.seq + 1)
    held_blocks = blocks(held_ids, args.seq + 1)[: args.eval_blocks]
    print(
        f"tokenizer: {len(tokenizer)} tokens; training text {len(train_ids):,} tokens "
        f"({len(train_blocks)} blocks of {args.seq + 1}), held-out {len(held_ids):,} tokens",
        flush=True,
    )

    config = model_config(tokenizer, args)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)
    random_init = evaluate(model, tokenizer, held_blocks, corpus["sentences"])
    print(f"random init perplexity: {random_init}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 25)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine down to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(train_blocks), generator=gen)
    cursor, epoch = 0, 0
    train_started = time.time()
    model.train()
    for step in range(args.steps):
        if cursor + args.batch > len(order):  # next epoch: a fresh seeded shuffle
            order = torch.randperm(len(train_blocks), generator=gen)
            cursor, epoch = 0, epoch + 1
        x = train_blocks[order[cursor : cursor + args.batch]]
        cursor += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step}/{args.steps} epoch {epoch} loss {float(loss.detach()):.3f} lr {lr_at(step):.2e} "
                f"{time.time() - train_started:.0f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            held = round(stream_perplexity(model, held_blocks), 2)
            print(f"  held-out modules perplexity at step {step}: {held}", flush=True)
    train_seconds = time.time() - train_started

    trained = evaluate(model, tokenizer, held_blocks, corpus["sentences"])
    print(f"trained perplexity: {trained}", flush=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    sample = generate_sample(model, tokenizer, "The function returns")
    print(f"sample: {sample!r}", flush=True)
    record = {
        "parameters": params,
        "training_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "steps": args.steps,
        "batch": args.batch,
        "sequence_length": args.seq,
        "tokens_seen": args.steps * args.batch * args.seq,
        "epochs": round(args.steps * args.batch / len(train_blocks), 2),
        "training_documents": len(corpus["train"]),
        "training_characters": train_chars,
        "training_tokens": len(train_ids),
        "held_out_modules": corpus["held_out_modules"],
        "held_out_docstrings": len(corpus["held_out"]),
        "held_out_tokens_evaluated": int(held_blocks.numel()),
        "evaluation_sentences": len(corpus["sentences"]),
        "perplexity": {"trained": trained, "random_init": random_init},
        "seed": SEED,
        "threads": args.threads,
        "lr": args.lr,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sample": sample,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2), flush=True)


def generate_sample(model, tokenizer, prompt: str) -> str:
    import torch

    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the model folder to write")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks scored (bounds the time)")
    p.add_argument("--eval-every", type=int, default=200, help="score the held-out text every N steps")
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, stdlib {sysconfig.get_paths()['stdlib']}", flush=True)
    train(args)


if __name__ == "__main__":
    main()
