"""The worker's `generate` job on builtin:tinylm: the events it streams, what they add up to, and what it
refuses. Run in this process through `worker.run_job` (the worker's own entry point after reading stdin);
the Generate view's tests run it in a real worker process.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil

import pytest

from studio.errors import BadInput
from studio.events import Done, Error, Metric, Progress, Token, from_json, to_json
from studio.generate_job import GenerateRequest, Side, generate_job, profile_lengths
from studio.resources import resources_dir
from studio.worker import run_job

PROMPT = "The function returns"
NEW_TOKENS = 5
CONTEXTS = (8, 16)


def run(data: dict) -> tuple[int, list]:
    out = io.StringIO()
    code = run_job(data, out)
    return code, [from_json(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def workspace_with_copy(tmp_path_factory):
    """A workspace holding one torch variant of builtin:tinylm: its folder copied as a saved variant."""
    from studio.variants import Workspace

    root = tmp_path_factory.mktemp("workspace")
    workspace = Workspace(root)
    staged = root / "staged"
    shutil.copytree(resources_dir() / "models" / "tinylm", staged)
    row = workspace.commit_variant(
        staged, kind="torch", parent=None, model="builtin:tinylm", recipe={"steps": []}, metrics={}
    )
    return root, row["id"]


@pytest.fixture(scope="module")
def tinylm():
    from studio.checkpoints import open_checkpoint

    return open_checkpoint("builtin:tinylm")


def recomputed_text(model, prompt: str, new_tokens: int) -> str:
    """Greedy decoding without a cache (the whole sequence again for each token), stopping at EOS."""
    import torch

    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    new: list[int] = []
    with torch.no_grad():
        while len(new) < new_tokens:
            nxt = int(model.module(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def cache_bytes_by_hand(model, context: int) -> int:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.module.config)
    with torch.no_grad():
        model.module(
            input_ids=torch.zeros((1, context), dtype=torch.long), past_key_values=cache, use_cache=True
        )
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_a_generate_job_streams_both_sides_then_profiles_them(workspace_with_copy, tinylm):
    root, row_id = workspace_with_copy
    request = GenerateRequest(
        (Side("A", source="builtin:tinylm"), Side("B", row=row_id)), PROMPT, NEW_TOKENS, CONTEXTS
    )
    code, events = run(generate_job(request, root).to_dict())
    assert code == 0, events[-1]
    assert isinstance(events[0], Progress) and events[0].message == "loading A: builtin:tinylm"
    tokens = [e for e in events if isinstance(e, Token)]
    # A and B take turns, one token each, so both streams move together
    assert [t.variant for t in tokens] == ["A", "B"] * NEW_TOKENS
    expected = recomputed_text(tinylm, PROMPT, NEW_TOKENS)
    assert expected.strip()
    for side in ("A", "B"):
        stream = [t for t in tokens if t.variant == side]
        assert [t.tokens for t in stream] == list(range(1, NEW_TOKENS + 1))
        assert [t.finished for t in stream] == [False] * (NEW_TOKENS - 1) + [True]
        for before, after in itertools.pairwise(stream):  # the text so far only grows
            assert after.text.startswith(before.text) and len(after.text) > len(before.text)
        assert stream[-1].text == expected  # the copy generates exactly what the original does
        assert len({t.ttft_ms for t in stream}) == 1 and stream[0].ttft_ms > 0
        assert stream[0].tokens_per_s == 0 and all(t.tokens_per_s > 0 for t in stream[1:])

    metrics = [e for e in events if isinstance(e, Metric)]
    assert {(m.name, m["variant"], m["context_tokens"]) for m in metrics} == {
        (name, side, n)
        for name in ("decode_tokens_per_s", "kv_cache_bytes")
        for side in "AB"
        for n in CONTEXTS
    }
    for m in metrics:
        if m.name == "kv_cache_bytes":
            assert m.value == cache_bytes_by_hand(tinylm, m["context_tokens"])
        else:
            assert m.value > 0

    done = events[-1]
    assert isinstance(done, Done) and done.result["kind"] == "generate"
    assert done.result["variants"]["A"]["text"] == done.result["variants"]["B"]["text"] == expected
    assert done.result["variants"]["B"]["row"] == row_id
    assert [p["context_tokens"] for p in done.result["profile"]["A"]] == list(CONTEXTS)
    assert done.result["variants"]["A"]["tokens"] == NEW_TOKENS


def test_token_events_round_trip_and_the_job_reads_back():
    event = Token("B", 3, "a function", 12.5, 240.0, True)
    assert from_json(to_json(event)) == event
    assert json.loads(to_json(event))["type"] == "token"
    request = GenerateRequest((Side("A", source="builtin:tinylm"), Side("B", row="abc")), "Hi", 7, (8, 16), 3)
    job = json.loads(generate_job(request, "/tmp/ws").payload())
    assert job["kind"] == "generate" and job["trust"] is False
    assert GenerateRequest.from_dict(job["generate"]) == request
    assert Side.from_key("B", Side("", row="abc").key) == Side("B", row="abc")


def test_profile_lengths_double_within_the_context(tinylm):
    assert profile_lengths(tinylm, 8) == [16, 32, 64, 128, 256]  # 512 positions leave no room for 512 + 9
    assert profile_lengths(tinylm, 8, [8, 503]) == [8, 503]
    with pytest.raises(BadInput, match="beyond the model's context of 512"):
        profile_lengths(tinylm, 8, [504])


@pytest.mark.parametrize(
    ("generate", "message"),
    [
        ({"variants": [{"label": "A", "source": "builtin:tinylm"}], "prompt": "  "}, "'generate.prompt'"),
        (
            {"variants": [{"label": "A", "source": "builtin:tinylm"}], "prompt": "x", "new_tokens": 0},
            "'generate.new_tokens'",
        ),
        ({"variants": [], "prompt": "x"}, "'generate.variants'"),
        (
            {"variants": [{"label": "A", "source": "builtin:tinylm"}], "prompt": "x", "new_tokens": 600},
            "beyond the model's context of 512 positions",
        ),
        (
            {"variants": [{"label": "A", "source": "builtin:minilm"}], "prompt": "x"},
            "feature-extraction model: it does not generate text",
        ),
        ({"variants": [{"label": "A", "row": "no-such-id"}], "prompt": "x"}, "no variant 'no-such-id'"),
    ],
)
def test_bad_requests_are_bad_input_errors(tmp_path, generate, message):
    code, events = run({"kind": "generate", "workspace": str(tmp_path), "generate": generate})
    assert code == 2
    assert isinstance(events[-1], Error) and events[-1].kind == "bad-input"
    assert message in events[-1].message
    assert not any(isinstance(e, Token) for e in events)


def test_a_variant_of_another_kind_is_refused_with_the_reason(tmp_path):
    from studio.variants import Workspace

    workspace = Workspace(tmp_path)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.xml").write_bytes(b"not read: the row's kind refuses it first")
    row = workspace.commit_variant(
        staged, kind="openvino", parent=None, model="builtin:tinylm", recipe={}, metrics={}
    )
    code, events = run(
        {
            "kind": "generate",
            "workspace": str(tmp_path),
            "generate": {"variants": [{"label": "B", "row": row["id"]}], "prompt": "x"},
        }
    )
    assert code == 2 and "is a openvino variant: only torch variants and ONNX graphs" in events[-1].message
