"""Techniques: one class per block, a pydantic params model, and an explicit registry.

A technique takes the pipeline's current `StageState` (a torch module in memory, or an ONNX / TensorRT
file in the job's work folder) and returns the next one. Heavy libraries are imported inside `run`, so
listing techniques (the GUI palette, `model-studio techniques`) stays fast.

Torch techniques that change a model's structure (pruning, quantization) append a *transform record* to
`StageState.transforms` and implement `restore`, which re-creates that structure on a freshly built model
from the record alone. A saved torch variant is its config, its state dict and these records; reopening
it replays the records and then loads the weights (studio/checkpoints/variant_folder.py, where `register`
enters each technique's `restore`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.variant_folder import register_restorer
from studio.errors import BadInput
from studio.events import Event, Log, Metric, Progress

STAGES = ("torch", "onnx", "tensorrt", "executorch", "openvino")
CATEGORIES = ("precision", "quantization", "pruning", "distillation", "export", "graph", "compile")


class Params(BaseModel):
    """Base of every technique's parameters: unknown fields are errors, every field has a description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoParams(Params):
    pass


# A technique's own parameters class: `run` and `check` receive the validated instance of exactly it.
P = TypeVar("P", bound=Params)


@dataclass
class StageState:
    """What flows from step to step.

    `model` describes the original checkpoint (family, tokenizer, config, pooling); `module` is the current
    torch module (torch stage) and `path` the current file (onnx: the .onnx file; tensorrt: the engine;
    openvino: the IR's model.xml, its model.bin beside it).
    """

    kind: str
    model: LoadedModel
    module: Any = None
    path: Path | None = None
    transforms: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(
        default_factory=dict
    )  # facts later steps may need (e.g. "dtype": "bfloat16")


@dataclass
class RunContext:
    """What a technique may use while it runs: data, the original model, a work folder, and reporting."""

    original: LoadedModel  # the unchanged model: teacher for distillation, reference for fidelity
    workdir: Path  # the job's temporary folder; write files here only
    calibration: Sequence[Any] = ()  # studio.evaluation.data.Example list
    sequence_length: int = 128
    step_index: int = 0
    later_steps: Sequence[str] = ()  # ids of the steps after this one
    device: str = "cpu"
    emit: Callable[[Event], None] = field(default=lambda _e: None)  # the run's sink: typed events

    def progress(self, fraction: float, message: str = "") -> None:
        self.emit(Progress(self.step_index, float(fraction), message))

    def log(self, message: str, level: str = "info") -> None:
        self.emit(Log(message, level, self.step_index))

    def metric(self, name: str, value: float, **extra: Any) -> None:
        self.emit(Metric(name, float(value), self.step_index, extra))

    def step_dir(self, name: str) -> Path:
        """A fresh folder for this step's files inside the work folder."""
        path = self.workdir / f"step{self.step_index:02d}-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path


class Technique(Generic[P]):
    """A pipeline block. Subclasses set the class attributes and implement `run`.

    A subclass names its params class twice, `class Half(Technique[HalfParams])` and `Params = HalfParams`:
    the first types `run`/`check`, the second is what the pipeline validates a step's params with.
    """

    id: ClassVar[str]
    title: ClassVar[str]
    category: ClassVar[str]
    input_kind: ClassVar[str]
    # Other stage kinds the block also takes (export.openvino: a torch model, exported to ONNX on the way).
    also_accepts: ClassVar[tuple[str, ...]] = ()
    output_kind: ClassVar[str]
    description: ClassVar[str] = ""
    if TYPE_CHECKING:
        # A ClassVar cannot hold a type variable, so the checker sees a plain attribute (read on the class).
        Params: type[P]
    else:
        Params = NoParams  # a technique without parameters need not set it
    # Families the technique applies to; None means every family.
    families: ClassVar[tuple[str, ...] | None] = None
    # Parameters a new block starts with in the editor, when the Params defaults alone do not validate.
    starter_params: ClassVar[dict[str, Any]] = {}

    @classmethod
    def accepts(cls, kind: str) -> bool:
        """Whether a model of stage kind `kind` can be this block's input."""
        return kind == cls.input_kind or kind in cls.also_accepts

    def availability(self) -> tuple[bool, str | None]:
        """(available, reason when not): e.g. TensorRT without an NVIDIA GPU."""
        return True, None

    def check(self, params: P, model: LoadedModel) -> None:
        """Refuse (BadInput) before anything runs when the technique cannot apply to this model."""
        if self.families is not None and model.family not in self.families:
            raise BadInput(
                f"{self.id} does not apply to {model.family} models (it applies to: {', '.join(self.families)})"
            )

    def run(self, state: StageState, params: P, ctx: RunContext) -> StageState:
        raise NotImplementedError

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        """Re-create on a fresh module the structure this technique recorded (no weights needed)."""
        raise NotImplementedError(f"{cls.id} records no structure to restore")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        ok, reason = cls().availability()
        out = {
            "id": cls.id,
            "title": cls.title,
            "category": cls.category,
            "input_kind": cls.input_kind,
            "output_kind": cls.output_kind,
            "description": cls.description,
            "families": list(cls.families) if cls.families else None,
            "params": cls.Params.model_json_schema(),
            "starter_params": dict(cls.starter_params),
            "available": ok,
        }
        if not ok:
            out["reason"] = reason
        return out


def initial_state(model: LoadedModel) -> StageState:
    """The state a pipeline starts from: a private copy of the torch module (the original stays the teacher
    and the fidelity reference), or the ONNX file (the OpenVINO IR) itself."""
    import copy

    from studio.checkpoints.stage import stage_of

    if stage_of(model) != "torch":
        return StageState(stage_of(model), model, path=model.path)
    # A reopened studio variant keeps its structure records, so saving it again still rebuilds it.
    done = getattr(model.config, "studio_transforms", None) or []
    return StageState(
        "torch", model, module=copy.deepcopy(model.module), transforms=copy.deepcopy(list(done))
    )


_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: add a technique to the registry; a second class with the same id is an error."""
    if cls.id in _REGISTRY:
        raise ValueError(f"technique id '{cls.id}' is already registered by {_REGISTRY[cls.id].__qualname__}")
    if any(k not in STAGES for k in (cls.input_kind, *cls.also_accepts, cls.output_kind)):
        raise ValueError(f"technique '{cls.id}' has an unknown stage kind")
    if cls.category not in CATEGORIES:
        raise ValueError(f"technique '{cls.id}' has an unknown category '{cls.category}'")
    for name, f in cls.Params.model_fields.items():
        if not f.description:
            raise ValueError(f"technique '{cls.id}': parameter '{name}' has no description")
    _REGISTRY[cls.id] = cls
    register_restorer(cls.id, cls.restore)  # so a saved variant folder naming this technique reopens
    return cls


def registry() -> dict[str, type[Technique]]:
    """Every registered technique by id (importing the technique modules registers them)."""
    import studio.techniques  # noqa: F401  (registers the built-in techniques)

    return dict(_REGISTRY)


def get_technique(technique_id: str) -> type[Technique]:
    reg = registry()
    if technique_id not in reg:
        raise BadInput(f"unknown technique '{technique_id}' (known: {', '.join(sorted(reg))})")
    return reg[technique_id]
