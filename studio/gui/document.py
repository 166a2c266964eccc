"""The state one window works on: the open model, the pipeline being edited, the workspace.

Views receive the document, read from it and follow its signals; they change it through its methods
(which push undoable commands for pipeline edits). Opening a model reads only headers and configs, so it
is done on the GUI thread; anything that touches weights runs off it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QSettings, Signal
from PySide6.QtGui import QUndoStack

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.stage import stage_of
from studio.gui.pipeline_model import AddStep, LoadRecipe, MoveStep, PipelineModel, RemoveStep, SetParams
from studio.pipeline import Recipe, Step
from studio.variants import Workspace

MAX_RECENT = 10


class StudioDocument(QObject):
    model_changed = Signal()  # a new model is open (self.model)
    error = Signal(str)  # a user-facing error message to show in the window
    status = Signal(str)  # a short status-bar message
    variants_changed = Signal()  # the workspace gained or lost variants

    def __init__(self, workspace: Workspace | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model: LoadedModel | None = None
        self.source: str = ""
        self.trusted = False  # the person confirmed that the open model may run code from its file
        self.pipeline = PipelineModel(self)
        self.undo_stack = QUndoStack(self)
        self._workspace = workspace
        self.recipe_path: Path | None = None

    @property
    def workspace(self) -> Workspace:
        if self._workspace is None:
            self._workspace = Workspace()
        return self._workspace

    # ---------------------------------------------------------------------------- model

    def open_model(self, source: str, *, trust: bool = False) -> bool:
        """Open a checkpoint; errors are emitted (shown in the window), never raised."""
        from studio.checkpoints import open_checkpoint
        from studio.errors import StudioError

        try:
            model = open_checkpoint(source, trust=trust)
        except StudioError as exc:
            self.error.emit(exc.message)
            return False
        self.model, self.source, self.trusted = model, str(source), trust
        self.pipeline.set_model(str(source), trust)
        self._remember(str(source))
        self.model_changed.emit()
        self.status.emit(f"Opened {source} ({model.family}, {model.format})")
        return True

    def start_kind(self) -> str:
        return stage_of(self.model) if self.model is not None else "torch"

    def recent(self) -> list[str]:
        value = QSettings().value("recent", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def _remember(self, source: str) -> None:
        items = [source] + [r for r in self.recent() if r != source]
        QSettings().setValue("recent", items[:MAX_RECENT])

    # ---------------------------------------------------------------------------- pipeline edits

    def add_step(
        self, technique: str, params: dict[str, Any] | None = None, index: int | None = None
    ) -> None:
        index = len(self.pipeline) if index is None else index
        self.undo_stack.push(AddStep(self.pipeline, index, Step(technique=technique, params=params or {})))

    def add_block(self, technique: str, params: dict[str, Any] | None = None) -> int:
        """Add a block where the user did not point (palette double-click, "Prune these heads"): at the last
        position where its stage kind fits (`PipelineModel.insertion_index`). Returns that position."""
        index = self.pipeline.insertion_index(technique, self.start_kind())
        self.add_step(technique, params, index)
        return index

    def remove_step(self, index: int) -> None:
        self.undo_stack.push(RemoveStep(self.pipeline, index))

    def move_step(self, src: int, dst: int) -> None:
        if src != dst:
            self.undo_stack.push(MoveStep(self.pipeline, src, dst))

    def set_params(self, index: int, params: dict[str, Any]) -> None:
        self.undo_stack.push(SetParams(self.pipeline, index, params))

    def load_recipe(self, recipe: Recipe, path: Path | None = None) -> None:
        self.undo_stack.push(LoadRecipe(self.pipeline, recipe))
        self.recipe_path = path

    def recipe(self) -> Recipe:
        return self.pipeline.to_recipe(model=self.source or None)
