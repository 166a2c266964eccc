"""ONNX models: initializers for inspection (external data read per tensor), onnxruntime for running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.errors import BadInput


def load_onnx_graph(path: Path) -> Any:
    """The ModelProto without external weights; a damaged file becomes BadInput."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"not a valid ONNX model ({first})", path=path) from exc


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
    import torch
    from onnx import numpy_helper

    model = load_onnx_graph(path)
    base = str(path.parent)
    for init in model.graph.initializer:

        def load(init: Any = init) -> torch.Tensor:
            from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

            if uses_external_data(init):
                load_external_data_for_tensor(init, base)
            array = numpy_helper.to_array(init)
            if array.dtype.kind not in "fiub":  # bfloat16 and other ml_dtypes
                array = array.astype("float32")
            return torch.from_numpy(array.copy())

        yield TensorRef(
            name=init.name,
            shape=tuple(int(d) for d in init.dims),
            dtype=_onnx_dtype_name(init.data_type),
            load=load,
        )


def config_from_json(text: str) -> Any:
    """The transformers config export.onnx stored in the graph's metadata (family details, token ids)."""
    import json

    from transformers import AutoConfig

    data = json.loads(text)
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (KeyError, ValueError):
        from types import SimpleNamespace

        return SimpleNamespace(**data)


def open_onnx(path: Path, *, source: str) -> LoadedModel:
    from studio.checkpoints.hf import TOKENIZER_FILES
    from studio.families import family_from_onnx

    model = load_onnx_graph(path)
    if not model.graph.node:
        raise BadInput("the ONNX model has an empty graph", path=path)
    inputs = [i.name for i in model.graph.input]
    props = {p.key: p.value for p in model.metadata_props}
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
        notes=[
            f"opset {max((o.version for o in model.opset_import), default=0)}; inputs: {', '.join(inputs)}"
        ],
    )
