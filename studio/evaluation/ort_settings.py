"""ONNX Runtime session settings a graph carries: thread count, graph optimization level, execution mode.

The `runtime.onnxruntime` step writes them into the graph's metadata (`studio.onnxruntime`, JSON), so they
travel with the variant's file: every session the studio opens on that graph (the evaluation, the memory
probe, compare, bench) is built with the same settings, and a search can explore them like any step
parameter. A graph without the key gets the measuring defaults (runners.session_options).
"""

from __future__ import annotations

import json
from typing import Any

from studio.errors import BadInput

SETTINGS_KEY = "studio.onnxruntime"
OPT_LEVELS = {  # the step's names -> onnxruntime.GraphOptimizationLevel members
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def recorded(metadata: dict[str, str], key: str = SETTINGS_KEY) -> dict[str, Any]:
    """The settings a graph's metadata carries under `key` ({} when none; runtime.onnxruntime_genai's are
    under its own key); a damaged entry is BadInput."""
    raw = metadata.get(key)
    if not raw:
        return {}
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadInput(f"the graph's {key} metadata is not JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise BadInput(f"the graph's {key} metadata is not a mapping")
    return settings


def apply(opts: Any, settings: dict[str, Any]) -> Any:
    """Set the recorded settings on an `onnxruntime.SessionOptions` (absent or null ones stay as they are)."""
    import onnxruntime as ort

    threads = settings.get("intra_op_threads")
    if threads:
        opts.intra_op_num_threads = int(threads)
    level = settings.get("graph_optimization_level")
    if level is not None:
        if level not in OPT_LEVELS:
            raise BadInput(f"unknown graph_optimization_level '{level}' (known: {', '.join(OPT_LEVELS)})")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
    mode = settings.get("execution_mode")
    if mode is not None:
        if mode not in EXECUTION_MODES:
            raise BadInput(f"unknown execution_mode '{mode}' (known: {', '.join(EXECUTION_MODES)})")
        opts.execution_mode = getattr(ort.ExecutionMode, EXECUTION_MODES[mode])
    return opts
