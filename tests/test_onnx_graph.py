"""Graph files (studio.checkpoints.onnx_graph) and the frame every ONNX pass runs in, on tiny real graphs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from studio.checkpoints.onnx_graph import (
    check_nodes,
    float_initializer_types,
    graph_opset,
    needs_external_data,
    onnx_size,
    op_counts,
    read_metadata,
    save_onnx,
    set_metadata,
    uses_external_data,
)
from studio.errors import BadInput
from studio.events import Event, Log
from studio.techniques.base import RunContext, StageState
from studio.techniques.onnx.graph_pass import GraphPass


def _graph(op: str = "Add", dtype: int = 1) -> object:
    """Y = X <op> W, W a float initializer of `dtype` (TensorProto)."""
    from onnx import TensorProto, helper, numpy_helper

    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[dtype]
    weight = numpy_helper.from_array(np.arange(4, dtype=np_dtype), name="W")
    node = helper.make_node(op, ["X", "W"], ["Y"], name="the_node")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", dtype, [4])],
        [helper.make_tensor_value_info("Y", dtype, [4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _state(path: Path) -> StageState:
    return StageState(kind="onnx", model=None, path=path)


def test_save_metadata_and_counts(tmp_path):
    path = tmp_path / "model.onnx"
    save_onnx(_graph(), path)
    set_metadata(path, {"studio.family": "feature-extraction"})
    set_metadata(path, {"studio.dtype": "float32"})  # added to, not replacing, what is there
    assert read_metadata(path) == {"studio.family": "feature-extraction", "studio.dtype": "float32"}
    assert op_counts(path) == {"Add": 1}
    assert graph_opset(path) == 17
    assert float_initializer_types(path) == {"float32"}
    assert not uses_external_data(path) and not needs_external_data(path)
    assert onnx_size(path) == path.stat().st_size
    check_nodes(path, ["the_node"])
    with pytest.raises(BadInput, match='no node named "other"'):
        check_nodes(path, ["the_node", "other"])


def test_frame_refuses_quantized_or_half_inputs_for_int8_passes(tmp_path):
    ctx = RunContext(original=None, workdir=tmp_path)
    half = tmp_path / "half.onnx"
    save_onnx(_graph(dtype=10), half)
    with pytest.raises(BadInput, match="quantizes float32 graphs"):
        GraphPass.open(_state(half), ctx, "q", technique="onnx.quantize_dynamic", float32=True)
    GraphPass.open(_state(half), ctx, "q", technique="onnx.half")  # only the INT8 passes ask for float32
    quantized = tmp_path / "quantized.onnx"
    save_onnx(_graph(op="MatMulInteger"), quantized)
    with pytest.raises(BadInput, match=r"onnx\.quantize_static: the graph is already quantized"):
        GraphPass.open(_state(quantized), ctx, "q", technique="onnx.quantize_static", float32=True)
    with pytest.raises(BadInput, match=r"put export\.onnx before it"):
        GraphPass.open(StageState(kind="torch", model=None), ctx, "q", technique="onnx.half")


def test_frame_reports_tool_failures_and_warnings_and_finishes_the_output(tmp_path):
    events: list[Event] = []
    ctx = RunContext(original=None, workdir=tmp_path, emit=events.append)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    save_onnx(_graph(), src)
    set_metadata(src, {"studio.family": "feature-extraction", "other": "not carried"})
    frame = GraphPass.open(_state(src), ctx, "pass", technique="onnx.test", exclude=["the_node"])
    with pytest.raises(BadInput, match="the tool failed: boom"), frame.tool("the tool"):
        raise RuntimeError("boom")
    with frame.tool("the tool", warnings=True):
        for _ in range(2):
            logging.getLogger().warning("a warning from the tool")
        save_onnx(_graph(), frame.out)
    warned = [e.message for e in events if isinstance(e, Log) and e.level == "warning"]
    assert warned == ["onnxruntime: a warning from the tool (x2)"]
    frame.finish({"studio.dtype": "float16"})
    assert read_metadata(frame.out) == {"studio.family": "feature-extraction", "studio.dtype": "float16"}
    assert frame.counts == {"Add": 1}
    state = frame.result("done", extra=True)
    assert state.path == frame.out and state.info == {"extra": True} and state.kind == "onnx"
