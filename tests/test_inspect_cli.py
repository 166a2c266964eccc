"""`model-studio inspect` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from studio.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_minilm_json_with_heads(capsys):
    out = _json(
        capsys,
        [
            "inspect",
            "builtin:minilm",
            "--json",
            "--heads",
            "--max-examples",
            "8",
            "--sequence-length",
            "32",
            "--bins",
            "16",
        ],
    )
    assert out["model"]["family"] == "feature-extraction"
    assert out["model"]["parameters"] == 22_713_728 and out["model"]["dtype"] == "float32"
    layer = next(x for x in out["layers"] if x["name"] == "encoder.layer.0.attention.self.query.weight")
    assert layer["shape"] == [384, 384] and layer["params"] == 147456
    assert set(layer["stats"]) >= {"min", "max", "mean", "std", "sparsity", "outliers"}
    assert len(layer["histogram"]["edges"]) == 17 and sum(layer["histogram"]["counts"]) == 147456
    heads = out["heads"]
    assert heads["method"] == "gradient" and "InfoNCE" in heads["objective"]
    assert (heads["layers"], heads["heads"]) == (6, 12) and len(heads["importance"]) == 6


@pytest.mark.parametrize("fixture", ["gpt2", "marian", "cnn_torchscript", "cnn_pt2", "tiny_onnx"])
def test_inspect_every_kind(request, capsys, fixture):
    out = _json(capsys, ["inspect", str(request.getfixturevalue(fixture)), "--json"])
    assert out["layers"] and out["model"]["parameters"] == sum(x["params"] for x in out["layers"])


def test_inspect_text_summary_with_ablation(request, capsys):
    assert (
        main(
            [
                "inspect",
                str(request.getfixturevalue("llama")),
                "--heads",
                "--heads-method",
                "ablation",
                "--max-examples",
                "4",
                "--sequence-length",
                "16",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "family        causal-lm" in text
    assert "method ablation" in text and "least important" in text


def test_heads_on_cnn_is_a_clear_error(cnn_torchscript, capsys):
    assert main(["inspect", str(cnn_torchscript), "--heads"]) == 2
    assert "no attention heads" in capsys.readouterr().err


def test_bad_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["inspect", "builtin:minilm", "--heads", "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no examples" in err


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point, as a user's shell sees it."""
    bad = tmp_path / "model.pt"
    bad.write_text("not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "studio", "inspect", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().startswith("model-studio: error:") and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
