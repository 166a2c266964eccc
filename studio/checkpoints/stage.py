"""The kind of model a pipeline stage holds, for the stage an opened checkpoint starts at.

A stage is "torch" (a module in memory), "onnx" (a graph file) or "tensorrt" (an engine built from a
graph). The kind decides which steps may follow (a technique's `input_kind` must match it) and which
runner times and judges the model. An opened checkpoint is an ONNX stage when it is an ONNX graph and a
torch stage otherwise (a Hugging Face folder, TorchScript, an exported program, a pickled module); no
checkpoint opens as a TensorRT engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel


def stage_of(model: LoadedModel) -> str:
    """The stage kind an opened checkpoint starts the pipeline at: "onnx" or "torch"."""
    return "onnx" if model.format == "onnx" else "torch"


def stage_of_source(source: str) -> str:
    """The same guess from a recipe's `model` text, for checking steps without opening the checkpoint
    (opening one imports torch): a path ending in .onnx starts at "onnx", anything else at "torch"."""
    return "onnx" if source.lower().endswith(".onnx") else "torch"
