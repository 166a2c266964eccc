"""Running a built TensorRT engine on torch CUDA tensors, and telling whether TensorRT can run here.

The engine is loaded with `trt.Runtime`, its inputs are copied to CUDA tensors of the engine's types, and
its outputs are torch CUDA tensors whose addresses TensorRT writes into (`set_tensor_address`), run on
torch's current stream with `execute_async_v3`. Building engines is the export.tensorrt technique
(studio/techniques/tensorrt.py), which shares the availability check, the logger and the input mapping.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from studio.errors import BadInput, Unavailable

NO_TENSORRT = "TensorRT Python package not installed (pip install tensorrt from NVIDIA's index)"
NO_GPU = "no NVIDIA GPU found"


@lru_cache(maxsize=1)
def nvidia_gpu_visible() -> bool:
    """An NVIDIA GPU the driver reports, found without importing torch (listing techniques stays fast)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0 and "GPU" in done.stdout:
            return True
    import sys

    torch = sys.modules.get("torch")  # already imported: ask it too (covers drivers without nvidia-smi)
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:  # a broken CUDA install is "no GPU" here
            return False
    return False


def tensorrt_availability() -> tuple[bool, str | None]:
    """(True, None), or (False, what is missing: the package, the GPU, or both)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append(NO_TENSORRT)
    if not nvidia_gpu_visible():
        missing.append(NO_GPU)
    return (False, "; ".join(missing)) if missing else (True, None)


def require_tensorrt() -> Any:
    ok, reason = tensorrt_availability()
    if not ok:
        raise Unavailable(reason or NO_GPU)
    import torch

    if not torch.cuda.is_available():
        raise Unavailable(f"{NO_GPU} (torch.cuda.is_available() is False: no usable CUDA device)")
    import tensorrt as trt

    return trt


def torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "int32": torch.int32,
        "int64": torch.int64,
        "bool": torch.bool,
    }
    for name, torch_dtype in table.items():
        if getattr(trt, name, None) == dtype:
            return torch_dtype
    raise BadInput(f"the engine uses a tensor type the runner does not handle ({dtype})")


def engine_feed(names: list[str], batch: Any, config: Any = None) -> dict[str, Any]:
    """Map a family batch onto the engine's input names.

    Inputs the graph takes but the batch lacks are made the way the model would: token_type_ids zeros,
    attention_mask ones, decoder_input_ids the labels shifted right. A single-input graph takes the
    batch's single input whatever it is called (images: `pixel_values` / `x` vs the exported name).
    """
    import torch

    from studio.families import Seq2Seq

    inputs = batch.inputs
    if len(names) == 1 and len(inputs) == 1 and names[0] not in inputs:
        return {names[0]: next(iter(inputs.values()))}
    feed: dict[str, Any] = {}
    missing = []
    for name in names:
        if name in inputs:
            feed[name] = inputs[name]
        elif name == "token_type_ids" and "input_ids" in inputs:
            feed[name] = torch.zeros_like(inputs["input_ids"])
        elif name == "attention_mask" and "input_ids" in inputs:
            feed[name] = torch.ones_like(inputs["input_ids"])
        elif name == "decoder_input_ids" and batch.labels is not None and config is not None:
            feed[name] = Seq2Seq.decoder_input_ids(batch, config)
        else:
            missing.append(name)
    if missing:
        raise BadInput(
            f"the engine takes inputs {', '.join(missing)} that the data does not give "
            f"(it gives {', '.join(inputs) or 'nothing'})"
        )
    return feed


_LOGGER: Any = None


def trt_logger(trt: Any) -> Any:
    """One logger for every builder and runtime (TensorRT keeps the first one it sees); messages go to
    whichever sink is set, and errors are kept for the exception text."""
    global _LOGGER
    if _LOGGER is None:

        class _StudioLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.sink: Any = None
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                    level = "error"
                elif severity == trt.ILogger.Severity.WARNING:
                    level = "warning"
                else:
                    return
                if self.sink is not None:
                    self.sink(f"TensorRT: {msg}", level)

        _LOGGER = _StudioLogger()
        _LOGGER.min_severity = trt.ILogger.Severity.WARNING
    return _LOGGER


class TensorRTRunner:
    """Runs a built engine on a family batch: `runner(batch) -> family.from_primary(output 0, batch)`.

    Inputs are copied to CUDA tensors of the engine's types; outputs are torch CUDA tensors whose
    addresses TensorRT writes into (`set_tensor_address`), run on torch's current stream with
    `execute_async_v3`. The result comes back on the batch's device.
    """

    def __init__(self, engine_path: str | Path, family: Any, model: Any) -> None:
        trt = require_tensorrt()
        import torch

        self._trt = trt
        self.family = family
        self.model = model
        self.path = Path(engine_path)
        self._logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BadInput(
                "TensorRT cannot load this engine (built by another TensorRT version or for another GPU?)",
                path=self.path,
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {}
        for n in self.inputs:
            fixed = tuple(self.engine.get_tensor_shape(n))
            if all(s >= 0 for s in fixed):
                self.profile[n] = [fixed, fixed, fixed]
            else:
                self.profile[n] = [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)]
        self.device = torch.device("cuda", torch.cuda.current_device())

    def __call__(self, batch: Any) -> Any:
        import torch

        config = getattr(self.model, "config", None)
        feed = engine_feed(self.inputs, batch, config)
        back_to = next(iter(batch.inputs.values())).device if batch.inputs else torch.device("cpu")
        keep = []
        for name in self.inputs:
            tensor = feed[name].to(self.device, self.dtypes[name]).contiguous()
            lo, _opt, hi = self.profile[name]
            shape = tuple(tensor.shape)
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
                raise BadInput(
                    f"input '{name}' of shape {list(shape)} is outside the engine's profile "
                    f"(min {list(lo)}, max {list(hi)}): rebuild the engine with a wider profile"
                )
            if not self.context.set_input_shape(name, shape):
                raise BadInput(f"TensorRT refused the shape {list(shape)} for input '{name}'")
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(s < 0 for s in shape):
                raise BadInput(f"output '{name}' has a data-dependent shape {list(shape)}: not supported")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            results[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BadInput("TensorRT failed to run the engine: " + "; ".join(self._logger.errors[-3:]))
        stream.synchronize()
        primary = results[self.outputs[0]]
        if primary.is_floating_point():
            primary = primary.float()
        return self.family.from_primary(primary.to(back_to), batch)
