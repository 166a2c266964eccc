"""OpenVINO IR checkpoints (model.xml + model.bin) opened as a LoadedModel.

export.openvino copies the studio's ONNX metadata (family, pooling, config, ...) into the IR's runtime
info under `model_studio`, so a saved IR says by itself how it is fed and judged, as an ONNX graph does;
an IR from elsewhere gets its family from its input and output names. Reading the IR needs openvino
(imported here only when an IR is opened); its weights are memory-mapped, not read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.errors import BadInput, Unavailable

RT_SECTION = "model_studio"  # the IR runtime-info section holding the studio's metadata
# The studio.* metadata keys export.onnx writes, carried into the IR under RT_SECTION without the prefix
# (not its torch weight names: the IR's constants are not the graph's initializers).
METADATA_KEYS = ("family", "architecture", "pooling", "normalize", "dtype", "exporter", "config")
NO_OPENVINO = "OpenVINO is not installed (pip install openvino==2026.4.1): an OpenVINO IR cannot be read here"


def import_openvino() -> Any:
    """The openvino package, or Unavailable naming what to install."""
    try:
        import openvino
    except ImportError as exc:
        raise Unavailable(NO_OPENVINO) from exc
    return openvino


def read_ir(path: Path) -> Any:
    """The IR at `path` as an openvino.Model; an unreadable or damaged IR is BadInput."""
    ov = import_openvino()
    if not path.with_suffix(".bin").is_file():
        raise BadInput("an OpenVINO IR needs its weights file beside it (model.bin)", path=path)
    try:
        return ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise BadInput(f"OpenVINO cannot read the IR: {openvino_message(exc)}", path=path) from exc


def openvino_message(exc: BaseException, limit: int = 400) -> str:
    """What an OpenVINO error says, without the C++ source location and frame lines it starts with
    ("Check 'false' failed at src/...cpp:151:", "FrontEnd API failed with ...:")."""
    noise = ("Check '", "FrontEnd API failed", "Summary:", "Exception from src/")
    lines = [line.strip().lstrip("-").strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(noise)]
    return " ".join(kept)[:limit] or type(exc).__name__


def ir_metadata(model: Any) -> dict[str, str]:
    """The studio metadata of an IR, under the ONNX graph's key names (`studio.family`, ...)."""
    props: dict[str, str] = {}
    for key in METADATA_KEYS:
        if model.has_rt_info([RT_SECTION, key]):
            props[f"studio.{key}"] = str(model.get_rt_info([RT_SECTION, key]).astype(str))
    return props


def family_from_ir(model: Any) -> str:
    """The family of an IR without studio metadata, from its input and output names (as for ONNX)."""
    inputs = {name for i in model.inputs for name in i.get_names()}
    outputs = [name for o in model.outputs for name in o.get_names()]
    if "decoder_input_ids" in inputs:
        return "seq2seq"
    if "input_ids" in inputs:
        if any(o.startswith("present") for o in outputs) or any(i.startswith("past") for i in inputs):
            return "causal-lm"
        return "feature-extraction"
    if any(len(i.get_partial_shape()) == 4 for i in model.inputs):
        return "image-classification"
    return "generic"


def iter_ir_tensors(path: Path) -> Iterator[TensorRef]:
    """The IR's constants with more than one element (weights, biases, quantization ranges), under the
    names OpenVINO gave them: the IR keeps no torch names, so they line up only with another IR's."""
    import numpy as np

    model = read_ir(path)
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = tuple(int(d) for d in op.get_output_shape(0))
        if int(np.prod(shape)) < 2:
            continue

        def load(op: Any = op) -> Any:
            import torch

            return torch.from_numpy(np.array(op.get_data(), order="C"))

        dtype = str(op.get_element_type().to_dtype())
        yield TensorRef(name=op.get_friendly_name(), shape=shape, dtype=dtype, load=load)


def open_openvino(path: Path, *, source: str) -> LoadedModel:
    from studio.checkpoints.hf import TOKENIZER_FILES
    from studio.checkpoints.onnx_file import check_metadata, config_from_json

    model = read_ir(path)
    props = ir_metadata(model)
    check_metadata(props, path)
    raw_config = props.get("studio.config")
    inputs = [i.get_any_name() for i in model.inputs]
    return LoadedModel(
        source=source,
        path=path,
        format="openvino",
        pooling=props.get("studio.pooling") or None,
        normalize=props.get("studio.normalize", "").lower() in ("1", "true", "yes"),
        config_factory=(lambda: config_from_json(raw_config)) if raw_config else None,
        family=props.get("studio.family") or family_from_ir(model),
        tensor_source=lambda: iter_ir_tensors(path),
        architecture=props.get("studio.architecture") or model.get_friendly_name() or None,
        tokenizer_dir=path.parent if any((path.parent / f).is_file() for f in TOKENIZER_FILES) else None,
        input_names=tuple(inputs),
        notes=[f"OpenVINO IR; inputs: {', '.join(inputs)}"],
    )
