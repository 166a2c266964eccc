"""The kind of model a pipeline stage holds, for the stage an opened checkpoint starts at.

A stage is "torch" (a module in memory), "onnx" (a graph file), "tensorrt" (an engine built from a
graph), "executorch" (a `.pte` program) or "openvino" (an OpenVINO IR: model.xml with its model.bin). The
kind decides which steps may follow (a technique's `input_kind` must match it) and which runner times and
judges the model. An opened checkpoint is an ONNX stage when it is an ONNX graph, an OpenVINO stage when it
is an IR, and a torch stage otherwise (a Hugging Face folder, TorchScript, an exported program, a pickled
module); no checkpoint opens as a TensorRT engine or an ExecuTorch program.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel

FILE_STAGES = {"onnx": "onnx", "openvino": "openvino"}  # checkpoint format -> the stage it starts at


def stage_of(model: LoadedModel) -> str:
    """The stage kind an opened checkpoint starts the pipeline at: "onnx", "openvino" or "torch"."""
    return FILE_STAGES.get(model.format, "torch")


def stage_of_source(source: str) -> str:
    """The same guess from a recipe's `model` text, for checking steps without opening the checkpoint
    (opening one imports torch): a path ending in .onnx starts at "onnx", one ending in .xml (an OpenVINO
    IR) at "openvino", anything else at "torch"."""
    lower = source.lower()
    if lower.endswith(".onnx"):
        return "onnx"
    return "openvino" if lower.endswith(".xml") else "torch"
