"""`.safetensors` files and folders of shards: weights read lazily through memory maps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.errors import BadInput

if TYPE_CHECKING:
    import torch

# safetensors dtype codes -> torch dtype names
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError
        raise BadInput(f"not a valid safetensors file ({exc})", path=path) from exc


# Bits per element of every dtype the safetensors format defines (its Rust `Dtype`).
_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
_MAX_DEPTH = 64  # a header is three levels deep; the library's JSON parser stops at 128


def _bad(path: Path, problem: str) -> BadInput:
    return BadInput(f"not a valid safetensors file ({problem})", path=path)


def _depth(value: Any, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(v, level + 1) for v in children), default=level)


def _natural(value: Any) -> bool:
    return type(value) is int and value >= 0


def read_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header), checked as strictly as the safetensors library checks it: tensors in
    order, neither overlapping nor leaving gaps, each exactly the bytes its dtype and shape need, and
    together covering the data to the last byte. A header the library would refuse, or one that would let
    the studio read header bytes as weights, is refused here, before anything is shown or loaded."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, "shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise _bad(path, "header length points past the end: truncated or not safetensors")
        if n > _MAX_HEADER:
            raise _bad(path, f"header of {n} bytes is larger than the format allows")
        raw = fh.read(n)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise _bad(path, "header is not a JSON object")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise _bad(path, "header JSON is nested too deeply") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    if _depth(header) > 3:
        raise _bad(path, "header JSON is nested deeper than the format's three levels")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _bad(path, "__metadata__ must map names to strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _bad(path, f"bad entry for tensor '{name}'")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _BITS:
            raise _bad(path, f"tensor '{name}' has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise _bad(
                path, f"tensor '{name}' has a bad shape {shape!r} (dimensions are non-negative integers)"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
            raise _bad(path, f"tensor '{name}' has bad data_offsets {offsets!r}")
        spans.append((offsets[0], offsets[1], name))
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * _BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _bad(
                path,
                f"tensor '{name}' is {dtype} {shape}, which needs {bits / 8:g} bytes, "
                f"but its data_offsets span {offsets[1] - offsets[0]}",
            )
    end = 0
    for first, last, name in sorted(spans):
        if first != end or last < first:
            raise _bad(
                path,
                f"tensor '{name}' has data_offsets [{first}, {last}]: tensors must follow one another "
                "without overlapping or leaving gaps",
            )
        end = last
    data = size - 8 - n
    if end > data:
        raise BadInput(
            f"truncated safetensors file: {end - data} bytes of tensor data are missing", path=path
        )
    if end < data:
        raise _bad(path, f"{data - end} bytes after the last tensor are not described by the header")
    return 8 + n, header


def check_safetensors(path: Path) -> list[str]:
    return list(read_header(path)[1])


# safetensors dtype code -> (numpy dtype, bytes per element); bfloat16 is read as raw 16-bit words
_NUMPY = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("uint16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


def _read_rows(path: Path, data_start: int, info: dict, start: int, stop: int) -> Any:
    """Rows [start, stop) of one tensor as a numpy array, by plain reads: only those bytes enter memory
    (no whole-file mmap) and no torch import is needed, so inspecting weights starts at once."""
    import numpy as np

    np_dtype, itemsize = _NUMPY[info["dtype"]]
    shape = info["shape"]
    row = 1
    for d in shape[1:]:
        row *= d
    offset = data_start + int(info["data_offsets"][0]) + start * row * itemsize
    count = (stop - start) * row
    with path.open("rb") as fh:
        fh.seek(offset)
        array = np.fromfile(fh, dtype=np_dtype, count=count)
    if info["dtype"] == "BF16":  # the high half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(stop - start, *shape[1:])


class _LazyFile:
    """A safetensors file opened (memory-mapped, which imports torch) only when a tensor is first loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def tensor(self, name: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = _safe_open(self.path)
        return self._handle.get_tensor(name)


def iter_safetensors(files: list[Path]) -> Iterator[TensorRef]:
    """Tensor descriptions come from the JSON header alone: listing a checkpoint reads no weights."""
    for path in files:
        data_start, header = read_header(path)
        lazy = _LazyFile(path)
        for name, info in header.items():
            known = info["dtype"] in _NUMPY
            yield TensorRef(
                name=name,
                shape=tuple(info["shape"]),
                dtype=_DTYPES.get(info["dtype"], info["dtype"].lower()),
                load=partial(lazy.tensor, name),
                load_rows=partial(_read_rows, path, data_start, info) if known else None,
            )


def open_safetensors(files: list[Path], *, source: str, path: Path) -> LoadedModel:
    from studio.checkpoints.recognise import family_from_tensor_names

    names = [n for f in files for n in check_safetensors(f)]
    return LoadedModel(
        source=source,
        path=path,
        format="safetensors",
        family=family_from_tensor_names(names),
        tensor_source=lambda: iter_safetensors(files),
        notes=[f"{len(files)} safetensors file(s); weights only, read lazily"],
    )
