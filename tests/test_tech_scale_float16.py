"""quantize.weight_only with scale_float16: the scales stored as float16 beside float32 weights (half their
bytes), the codes rounded against the stored scale, the variant reopened as stored."""

from __future__ import annotations


def test_float16_scales_halve_the_scale_bytes_and_reopen_with_the_same_outputs(bert_classifier, tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.pipeline import execute_steps, load_recipe, plan, save_state

    model = open_checkpoint(bert_classifier)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    states = {}
    for half in (False, True):
        recipe = tmp_path / f"half-{half}.yaml"
        recipe.write_text(
            f"version: 1\nmodel: {bert_classifier}\nsteps:\n  - technique: quantize.weight_only\n"
            f"    params: {{bits: 4, group_size: 16, embeddings: true, clip_search: true, "
            f"scale_float16: {str(half).lower()}}}\n"
        )
        state, _ = execute_steps(
            plan(load_recipe(recipe), model), tmp_path / f"w-{half}", [], lambda _e: None
        )
        states[half] = state
        save_state(state, tmp_path / f"artifact-{half}", [], 16)

    def scales(module) -> dict[str, torch.Tensor]:
        return {n: b for n, b in module.named_buffers() if n.endswith("scales")}

    wide, half = scales(states[False].module), scales(states[True].module)
    assert wide and wide.keys() == half.keys()
    assert {t.dtype for t in wide.values()} == {torch.float32} and {t.dtype for t in half.values()} == {
        torch.float16
    }
    table = states[True].module.bert.embeddings.word_embeddings
    assert type(table).__name__ == "WeightOnlyEmbedding" and table.dtype == torch.float32
    with torch.no_grad():
        out_half = states[True].module(input_ids=ids).logits
        out_wide = states[False].module(input_ids=ids).logits
        assert out_half.dtype == torch.float32
        assert torch.allclose(out_half, out_wide, atol=2e-2)  # nearly the same model
        assert not torch.equal(out_half, out_wide)  # but really the float16 scales
    files = {h: (tmp_path / f"artifact-{h}" / "model.safetensors").stat().st_size for h in (False, True)}
    saved = sum(t.numel() for t in wide.values()) * 2
    assert abs(files[False] - files[True] - saved) < 256  # the scales' halved bytes (headers differ a little)
    reopened = open_checkpoint(tmp_path / "artifact-True")
    assert {t.dtype for t in scales(reopened.module).values()} == {torch.float16}
    with torch.no_grad():
        assert torch.equal(reopened.module(input_ids=ids).logits, out_half)
