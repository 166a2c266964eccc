"""`model-studio bench --recipes FILE ...`: a user's recipe files are timed beside the bench's own, named
`<folder>-<file>`, and one that cannot run (a graph traced for other shapes) gets its error in its row while
the others are still measured."""

from __future__ import annotations

import json


def test_extra_recipe_rows_and_their_errors(tmp_path, capsys):
    from studio.cli import main

    fixed = tmp_path / "mine" / "fixed-shapes.yaml"
    fixed.parent.mkdir()
    fixed.write_text(
        "version: 1\nmodel: builtin:minilm\nsteps:\n"
        "  - technique: export.onnx\n    params: {dynamic_axes: false}\n"
    )
    out = tmp_path / "bench.json"
    args = ["bench", "--only", "01-torch-fp32", "--recipes", str(fixed), "--rounds", "1", "--examples", "4"]
    args += [
        "--batch-sizes",
        "1",
        "2",
        "--sequence-length",
        "16",
        "--toy",
        "--workspace",
        str(tmp_path / "ws"),
    ]
    assert main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["variants"]
    assert list(rows) == ["01-torch-fp32", "mine-fixed-shapes"]
    assert "error" not in rows["01-torch-fp32"] and rows["01-torch-fp32"]["latency_ms"]["2"]["runs"] > 0
    assert "dimensions" in rows["mine-fixed-shapes"]["error"]  # ONNX Runtime's own words: the traced shape
    assert "mine-fixed-shapes" in table and "ERROR" in table


def test_missing_recipe_file_and_wrong_family_are_refused(tmp_path, capsys):
    from studio.cli import main

    ws = ["--workspace", str(tmp_path / "ws")]
    assert main(["bench", "--recipes", str(tmp_path / "nope.yaml"), *ws]) == 2
    assert "nope.yaml: no such recipe file" in capsys.readouterr().err
    assert main(["bench", "--family", "causal-lm", "--recipes", str(tmp_path / "nope.yaml"), *ws]) == 2
    assert "--recipes is for the encoder bench (causal-lm" in capsys.readouterr().err
