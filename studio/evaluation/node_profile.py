"""Where the run time goes, node by node: ONNX Runtime's profiler for graphs, torch.profiler for modules.

Shares are of the time the profiler saw in nodes (so they sum to 1), with the total kept beside them: a
user asking "why is this slow" wants the ranking, and the absolute milliseconds for scale.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import BadInput


@dataclass
class NodeProfile:
    shares: dict[str, float]  # node name (as the graph calls it) -> fraction of the profiled node time
    ops: dict[str, str] = field(default_factory=dict)  # node name -> op type, as the profiler saw it
    total_ms: float = 0.0  # node time per run
    runs: int = 0
    threads: int | None = None  # intra-op threads asked for (None: the library's default)
    threads_used: int | None = None  # threads the kernels ran on, as the profiler saw them

    def to_dict(self) -> dict[str, Any]:
        return {
            "shares": self.shares,
            "ops": self.ops,
            "total_ms": self.total_ms,
            "runs": self.runs,
            "threads": self.threads,
            "threads_used": self.threads_used,
        }


def parse_ort_trace(events: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """Microseconds per node and each node's op from an ONNX Runtime profile (a Chrome trace): the
    `Node` events named `<node>_kernel_time` are the kernels; fences are bookkeeping and are left out."""
    micros: dict[str, float] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"].removesuffix("_kernel_time")
        micros[name] = micros.get(name, 0.0) + float(e.get("dur", 0))
        ops[name] = (e.get("args") or {}).get("op_name", "")
    return micros, ops


def threads_in_trace(events: Sequence[dict[str, Any]]) -> int | None:
    """The most threads one kernel ran on: the calling thread plus the intra-op pool's threads that ran
    a part of it (ONNX Runtime records them per node as `thread_scheduling_stats`)."""
    most = None
    for e in events:
        stats = (e.get("args") or {}).get("thread_scheduling_stats")
        if e.get("cat") != "Node" or not isinstance(stats, dict):
            continue
        subs = stats.get("sub_threads") or {}
        ran = 1 + sum(1 for t in subs.values() if isinstance(t, dict) and int(t.get("num_run", 0)) > 0)
        most = ran if most is None else max(most, ran)
    return most


def shares_of(micros: dict[str, float]) -> dict[str, float]:
    total = sum(micros.values())
    if total <= 0:
        return {k: 0.0 for k in micros}
    return {k: v / total for k, v in sorted(micros.items(), key=lambda kv: -kv[1])}


def profile_onnx(
    path: Path, feeds: dict[str, Any], *, runs: int = 3, threads: int | None = None
) -> NodeProfile:
    """Run the graph once to warm up and `runs` times more, and share its node time. ONNX Runtime profiles
    from the session's start, so the warm-up's node events are dropped by their time window."""
    import onnxruntime as ort

    from studio.evaluation.runners import session_options

    with tempfile.TemporaryDirectory(prefix="studio-profile-") as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BadInput(f"onnxruntime cannot load the graph: {exc}", path=path) from exc
        session.run(None, feeds)  # warm-up: first-run allocations are not the model's steady cost
        for _ in range(runs):
            session.run(None, feeds)
        trace = session.end_profiling()
        events = json.loads(Path(trace).read_text())
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(runs_seen) > runs:  # drop the warm-up run's node events by its time window
        warm = runs_seen[0]
        end = float(warm["ts"]) + float(warm["dur"])
        events = [e for e in events if e.get("cat") != "Node" or float(e.get("ts", 0)) > end]
    micros, ops = parse_ort_trace(events)
    if not micros:
        raise BadInput("ONNX Runtime's profile of the graph holds no node events", path=path)
    return NodeProfile(
        shares=shares_of(micros),
        ops=ops,
        total_ms=sum(micros.values()) / 1000.0 / runs,
        runs=runs,
        threads=threads,
        threads_used=threads_in_trace(events),
    )


def profile_torch(module: Any, call: Any, *, runs: int = 3, threads: int | None = None) -> NodeProfile:
    """Time each leaf module of `module` while `call()` runs it: a torch.profiler range per leaf call (opened
    and closed by forward hooks), summed per module path; shares are of the leaves' total."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from studio.evaluation.runners import torch_threads

    leaves = {name: m for name, m in module.named_modules() if name and not list(m.children())}
    open_ranges: list[Any] = []

    def before(name: str) -> Any:
        def hook(_m: Any, _args: Any) -> None:
            r = record_function(f"studio.module::{name}")
            r.__enter__()
            open_ranges.append(r)

        return hook

    def after(_m: Any, _args: Any, _out: Any) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    handles = []
    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(before(name)))
        handles.append(m.register_forward_hook(after))
    try:
        with torch_threads(threads), torch.inference_mode():
            call()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    call()
    finally:
        for h in handles:
            h.remove()
    micros: dict[str, float] = {}
    ops: dict[str, str] = {}
    for evt in prof.key_averages():
        if evt.key.startswith("studio.module::"):
            name = evt.key.removeprefix("studio.module::")
            micros[name] = float(evt.cpu_time_total)
            ops[name] = type(leaves[name]).__name__ if name in leaves else ""
    if not micros:
        raise BadInput("torch.profiler saw no module run: the model calls none of its leaf modules")
    used = threads or torch.get_num_threads()
    total_ms = sum(micros.values()) / 1000.0 / runs
    return NodeProfile(shares_of(micros), ops, total_ms, runs, threads=threads, threads_used=used)


def profile_model(
    model: Any,
    examples: Sequence[Any],
    *,
    sequence_length: int = 32,
    runs: int = 3,
    threads: int | None = None,
) -> NodeProfile:
    """The node profile of an opened checkpoint on a batch of `examples`, fed as its evaluation feeds it."""
    from studio.checkpoints.stage import stage_of
    from studio.evaluation.runners import OnnxRunner, TorchRunner, graph_feeds
    from studio.families import family_for

    batch = family_for(model).batch(model, examples, sequence_length)
    if stage_of(model) == "onnx":
        graph = OnnxRunner(model.path, model, threads=threads, device="cpu")  # its declared inputs and types
        feeds = graph_feeds(batch, graph.inputs, graph.family, graph.config)
        del graph
        return profile_onnx(model.path, feeds, runs=runs, threads=threads)
    runner = TorchRunner(model.module, model, threads=threads)
    return profile_torch(model.module, lambda: runner(batch), runs=runs, threads=threads)
