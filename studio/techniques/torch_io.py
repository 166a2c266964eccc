"""Saving a torch-stage model as a variant folder, and building it again from that folder.

A Hugging Face model is saved as a Hugging Face folder: config.json (with `studio_transforms`, the
structure records of the techniques applied), the weights, and the original's tokenizer and
sentence-transformers files. Weights go to model.safetensors when every tensor is a plain dense tensor,
else to model.pt (quantized tensors), which opens with `torch.load(weights_only=True)`. Reopening builds the
architecture from the config, replays the records (pruned heads, quantized layers, dtype) and loads the
weights (`studio.checkpoints.variant_folder`), so the folder reloads with `open_checkpoint` like any other.

Other torch modules (TorchScript, ExportedProgram, pickled) are saved as an ExportedProgram (model.pt2)
that must pass the studio's safe `.pt2` reader (no pickled parts, no guard code), so anyone can reopen it
without trusting it; a module that would need pickle is refused rather than saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from studio.checkpoints.variant_folder import TRANSFORMS_KEY
from studio.errors import BadInput

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "spiece.model",
    "source.spm",
    "target.spm",
    "sentencepiece.bpe.model",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
SIDE_FOLDERS = ("1_Pooling", "2_Normalize")


def copy_side_files(source: Path | None, folder: Path) -> None:
    """Tokenizer and sentence-transformers files of the original, so the variant is self-contained.

    Only what lies inside `source` is copied: a side file that is a link leading out of the folder (a
    `merges.txt` pointing at a private file) would carry that file into the variant and every export of it,
    so it is skipped. The one exception is the Hugging Face cache, whose snapshot folders link every file to
    the same repository's `blobs/`.
    """
    if source is None or not source.is_dir():
        return
    allowed = [source.resolve()]
    if source.parent.name == "snapshots" and source.parent.parent.name.startswith("models--"):
        allowed.append((source.parent.parent / "blobs").resolve())

    def inside(path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(root) for root in allowed)

    for name in SIDE_FILES:
        src = source / name
        if src.is_file() and inside(src):
            shutil.copy2(src, folder / name)

    def skip(where: str, names: list[str]) -> set[str]:
        # linked folders are never entered (a link to an ancestor would loop); linked files only if inside
        base = Path(where)
        return {n for n in names if (base / n).is_symlink() and ((base / n).is_dir() or not inside(base / n))}

    for name in SIDE_FOLDERS:
        src = source / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, folder / name, ignore=skip, dirs_exist_ok=True)


def _plain(t: Any) -> bool:
    import torch

    return type(t) is torch.Tensor and not t.is_quantized


def save_torch_variant(
    module: Any,
    transforms: list[dict[str, Any]],
    folder: Path,
    source: Path | None,
    example_inputs: tuple[Any, ...] | None = None,
) -> list[Path]:
    """Write `module` into `folder`; returns the files written."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "config") and hasattr(module, "save_pretrained"):
        from studio.techniques.hf_format import save_weights

        config = module.config.to_dict()
        config[TRANSFORMS_KEY] = transforms
        config.pop("_name_or_path", None)
        # quantized layers: torchao's format where transformers computes them alike, else a config that
        # makes a plain from_pretrained refuse the folder (see studio.techniques.hf_format)
        if not save_weights(module, transforms, folder, config):
            state = module.state_dict()
            if all(_plain(v) for v in state.values()):  # packed params or quantized tensors -> model.pt
                from safetensors.torch import save_model

                save_model(module, str(folder / "model.safetensors"))
            else:
                torch.save(state, folder / "model.pt")
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        copy_side_files(source, folder)
    else:
        if example_inputs is None:
            raise BadInput("this torch module has no config; saving it needs example inputs to export it")
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = tuple({0: batch} if getattr(x, "dim", lambda: 0)() > 0 else None for x in example_inputs)
        try:
            program = torch.export.export(module, example_inputs, dynamic_shapes=dynamic)
        except Exception:  # some graphs specialise the batch size; a fixed-shape program still reloads
            program = torch.export.export(module, example_inputs)
        target = folder / "model.pt2"
        torch.export.save(program, str(target))
        _check_code_free(target)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _check_code_free(path: Path) -> None:
    """A saved ExportedProgram must reopen with the studio's safe reader: one that needs pickle (tensor
    subclasses, opaque or script-object constants) could not be opened by a colleague without trusting it,
    so it is removed and refused instead of saved."""
    from studio.checkpoints.pt2_archive import audit

    try:
        audit(path)
    except BadInput as exc:
        path.unlink(missing_ok=True)
        raise BadInput(
            f"this model cannot be saved as a code-free ExportedProgram ({exc.problem}); "
            "the studio does not write files that need unpickling to open",
            path=path.parent,
        ) from exc
