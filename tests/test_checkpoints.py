"""Opening every checkpoint kind, and refusing bad ones with a clear message."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput


def test_builtin_minilm_is_the_real_checkpoint():
    m = open_checkpoint("builtin:minilm")
    assert m.format == "builtin"
    assert m.family == "feature-extraction"
    assert m.architecture == "BertModel"
    assert m.pooling == "mean" and m.normalize
    assert sum(r.numel for r in m.tensors()) == 22_713_728
    assert m.module.config.num_hidden_layers == 6


@pytest.mark.parametrize(
    ("fixture", "family", "architecture"),
    [
        ("bert_classifier", "text-classification", "BertForSequenceClassification"),
        ("gpt2", "causal-lm", "GPT2LMHeadModel"),
        ("llama", "causal-lm", "LlamaForCausalLM"),
        ("marian", "seq2seq", "MarianMTModel"),
    ],
)
def test_hf_folders_detect_family(request, fixture, family, architecture):
    m = open_checkpoint(request.getfixturevalue(fixture))
    assert (m.format, m.family, m.architecture) == ("hf-folder", family, architecture)
    assert m.runnable and m.tokenizer_dir is not None


def test_safetensors_file_is_weights_only_and_lazy(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.ones(4, 3), "b": torch.zeros(5, dtype=torch.bfloat16)}, str(path))
    m = open_checkpoint(path)
    assert m.format == "safetensors" and not m.runnable
    refs = {r.name: r for r in m.tensors()}
    assert refs["a.weight"].shape == (4, 3) and refs["b"].dtype == "bfloat16"
    rows = refs["a.weight"].load_rows(1, 3)
    assert rows.shape == (2, 3) and torch.equal(torch.as_tensor(rows), torch.ones(2, 3))
    with pytest.raises(BadInput, match="weights only"):
        _ = m.module


def test_state_dict_pt(tmp_path):
    import torch

    path = tmp_path / "sd.pt"
    torch.save({"state_dict": {"layer.weight": torch.randn(3, 3)}, "epoch": 3}, path)
    m = open_checkpoint(path)
    assert m.format == "state-dict"
    assert [r.name for r in m.tensors()] == ["layer.weight"]


def test_torchscript_and_exported_program(cnn_torchscript, cnn_pt2):
    import torch

    ts = open_checkpoint(cnn_torchscript)
    ep = open_checkpoint(cnn_pt2)
    assert (ts.format, ts.family) == ("torchscript", "image-classification")
    assert (ep.format, ep.family) == ("exported-program", "image-classification")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ts.module(x), ep.module(x), atol=1e-5)
    assert {r.name for r in ts.tensors()} >= {"0.weight", "7.bias"}


def test_onnx(tiny_onnx):
    m = open_checkpoint(tiny_onnx)
    assert m.format == "onnx" and m.family == "image-classification"
    shapes = {r.name: r.shape for r in m.tensors()}
    assert (10, 16) in shapes.values() or (16, 10) in shapes.values()


def test_whole_module_needs_trust(tmp_path):
    import torch

    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(BadInput, match="--trust"):
        open_checkpoint(path)
    m = open_checkpoint(path, trust=True)
    assert m.format == "pickled-module" and m.module.out_features == 2


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_not_executed(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    with pytest.raises(BadInput, match="run code"):
        open_checkpoint(path)
    assert not marker.exists()
    # The legacy (non-zip) pickle format is refused the same way.
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(BadInput):
        open_checkpoint(legacy)
    assert not marker.exists()


def _bad_inputs(tmp_path: Path, minilm: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    (no_config / "README.md").write_text("hello")
    truncated = tmp_path / "truncated.safetensors"
    data = (minilm / "model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    corrupt_onnx = tmp_path / "corrupt.onnx"
    corrupt_onnx.write_bytes(b"\x08\x07\x12\xff\xff garbage protobuf \x00\x01")
    text_pt = tmp_path / "notes.pt"
    text_pt.write_text("these are my notes, not a checkpoint\n")
    unknown_arch = tmp_path / "unknown-arch"
    unknown_arch.mkdir()
    shutil.copy(minilm / "model.safetensors", unknown_arch / "model.safetensors")
    cfg = json.loads((minilm / "config.json").read_text())
    (unknown_arch / "config.json").write_text(json.dumps({**cfg, "architectures": ["FancyNewModelForMagic"]}))
    unknown_type = tmp_path / "unknown-type"
    unknown_type.mkdir()
    (unknown_type / "config.json").write_text(json.dumps({"model_type": "not-a-real-model-type"}))
    return {
        "missing path": (tmp_path / "does-not-exist", "no such file"),
        "empty folder": (empty, "folder is empty"),
        "folder without config": (no_config, "no config.json"),
        "truncated safetensors": (truncated, "truncated"),
        "corrupt safetensors": (garbage_st, "not a valid safetensors"),
        "corrupt onnx": (corrupt_onnx, "not a valid ONNX"),
        "text renamed .pt": (text_pt, "not a PyTorch checkpoint"),
        "unknown architecture": (
            unknown_arch / "config.json",
            "unknown architecture 'FancyNewModelForMagic'",
        ),
        "unknown model type": (unknown_type / "config.json", "unknown architecture"),
    }


def test_bad_inputs_name_the_file_and_the_problem(tmp_path):
    from tests.conftest import minilm_dir

    for label, (path, problem) in _bad_inputs(tmp_path, minilm_dir()).items():
        target = path.parent if path.name == "config.json" else path
        with pytest.raises(BadInput) as info:
            open_checkpoint(target)
        assert str(path) in info.value.message, label
        assert problem in info.value.message, (label, info.value.message)


def test_cli_bad_inputs_exit_2_without_traceback(tmp_path, capsys):
    from studio.cli import main
    from tests.conftest import minilm_dir

    for label, (path, problem) in _bad_inputs(tmp_path, minilm_dir()).items():
        target = path.parent if path.name == "config.json" else path
        assert main(["inspect", str(target)]) == 2, label
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, (label, err)
        assert err.count("\n") == 1, (label, err)


def test_cli_debug_shows_traceback(tmp_path):
    from studio.cli import main

    with pytest.raises(BadInput):
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_every_family_name_has_a_class():
    from studio.checkpoints import FAMILIES
    from studio.families import FAMILY_CLASSES

    assert set(FAMILY_CLASSES) == set(FAMILIES)


def test_onnx_inputs_are_read_once_when_opened(tmp_path):
    """Feeding an ONNX graph asks which text inputs it takes: the names recorded at opening, so a file
    changed (or gone) since is not read again."""
    import onnx
    from onnx import TensorProto, helper

    from studio.families import accepted_inputs

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "seq"])
    add = helper.make_node("Add", ["input_ids", "attention_mask"], ["logits"])
    graph = helper.make_graph([add], "g", [ids, mask], [out])
    path = tmp_path / "text.onnx"
    onnx.save(helper.make_model(graph), str(path))
    model = open_checkpoint(path)
    assert model.input_names == ("input_ids", "attention_mask")
    path.write_bytes(b"not a graph any more")
    assert accepted_inputs(model) == ("input_ids", "attention_mask")
