"""Running an OpenVINO IR (model.xml + model.bin) on OpenVINO's CPU plugin, fed like an ONNX graph.

The IR is compiled once for the CPU with the measuring settings: `INFERENCE_NUM_THREADS` (the recipe's
threads), `PERFORMANCE_HINT: LATENCY` (one stream: a call uses every thread, as the other runtimes are
timed) and `INFERENCE_PRECISION_HINT: f32`. Without the last, OpenVINO computes in bfloat16 on CPUs that
have it (AVX-512 BF16, AMX), so an "FP32" IR would be judged and timed at another precision than its
peers; INT8 layers of an NNCF model run in INT8 either way. Inputs are matched by name as for ONNX
(`runners.graph_feeds`), and output 0 goes through the family's `from_primary`.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.checkpoints.openvino_ir import NO_OPENVINO, import_openvino, ir_metadata, read_ir
from studio.errors import BadInput
from studio.evaluation.runners import graph_config, graph_feeds
from studio.families import Batch, family_for

if TYPE_CHECKING:
    import torch

    from studio.checkpoints.base import LoadedModel


def installed(package: str) -> bool:
    """Whether `package` can be imported, found without importing it (openvino and nncf take seconds)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: a module entry without a spec (None in sys.modules)
        return False


def openvino_availability() -> tuple[bool, str | None]:
    """(True, None), or (False, why not) when the openvino package is missing."""
    return (True, None) if installed("openvino") else (False, NO_OPENVINO)


@lru_cache(maxsize=1)
def core() -> Any:
    """One OpenVINO Core per process: it holds the plugins, which load once."""
    return import_openvino().Core()


def compile_settings(threads: int | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        settings["INFERENCE_NUM_THREADS"] = int(threads)
    return settings


def declared_inputs(ov_model: Any) -> list[tuple[str, str]]:
    """The IR's inputs as [(name, numpy dtype name)], the form `graph_feeds` takes."""
    return [(i.get_any_name(), str(i.get_element_type().to_dtype())) for i in ov_model.inputs]


class OpenVinoRunner:
    """A compiled IR: `runner(batch) -> family.from_primary(output 0, batch)`."""

    def __init__(self, path: str | Path, model: LoadedModel, *, threads: int | None = None) -> None:
        self.path = Path(path)
        ov_model = read_ir(self.path)
        self.inputs = declared_inputs(ov_model)
        self.family = family_for(model)
        self.config = graph_config(model, ir_metadata(ov_model))
        try:
            self.compiled = core().compile_model(ov_model, "CPU", compile_settings(threads))
        except RuntimeError as exc:
            raise BadInput(f"OpenVINO cannot compile the IR for the CPU: {exc}", path=self.path) from exc
        self.output = self.compiled.outputs[0]
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: Batch) -> torch.Tensor:
        import torch

        feeds = graph_feeds(batch, self.inputs, self.family, self.config)
        try:
            result = self.request.infer(feeds)
        except RuntimeError as exc:
            raise BadInput(f"OpenVINO failed to run the IR: {exc}", path=self.path) from exc
        primary = torch.from_numpy(result[self.output].copy())  # the request reuses its output buffer
        return self.family.from_primary(primary, batch).float()
