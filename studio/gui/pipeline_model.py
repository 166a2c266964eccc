"""The pipeline being edited: an observable list of steps, changed only through undoable commands.

Views never change the list directly: they push a command on the document's QUndoStack
(`AddStep`, `MoveStep`, `RemoveStep`, `SetParams`), whose redo/undo call the model's mutators, which
emit `step_added`, `step_moved`, `step_removed`, `params_changed`. Views follow those signals
(orange-canvas-core's Scheme / document commands).

The rest of the recipe (its model, data and evaluate settings) is read through `recipe` and changed only
through `set_model`, `set_data` and `set_evaluate`, which emit `settings_changed`: an assignment from
outside would change what is saved and run without any view hearing of it.
"""

from __future__ import annotations

import copy
from typing import Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoCommand

from studio.pipeline import DataSpec, EvaluateSpec, Recipe, Step
from studio.recipe_check import ModelLayout, check_recipe


class PipelineModel(QObject):
    step_added = Signal(int)  # index
    step_moved = Signal(int, int)  # from, to
    step_removed = Signal(int)  # index
    params_changed = Signal(int)  # index
    reset = Signal()  # the whole list was replaced (a recipe was opened)
    settings_changed = Signal()  # the recipe's model, data or evaluate settings changed (not its steps)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._steps: list[Step] = []
        self._recipe = Recipe()  # data / evaluate settings and the model; steps live in _steps

    @property
    def recipe(self) -> Recipe:
        """The recipe's model and settings (its steps are `steps()`); read-only, see the setters."""
        return self._recipe

    # ---------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._steps)

    def step(self, index: int) -> Step:
        return self._steps[index]

    def steps(self) -> list[Step]:
        return [s.model_copy(deep=True) for s in self._steps]

    def to_recipe(self, model: str | None = None) -> Recipe:
        data = self.recipe.model_dump()
        data["steps"] = [s.model_dump() for s in self._steps]
        if model is not None:
            data["model"] = model
        return Recipe.model_validate(data)

    def problems(
        self, start_kind: str = "torch", loaded: Any = None, layout: ModelLayout | None = None
    ) -> dict[int, str]:
        """Problems by step index, shown at once in the editor: stage order, params, availability, and with
        a model open its family and the heads / layer names the steps give (`recipe_check`); index -1 is
        the recipe as a whole."""
        from studio.pipeline import check_steps

        if loaded is not None:
            found = [(p.step, p.message) for p in check_recipe(self.to_recipe(), loaded, layout)]
        else:
            found = list(check_steps(self._steps, start_kind, None)[1])
        out: dict[int, str] = {}
        for index, message in found:
            out.setdefault(-1 if index is None else index, message)
        return out

    def insertion_index(self, technique: str, start_kind: str = "torch") -> int:
        """Where a block added without a position goes: the last place where its stage kind fits.

        A block fits at position i when the model reaching i has its input kind and the step now at i (if
        any) takes its output kind, so a torch step lands before `export.onnx` instead of after the export
        where the pipeline could not run. Without such a place, the last position with the right input
        kind; without that, the end (the editor then shows why it cannot run).
        """
        from studio.techniques.base import registry

        techniques = registry()
        cls = techniques.get(technique)
        if cls is None:
            return len(self._steps)
        kinds = [start_kind]  # kinds[i]: the model kind reaching position i
        for step in self._steps:
            known = techniques.get(step.technique)
            kinds.append(known.output_kind if known is not None else kinds[-1])
        inputs = [
            techniques[s.technique].input_kind if s.technique in techniques else kinds[i]
            for i, s in enumerate(self._steps)
        ]
        fits = [
            i
            for i in range(len(self._steps) + 1)
            if cls.accepts(kinds[i]) and (i == len(self._steps) or inputs[i] == cls.output_kind)
        ]
        if fits:
            return fits[-1]
        right_input = [i for i in range(len(self._steps) + 1) if cls.accepts(kinds[i])]
        return right_input[-1] if right_input else len(self._steps)

    # ---------------------------------------------------------------------------- settings setters

    def set_model(self, model: str, trust: bool) -> None:
        """The model the recipe runs on, and whether it may run code from its file."""
        self._update({"model": model, "trust": trust})

    def set_data(self, data: DataSpec) -> None:
        self._update({"data": data})

    def set_evaluate(self, evaluate: EvaluateSpec) -> None:
        self._update({"evaluate": evaluate})

    def _update(self, fields: dict[str, Any]) -> None:
        """Emit only on a real change (as Scheme's setters do), so a form echoing its values back is quiet."""
        if all(getattr(self._recipe, k) == v for k, v in fields.items()):
            return
        self._recipe = self._recipe.model_copy(update=fields)
        self.settings_changed.emit()

    # ---------------------------------------------------------------------------- mutators (commands only)

    def insert(self, index: int, step: Step) -> None:
        self._steps.insert(index, step)
        self.step_added.emit(index)

    def pop(self, index: int) -> Step:
        step = self._steps.pop(index)
        self.step_removed.emit(index)
        return step

    def move(self, src: int, dst: int) -> None:
        step = self._steps.pop(src)
        self._steps.insert(dst, step)
        self.step_moved.emit(src, dst)

    def set_params(self, index: int, params: dict[str, Any]) -> None:
        self._steps[index] = Step(technique=self._steps[index].technique, params=copy.deepcopy(params))
        self.params_changed.emit(index)

    def load(self, recipe: Recipe) -> None:
        self._recipe = recipe.model_copy(deep=True)
        self._steps = [s.model_copy(deep=True) for s in recipe.steps]
        self.reset.emit()


class AddStep(QUndoCommand):
    def __init__(self, model: PipelineModel, index: int, step: Step) -> None:
        super().__init__(f"Add {step.technique}")
        self.model, self.index, self.step_ = model, index, step

    def redo(self) -> None:
        self.model.insert(self.index, self.step_.model_copy(deep=True))

    def undo(self) -> None:
        self.model.pop(self.index)


class RemoveStep(QUndoCommand):
    def __init__(self, model: PipelineModel, index: int) -> None:
        super().__init__(f"Remove {model.step(index).technique}")
        self.model, self.index = model, index
        self.step_: Step | None = None

    def redo(self) -> None:
        self.step_ = self.model.pop(self.index)

    def undo(self) -> None:
        assert self.step_ is not None
        self.model.insert(self.index, self.step_)


class MoveStep(QUndoCommand):
    def __init__(self, model: PipelineModel, src: int, dst: int) -> None:
        super().__init__(f"Move {model.step(src).technique}")
        self.model, self.src, self.dst = model, src, dst

    def redo(self) -> None:
        self.model.move(self.src, self.dst)

    def undo(self) -> None:
        self.model.move(self.dst, self.src)


class SetParams(QUndoCommand):
    """Parameter edits of the same step merge while typing, so one undo reverts one field edit session."""

    ID = 4242

    def __init__(self, model: PipelineModel, index: int, params: dict[str, Any]) -> None:
        super().__init__(f"Edit {model.step(index).technique}")
        self.model, self.index = model, index
        self.old = copy.deepcopy(model.step(index).params)
        self.new = copy.deepcopy(params)

    def id(self) -> int:
        return self.ID

    def mergeWith(self, other: QUndoCommand) -> bool:
        if not isinstance(other, SetParams) or other.index != self.index:
            return False
        if set(other.new) != set(self.new) and set(other.new) != set(self.old):
            return False
        self.new = copy.deepcopy(other.new)
        return True

    def redo(self) -> None:
        self.model.set_params(self.index, self.new)

    def undo(self) -> None:
        self.model.set_params(self.index, self.old)


class LoadRecipe(QUndoCommand):
    def __init__(self, model: PipelineModel, recipe: Recipe) -> None:
        super().__init__("Open pipeline")
        self.model = model
        self.old = model.to_recipe()
        self.new = recipe

    def redo(self) -> None:
        self.model.load(self.new)

    def undo(self) -> None:
        self.model.load(self.old)
