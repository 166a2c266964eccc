"""ONNX graph files: reading, checking, measuring and writing them, torch-free and Qt-free.

One place for what every layer does to a `.onnx` file: the checkpoint loader opens and checks it, the
runners read its metadata, and the ONNX passes save their output, carry the studio metadata along and
count its ops. A graph is one `model.onnx`, or that plus one `model.onnx.data` with the weights when it
would pass protobuf's 2 GB limit on one message.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio.errors import BadInput

TWO_GB = 2**31 - 1  # protobuf's limit on one serialized message: larger models keep weights outside
MAX_ELEMENTS = 1 << 48  # more elements than any real tensor: dims this large are a damaged or hostile file
# Ops of a graph already quantized to integers (dynamic, static QDQ, or fused integer kernels).
QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
}
# Bits per element of each ONNX TensorProto data type (STRING has no fixed size).
_BITS = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
    16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2, 27: 6, 28: 6,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- reading


def load_onnx_graph(path: Path) -> Any:
    """The ModelProto without external weights; a damaged file becomes BadInput."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"not a valid ONNX model ({first})", path=path) from exc


def initializer_array(init: Any, base: str | Path) -> Any:
    """One initializer's values as stored (numpy), its external data read from the graph's folder if it has any
    (checked first: inside that folder, present and long enough)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    where = Path(base)
    try:
        if uses_external_data(init):
            check_external_data(init, where)
            load_external_data_for_tensor(init, str(base))
        return numpy_helper.to_array(init)
    except BadInput:
        raise
    except Exception as exc:  # onnx/numpy raise many types on data that does not fit the tensor's dims
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"ONNX tensor '{init.name}' cannot be read ({first})", path=where) from exc


def read_metadata(path: Path) -> dict[str, str]:
    return metadata_of(load_onnx_graph(path))


def metadata_of(proto: Any) -> dict[str, str]:
    """A loaded graph's metadata_props as a dict (the studio keeps its own under `studio.*`)."""
    return {p.key: p.value for p in proto.metadata_props}


def graph_opset(path: Path) -> int:
    return max(
        (o.version for o in load_onnx_graph(path).opset_import if o.domain in ("", "ai.onnx")), default=0
    )


def op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in load_onnx_graph(path).graph.node)


def float_initializer_types(path: Path) -> set[str]:
    """The floating-point types the graph's weights are stored in ("float32", "float16", "bfloat16")."""
    import onnx

    floats = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.BFLOAT16: "bfloat16",
    }
    return {floats[t.data_type] for t in load_onnx_graph(path).graph.initializer if t.data_type in floats}


def check_nodes(path: Path, names: Sequence[str]) -> None:
    """Every named node is in the graph (a typo in an exclusion list would otherwise be ignored)."""
    if not names:
        return
    present = {n.name for n in load_onnx_graph(path).graph.node}
    missing = [n for n in names if n not in present]
    if missing:
        raise BadInput(f"no node named {', '.join(map(json.dumps, missing))} in the graph", path=path)


def content_digest(array: Any) -> tuple[str, tuple[int, ...], str]:
    """An array's identity by content (bytes, shape, dtype): how weights are followed across renames."""
    import hashlib

    return hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest(), tuple(array.shape), str(array.dtype)


# ---------------------------------------------------------------------------------------------- size


def byte_size(tensor: Any, path: Path) -> int | None:
    """Bytes the tensor's values take as raw data, or None for strings."""
    if tensor.data_type == 8:
        return None
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        raise BadInput(f"ONNX tensor '{tensor.name}' has unknown data type {tensor.data_type}", path=path)
    return (_numel(tensor, path) * bits + 7) // 8


def _numel(tensor: Any, path: Path) -> int:
    n = 1
    for d in tensor.dims:
        if d < 0:
            raise BadInput(
                f"ONNX tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}", path=path
            )
        n *= d
    if n >= MAX_ELEMENTS:
        raise BadInput(
            f"ONNX tensor '{tensor.name}' has impossibly large dimensions {list(tensor.dims)}", path=path
        )
    return n


def onnx_size(path: Path) -> int:
    """Bytes on disk of the graph and its external weights."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


# ---------------------------------------------------------------------------------------------- external data


def uses_external_data(path: Path) -> bool:
    from onnx.external_data_helper import uses_external_data as uses

    return any(uses(t) for t in load_onnx_graph(path).graph.initializer)


def needs_external_data(path: Path) -> bool:
    """Keep weights outside the graph when the input did, or when they approach protobuf's 2 GB."""
    return uses_external_data(path) or onnx_size(path) > TWO_GB // 2


def check_external_data(tensor: Any, base: Path) -> None:
    """External data must lie in the model's folder (no absolute paths, `..` or links out of it), exist,
    and hold the bytes the tensor's dims need, so a graph cannot read other files or crash half-way."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = base / location
    if not location or Path(location).is_absolute() or Path(location).drive:
        raise BadInput(f"ONNX tensor '{tensor.name}' names external data at '{location}'", path=base)
    try:
        resolved = where.resolve()
        resolved.relative_to(base.resolve())
    except (ValueError, OSError) as exc:
        raise BadInput(
            f"ONNX tensor '{tensor.name}': external data '{location}' lies outside the model's folder",
            path=base,
        ) from exc
    if not resolved.is_file():
        raise BadInput(f"ONNX tensor '{tensor.name}': external data file '{location}' is missing", path=base)
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError as exc:
        raise BadInput(
            f"ONNX tensor '{tensor.name}' has a bad external data offset or length", path=base
        ) from exc
    need = byte_size(tensor, base)
    if offset < 0 or (length is not None and length < 0):
        raise BadInput(
            f"ONNX tensor '{tensor.name}' has a negative external data offset or length", path=base
        )
    if length is not None and need is not None and length != need:
        raise BadInput(
            f"ONNX tensor '{tensor.name}' is {list(tensor.dims)} ({need} bytes) but its external data is "
            f"{length} bytes",
            path=base,
        )
    size = resolved.stat().st_size
    want = length if length is not None else need
    if want is not None and offset + want > size:
        raise BadInput(
            f"ONNX tensor '{tensor.name}': external data '{location}' is too short "
            f"({size} bytes, the tensor needs bytes {offset}..{offset + want})",
            path=base,
        )


# ---------------------------------------------------------------------------------------------- writing


def save_onnx(proto: Any, path: Path) -> None:
    """One file when it fits protobuf's 2 GB limit, else the graph plus one `<name>.data` weights file."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if proto.ByteSize() < TWO_GB:
        onnx.save_model(proto, str(path))
    else:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Write metadata_props into the graph file (external weights, if any, are left where they are)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    current = metadata_of(proto)
    current.update(props)
    del proto.metadata_props[:]
    for key, value in current.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
