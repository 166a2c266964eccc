"""Recipes (the saved pipeline), their validation, and the run loop that emits events.

A recipe is validated completely before anything runs: unknown techniques, parameters out of range,
a step that cannot follow the previous one (stage kinds torch -> onnx -> tensorrt), a technique that does
not apply to the model's family, one that is unavailable here, and unreadable data are each refused with
a message naming the step and the field.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
)

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.recognise import FAMILIES
from studio.checkpoints.stage import stage_of
from studio.errors import BadInput, Unavailable
from studio.events import Event, Progress
from studio.families import context_length
from studio.safe_files import MB, check_structure, read_text
from studio.search_space import SearchSpec

# ------------------------------------------------------------------------------------------------ recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(_Strict):
    technique: str = Field(description="technique id, e.g. prune.heads (see `model-studio techniques`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the technique's parameters")


class DataSpec(_Strict):
    calibration: str = Field("builtin:sentences", description="examples techniques learn from")
    evaluation: str = Field("builtin:sentences", description="examples variants are judged on")
    calibration_examples: int = Field(
        128, ge=1, le=100_000, description="how many calibration examples to use"
    )
    evaluation_examples: int = Field(64, ge=1, le=100_000, description="how many evaluation examples to use")


def _positive_batch_sizes(v: list[int]) -> list[int]:
    if not v or any(b < 1 for b in v):
        raise ValueError("batch sizes must be a non-empty list of positive integers")
    return v


BatchSizes = Annotated[list[int], AfterValidator(_positive_batch_sizes)]


class GenerationSpec(_Strict):
    """Generation speed of causal LMs and seq2seq models (TTFT, TPOT, tokens/s, KV cache): the same
    greedy prompts for the baseline and every variant. Checked against the model in `check_generation`."""

    prompt_tokens: int = Field(
        128, ge=1, le=65_536, description="tokens per prompt (from the evaluation data)"
    )
    new_tokens: int = Field(64, ge=1, le=65_536, description="tokens generated after each prompt (greedy)")
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1], description="batch sizes timed")
    attention: Literal["eager", "sdpa", "flash"] | None = Field(
        None,
        description="attention of torch models while generating: eager, sdpa (PyTorch's fused attention) or "
        "flash (FlashAttention 2: a CUDA GPU and the flash-attn package); default: the model's own",
    )
    cache: Literal["dynamic", "static", "none"] = Field(
        "dynamic",
        description="KV cache of torch models: dynamic (grows per token), static (preallocated for prompt + "
        "new tokens) or none (every token recomputes the whole sequence)",
    )

    @model_serializer(mode="wrap")
    def _without_default_options(self, handler: Any) -> dict[str, Any]:
        # Recipes that do not choose the attention or the cache dump exactly as before the options existed,
        # so the recipes recorded in workspaces and saved by the editor keep their text.
        data = handler(self)
        if data.get("attention") is None:
            data.pop("attention", None)
        if data.get("cache") == "dynamic":
            data.pop("cache", None)
        return data


class EvaluateSpec(_Strict):
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 32], description="batch sizes timed")
    sequence_length: int = Field(128, ge=1, le=65_536, description="tokens per example (text models)")
    latency: bool = Field(True, description="time the variants (off: quality and size only)")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for timing (default: all cores)"
    )
    profile: bool = Field(False, description="also record the 10 slowest operators of one forward pass")
    generation: GenerationSpec | None = Field(
        None, description="also time generation (causal-lm / seq2seq): prompt_tokens, new_tokens, batch_sizes"
    )


class Recipe(_Strict):
    version: Literal[1] = Field(1, description="recipe format version")
    model: str = Field("builtin:minilm", description="checkpoint path or builtin:minilm")
    task: str | None = Field(None, description="model family; inferred from the checkpoint when omitted")
    # Kept so a recipe round-trips, but never honoured by itself: trust comes from the person (`--trust`,
    # the GUI's confirmation), not from a file that anyone could have written.
    trust: bool = Field(
        False,
        description="recorded only; loading code from the model needs --trust or the GUI's confirmation",
    )
    data: DataSpec = Field(default_factory=DataSpec)
    steps: list[Step] = Field(default_factory=list)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    search: SearchSpec | None = Field(
        None, description="what `model-studio search` explores (ignored by `model-studio run`)"
    )

    @model_serializer(mode="wrap")
    def _without_empty_search(self, handler: Any) -> dict[str, Any]:
        # A recipe without a search section dumps exactly as before the section existed, so the recipes
        # recorded in workspaces and saved by the editor do not grow a `search: null`.
        data = handler(self)
        if data.get("search") is None:
            data.pop("search", None)
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        if v is not None and v not in FAMILIES:
            raise ValueError(f"unknown task '{v}' (expected one of: {', '.join(FAMILIES)})")
        return v

    def to_yaml(self) -> str:
        """The canonical text form: what the pipeline editor saves and `model-studio run` reads."""
        data = self.model_dump(mode="json", exclude_defaults=False)
        if data.get("task") is None:
            data.pop("task")
        if not data.get("trust"):
            data.pop("trust")
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _describe_validation(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = _field_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{prefix}field '{where}': {msg}" if where else f"{prefix}{msg}")
    return "; ".join(parts)


RECIPE_MAX_BYTES = 4 * MB  # a recipe is a few hundred bytes; the pipeline editor writes nothing near this
RECIPE_MAX_DEPTH = 32  # recipe > steps > step > params > a parameter's own lists: well under 10 in practice
RECIPE_MAX_VALUES = 100_000  # counting YAML aliases as the copies they stand for (see check_structure)


def parse_recipe(data: Any, path: str | Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise BadInput("a recipe must be a YAML mapping (version, model, steps, ...)", path=path)
    # Before pydantic: it (and model_dump, json.dumps for the worker) recurses per level and walks every
    # alias copy, so a hostile recipe would be a RecursionError or hours of work instead of a message.
    check_structure(data, "recipe", path, RECIPE_MAX_DEPTH, RECIPE_MAX_VALUES)
    steps = data.get("steps")
    if isinstance(steps, list):
        for i, step in enumerate(steps, 1):
            if not isinstance(step, dict) or "technique" not in step:
                raise BadInput(f"step {i}: each step needs 'technique' (and optional 'params')", path=path)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"invalid recipe: {_describe_validation(exc)}", path=path) from exc


def load_recipe(path: str | Path) -> Recipe:
    """The recipe in a YAML file; anything but a readable recipe (a FIFO, a device, a huge or deeply
    nested file, a bad value) is a BadInput naming the file."""
    path = Path(path)
    text = read_text(path, "recipe file", RECIPE_MAX_BYTES)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"the recipe is not valid YAML{where}", path=path) from exc
    except RecursionError as exc:  # PyYAML's composer recurses once per nesting level
        raise BadInput("the recipe is nested too deeply to read", path=path) from exc
    except ValueError as exc:  # a value YAML matches but Python refuses: a 5000-digit integer, 2020-13-45
        raise BadInput(
            f"the recipe has a value that cannot be read ({str(exc).split(':')[0]})", path=path
        ) from exc
    return parse_recipe(data, path)


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class PlannedStep:
    index: int  # 0-based
    technique: Any  # Technique instance
    params: Any  # its validated Params

    @property
    def label(self) -> str:
        return f"step {self.index + 1} ({self.technique.id})"


@dataclass
class Plan:
    recipe: Recipe
    model: LoadedModel
    steps: list[PlannedStep]
    final_kind: str


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_steps(
    steps: list[Step], start_kind: str, model: LoadedModel | None = None
) -> tuple[list[PlannedStep], list[tuple[int, str]]]:
    """Validate steps one by one; returns the planned steps and every problem as (step index, message).

    Used by `plan` (which raises on the first problem) and by the pipeline editor (which shows them all).
    """
    from studio.techniques.base import get_technique

    planned: list[PlannedStep] = []
    problems: list[tuple[int, str]] = []
    kind = start_kind
    previous = "the model"
    for i, step in enumerate(steps):
        label = f"step {i + 1} ({step.technique})"
        try:
            cls = get_technique(step.technique)
        except BadInput as exc:
            problems.append((i, f"step {i + 1}: {exc.problem}"))
            continue
        technique = cls()
        try:
            params = cls.Params.model_validate(step.params)
        except ValidationError as exc:
            problems.append((i, f"{label}: {_describe_validation(exc, 'params ')}"))
            params = None
        if not cls.accepts(kind):
            problems.append(
                (
                    i,
                    f"{label}: needs {' or '.join(_a(k) for k in (cls.input_kind, *cls.also_accepts))} model"
                    f" but {previous} gives {_a(kind)} model"
                    + (" (torch steps must come before export.onnx)" if cls.input_kind == "torch" else ""),
                )
            )
        ok, reason = technique.availability()
        if not ok:
            problems.append((i, f"{label}: not available here: {reason}"))
        if model is not None and params is not None:
            try:
                technique.check(params, model)
            except BadInput as exc:
                problems.append((i, f"{label}: {exc.problem}"))
        if params is not None:
            planned.append(PlannedStep(i, technique, params))
        kind = cls.output_kind
        previous = label
    return planned, problems


GENERATIVE = ("causal-lm", "seq2seq")


def check_generation(spec: EvaluateSpec, model: LoadedModel) -> list[str]:
    """Problems with `evaluate.generation` for this model, found before anything runs."""
    gen = spec.generation
    if gen is None:
        return []
    if model.family not in GENERATIVE:
        return [
            f"field 'evaluate.generation': generation metrics need a causal-lm or seq2seq model, "
            f"but {model.family} models do not generate (remove the section)"
        ]
    options = generation_option_problem(gen, model)
    if options:
        return [options]
    limit = context_length(model)
    if limit is None:
        return []
    if model.family == "seq2seq":  # the prompt goes to the encoder, the new tokens to the decoder
        longest = max(gen.prompt_tokens, gen.new_tokens)
        if longest > limit:
            return [
                f"field 'evaluate.generation': {longest} tokens on one side is beyond the model's context "
                f"of {limit} positions"
            ]
    elif gen.prompt_tokens + gen.new_tokens > limit:
        return [
            f"field 'evaluate.generation': prompt_tokens + new_tokens = {gen.prompt_tokens + gen.new_tokens} "
            f"is beyond the model's context of {limit} positions"
        ]
    return []


def generation_option_problem(gen: GenerationSpec, model: LoadedModel) -> str | None:
    """Why this model cannot generate with the chosen attention or cache, or None: flash attention where
    the GPU or the flash-attn package is missing, a static cache for a model it cannot be built for."""
    from studio.evaluation.generation_options import flash_unavailable, static_cache

    if gen.attention == "flash":
        reason = flash_unavailable()
        if reason:
            return f"field 'evaluate.generation.attention': {reason}"
    if gen.cache == "static":
        if model.family != "causal-lm":
            return (
                f"field 'evaluate.generation.cache': a static cache is measured for causal-lm models only, "
                f"not {model.family} ones"
            )
        if model.config is None:
            return "field 'evaluate.generation.cache': a static cache needs a transformers model config"
        try:
            static_cache(model.config, gen.prompt_tokens + gen.new_tokens)
        except BadInput as exc:
            return f"field 'evaluate.generation.cache': {exc.problem}"
    return None


def check_generation_cache(recipe: Recipe, model: LoadedModel) -> list[tuple[int, str]]:
    """An ONNX causal LM or seq2seq model asked to generate must have its KV cache (export.onnx with_cache):
    without it every new token recomputes the whole sequence, so its generation numbers would mean nothing."""
    from studio.evaluation.onnx_cache import NO_CACHE_HOW, takes_past

    if recipe.evaluate.generation is None or model.family not in GENERATIVE:
        return []
    exports = [i for i, s in enumerate(recipe.steps) if s.technique == "export.onnx"]
    if exports:
        i = exports[-1]
        if not final_kind_is_onnx(recipe.steps[i + 1 :]):
            return []  # a TensorRT engine (say) is built from the graph: its own runtime decides
        if not recipe.steps[i].params.get("with_cache", False):
            return [
                (
                    i,
                    f"step {i + 1} (export.onnx): field 'with_cache': evaluate.generation measures the ONNX "
                    "variant generating by itself, which needs its KV cache: set `with_cache: true`",
                )
            ]
        if model.family == "seq2seq" and len(recipe.steps) > i + 1:
            return [
                (
                    i + 1,
                    f"step {i + 2} ({recipe.steps[i + 1].technique}): evaluate.generation measures the seq2seq "
                    "ONNX variant generating with the decoder graph export.onnx writes beside model.onnx, and "
                    "ONNX passes rewrite model.onnx only: make export.onnx the last step",
                )
            ]
        return []
    if stage_of(model) == "onnx" and model.family == "seq2seq":
        from studio.checkpoints.onnx_graph import read_metadata
        from studio.evaluation.onnx_cache import seq2seq_problem

        reason = seq2seq_problem(model.path, read_metadata(model.path))
        return [] if reason is None else [(-1, f"field 'evaluate.generation': {reason}")]
    if stage_of(model) == "onnx" and not takes_past(model.input_names or ()):
        problem = (
            f"field 'evaluate.generation': this ONNX graph has no past key/values inputs; {NO_CACHE_HOW}"
        )
        return [(-1, problem)]
    return []


def final_kind_is_onnx(later: list[Step]) -> bool:
    from studio.techniques.base import get_technique

    try:
        return all(get_technique(s.technique).output_kind == "onnx" for s in later)
    except BadInput:  # an unknown technique: check_steps reports it
        return False


def plan(
    recipe: Recipe, model: LoadedModel | None = None, *, path: str | Path | None = None, trust: bool = False
) -> Plan:
    """Open the model (cheap: no weights) and validate every step; raises BadInput on the first problem.
    `trust` (the person's say, never `recipe.trust`) allows loading a model whose file can run code.

    A given `model` is left as it is: when the recipe's `task` names another family, the plan holds a
    shallow copy with that family (sharing the module, config and tokenizer already loaded), so the
    caller's open model (the GUI's, a benchmark's baseline) keeps the family it was opened with."""
    from studio.checkpoints import open_checkpoint

    model = model or open_checkpoint(recipe.model, trust=trust)
    if recipe.task is not None and recipe.task != model.family:
        model = copy.copy(model)
        model.family = recipe.task
    planned, problems = check_steps(recipe.steps, stage_of(model), model)
    problems += [(-1, p) for p in check_generation(recipe.evaluate, model)]
    problems += check_generation_cache(recipe, model)
    if problems:
        raise BadInput(problems[0][1], path=path)
    kind = planned[-1].technique.output_kind if planned else stage_of(model)
    return Plan(recipe, model, planned, kind)


# ------------------------------------------------------------------------------------------------ running

Sink = Callable[[Event], None]


def execute_steps(plan_: Plan, workdir: Path, calibration: list[Any], sink: Sink) -> tuple[Any, list[float]]:
    """Run the plan's steps from the original model; returns the final StageState and each step's seconds."""
    from studio.techniques.base import RunContext, initial_state

    recipe, model = plan_.recipe, plan_.model

    sink(Progress(-1, 0.0, f"loading {recipe.model}"))
    state = initial_state(model)
    sink(Progress(-1, 1.0, f"loaded {recipe.model}"))
    step_times: list[float] = []
    for planned in plan_.steps:
        ctx = RunContext(
            original=model,
            workdir=workdir,
            calibration=calibration,
            sequence_length=recipe.evaluate.sequence_length,
            step_index=planned.index,
            later_steps=[p.technique.id for p in plan_.steps[planned.index + 1 :]],
            emit=sink,
        )
        ctx.progress(0.0, f"{planned.technique.title}")
        started = time.perf_counter()
        try:
            state = planned.technique.run(state, planned.params, ctx)
        except (BadInput, Unavailable) as exc:
            exc.step = planned.index
            raise
        elapsed = time.perf_counter() - started
        step_times.append(elapsed)
        ctx.metric("step_seconds", elapsed)
        ctx.progress(1.0, f"{planned.technique.title} done in {elapsed:.1f}s")
    return state, step_times


def run_plan(plan_: Plan, workspace: Any, sink: Sink, *, job_id: str | None = None) -> dict[str, Any]:
    """Run every step, evaluate the baseline and the result, and save the result as a variant.

    The work happens in a temporary folder of the workspace; only a complete variant is moved into place.
    Returns the result object of `model-studio run --json`.
    """
    from studio.evaluation.data import load_examples
    from studio.evaluation.measure import evaluate_baseline, evaluate_state, record_baseline_latency

    recipe, model = plan_.recipe, plan_.model
    n = len(plan_.steps)
    calibration = load_examples(recipe.data.calibration, recipe.data.calibration_examples)
    evaluation = load_examples(recipe.data.evaluation, recipe.data.evaluation_examples)
    with workspace.job_folder(job_id) as workdir:
        state, step_times = execute_steps(plan_, workdir, calibration, sink)
        sink(Progress(n, 0.0, "evaluating the original"))
        baseline = evaluate_baseline(workspace, model, recipe, evaluation, sink, step=n)
        artifact = workdir / "artifact"
        sink(Progress(n, 0.5, "saving and evaluating the variant"))
        files = save_state(state, artifact, calibration, recipe.evaluate.sequence_length)
        metrics = evaluate_state(state, artifact, model, recipe, evaluation, sink)
        metrics["step_seconds"] = step_times
        # the original's latency as timed in turns with this variant, not a cached time from another run
        baseline = record_baseline_latency(workspace, baseline, metrics)
        record = workspace.commit_variant(
            artifact,
            kind=state.kind,
            parent=baseline["id"],
            model=recipe.model,
            recipe=recipe.model_dump(mode="json"),
            metrics=metrics,
            files=files,
        )
        sink(Progress(n, 1.0, f"saved variant {record['id']}"))
    return {"baseline": baseline, "variants": [record]}


def save_state(state: Any, folder: Path, calibration: list[Any], sequence_length: int) -> list[Path]:
    """Write the final artifact of a run into `folder` (torch: a reloadable folder; onnx/tensorrt: the files)."""
    import shutil

    from studio.techniques.torch_io import copy_side_files, save_torch_variant

    folder.mkdir(parents=True, exist_ok=True)
    if state.kind == "torch":
        example = None
        if not hasattr(state.module, "config"):
            from studio.families import family_for

            batch = family_for(state.model).batch(state.model, calibration[:2], sequence_length)
            example = tuple(batch.inputs.values())
        adapter = state.info.get("peft_adapter")  # train.lora's unmerged adapters, in peft's format
        if adapter:
            shutil.copytree(adapter, folder / Path(adapter).name, dirs_exist_ok=True)
        return save_torch_variant(
            state.module,
            state.transforms,
            folder,
            state.model.tokenizer_dir or (state.model.path if state.model.path.is_dir() else None),
            example,
        )
    source_dir = state.path.parent
    for item in source_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, folder / item.name)
        elif item.is_dir():
            shutil.copytree(item, folder / item.name, dirs_exist_ok=True)
    copy_side_files(state.model.tokenizer_dir, folder)
    return sorted(p for p in folder.rglob("*") if p.is_file())
