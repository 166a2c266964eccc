"""The frame every ONNX -> ONNX pass runs in: its input checked, its tool's failures and warnings reported,
its output finished the same way.

A pass reads the previous step's file and writes a new one in its own step folder (the input is never
changed); the output carries the input's studio metadata (with the torch weight names followed to the
initializers the pass made) and the tokenizer files, and the step reports the size change. Each pass
module holds only what is its own: the tool it calls and what it measures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.checkpoints.onnx_graph import (
    QUANT_OPS,
    check_nodes,
    content_digest,
    float_initializer_types,
    initializer_array,
    load_onnx_graph,
    onnx_size,
    op_counts,
    read_metadata,
    set_metadata,
)
from studio.errors import BadInput
from studio.techniques.base import RunContext, StageState

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel

GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's description of the graph (export.onnx_genai)


@dataclass
class GraphPass:
    """One run of a pass: `open` checks the input, `tool` runs ONNX Runtime's tool, `finish` completes the
    output file, `result` is the new state."""

    state: StageState
    ctx: RunContext
    src: Path
    folder: str

    @classmethod
    def open(
        cls,
        state: StageState,
        ctx: RunContext,
        folder: str,
        *,
        technique: str,
        float32: bool = False,
        exclude: Sequence[str] = (),
    ) -> GraphPass:
        """The input graph, refused unless it is unquantized float32 (`float32`, for the INT8 passes) and
        unless every node named in `exclude` is in it."""
        src = input_path(state)
        if float32:
            refuse_unless_float32(src, technique)
        check_nodes(src, exclude)
        return cls(state, ctx, src, folder)

    @cached_property
    def out(self) -> Path:
        """The output graph, in the step's folder (made on first use: a pass that passes its input on
        unchanged leaves no folder)."""
        return self.ctx.step_dir(self.folder) / "model.onnx"

    @contextlib.contextmanager
    def tool(self, name: str, *, warnings: bool = False) -> Iterator[None]:
        """Run a tool: its failure becomes a BadInput naming it; with `warnings`, what it warns through
        the root logger goes to the step's log."""
        with ort_warnings(self.ctx) if warnings else contextlib.nullcontext():
            try:
                yield
            except Exception as exc:
                raise BadInput(f"{name} failed: {exc}", path=self.src) from exc

    def copy_input(self) -> None:
        """The input graph copied unchanged to `out`, its external weights beside it under the same relative
        name: for steps that only record how the graph is run (the runtime steps)."""
        shutil.copyfile(self.src, self.out)
        data = self.src.with_name(self.src.name + ".data")
        if data.is_file():
            shutil.copyfile(data, self.out.with_name(self.out.name + ".data"))

    def finish(self, extra: dict[str, str] | None = None) -> None:
        finish_pass(self.src, self.out, self.ctx, extra)

    @cached_property
    def input_counts(self) -> Counter[str]:
        """The input graph's op types and their counts."""
        return op_counts(self.src)

    @cached_property
    def counts(self) -> Counter[str]:
        """The output graph's op types and their counts (after `finish`)."""
        return op_counts(self.out)

    def result(self, done: str, **info: Any) -> StageState:
        self.ctx.progress(1.0, done)
        return StageState(
            kind="onnx", model=self.state.model, path=self.out, info=dict(self.state.info, **info)
        )


def input_path(state: StageState) -> Path:
    if state.kind != "onnx" or state.path is None or not Path(state.path).is_file():
        raise BadInput("this step needs an ONNX graph: put export.onnx before it")
    return Path(state.path)


def refuse_unless_float32(path: Path, technique: str) -> None:
    if QUANT_OPS & set(op_counts(path)):
        raise BadInput(f"{technique}: the graph is already quantized", path=path)
    if "float32" not in float_initializer_types(path):
        raise BadInput(f"{technique} quantizes float32 graphs: put it before onnx.half", path=path)


def model_config(model: LoadedModel, path: Path) -> Any:
    from studio.evaluation.runners import graph_config

    return graph_config(model, read_metadata(path))


@contextlib.contextmanager
def ort_warnings(ctx: RunContext, limit: int = 5) -> Iterator[None]:
    """ONNX Runtime's quantization tools warn through the root logger (stderr); pass their warnings to
    the step's log instead, once each and at most `limit`."""
    seen: dict[str, int] = {}

    def capture(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = record.getMessage().strip()
            # the pre-processing hint: DefaultTensorType (dynamic) or preprocess() (static) stands in for it
            if "pre-processing" not in message and "pre-process" not in message:
                seen[message] = seen.get(message, 0) + 1
            return False
        return True

    root = logging.getLogger()
    root.addFilter(capture)
    try:
        yield
    finally:
        root.removeFilter(capture)
        for message, count in list(seen.items())[:limit]:
            ctx.log(f"onnxruntime: {message}" + (f" (x{count})" if count > 1 else ""), level="warning")
        if len(seen) > limit:
            ctx.log(f"onnxruntime: {len(seen) - limit} more warning(s)", level="warning")


def follow_weight_names(src: Path, out: Path, names: dict[str, Any]) -> dict[str, Any]:
    """The input graph's torch weight names (see export.onnx's `weight_names`), extended to the initializers
    the pass made from named ones: a renamed copy, or a concatenation of equal parts (the Q, K and V weights
    a fusion joins into one Attention weight), found by content."""
    import numpy as np

    src_inits = load_onnx_graph(src).graph.initializer
    known = {
        content_digest(initializer_array(i, src.parent)): names[i.name]
        for i in src_inits
        if isinstance(names.get(i.name), list)
    }
    src_names = {i.name for i in src_inits}
    out_names = dict(names)
    for init in load_onnx_graph(out).graph.initializer:
        if init.name in src_names or init.name in names:
            continue
        array = initializer_array(init, out.parent)
        whole = known.get(content_digest(array))
        if whole:
            out_names[init.name] = whole
        elif array.ndim in (1, 2) and array.shape[-1] % 3 == 0 and array.shape[-1] > 3:
            parts = [known.get(content_digest(part)) for part in np.split(array, 3, axis=-1)]
            if all(parts):
                out_names[init.name] = {"parts": parts, "axis": array.ndim - 1}
    return out_names


def carry_genai_config(src_dir: Path, out: Path) -> None:
    """onnxruntime-genai's genai_config.json (export.onnx_genai) goes with the graph, naming the pass's
    output file, so every later graph still loads in onnxruntime-genai's Generator."""
    config = src_dir / GENAI_CONFIG
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    decoder = data.get("model", {}).get("decoder")
    if isinstance(decoder, dict):
        decoder["filename"] = out.name
    (out.parent / GENAI_CONFIG).write_text(json.dumps(data, indent=4))


def finish_pass(src: Path, out: Path, ctx: RunContext, extra: dict[str, str] | None = None) -> None:
    """Carry the input graph's studio metadata and side files to the output; report the size change."""
    from studio.techniques.torch_io import copy_side_files

    if not out.is_file():
        raise BadInput("the pass wrote no graph", path=out)
    props = {k: v for k, v in read_metadata(src).items() if k.startswith("studio.")}
    if "studio.weight_names" in props:
        names = follow_weight_names(src, out, json.loads(props["studio.weight_names"]))
        props["studio.weight_names"] = json.dumps(names, sort_keys=True)
    set_metadata(out, {**props, **(extra or {})})
    copy_side_files(src.parent, out.parent)
    carry_genai_config(src.parent, out)
    before, after = onnx_size(src), onnx_size(out)
    ctx.metric("onnx_size_bytes", after)
    ctx.log(f"{out.name}: {after / 1e6:.1f} MB ({after / before:.0%} of the input's {before / 1e6:.1f} MB)")
