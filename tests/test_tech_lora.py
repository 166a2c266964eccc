"""train.lora: adapters trained toward the original win back what head pruning lost, fold into the weights
exactly, sit beside a quantized base without changing it, and reload from a saved variant."""

from __future__ import annotations

import copy

import pytest

from studio.errors import BadInput

STEPS = 25


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """MiniLM with half of its heads pruned, training sentences, a held-out batch and a fidelity measure."""
    import torch
    import torch.nn.functional as F

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.families import family_for
    from studio.techniques.base import RunContext, get_technique, initial_state

    model = open_checkpoint("builtin:minilm")
    family = family_for(model)
    data = load_examples("builtin:sentences", 140)
    held = family.batch(model, data[100:132], 64)

    def fidelity(module) -> float:
        with torch.no_grad():
            ref, out = family.forward(model.module, held), family.forward(module, held)
        return float(F.cosine_similarity(ref, out, dim=-1).mean())

    def outputs(module):
        with torch.no_grad():
            return family.forward(module, held)

    def ctx(tmp_path, events=None):
        return RunContext(
            original=model,
            workdir=tmp_path,
            calibration=data[:32],
            sequence_length=32,
            step_index=1,
            emit=(events if events is not None else []).append,
        )

    prune = get_technique("prune.heads")()
    pruned = prune.run(initial_state(model), prune.Params(fraction=0.5), ctx(tmp_path_factory.mktemp("p")))
    return {
        "model": model,
        "pruned": pruned,
        "fidelity": fidelity,
        "outputs": outputs,
        "ctx": ctx,
    }


def _lora(**params):
    from studio.techniques.base import get_technique

    cls = get_technique("train.lora")
    return cls(), cls.Params(**params)


def _losses(events):
    return [e.value for e in events if getattr(e, "name", None) == "distill_loss"]


def test_registered_with_described_params():
    from studio.techniques.base import get_technique

    info = get_technique("train.lora").describe()
    assert (info["input_kind"], info["output_kind"]) == ("torch", "torch")
    props = info["params"]["properties"]
    for name in ("rank", "alpha", "dropout", "target_modules", "steps", "learning_rate", "merge", "loss"):
        assert props[name]["description"], name


@pytest.mark.parametrize("bad", [{"rank": 0}, {"dropout": 1.0}, {"alpha": 0}, {"target_modules": [" "]}])
def test_params_refused(bad):
    from pydantic import ValidationError

    from studio.techniques.lora import LoraParams

    with pytest.raises(ValidationError):
        LoraParams(**bad)


def test_lora_after_head_pruning_raises_fidelity_and_merges_exactly(setting, tmp_path):
    from studio.techniques.lora import merge_adapters

    fidelity = setting["fidelity"]
    before = fidelity(setting["pruned"].module)
    events: list = []
    tech, params = _lora(steps=STEPS, rank=8, merge=False)
    out = tech.run(copy.deepcopy(setting["pruned"]), params, setting["ctx"](tmp_path, events))
    after = fidelity(out.module)
    losses = _losses(events)
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss went down
    assert after > before + 0.01, (before, after)  # and the cosine to the original went up
    record = out.transforms[-1]
    assert record["technique"] == "train.lora" and record["modules"]

    merged = copy.deepcopy(out.module)
    merge_adapters(merged, record["modules"])
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    import torch

    torch.testing.assert_close(
        setting["outputs"](merged), setting["outputs"](out.module), atol=2e-5, rtol=1e-4
    )


def test_merged_run_is_a_plain_model_of_the_pruned_shape(setting, tmp_path):
    import torch

    pruned = setting["pruned"]
    tech, params = _lora(steps=3, rank=4, target_modules=["query", "value"])
    out = tech.run(copy.deepcopy(pruned), params, setting["ctx"](tmp_path))
    assert out.transforms == pruned.transforms  # nothing to rebuild: adapters folded into the weights
    assert out.info["lora"]["merged"] == 12 and out.info["lora"]["layers"] == 12
    shapes = {n: tuple(p.shape) for n, p in out.module.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in pruned.module.named_parameters()}
    # only query and value changed
    old = dict(pruned.module.named_parameters())
    changed = {n for n, p in out.module.named_parameters() if not torch.equal(p, old[n])}
    assert changed and all(".query." in n or ".value." in n for n in changed)


def test_unknown_target_modules_are_refused_with_the_names_there_are(setting, tmp_path):
    tech, params = _lora(target_modules=["query", "q_proj"])
    state = copy.deepcopy(setting["pruned"])
    with pytest.raises(BadInput) as err:
        tech.run(state, params, setting["ctx"](tmp_path))
    message = str(err.value)
    assert "'q_proj'" in message
    for name in ("query", "key", "value", "dense"):
        assert name in message
    with pytest.raises(BadInput):
        tech.check(params, setting["model"])  # refused before a run too
    assert list(tmp_path.iterdir()) == []


def test_rank_larger_than_a_layer_is_refused_and_nothing_is_written(setting, tmp_path):
    # pruned layers keep fewer heads: their query projects to fewer than 384 outputs
    state = copy.deepcopy(setting["pruned"])
    smallest = min(
        state.module.get_submodule(f"encoder.layer.{i}.attention.self.query").out_features for i in range(6)
    )
    tech, params = _lora(rank=smallest + 1, target_modules=["query"])
    with pytest.raises(BadInput) as err:
        tech.run(state, params, setting["ctx"](tmp_path))
    assert f"rank {smallest + 1} is larger than layer" in str(err.value)
    assert f"at most {smallest}" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert not any(".lora_" in n for n, _ in state.module.named_parameters())


def test_bad_rank_exits_2_from_the_cli_before_anything_runs(tmp_path, capsys):
    import yaml

    from studio.cli import main

    recipe = {
        "version": 1,
        "model": "builtin:minilm",
        "data": {"calibration": "builtin:sentences", "calibration_examples": 8},
        "steps": [{"technique": "train.lora", "params": {"rank": 1000, "steps": 1}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "rank 1000 is larger than layer" in capsys.readouterr().err


def test_qlora_on_a_weight_only_base_keeps_its_codes_and_reloads(setting, tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.pipeline import save_state
    from studio.techniques.base import get_technique

    model = setting["model"]
    quant = get_technique("quantize.weight_only")()
    base = quant.run(
        copy.deepcopy(setting["pruned"]), quant.Params(bits=4, group_size=64), setting["ctx"](tmp_path / "q")
    )
    codes = {n: b.clone() for n, b in base.module.named_buffers() if n.endswith("qweight")}
    before = setting["fidelity"](base.module)
    tech, params = _lora(steps=STEPS, rank=8, merge=True)
    out = tech.run(base, params, setting["ctx"](tmp_path / "l"))
    assert setting["fidelity"](out.module) > before
    assert out.transforms[-1]["technique"] == "train.lora"  # quantized layers: adapters kept
    after = {n.replace(".base_layer", ""): b for n, b in out.module.named_buffers() if n.endswith("qweight")}
    assert set(after) == set(codes) and all(torch.equal(after[n], codes[n]) for n in codes)

    folder = tmp_path / "variant"
    files = save_state(out, folder, [], 32)
    assert (folder / "peft-adapter" / "adapter_config.json") in files
    assert (folder / "peft-adapter" / "adapter_model.safetensors") in files
    reopened = open_checkpoint(folder)
    assert reopened.module is not None and model is not reopened
    torch.testing.assert_close(setting["outputs"](reopened.module), setting["outputs"](out.module))


def test_adapters_before_a_dynamic_int8_layer_train(setting, tmp_path):
    """FBGEMM's int8 matmul has no backward: gradients reach the earlier adapters through its dequantized
    weights, so every adapter learns (B starts at zero and moves)."""
    from studio.techniques.base import get_technique

    quant = get_technique("quantize.dynamic_int8")()
    base = quant.run(
        copy.deepcopy(setting["pruned"]), quant.Params(embeddings=False), setting["ctx"](tmp_path / "q")
    )
    tech, params = _lora(steps=3, rank=4, target_modules=["encoder.layer.0.attention.self.query"])
    out = tech.run(base, params, setting["ctx"](tmp_path / "l"))
    lora_b = out.module.get_submodule("encoder.layer.0.attention.self.query").lora_B["default"].weight
    assert float(lora_b.detach().abs().sum()) > 0


def test_the_shipped_lora_recipe_plans_on_minilm(setting):
    from studio.pipeline import load_recipe, plan
    from studio.resources import resource

    recipe = load_recipe(resource("recipes", "recovery", "minilm-heads-lora-onnx-int8.yaml"))
    steps = plan(recipe, setting["model"]).steps
    assert [s.technique.id for s in steps] == [
        "prune.heads",
        "train.lora",
        "export.onnx",
        "onnx.quantize_dynamic",
    ]


def test_the_lora_recipe_runs_through_onnx_int8(setting, tmp_path):
    """Merged adapters leave a plain pruned model, which exports and quantizes like any other."""
    import onnx
    import onnxruntime as ort
    import yaml

    from studio.pipeline import execute_steps, parse_recipe, plan
    from studio.resources import resource

    data = yaml.safe_load(resource("recipes", "recovery", "minilm-heads-lora-onnx-int8.yaml").read_text())
    data["steps"][1]["params"]["steps"] = 2
    recipe = parse_recipe(data)
    state, _times = execute_steps(
        plan(recipe, setting["model"]), tmp_path, setting["ctx"](tmp_path).calibration, [].append
    )
    assert state.kind == "onnx" and state.path.is_file()
    session = ort.InferenceSession(str(state.path), providers=["CPUExecutionProvider"])
    assert any("Integer" in n.op_type or "Quant" in n.op_type for n in onnx.load(str(state.path)).graph.node)
    assert session.get_inputs()
