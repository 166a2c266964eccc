"""`.safetensors` files and folders of shards: weights read lazily through memory maps."""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def read_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header) after checking the header against the file size, so a truncated
    download fails here and not halfway through an inspection."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise BadInput("not a valid safetensors file (shorter than its 8-byte header length)", path=path)
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise BadInput(
                "not a valid safetensors file (header length points past the end: truncated or not safetensors)",
                path=path,
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"not a valid safetensors file (header is not JSON: {exc})", path=path) from exc
    if not isinstance(header, dict):
        raise BadInput("not a valid safetensors file (header is not a JSON object)", path=path)
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
            info["shape"] = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise BadInput(
                f"not a valid safetensors file (bad entry for tensor '{name}')", path=path
            ) from exc
    if 8 + n + end > size:
        missing = 8 + n + end - size
        raise BadInput(f"truncated safetensors file: {missing} bytes of tensor data are missing", path=path)
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
                load=lambda f=lazy, n=name: f.tensor(n),
                load_rows=(lambda a, b, i=info, p=path, d=data_start: _read_rows(p, d, i, a, b))
                if known
                else None,
            )


def open_safetensors(files: list[Path], *, source: str, path: Path) -> LoadedModel:
    from studio.families import family_from_tensor_names

    names = [n for f in files for n in check_safetensors(f)]
    return LoadedModel(
        source=source,
        path=path,
        format="safetensors",
        family=family_from_tensor_names(names),
        tensor_source=lambda: iter_safetensors(files),
        notes=[f"{len(files)} safetensors file(s); weights only, read lazily"],
    )
