"""TensorRT engines from ONNX graphs (running them is studio/evaluation/tensorrt_runner.py).

Built with the TensorRT Python API: `OnnxParser` fills an `INetworkDefinition`, an `IBuilderConfig`
carries the precision, the workspace limit, one optimization profile (min/opt/max batch and sequence
length for every dynamic input) and a timing cache, and `Builder.build_serialized_network` returns the
engine. The timing cache lives in the job's work folder and is reused by every later TensorRT build of
the job, so a second engine (another precision, another profile) skips most kernel timing.

Precision, by TensorRT version:
- TensorRT 10 (weakly typed networks): `fp16` sets `BuilderFlag.FP16`. `int8` sets `BuilderFlag.INT8`;
  a graph with QuantizeLinear/DequantizeLinear nodes (from `onnx.quantize_static`) is built with its own
  scales (explicit quantization), any other graph is calibrated on the calibration data with an
  `IInt8EntropyCalibrator2`.
- TensorRT 11 removed those flags and calibrators: networks are strongly typed, so `fp16` converts a
  float32 graph to float16 first (inputs and outputs stay float32), and `int8` needs a QDQ graph.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from studio.errors import BadInput
from studio.evaluation.tensorrt_runner import (
    engine_feed,
    require_tensorrt,
    tensorrt_availability,
    torch_dtype,
    trt_logger,
)
from studio.techniques.base import Params, RunContext, StageState, Technique, register

TIMING_CACHE_NAME = "tensorrt-timing.cache"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ONNX Runtime's own quantized operators, which the TensorRT ONNX parser does not take.
ORT_QUANT_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")


# ------------------------------------------------------------------------------------------ params


class TensorRTParams(Params):
    fp16: bool = Field(
        True,
        description="Allow FP16 kernels (TensorRT 10: builder flag; TensorRT 11: the graph is converted to FP16)",
    )
    int8: bool = Field(
        False,
        description=(
            "INT8: a QDQ graph (onnx.quantize_static) keeps its scales; otherwise TensorRT 10 calibrates on "
            "the calibration data (TensorRT 11 needs a QDQ graph)"
        ),
    )
    min_batch: int = Field(1, ge=1, le=65536, description="Smallest batch the engine accepts")
    opt_batch: int = Field(8, ge=1, le=65536, description="Batch size the kernels are tuned for")
    max_batch: int = Field(32, ge=1, le=65536, description="Largest batch the engine accepts")
    min_seq: int = Field(1, ge=1, le=1 << 20, description="Shortest sequence (tokens) the engine accepts")
    opt_seq: int = Field(128, ge=1, le=1 << 20, description="Sequence length the kernels are tuned for")
    max_seq: int = Field(
        512,
        ge=1,
        le=1 << 20,
        description="Longest sequence the engine accepts (capped at the model's position limit)",
    )
    workspace_mb: int = Field(
        4096, ge=16, le=1 << 20, description="Scratch GPU memory the builder may use per layer (MiB)"
    )
    timing_cache: bool = Field(
        True, description="Reuse and update the kernel timing cache kept in the job's work folder"
    )

    @model_validator(mode="after")
    def _ordered(self) -> TensorRTParams:
        for what in ("batch", "seq"):
            lo, opt, hi = (getattr(self, f"{k}_{what}") for k in ("min", "opt", "max"))
            if not lo <= opt <= hi:
                raise ValueError(
                    f"min_{what} <= opt_{what} <= max_{what} is required (got {lo}, {opt}, {hi})"
                )
        return self


# ------------------------------------------------------------------------------------------ helpers


def profile_shapes(
    name: str, dims: tuple[int, ...], batch: tuple[int, int, int], seq: tuple[int, int, int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one network input: axis 0 is the batch, axis 1 of a 2-D or 3-D input
    the sequence; fixed axes keep their size. Any other dynamic axis cannot be guessed."""
    shapes: list[list[int]] = [[], [], []]
    for axis, size in enumerate(dims):
        if size >= 0:
            triple: tuple[int, int, int] = (size, size, size)
        elif axis == 0:
            triple = batch
        elif axis == 1 and len(dims) in (2, 3):
            triple = seq
        else:
            raise BadInput(
                f"input '{name}' has a dynamic axis {axis} (shape {list(dims)}) that is neither the batch "
                "(axis 0) nor the sequence (axis 1): export the graph with that axis fixed"
            )
        for k in range(3):
            shapes[k].append(triple[k])
    return tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2])


def _position_limit(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _graph_facts(path: Path) -> dict[str, Any]:
    import onnx

    from studio.checkpoints.onnx_graph import load_onnx_graph

    graph = load_onnx_graph(path).graph
    ops = {n.op_type for n in graph.node}
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    return {
        "qdq": any(op in ops for op in QDQ_OPS),
        "ort_quant_ops": sorted(op for op in ops if op in ORT_QUANT_OPS),
        "float32_weights": len(floats),
        "outputs": [o.name for o in graph.output],
    }


def _make_calibrator(trt: Any, batches: list[dict[str, Any]], cache_path: Path) -> Any:
    """An entropy calibrator (TensorRT 10) that hands TensorRT one prepared batch of CUDA tensors per call."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = batches
            self.index = 0
            self.current: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return 1  # explicit-batch network: the batch is part of each tensor's shape

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            self.current = self.batches[self.index]  # kept alive until the next call
            self.index += 1
            return [int(self.current[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_path.write_bytes(bytes(cache))

    return _Calibrator()


def _calibration_batches(
    network_inputs: list[tuple[str, tuple[int, ...], Any]],
    opt_shapes: dict[str, tuple[int, ...]],
    ctx: RunContext,
    model: Any,
    trt: Any,
    limit: int = 64,
) -> list[dict[str, Any]]:
    """Calibration data at exactly the profile's opt shapes (TensorRT calibrates at kOPT): integer (text)
    inputs from the calibration examples, padded or cut to the opt length; float inputs seeded random
    data, as the image family uses."""
    import torch

    from studio.families import family_for

    family = family_for(model)
    examples = list(ctx.calibration)
    dtypes = {name: torch_dtype(trt, dtype) for name, _dims, dtype in network_inputs}
    int_names = [n for n, _d, _t in network_inputs if not dtypes[n].is_floating_point]
    if int_names and not family.takes_text:
        raise BadInput(f"cannot make INT8 calibration data for the integer inputs {', '.join(int_names)}")
    opt_batch = max(shape[0] for shape in opt_shapes.values() if shape) if opt_shapes else 1
    seq_len = max((opt_shapes[n][1] for n in int_names if len(opt_shapes[n]) > 1), default=1)
    pad_id = 0
    if int_names:
        pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in range(max(1, min(limit, len(examples) // opt_batch))):
        tensors: dict[str, Any] = {}
        if int_names:
            chunk = [examples[(b * opt_batch + i) % len(examples)] for i in range(opt_batch)]
            fed = engine_feed(int_names, family.batch(model, chunk, seq_len), getattr(model, "config", None))
            for name in int_names:
                shape, src = opt_shapes[name], fed[name]
                fill = pad_id if name in ("input_ids", "decoder_input_ids") else 0
                fitted = torch.full(shape, fill, dtype=src.dtype)
                region = tuple(slice(0, min(w, h)) for w, h in zip(shape, src.shape, strict=False))
                fitted[region] = src[region]
                tensors[name] = fitted.to(dtypes[name])
        for name, _dims, _dtype in network_inputs:
            if name not in tensors:
                tensors[name] = torch.randn(opt_shapes[name], generator=gen).to(dtypes[name])
        batches.append({k: v.contiguous().cuda() for k, v in tensors.items()})
    return batches


@dataclass
class _Built:
    """What one engine build produced (written to disk by the caller)."""

    engine: bytes = b""
    timing_cache: bytes | None = None
    cache_reused: bool = False
    seconds: float = 0.0
    int8_mode: str | None = None
    profile: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ technique


@register
class ExportTensorRT(Technique[TensorRTParams]):
    id = "export.tensorrt"
    title = "TensorRT engine"
    category = "export"
    input_kind = "onnx"
    output_kind = "tensorrt"
    description = (
        "Builds a TensorRT engine from the ONNX graph: FP16 / INT8, an optimization profile for dynamic "
        "batch and sequence length, and a reused timing cache. Needs an NVIDIA GPU and TensorRT."
    )
    Params = TensorRTParams

    def availability(self) -> tuple[bool, str | None]:
        return tensorrt_availability()

    def run(self, state: StageState, params: TensorRTParams, ctx: RunContext) -> StageState:
        trt = require_tensorrt()
        import torch

        if state.kind != "onnx" or state.path is None:
            raise BadInput("export.tensorrt takes an ONNX graph: put export.onnx before it")
        onnx_path = Path(state.path)
        out_dir = ctx.step_dir("tensorrt")
        notes: list[str] = []
        facts = _graph_facts(onnx_path)
        weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 dropped precision flags

        if facts["ort_quant_ops"]:
            raise BadInput(
                f"the graph holds ONNX Runtime quantized operators ({', '.join(facts['ort_quant_ops'])}) "
                "that TensorRT cannot build: use onnx.quantize_static (QDQ) or int8 on the float graph",
                path=onnx_path,
            )
        int8_mode = None
        if params.int8:
            if facts["qdq"]:
                int8_mode = "explicit (QDQ graph scales)"
            elif weakly_typed:
                if not ctx.calibration:
                    raise BadInput(
                        "int8 on a graph without QDQ nodes needs calibration data (data.calibration)"
                    )
                int8_mode = "calibrated (entropy calibrator 2)"
            else:
                raise BadInput(
                    f"TensorRT {trt.__version__} has no INT8 calibration: quantize the graph with "
                    "onnx.quantize_static (QDQ) before export.tensorrt",
                    path=onnx_path,
                )
        elif facts["qdq"]:
            notes.append("the graph has QDQ nodes: TensorRT builds them as INT8 whatever int8 says")
        fp16_mode = None
        if params.fp16:
            if weakly_typed:
                fp16_mode = "builder flag"
            elif facts["qdq"]:
                notes.append("fp16: a QDQ graph is built with the types it has (no float16 conversion)")
            elif facts["float32_weights"]:
                onnx_path = self._to_float16(onnx_path, out_dir)
                fp16_mode = "graph converted to float16 (inputs and outputs float32)"
                notes.append(f"TensorRT {trt.__version__} is strongly typed: built from {onnx_path.name}")
            else:
                fp16_mode = "graph already float16"

        seq = (params.min_seq, params.opt_seq, params.max_seq)
        limit = _position_limit(state.model)
        if limit is not None and params.max_seq > limit:
            if params.min_seq > limit:
                raise BadInput(f"min_seq {params.min_seq} is beyond the model's {limit} positions")
            seq = (params.min_seq, min(params.opt_seq, limit), limit)
            notes.append(f"max_seq capped at the model's {limit} positions")
        batch = (params.min_batch, params.opt_batch, params.max_batch)

        logger = trt_logger(trt)
        logger.sink, logger.errors = ctx.log, []
        try:
            with warnings.catch_warnings():
                # TensorRT 10.x marks its weakly typed API (precision flags, INT8 calibrators) deprecated:
                # it is used on purpose there; TensorRT 11 takes the strongly typed path chosen above.
                warnings.simplefilter("ignore", DeprecationWarning)
                built = self._build(trt, logger, onnx_path, params, ctx, state.model, batch, seq, int8_mode)
        finally:
            logger.sink = None
        notes.extend(built.notes)
        engine_path = out_dir / "model.engine"
        engine_path.write_bytes(memoryview(built.engine))
        cache_path = ctx.workdir / TIMING_CACHE_NAME
        if built.timing_cache is not None:
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_bytes(memoryview(built.timing_cache))
            os.replace(tmp, cache_path)

        build = {
            "tensorrt_version": trt.__version__,
            "gpu": torch.cuda.get_device_name(torch.cuda.current_device()),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "onnx": str(onnx_path),
            "settings": params.model_dump(),
            "precision": {"fp16": fp16_mode, "int8": built.int8_mode, "strongly_typed": not weakly_typed},
            "profile": built.profile,
            "inputs": built.inputs,
            "outputs": built.outputs,
            "build_seconds": round(built.seconds, 3),
            "engine_bytes": engine_path.stat().st_size,
            "timing_cache": {
                "path": str(cache_path) if params.timing_cache else None,
                "reused": built.cache_reused,
                "bytes": cache_path.stat().st_size if params.timing_cache and cache_path.is_file() else 0,
            },
            "notes": notes,
        }
        (out_dir / "build.json").write_text(json.dumps(build, indent=2, default=str))
        for note in notes:
            ctx.log(note)
        ctx.log(
            f"TensorRT {trt.__version__} engine built in {built.seconds:.1f} s on {build['gpu']}: "
            f"{build['engine_bytes'] / 1e6:.1f} MB"
        )
        ctx.progress(1.0, "engine built")
        info = dict(state.info)
        info["tensorrt"] = {
            "build": str(out_dir / "build.json"),
            "profile": built.profile,
            "outputs": built.outputs,
        }
        return replace(state, kind="tensorrt", module=None, path=engine_path, info=info)

    @staticmethod
    def _build(
        trt: Any,
        logger: Any,
        onnx_path: Path,
        params: TensorRTParams,
        ctx: RunContext,
        model: Any,
        batch: tuple[int, int, int],
        seq: tuple[int, int, int],
        int8_mode: str | None,
    ) -> _Built:
        """Parse, configure (precision, workspace, profile, calibrator, timing cache) and build."""
        weakly_typed = hasattr(trt.BuilderFlag, "FP16")
        built = _Built(int8_mode=int8_mode)
        ctx.progress(0.05, "parsing the ONNX graph")
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BadInput(
                "TensorRT cannot parse the graph: " + "; ".join(errors[:3] or logger.errors[:3]),
                path=onnx_path,
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, params.workspace_mb << 20)
        if weakly_typed and params.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if weakly_typed and params.int8:
            config.set_flag(trt.BuilderFlag.INT8)

        profile = builder.create_optimization_profile()
        inputs = []
        opt_shapes: dict[str, tuple[int, ...]] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = tuple(int(d) for d in tensor.shape)
            lo, opt, hi = profile_shapes(tensor.name, dims, batch, seq)
            profile.set_shape(tensor.name, lo, opt, hi)
            inputs.append((tensor.name, dims, tensor.dtype))
            built.profile[tensor.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
            built.inputs.append({"name": tensor.name, "shape": list(dims), "dtype": str(tensor.dtype)})
            opt_shapes[tensor.name] = opt
        built.outputs = [network.get_output(i).name for i in range(network.num_outputs)]
        if config.add_optimization_profile(profile) < 0:
            raise BadInput(f"TensorRT refused the optimization profile {built.profile}")

        calibrator = None
        if int8_mode and int8_mode.startswith("calibrated"):
            ctx.progress(0.1, "preparing INT8 calibration data")
            batches = _calibration_batches(inputs, opt_shapes, ctx, model, trt)
            calibrator = _make_calibrator(trt, batches, ctx.step_dir("tensorrt") / "calibration.cache")
            config.int8_calibrator = calibrator
            config.set_calibration_profile(profile)
            built.int8_mode = f"{int8_mode}, {len(batches)} batches at the opt shape"

        if params.timing_cache:
            cache_path = ctx.workdir / TIMING_CACHE_NAME
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            cache = config.create_timing_cache(blob)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                built.cache_reused = bool(blob)
            else:
                built.notes.append("the timing cache was made by another TensorRT or GPU: started a new one")
                config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        ctx.progress(0.2, "building the engine (kernel timing)")
        started = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        built.seconds = time.perf_counter() - started
        if serialized is None:
            raise BadInput(
                "TensorRT could not build an engine: " + ("; ".join(logger.errors[:3]) or "see the log"),
                path=onnx_path,
            )
        built.engine = bytes(memoryview(serialized))
        if params.timing_cache:
            updated = config.get_timing_cache()
            if updated is not None:
                built.timing_cache = bytes(memoryview(updated.serialize()))
        del calibrator  # its CUDA batches are no longer needed
        return built

    @staticmethod
    def _to_float16(path: Path, out_dir: Path) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(path))
        converted = convert_float_to_float16(model, keep_io_types=True)
        target = out_dir / "model.fp16.onnx"
        weights = sum(len(t.raw_data) for t in converted.graph.initializer)
        onnx.save(
            converted,
            str(target),
            save_as_external_data=weights > (1 << 30),  # protobuf cannot hold 2 GB in one message
            location=f"{target.name}.data",
        )
        return target
