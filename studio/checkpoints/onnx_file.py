"""ONNX checkpoints opened as a LoadedModel: every tensor and the studio metadata checked, initializers shown
under their torch names (external data read per tensor). Reading and writing graph files is onnx_graph's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.checkpoints.onnx_graph import (
    MAX_ELEMENTS,
    byte_size,
    check_external_data,
    initializer_array,
    load_onnx_graph,
    metadata_of,
)
from studio.errors import BadInput


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def check_graph(model: Any, path: Path) -> None:
    """Every tensor's dims, stored size and external data, and the graph's input dims, checked when the
    model is opened: a bad value is one BadInput naming it, not a crash later in inspection or a run."""
    from onnx.external_data_helper import uses_external_data

    for tensor in _graph_tensors(model.graph):
        need = byte_size(tensor, path)
        if uses_external_data(tensor):
            check_external_data(tensor, path.parent)
        elif tensor.raw_data and need is not None and len(tensor.raw_data) != need:
            raise BadInput(
                f"ONNX tensor '{tensor.name}' is {list(tensor.dims)} ({need} bytes) but holds "
                f"{len(tensor.raw_data)} bytes",
                path=path,
            )
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and not 0 <= dim.dim_value < MAX_ELEMENTS:
                raise BadInput(f"ONNX graph {value.name!r} has a bad dimension {dim.dim_value}", path=path)


def check_metadata(props: dict[str, str], path: Path) -> None:
    """The studio's own metadata (written by export.onnx) read back strictly: a graph from elsewhere may
    carry anything under these keys."""
    import json

    from studio.checkpoints.hf import check_dimensions
    from studio.checkpoints.recognise import FAMILIES

    def bad(key: str, problem: str) -> BadInput:
        return BadInput(f"ONNX metadata '{key}' {problem}", path=path)

    def name_pair(value: Any) -> bool:
        return (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], str)
            and type(value[1]) is bool
        )

    for key in ("studio.weight_names", "studio.config"):
        if props.get(key):
            try:
                value = json.loads(props[key])
            except (json.JSONDecodeError, RecursionError) as exc:
                raise bad(key, f"is not valid JSON ({type(exc).__name__})") from exc
            if not isinstance(value, dict):
                raise bad(key, "is not a JSON object")
            if key == "studio.config":
                check_dimensions(value, path)
                continue
            for name, entry in value.items():
                if isinstance(entry, dict):
                    parts, axis = entry.get("parts"), entry.get("axis", 0)
                    ok = (
                        isinstance(parts, list)
                        and parts
                        and all(name_pair(p) for p in parts)
                        and type(axis) is int
                    )
                else:
                    ok = name_pair(entry)
                if not ok:
                    raise bad(key, f"has a malformed entry for '{name}'")
    family = props.get("studio.family")
    if family and family not in FAMILIES:
        raise bad("studio.family", f"names an unknown family '{family}'")
    if props.get("studio.pooling") not in (None, "", "mean", "cls"):
        raise bad("studio.pooling", f"is '{props['studio.pooling']}' (expected mean or cls)")


def _onnx_dtype_name(elem_type: int) -> str:
    import onnx

    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    names = {
        "float32": "float32",
        "float16": "float16",
        "float64": "float64",
        "int8": "int8",
        "uint8": "uint8",
    }
    return names.get(str(np_dtype), str(np_dtype))


def iter_onnx_tensors(path: Path) -> Iterator[TensorRef]:
    """The graph's initializers, under the torch names export.onnx recorded (`studio.weight_names`): Linear
    weights the exporter stored transposed are turned back, and INT8 weights of a quantized graph
    (`X_quantized` with `X_scale` and `X_zero_point`) are shown dequantized, and a fused weight (Q, K and V
    in one) is shown as its parts, so a graph compares with its torch original layer by layer. Initializers
    without a recorded name keep their own."""
    import json

    import numpy as np

    model = load_onnx_graph(path)
    base = str(path.parent)
    names = json.loads(metadata_of(model).get("studio.weight_names") or "{}")
    inits = {init.name: init for init in model.graph.initializer}

    def array_of(init: Any) -> Any:
        array = initializer_array(init, base)
        if array.dtype.kind not in "fiub":  # bfloat16 and other ml_dtypes
            array = array.astype("float32")
        return array

    def dequantized(init: Any, scale: Any, zero: Any) -> Any:
        q, s = array_of(init).astype(np.float32), array_of(scale).astype(np.float32)
        z = array_of(zero).astype(np.float32) if zero is not None else np.float32(0)
        if s.ndim == 1 and q.ndim == 2:  # per channel: along the output columns of a MatMul weight, else rows
            axis = 1 if s.size == q.shape[1] else 0
            shape = (1, -1) if axis == 1 else (-1, 1)
            s, z = s.reshape(shape), (z.reshape(shape) if np.ndim(z) else z)
        return (q - z) * s

    for init in model.graph.initializer:
        dims, dtype = tuple(int(d) for d in init.dims), _onnx_dtype_name(init.data_type)
        stem = init.name.removesuffix("_quantized")
        scale = inits.get(stem + "_scale") if stem != init.name and stem in names else None
        entry = names.get(stem if scale is not None else init.name)
        if entry is None:

            def plain(init: Any = init) -> Any:
                return _tensor(array_of(init))

            yield TensorRef(name=init.name, shape=dims, dtype=dtype, load=plain)
            continue

        def raw(init: Any = init, scale: Any = scale) -> Any:
            if scale is None:
                return array_of(init)
            return dequantized(init, scale, inits.get(init.name.removesuffix("_quantized") + "_zero_point"))

        # one weight, or several concatenated by a fusion (Q, K and V in one Attention weight)
        parts = entry["parts"] if isinstance(entry, dict) else [entry]
        axis = entry.get("axis", 0) if isinstance(entry, dict) else 0
        for i, (name, flip) in enumerate(parts):
            shape = list(dims)
            if len(parts) > 1:
                shape[axis] //= len(parts)

            def load(
                raw: Any = raw, i: int = i, n: int = len(parts), axis: int = axis, flip: bool = flip
            ) -> Any:
                array = raw()
                if n > 1:
                    array = np.split(array, n, axis=axis)[i]
                return _tensor(array.T if flip else array)

            # dtype stays the stored one (int8 for quantized weights, so sizes add up); values are dequantized
            yield TensorRef(name=name, shape=tuple(shape[::-1] if flip else shape), dtype=dtype, load=load)


def _tensor(array: Any) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.array(array, order="C"))  # a writable copy


def config_from_json(text: str) -> Any:
    """The transformers config export.onnx stored in the graph's metadata (family details, token ids)."""
    import json

    from transformers import AutoConfig

    data = json.loads(text)
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (KeyError, ValueError, TypeError, AttributeError):
        from types import SimpleNamespace

        return SimpleNamespace(**data)


def open_onnx(path: Path, *, source: str) -> LoadedModel:
    from studio.checkpoints.hf import TOKENIZER_FILES
    from studio.checkpoints.recognise import family_from_onnx

    model = load_onnx_graph(path)
    if not model.graph.node:
        raise BadInput("the ONNX model has an empty graph", path=path)
    check_graph(model, path)
    inputs = [i.name for i in model.graph.input]
    props = metadata_of(model)
    check_metadata(props, path)
    raw_config = props.get("studio.config")
    return LoadedModel(
        source=source,
        path=path,
        format="onnx",
        pooling=props.get("studio.pooling") or None,
        normalize=props.get("studio.normalize", "").lower() in ("1", "true", "yes"),
        config_factory=(lambda: config_from_json(raw_config)) if raw_config else None,
        family=props.get("studio.family") or family_from_onnx(model),
        tensor_source=lambda: iter_onnx_tensors(path),
        architecture=props.get("studio.architecture") or model.graph.name or None,
        tokenizer_dir=path.parent if any((path.parent / f).is_file() for f in TOKENIZER_FILES) else None,
        input_names=tuple(inputs),
        notes=[
            f"opset {max((o.version for o in model.opset_import), default=0)}; inputs: {', '.join(inputs)}"
        ],
    )
