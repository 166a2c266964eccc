"""Run a torch module, an ONNX graph, a TensorRT engine, an ExecuTorch program or an OpenVINO IR on a
`Batch`, returning the family's compared output.

Latency, quality and export verification all go through these runners, so every stage kind is fed the
same inputs and judged by the same output (pooled embeddings for encoders, logits otherwise): torch through
`family.forward`, graphs and engines through `family.from_primary` on their first output.

A runner is any callable `runner(batch) -> torch.Tensor`. `make_runner` picks the class by stage kind;
TensorRT's class (studio/evaluation/tensorrt_runner.py, `TensorRTRunner(engine_path, family, model)`) is
imported only when asked for, so nothing here needs TensorRT installed; so is ExecuTorch's
(studio/evaluation/executorch_runner.py, `ExecuTorchRunner(pte_path, model)`), and OpenVINO's
(studio/evaluation/openvino_runner.py, `OpenVinoRunner(xml_path, model, threads=...)`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

from studio.errors import BadInput, Unavailable
from studio.evaluation import ort_settings
from studio.evaluation.onnx_cache import PAST_PREFIX, empty_past
from studio.families import Batch, Family, Seq2Seq, family_for

if TYPE_CHECKING:
    import numpy as np
    import torch

    from studio.checkpoints.base import LoadedModel
    from studio.techniques.base import StageState


class Runner(Protocol):
    def __call__(self, batch: Batch) -> torch.Tensor: ...


def make_runner(
    state_or_kind: StageState | str,
    model: LoadedModel | None = None,
    *,
    artifact: Any = None,
    threads: int | None = None,
    device: str | None = None,
) -> Runner:
    """A runner for a pipeline state, or for `kind` ("torch", "onnx", "tensorrt", "executorch",
    "openvino") and a checkpoint.

    With a `StageState` the artifact is its module (torch) or its file; with a kind it is `artifact`, or
    else the checkpoint's own module (torch) or file (onnx). `threads` sets the intra-op thread count
    (None: the library's default). `device` applies to ONNX: None uses CUDA when onnxruntime has it, "cpu"
    forces the CPU, "cuda" requires CUDA.
    """
    if isinstance(state_or_kind, str):
        kind = state_or_kind
        if model is None:
            raise TypeError("make_runner(kind, ...) needs the model")
    else:
        kind, model = state_or_kind.kind, model or state_or_kind.model
        artifact = state_or_kind.module if kind == "torch" else state_or_kind.path
    if artifact is None:
        artifact = model.module if kind == "torch" else model.path
    if kind == "torch":
        return TorchRunner(artifact, model, threads=threads)
    if kind == "onnx":
        return OnnxRunner(Path(artifact), model, threads=threads, device=device)
    if kind == "tensorrt":
        from studio.evaluation.tensorrt_runner import TensorRTRunner  # needs TensorRT: imported only here

        return TensorRTRunner(Path(artifact), family_for(model), model)  # a GPU engine: no CPU threads
    if kind == "executorch":
        from studio.evaluation.executorch_runner import ExecuTorchRunner  # needs executorch: only here

        return ExecuTorchRunner(Path(artifact), model)  # threads: XNNPACK sizes its own pool
    if kind == "openvino":
        from studio.evaluation.openvino_runner import OpenVinoRunner  # needs openvino: imported only here

        return OpenVinoRunner(Path(artifact), model, threads=threads)
    raise BadInput(f"no runner for stage kind '{kind}' (known: torch, onnx, tensorrt, executorch, openvino)")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count for the duration (it is process-wide, so it is put back after)."""
    import torch

    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchRunner:
    """`family.forward` under no_grad, with the inputs moved to where the module's weights are."""

    def __init__(self, module: Any, model: LoadedModel, *, threads: int | None = None) -> None:
        self.module = module
        self.family: Family = family_for(model)
        self.threads = threads
        tensors = [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else []
        self.device = tensors[0].device if tensors else None
        self.dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)

    def __call__(self, batch: Batch) -> torch.Tensor:
        import torch

        def place(t: torch.Tensor) -> torch.Tensor:
            # float inputs (images) in the weights' precision, so a half-precision CNN takes float32 images
            dtype = self.dtype if t.is_floating_point() and self.dtype is not None else t.dtype
            return t.to(self.device or t.device, dtype)

        if self.device is not None and (self.device.type != "cpu" or self.dtype != torch.float32):
            batch = Batch(
                inputs={k: place(v) for k, v in batch.inputs.items()},
                labels=None if batch.labels is None else batch.labels.to(self.device),
            )
        with torch.inference_mode(), torch_threads(self.threads):
            return self.family.forward(self.module, batch).float().cpu()


def graph_config(model: LoadedModel, metadata: dict[str, str]) -> Any:
    """The model config: the checkpoint's, or the one export.onnx stored in the graph's metadata."""
    if model.config is not None:
        return model.config
    raw = metadata.get("studio.config")
    return SimpleNamespace(**json.loads(raw)) if raw else None


def graph_feeds(
    batch: Batch,
    inputs: list[tuple[str, str]],
    family: Family,
    config: Any = None,
) -> dict[str, np.ndarray]:
    """Numpy feeds for a graph's declared inputs [(name, numpy dtype)]: text inputs as int64 arrays,
    seq2seq's decoder_input_ids by teacher forcing, and an image graph's one input whatever its name."""
    feeds: dict[str, np.ndarray] = {}
    given = dict(batch.inputs)
    for name, dtype in inputs:
        if name in given:
            value = given[name]
        elif name == "decoder_input_ids" and isinstance(family, Seq2Seq):
            if batch.labels is None or config is None:
                raise BadInput("a seq2seq graph needs target ids (batch labels) and the model config")
            value = Seq2Seq.decoder_input_ids(batch, config)
        elif len(inputs) == 1 and len(given) == 1:  # images: "x", "pixel_values", "pixels", ...
            value = next(iter(given.values()))
        else:
            raise BadInput(f"the graph takes an input '{name}' the {family.name} family does not make")
        feeds[name] = value.detach().cpu().numpy().astype(dtype, copy=False)
    return feeds


ORT_TYPES = {
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bool)": "bool",
}


def session_options(threads: int | None = None, settings: dict[str, Any] | None = None) -> Any:
    """ORT options for measuring: a set intra-op thread count, and no idle spinning, whose busy-waiting
    threads would steal cores from whatever runs next (the next variant, torch, the GUI). `settings`: the
    ones a graph carries (ort_settings.py), which win over `threads`: they are part of the variant."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings about CPU fallbacks are not the user's business
    return ort_settings.apply(opts, settings or {})


def providers_for(device: str | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise Unavailable("onnxruntime has no CUDA execution provider on this machine")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(
    path: Path, threads: int | None = None, device: str | None = None, metadata: dict[str, str] | None = None
) -> Any:
    """An onnxruntime session with the measuring options and the graph's own settings (from `metadata`,
    read from the file when not given); a graph it cannot load is BadInput."""
    import onnxruntime as ort

    from studio.checkpoints.onnx_graph import read_metadata

    settings = ort_settings.recorded(read_metadata(path) if metadata is None else metadata)
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads, settings), providers=providers_for(device)
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BadInput(f"onnxruntime cannot load the graph: {exc}", path=path) from exc


def past_inputs(session: Any) -> list[tuple[str, list[Any], str]]:
    """A session's KV-cache inputs (export.onnx with_cache) as [(name, declared shape, numpy dtype)]."""
    return [
        (i.name, list(i.shape), ORT_TYPES.get(i.type, "float32"))
        for i in session.get_inputs()
        if i.name.startswith(PAST_PREFIX)
    ]


class OnnxRunner:
    """An onnxruntime session: declared inputs fed from the batch, output 0 through `family.from_primary`."""

    def __init__(
        self,
        path: Path,
        model: LoadedModel,
        *,
        threads: int | None = None,
        device: str | None = None,
    ) -> None:
        from studio.checkpoints.onnx_graph import read_metadata

        self.path = Path(path)
        metadata = read_metadata(self.path)
        self.session = open_session(self.path, threads, device, metadata)
        declared = self.session.get_inputs()
        # A cache graph (export.onnx with_cache) is fed a zero-length past: a plain forward pass.
        self.past = past_inputs(self.session)
        self.inputs = [
            (i.name, ORT_TYPES.get(i.type, "float32")) for i in declared if not i.name.startswith(PAST_PREFIX)
        ]
        self.output = self.session.get_outputs()[0].name
        self.family = family_for(model)
        self.config = graph_config(model, metadata)

    def __call__(self, batch: Batch) -> torch.Tensor:
        import torch

        feeds = graph_feeds(batch, self.inputs, self.family, self.config)
        if self.past:
            feeds.update(empty_past(self.past, len(next(iter(feeds.values())))))
        (primary,) = self.session.run([self.output], feeds)
        return self.family.from_primary(torch.from_numpy(primary), batch).float()
