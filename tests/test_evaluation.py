"""Metric code against hand-computed values; end-to-end run JSON; compare; export; disk full."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from studio.evaluation.latency import bootstrap_median_ci, significant, summarise
from studio.evaluation.quality import QualityAccumulator, corpus_scores, sentence_bleu
from studio.families import Batch


def test_percentiles_and_throughput_by_hand():
    s = summarise([1.0, 2.0, 3.0, 4.0, 5.0], batch_size=10)
    assert s["p50"] == 3.0 and s["mean"] == 3.0
    assert s["p95"] == pytest.approx(4.8)  # numpy linear interpolation: 4 + 0.8 * (5 - 4)
    assert s["p99"] == pytest.approx(4.96)
    assert s["throughput_per_s"] == pytest.approx(10 / 0.003)


def test_bootstrap_ci_fixed_seed_brackets_the_median_and_repeats():
    samples = [10.0, 11.0, 9.5, 10.2, 10.1, 30.0, 9.9, 10.4]
    lo, hi = bootstrap_median_ci(samples, seed=0)
    assert (lo, hi) == bootstrap_median_ci(samples, seed=0)
    assert lo <= float(np.median(samples)) <= hi
    assert bootstrap_median_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)


def test_significance_of_identical_and_separated_samples():
    same = summarise([10.0, 10.5, 9.8, 10.2, 10.1, 9.9], 1)
    assert significant(same, same)["significant"] is False
    fast = summarise([5.0, 5.1, 4.9, 5.2, 5.0, 4.8], 1)
    verdict = significant(same, fast)
    assert verdict["significant"] is True and verdict["permutation_p"] < 0.05


def test_perplexity_of_a_known_distribution():
    """A model that puts probability 1/4 on every next token has perplexity exactly 4."""
    import torch

    ids = torch.tensor([[0, 1, 2, 3, 1]])
    logits = torch.zeros(1, 5, 4)  # uniform over a vocabulary of 4
    acc = QualityAccumulator("causal-lm", [object()])
    acc.add(Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), logits, logits)
    base, var = acc.results()
    assert base["perplexity"] == pytest.approx(4.0) and var["perplexity"] == pytest.approx(4.0)
    assert var["top1_agreement"] == 1.0 and var["kl_divergence"] == pytest.approx(0.0, abs=1e-12)


def test_bleu_identical_and_disjoint():
    same = corpus_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert corpus_scores(["alpha beta gamma delta"], ["one two three four"])["bleu"] == pytest.approx(0.0)
    assert sentence_bleu("a b c d", "w x y z") == pytest.approx(0.0)


def test_fidelity_cosine_and_classifier_agreement_by_hand():
    import torch

    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    var = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    acc = QualityAccumulator("feature-extraction", [object(), object()])
    acc.add(Batch({}), base, var)
    q = acc.results()[1]
    assert q["fidelity_cosine"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert q["fidelity_cosine_min"] == pytest.approx(1 / math.sqrt(2))
    acc = QualityAccumulator("text-classification", [object(), object()])
    acc.add(Batch({}, labels=torch.tensor([0, 0])), base, var)
    base_q, var_q = acc.results()
    assert var_q["top1_agreement"] == 0.5 and base_q["accuracy"] == 0.5 and var_q["accuracy"] == 1.0


@pytest.fixture(scope="module")
def run_result(minilm_variants, tmp_path_factory):
    """One real end-to-end run of a recipe on MiniLM through the CLI and the worker (a bfloat16 variant, in
    the session's MiniLM workspace, which also holds an ONNX variant), on this module's copy of it."""
    import shutil

    source, _ids, result = minilm_variants
    root = tmp_path_factory.mktemp("ws")
    shutil.copytree(source, root, dirs_exist_ok=True)
    return root, result


def test_run_json_has_every_documented_field(run_result):
    _, result = run_result
    assert set(result) == {"baseline", "variants"}
    assert {"id", "metrics"} <= set(result["baseline"])
    (v,) = result["variants"]
    assert {"id", "parent", "artifact", "recipe", "metrics"} <= set(v)
    m = v["metrics"]
    assert m["size_bytes"] > 0 and m["peak_memory_mb"] > 0  # the loaded weights alone are tens of MB
    assert set(m["latency_ms"]) == {"1", "4"}
    for lat in m["latency_ms"].values():
        assert {"p50", "p95", "p99", "mean", "ci95"} <= set(lat)
        assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert set(m["throughput_per_s"]) == {"1", "4"}
    assert 0.99 < m["quality"]["fidelity_cosine"] <= 1.0
    assert v["parent"] == result["baseline"]["id"]
    assert 0.45 < m["size_bytes"] / result["baseline"]["metrics"]["size_bytes"] < 0.55  # bf16: half


def test_compare_a_variant_with_itself(run_result):
    from studio.compare import compare
    from studio.variants import Workspace

    root, result = run_result
    vid = result["variants"][0]["id"]
    out = compare(Workspace(root), vid, vid, examples=4)
    for row in out["metrics"]:
        if row["a"]:
            assert row["ratio_b_over_a"] == pytest.approx(1.0) and row["better"] is None
    for sig in out["latency_significance"].values():
        assert sig["significant"] is False
    assert all(layer["change"] == "none" for layer in out["weights"]["layers"])
    assert all(d["score"] == pytest.approx(1.0, abs=1e-6) for d in out["disagreements"])


def test_compare_and_report_verbs(run_result, tmp_path, capsys):
    """What a user types: `compare BASELINE VARIANT --json` and `report --out FILE` on the same run."""
    from studio.cli import main

    root, result = run_result
    base, vid = result["baseline"]["id"], result["variants"][0]["id"]
    assert main(["compare", base, vid, "--json", "--workspace", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["a"]["id"], out["b"]["id"]) == (base, vid)
    size = next(m for m in out["metrics"] if m["metric"] == "size_mb")
    assert size["ratio_b_over_a"] == pytest.approx(0.5, abs=0.05) and size["better"] == "B"  # bfloat16: half
    changed = [layer for layer in out["weights"]["layers"] if layer["change"] == "values"]
    assert len(changed) > 50 and all(0 < layer["relative_l2"] < 0.01 for layer in changed)  # bf16 rounding
    assert len(out["disagreements"]) == 5

    report = tmp_path / "report.html"
    assert main(["report", "--out", str(report), "--workspace", str(root)]) == 0
    html = report.read_text()
    assert vid in html and "data:image/png;base64," in html  # plots embedded: the file stands alone
    assert 'src="http' not in html and 'href="http' not in html
    assert main(["compare", base, "nonexistent", "--workspace", str(root)]) == 2
    assert "no variant 'nonexistent'" in capsys.readouterr().err


def test_techniques_verb_lists_every_block_with_its_schema(capsys):
    from studio.cli import main

    assert main(["techniques", "--json"]) == 0
    blocks = {b["id"]: b for b in json.loads(capsys.readouterr().out)}
    documented = {
        "precision.half", "quantize.dynamic_int8", "quantize.weight_only", "prune.magnitude",
        "prune.structured", "prune.heads", "distill", "export.onnx", "onnx.optimize",
        "onnx.quantize_dynamic", "onnx.quantize_static", "onnx.half", "export.tensorrt",
    }  # fmt: skip
    assert documented <= set(blocks)
    for block in blocks.values():
        assert block["input_kind"] in ("torch", "onnx", "tensorrt", "openvino") and block["description"]
        for name, field in block["params"]["properties"].items():
            assert field.get("description"), f"{block['id']}.{name} has no description"
    trt = blocks["export.tensorrt"]
    if not trt["available"]:  # no TensorRT or no GPU here: says which
        assert "TensorRT" in trt["reason"] or "GPU" in trt["reason"]


def test_export_hf_reloads_in_transformers_with_the_same_outputs(run_result, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from studio.checkpoints import open_checkpoint
    from studio.export import export_variant
    from studio.variants import Workspace

    root, result = run_result
    vid = result["variants"][0]["id"]
    out = export_variant(Workspace(root), vid, "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "manifest.json").is_file() and out["format"] == "hf"
    plain = AutoModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ours = open_checkpoint(Workspace(root).get(vid)["artifact"]).module
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    enc = tok(["A quick test sentence."], return_tensors="pt")
    with torch.no_grad():
        a = plain(**enc).last_hidden_state.float()
        b = ours(**enc).last_hidden_state.float()
    assert torch.allclose(a, b, atol=1e-2)
    assert plain.dtype == torch.bfloat16


def test_disk_full_while_committing_is_a_clear_error(run_result, tmp_path):
    """A real ENOSPC from the kernel (/dev/full) while the manifest is written: a clear error, nothing kept."""
    from studio.errors import DiskFull
    from studio.variants import Workspace

    ws = Workspace(tmp_path / "ws")
    staged = ws.tmp_dir / "job" / "artifact"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"x" * 100)
    os.symlink("/dev/full", staged / "manifest.json.tmp")
    with pytest.raises(DiskFull, match="disk is full"):
        ws.commit_variant(staged, kind="torch", parent=None, model="m", recipe={}, metrics={})
    assert not any(ws.variants_dir.iterdir())
    assert [r for r in ws.list()] == []


def test_disk_full_in_a_small_tmpfs_gives_a_clear_error(bert_classifier, tmp_path):
    """A whole run into a 2 MB tmpfs workspace, where the test can mount one (root); skipped elsewhere.
    The tiny BERT's weights alone (4 MB) do not fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            f"version: 1\nmodel: {bert_classifier}\ndata: {{evaluation_examples: 4}}\nsteps: []\n"
            "evaluate: {latency: false, sequence_length: 16}\n"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "studio", "run", str(recipe), "--workspace", str(mount)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 4, proc.stderr
        assert "disk is full" in proc.stderr and "Traceback" not in proc.stderr
        assert not any((mount / "variants").iterdir()) and not any((mount / "tmp").iterdir())
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
