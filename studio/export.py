"""`model-studio export`: copy a variant's artifact out of the workspace, with its manifest.

Copies go to a temporary folder beside the target and are renamed into place at the end, so a failed or
cancelled export leaves no half-written folder. Only the files the variant's manifest records are copied, each
checked against its sha256 while it is copied: a variant changed or linked out of its folder since it was saved
is refused, not handed over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from studio.errors import BadInput, StudioError, disk_full_error
from studio.safe_files import make_parent_folder

FORMATS = ("onnx", "tensorrt", "executorch", "openvino", "hf")
_KIND_FOR_FORMAT = {
    "onnx": "onnx",
    "tensorrt": "tensorrt",
    "executorch": "executorch",
    "openvino": "openvino",
    "hf": "torch",
}


def export_variant(workspace: Any, vid: str, fmt: str, out: str | Path) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    row = workspace.get(vid)
    if row.get("missing"):
        raise BadInput(
            f"variant {row['id']}: its files are gone from the workspace ({row.get('damage') or 'missing'})",
            path=row["artifact"],
        )
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
            "executorch": "add export.executorch to the pipeline",
            "openvino": "add export.onnx and export.openvino to the pipeline",
            "hf": "only torch-stage variants can be saved as a transformers folder",
        }[fmt]
        raise BadInput(f"variant {row['id']} is a {kind} variant, not {want}: {hint}")
    source = workspace.folder(row["id"])
    out = Path(out).expanduser()
    check_output_folder(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    _remove_own(tmp)
    try:
        tmp.mkdir()
        _copy_recorded(source, tmp, row["id"])
        if fmt == "hf":
            _check_transformers_loads(tmp, row)
        if out.is_dir():
            out.rmdir()  # empty (checked above); a folder that filled up meanwhile makes this fail, not vanish
        os.replace(tmp, out)
    except BaseException as exc:
        _remove_own(tmp)
        if isinstance(exc, OSError):
            raise output_error(exc, out) from exc
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


def check_output_folder(out: Path) -> None:
    """A new or empty folder (missing folders above it are made); anything else is a one-line BadInput."""
    if out.is_symlink():
        raise BadInput("is a link; choose a new folder", path=out)
    if out.exists() and not out.is_dir():
        raise BadInput("is a file, not a folder; choose a new folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        raise BadInput("the target exists and is not empty; choose a new folder", path=out)
    make_parent_folder(out)


def output_error(exc: OSError, out: Path) -> StudioError:
    """What went wrong writing the export, in words a user can act on."""
    full = disk_full_error(exc, f"the export {out}")
    if full is not None:
        return full
    where = getattr(exc, "filename", None) or out
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInput(f"cannot write here ({exc.strerror}); choose a writable folder", path=where)
    if exc.errno == errno.ENOTDIR:
        return BadInput("a part of this path is a file, not a folder", path=where)
    return BadInput(f"cannot write the export ({exc.strerror or exc})", path=where)


def _remove_own(tmp: Path) -> None:
    """Remove a partial copy of ours; never through a link."""
    if tmp.is_symlink():
        tmp.unlink()
    elif tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_recorded(source: Path, dest: Path, vid: str) -> None:
    """Copy manifest.json and the files it lists, hashing each on the way; anything else in the folder is
    left behind (it is not part of the variant), and a mismatch or link out of the folder stops the export."""
    manifest_file = source / "manifest.json"
    try:
        if manifest_file.is_symlink():
            raise ValueError("manifest.json is a link")
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("it lists no files")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(
            f"variant {vid} is damaged: its manifest.json cannot be used ({exc})", path=source
        ) from exc
    inside = source.resolve()
    for rel, digest in [*files.items(), ("manifest.json", None)]:
        src = source / rel
        if src.is_symlink() or not src.resolve().is_relative_to(inside) or not src.is_file():
            raise BadInput(
                f"variant {vid} is damaged: {rel} is missing, a link, or outside the variant's folder",
                path=source,
            )
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with src.open("rb") as fin, target.open("xb") as fout:
            while block := fin.read(1 << 20):
                h.update(block)
                fout.write(block)
        if digest is not None and h.hexdigest() != digest:
            raise BadInput(
                f"variant {vid} is damaged: {rel} does not match the sha256 in its manifest; it was changed "
                "after it was saved",
                path=src,
            )
        shutil.copystat(src, target)


def _check_transformers_loads(folder: Path, row: dict[str, Any]) -> None:
    """A transformers folder is only useful if plain `from_pretrained` loads it; prove it before handing it over."""
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.checkpoints.hf import load_pretrained, model_class, read_config
    from studio.checkpoints.variant_folder import TRANSFORMS_KEY
    from studio.techniques import hf_format

    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    records = data.get(TRANSFORMS_KEY) or []
    studio = open_checkpoint(Path(row["artifact"])).module
    if hf_format.form_of(studio, records).kind != "plain":  # quantized layers: converted or refused
        hf_format.export_folder(folder, studio, records, row["id"])
        return
    blocking = [r["technique"] for r in records if not _plain_record(r)]
    if blocking:
        raise BadInput(
            f"variant {row['id']} has a structure plain transformers cannot rebuild ({', '.join(blocking)}: per-layer "
            "shapes or quantized layers); it reopens in Model Studio, or export it to ONNX"
        )
    data.pop(TRANSFORMS_KEY, None)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
    config = read_config(folder)
    plain = load_pretrained(model_class(config, folder), folder)
    ours = studio.state_dict()
    theirs = plain.state_dict()
    with torch.no_grad():
        for name, a in ours.items():
            b = theirs.get(name)
            if b is None or a.shape != b.shape or not torch.equal(a.to(b.dtype), b):
                raise BadInput(f"transformers loads the exported folder differently at '{name}'")


def _plain_record(record: dict[str, Any]) -> bool:
    """A record transformers reproduces from config.json and the weights alone: a dtype, or smoothing
    without quantized layers (its scales live in the saved norm and Linear weights)."""
    technique = record.get("technique")
    return technique == "precision.half" or (
        technique == "quantize.smoothquant" and not record.get("modules")
    )
