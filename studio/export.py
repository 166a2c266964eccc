"""`model-studio export`: copy a variant's artifact out of the workspace, with its manifest.

Copies go to a temporary folder beside the target and are renamed into place at the end, so a failed or
cancelled export leaves no half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from studio.errors import BadInput

FORMATS = ("onnx", "tensorrt", "hf")
_KIND_FOR_FORMAT = {"onnx": "onnx", "tensorrt": "tensorrt", "hf": "torch"}


def export_variant(workspace: Any, vid: str, fmt: str, out: str | Path) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    row = workspace.get(vid)
    if row.get("missing"):
        raise BadInput(f"variant {row['id']}: its files are gone from the workspace", path=row["artifact"])
    want = _KIND_FOR_FORMAT[fmt]
    kind = row["kind"]
    if kind == "baseline":
        raise BadInput(
            f"{row['id']} is the original model, not a variant; export the original from its own files"
        )
    if kind != want:
        hint = {
            "onnx": "add export.onnx to the pipeline to get an ONNX variant",
            "tensorrt": "add export.onnx and export.tensorrt to the pipeline",
            "hf": "only torch-stage variants can be saved as a transformers folder",
        }[fmt]
        raise BadInput(f"variant {row['id']} is a {kind} variant, not {want}: {hint}")
    source = workspace.folder(row["id"])
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir() if out.is_dir() else [out]):
        raise BadInput("the target exists and is not empty; choose a new folder", path=out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp)
        if fmt == "hf":
            _check_transformers_loads(tmp, row)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    main = row["artifact"] and Path(row["artifact"]).name
    return {
        "id": row["id"],
        "format": fmt,
        "out": str(out),
        "artifact": str(out / main) if main else str(out),
        "files": files,
    }


def _check_transformers_loads(folder: Path, row: dict[str, Any]) -> None:
    """A transformers folder is only useful if plain `from_pretrained` loads it; prove it before handing it over."""
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.checkpoints.hf import load_pretrained, model_class, read_config
    from studio.techniques.torch_io import TRANSFORMS_KEY

    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    records = data.get(TRANSFORMS_KEY) or []
    blocking = [r["technique"] for r in records if r.get("technique") not in ("precision.half",)]
    if blocking:
        raise BadInput(
            f"variant {row['id']} has a structure plain transformers cannot rebuild ({', '.join(blocking)}: per-layer "
            "shapes or quantized layers); it reopens in Model Studio, or export it to ONNX"
        )
    data.pop(TRANSFORMS_KEY, None)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
    config = read_config(folder)
    plain = load_pretrained(model_class(config, folder), folder)
    ours = open_checkpoint(Path(row["artifact"])).module.state_dict()
    theirs = plain.state_dict()
    with torch.no_grad():
        for name, a in ours.items():
            b = theirs.get(name)
            if b is None or a.shape != b.shape or not torch.equal(a.to(b.dtype), b):
                raise BadInput(f"transformers loads the exported folder differently at '{name}'")
