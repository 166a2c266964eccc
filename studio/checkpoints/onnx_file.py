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


def initializer_array(init: Any, base: str | Path) -> Any:
    """One initializer's values as stored (numpy), its external data read from the graph's folder if it has any."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(init):
        load_external_data_for_tensor(init, str(base))
    return numpy_helper.to_array(init)


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
    names = json.loads({p.key: p.value for p in model.metadata_props}.get("studio.weight_names") or "{}")
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
            yield TensorRef(
                name=init.name, shape=dims, dtype=dtype, load=lambda init=init: _tensor(array_of(init))
            )
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
