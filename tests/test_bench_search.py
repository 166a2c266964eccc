"""`model-studio bench --search`: the bench's shipped search runs in the bench's workspace first, and the
best recipe it finds is timed interleaved with the other recipes as the row `searched-best` (toy sizes).

The bench runs on the tiny BERT encoder of tests/conftest.py here (studio/bench.py's test knob
MODEL_STUDIO_BENCH_MODEL), not MiniLM: what is checked is the plumbing from the search to the timed row,
and on MiniLM the search's mixed-precision step quantizes the graph once per layer, twice (in the trial and
in the bench's build), which took minutes. tests/test_bench.py times the bench on MiniLM itself."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest


def test_bench_search_times_the_best_recipe_found(bert_encoder, tmp_path, capsys, monkeypatch):
    from studio.bench import MODEL_ENV
    from studio.cli import main
    from studio.pipeline import load_recipe
    from studio.variants import Workspace

    monkeypatch.setenv(MODEL_ENV, str(bert_encoder))

    out, ws = tmp_path / "bench.json", tmp_path / "ws"
    args = ["bench", "--only", "06-onnx-optimized-int8", "--search", "2", "--rounds", "2", "--examples", "4"]
    args += ["--batch-sizes", "1", "2", "--sequence-length", "16", "--toy", "--out", str(out)]
    assert main([*args, "--workspace", str(ws)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    search = result["search"]
    assert Path(search["search_recipe"]).name == "minilm-bench.yaml"
    assert search["trials_run"] == search["new_trials"] == 2
    assert Path(search["storage"]).is_file() and Path(search["storage"]).parent == ws / "searches"
    assert f"search: 2 trials of {search['search_recipe']} (study {search['study']})" in table
    # the two trials are one per runtime (search.alternatives), whichever the sampler would have drawn
    study = optuna.load_study(study_name=search["study"], storage=f"sqlite:///{search['storage']}")
    assert [t.params["alternative"] for t in study.trials] == ["onnxruntime", "openvino"]
    rows = result["variants"]
    assert list(rows) == ["06-onnx-optimized-int8", "searched-best"]
    row = rows["searched-best"]
    if search["recipe"] is None:  # the one trial missed the cosine floor on this CPU: said, not timed
        assert search["best"] is None and search["closest"]["number"] in (0, 1)
        assert row["error"].startswith("the search found no trial that meets its constraints (closest: trial")
        assert "searched-best: no trial met the constraints (closest: trial" in table
        return
    recipe_file = Path(search["recipe"])
    assert recipe_file.parent == ws / "searches" and row["recipe"] == recipe_file.name
    assert f"searched-best: trial variant {search['best']}, recipe {recipe_file}" in table
    # the trial's concrete recipe: one runtime's steps, the optional fusion step kept or dropped
    steps = [s.technique for s in load_recipe(recipe_file).steps]
    assert steps in (
        ["export.onnx", "onnx.optimize", "onnx.quantize_dynamic"],
        ["export.onnx", "onnx.quantize_dynamic"],
        ["export.onnx", "export.openvino", "quantize.nncf"],
    )
    assert "error" not in row and row["peer"] is False and row["precision"] == "int8"
    assert row["quality"]["fidelity_cosine"] >= 0.995  # the search's constraint, on the same sentences
    # the trial measured its variant on the bench's own sentences and tokens: the same fidelity again
    trial = Workspace(ws).get(search["best"])
    assert trial["model"] == str(bert_encoder) and result["model"] == str(bert_encoder)
    for key in ("fidelity_cosine", "fidelity_cosine_min"):
        assert row["quality"][key] == pytest.approx(trial["metrics"]["quality"][key], abs=1e-6)
    for b in ("1", "2"):
        lat = row["latency_ms"][b]
        assert lat["runs"] == len(lat["samples"]) == rows["06-onnx-optimized-int8"]["latency_ms"][b]["runs"]
    speed = {t["target"]: t for t in result["issue18_targets"]}["speed b1"]
    assert speed["got"].startswith("searched-best ")  # the only studio variant: the one held to the peer


def test_bench_search_refused_for_the_llm_bench(capsys):
    from studio.cli import main

    assert main(["bench", "--family", "causal-lm", "--search"]) == 2
    assert "--search is for the encoder bench" in capsys.readouterr().err
