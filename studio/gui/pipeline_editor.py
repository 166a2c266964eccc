"""The pipeline editor: a palette of technique blocks (`pipeline_palette`), the pipeline as an ordered list
(`pipeline_steps`), and a parameter form, with Open/Save and Undo/Redo.

The editor is a passive view of `document.pipeline`: it rebuilds its list from the model's signals and
changes the pipeline only through the document (undoable commands). Drag and drop carries a technique id
(palette -> pipeline) or a step index (moves inside the pipeline) in custom MIME types; the drop handler
reads only the QMimeData and the drop position, so tests send a real QDropEvent offscreen.

Problems (a step that cannot follow the previous one, a bad parameter, an unavailable technique) come from
`PipelineModel.problems`, the same check `model-studio run` does, and are shown on the step at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QAction, QIcon
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QLabel,
    QLineEdit,
    QListWidgetItem,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QStyle,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from studio.gui.document import StudioDocument
from studio.gui.param_form import ParamForm
from studio.gui.pipeline_palette import ID_ROLE, TechniquePalette, technique_classes
from studio.gui.pipeline_steps import (
    KINDS_ROLE,
    PROBLEM_ROLE,
    TITLE_ROLE,
    PipelineList,
    is_dark_palette,
    problem_color,
)
from studio.gui.widgets import Banner

RECIPE_FILTER = "Recipes (*.yaml *.yml);;All files (*)"
MAX_PROBLEM_LINES = 5


def _short(source: str) -> str:
    """A model's name for a button: the folder or file name, not the whole path."""
    return source if source.startswith("builtin:") else Path(source).name or source


class PipelineEditor(QWidget):
    """Palette | pipeline | parameters, with Open/Save (recipe YAML) and Undo/Redo."""

    saved = Signal(str)  # path
    opened = Signal(str)  # path
    model_checked = Signal()  # the open model's structure is known: heads / layer names are checked now

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.pipeline = document.pipeline
        self.last_error = ""
        self._form: ParamForm | None = None
        self._form_row: int | None = None
        self._problems: dict[int, str] = {}
        self._layout: Any = None  # ModelLayout of the open model once computed (None: not yet)
        self._layout_task: Any = None

        self._build_actions()
        self._build_ui()

        self.pipeline.step_added.connect(self._on_added)
        self.pipeline.step_moved.connect(self._on_moved)
        self.pipeline.step_removed.connect(self._on_removed)
        self.pipeline.params_changed.connect(self._on_params_changed)
        self.pipeline.reset.connect(self._on_reset)
        document.model_changed.connect(self._on_model_changed)
        document.undo_stack.cleanChanged.connect(self._clean_changed)
        self._rebuild(select=0 if len(self.pipeline) else None)
        if document.model is not None:
            self._on_model_changed()

    # ---------------------------------------------------------------------------- construction

    def _build_actions(self) -> None:
        style = self.style()
        sp = QStyle.StandardPixmap
        self.open_action = QAction(style.standardIcon(sp.SP_DialogOpenButton), "Open pipeline…", self)
        self.open_action.setToolTip("Open a recipe YAML file (the format `model-studio run` reads)")
        self.open_action.triggered.connect(self.open_dialog)
        self.save_action = QAction(style.standardIcon(sp.SP_DialogSaveButton), "Save pipeline", self)
        self.save_action.setToolTip("Save the pipeline as a recipe YAML file")
        self.save_action.triggered.connect(self.save)
        self.save_as_action = QAction("Save pipeline as…", self)
        self.save_as_action.triggered.connect(self.save_as)
        # Fixed labels (the toolbar does not jump as command names change); what is undone goes in the tooltip.
        stack = self.document.undo_stack
        self.undo_action = QAction(style.standardIcon(sp.SP_ArrowBack), "Undo", self)
        self.undo_action.triggered.connect(stack.undo)
        self.redo_action = QAction(style.standardIcon(sp.SP_ArrowForward), "Redo", self)
        self.redo_action.triggered.connect(stack.redo)
        # state comes with the signals: the stack may be going away when it sends them (window closing)
        stack.canUndoChanged.connect(self.undo_action.setEnabled)
        stack.canRedoChanged.connect(self.redo_action.setEnabled)
        stack.undoTextChanged.connect(self._undo_text_changed)
        stack.redoTextChanged.connect(self._redo_text_changed)
        self.undo_action.setEnabled(stack.canUndo())
        self.redo_action.setEnabled(stack.canRedo())
        self._undo_text_changed(stack.undoText())
        self._redo_text_changed(stack.redoText())
        self.remove_action = QAction(style.standardIcon(sp.SP_TrashIcon), "Remove step", self)
        self.remove_action.setToolTip("Remove the selected step (Delete)")
        self.remove_action.triggered.connect(self.remove_selected)
        self.up_action = QAction(style.standardIcon(sp.SP_ArrowUp), "Move up", self)
        self.up_action.triggered.connect(lambda: self._move_selected(-1))
        self.down_action = QAction(style.standardIcon(sp.SP_ArrowDown), "Move down", self)
        self.down_action.triggered.connect(lambda: self._move_selected(+1))

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)

        self.toolbar = QToolBar()
        self.toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toolbar.setIconSize(QSize(16, 16))
        for action in (self.open_action, self.save_action, self.save_as_action):
            self.toolbar.addAction(action)
        self.toolbar.addSeparator()
        self.toolbar.addAction(self.undo_action)
        self.toolbar.addAction(self.redo_action)
        self.toolbar.addSeparator()
        for action in (self.remove_action, self.up_action, self.down_action):
            self.toolbar.addAction(action)
        layout.addWidget(self.toolbar)

        self.error_banner = Banner("error")
        self.error_banner.closed.connect(self._error_dismissed)
        layout.addWidget(self.error_banner)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setChildrenCollapsible(False)
        layout.addWidget(splitter, 1)

        # palette
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(self._heading("Techniques"))
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter…")
        self.filter_edit.setClearButtonEnabled(True)
        lv.addWidget(self.filter_edit)
        self.palette_view = TechniquePalette()
        self.palette_view.technique_activated.connect(self.document.add_block)
        self.filter_edit.textChanged.connect(self.palette_view.set_filter)
        lv.addWidget(self.palette_view, 1)
        splitter.addWidget(left)

        # pipeline
        middle = QWidget()
        mv = QVBoxLayout(middle)
        mv.setContentsMargins(0, 0, 0, 0)
        self.pipeline_heading = self._heading("Pipeline")
        mv.addWidget(self.pipeline_heading)
        self.list = PipelineList()
        self.list.technique_dropped.connect(self._technique_dropped)
        self.list.step_dropped.connect(self._step_dropped)
        self.list.delete_requested.connect(self.remove_selected)
        self.list.currentRowChanged.connect(self._selection_changed)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        for action in (self.up_action, self.down_action, self.remove_action):
            self.list.addAction(action)
        mv.addWidget(self.list, 1)
        self.problems_label = QLabel()
        self.problems_label.setObjectName("pipeline-problems")
        self.problems_label.setWordWrap(True)
        self.problems_label.setTextFormat(Qt.TextFormat.PlainText)
        self.problems_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        mv.addWidget(self.problems_label)
        splitter.addWidget(middle)

        # parameters
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        self.params_heading = self._heading("Parameters")
        rv.addWidget(self.params_heading)
        self.description_label = QLabel()
        self.description_label.setWordWrap(True)
        self.description_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        rv.addWidget(self.description_label)
        self.form_area = QScrollArea()
        self.form_area.setWidgetResizable(True)
        self.form_area.setFrameShape(QFrame.Shape.NoFrame)
        rv.addWidget(self.form_area, 1)
        splitter.addWidget(right)

        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setStretchFactor(2, 1)
        splitter.setSizes([max(330, self.palette_view.minimumWidth()), 440, 480])

    @staticmethod
    def _heading(text: str) -> QLabel:
        label = QLabel(text)
        font = label.font()
        font.setBold(True)
        font.setPointSizeF(font.pointSizeF() * 1.1)
        label.setFont(font)
        return label

    # ---------------------------------------------------------------------------- model -> view

    def _rebuild(self, select: int | None) -> None:
        """Refill the list from the pipeline model (a handful of rows: cheaper than patching)."""
        techniques = technique_classes()
        self.list.blockSignals(True)
        self.list.clear()
        for i in range(len(self.pipeline)):
            step = self.pipeline.step(i)
            cls = techniques.get(step.technique)
            title = cls.title if cls is not None else step.technique
            kinds = f"{cls.input_kind} -> {cls.output_kind}" if cls is not None else "?"
            item = QListWidgetItem(f"{i + 1}. {title}  ({step.technique}, {kinds})")
            item.setData(TITLE_ROLE, title)
            item.setData(ID_ROLE, step.technique)
            item.setData(KINDS_ROLE, kinds)
            item.setFlags(
                Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled
            )
            self.list.addItem(item)
        if select is not None and 0 <= select < self.list.count():
            self.list.setCurrentRow(select)
        self.list.blockSignals(False)
        self._refresh_problems()
        self._selection_changed(self.list.currentRow())

    # ---------------------------------------------------------------------------- the open model

    def _on_model_changed(self) -> None:
        """A new model: check at once what needs no structure, and the heads / layer names the steps give
        once its structure is known (`model_layout` imports the architecture: seconds the first time)."""
        from studio.gui.widgets import run_task
        from studio.recipe_check import model_layout

        self._layout = None
        model = self.document.model
        self._layout_task = None
        if model is not None:
            self._layout_task = run_task(
                lambda: model_layout(model), on_done=self._on_layout, on_error=self._on_layout_error
            )
        self._refresh_problems()

    def _on_layout(self, token: int, layout: Any) -> None:
        if self._layout_task is None or token != self._layout_task.token:
            return  # the answer for a model that is no longer open
        self._layout_task = None
        self._layout = layout
        self._refresh_problems()
        self.model_checked.emit()

    def _on_layout_error(self, token: int, _message: str) -> None:
        from studio.recipe_check import UNKNOWN

        self._on_layout(token, UNKNOWN)

    @property
    def checking_model(self) -> bool:
        """The open model's structure is still being read: heads and layer names are not checked yet."""
        return self._layout_task is not None

    def _refresh_problems(self) -> None:
        from studio.recipe_check import UNKNOWN

        try:
            self._problems = self.pipeline.problems(
                self.document.start_kind(), self.document.model, self._layout or UNKNOWN
            )
        except Exception as exc:  # a broken technique must not take the editor down
            self._problems = {-1: f"could not check the pipeline: {exc}"}
        techniques = technique_classes()
        warn = self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        for i in range(self.list.count()):
            item = self.list.item(i)
            problem = self._problems.get(i)
            item.setData(PROBLEM_ROLE, problem)
            item.setIcon(warn if problem else QIcon())
            cls = techniques.get(item.data(ID_ROLE))
            if problem:
                item.setToolTip(problem)
            else:
                item.setToolTip(cls.description if cls is not None else "")
        self.list.doItemsLayout()  # rows with a problem are taller
        self.list.viewport().update()
        pal = self.problems_label.palette()
        if self._problems:
            lines = [f"⚠ {self._problems[i]}" for i in sorted(self._problems)]
            if len(lines) > MAX_PROBLEM_LINES:  # the rest are on their steps (marker and tooltip)
                lines = [*lines[: MAX_PROBLEM_LINES - 1], f"… and {len(lines) - MAX_PROBLEM_LINES + 1} more"]
            self.problems_label.setText("\n".join(lines))
            self.problems_label.setStyleSheet(f"color: {problem_color(pal).name()};")
        elif len(self.pipeline) and self.checking_model:
            self.problems_label.setText(f"Checking the pipeline against {self.document.source}…")
            self.problems_label.setStyleSheet("")
        elif len(self.pipeline):
            first = self.document.start_kind()
            last = techniques[self.pipeline.step(len(self.pipeline) - 1).technique].output_kind
            on = f" on {self.document.source}" if self.document.source else ""
            self.problems_label.setText(f"✓ Ready to run{on}: {first} model -> {last} model")
            self.problems_label.setStyleSheet(
                "color: #2e7d32;" if not is_dark_palette(pal) else "color: #a5d6a7;"
            )
        else:
            self.problems_label.setText("")
        self._update_actions()
        self._update_title()

    def problems(self) -> dict[int, str]:
        """The problems shown now, by step index."""
        return dict(self._problems)

    def _update_actions(self) -> None:
        row = self.list.currentRow()
        self.remove_action.setEnabled(row >= 0)
        self.up_action.setEnabled(row > 0)
        self.down_action.setEnabled(0 <= row < self.list.count() - 1)

    def _undo_text_changed(self, text: str) -> None:
        self.undo_action.setToolTip(f"Undo {text}" if text else "Nothing to undo")

    def _redo_text_changed(self, text: str) -> None:
        self.redo_action.setToolTip(f"Redo {text}" if text else "Nothing to redo")

    def _clean_changed(self, clean: bool) -> None:
        self._update_title(clean)

    def _update_title(self, clean: bool | None = None) -> None:
        if clean is None:
            clean = self.document.undo_stack.isClean()
        path = self.document.recipe_path
        name = path.name if path else "unsaved"
        dirty = "" if clean else " •"
        self.pipeline_heading.setText(f"Pipeline — {name}{dirty}")
        self.pipeline_heading.setToolTip(str(path) if path else "")

    def _on_added(self, index: int) -> None:
        self._rebuild(select=index)

    def _on_moved(self, _src: int, dst: int) -> None:
        self._form_row = None
        self._rebuild(select=dst)

    def _on_removed(self, index: int) -> None:
        self._form_row = None
        self._rebuild(select=min(index, len(self.pipeline) - 1) if len(self.pipeline) else None)

    def _on_reset(self) -> None:
        self._form_row = None
        self._rebuild(select=0 if len(self.pipeline) else None)

    def _on_params_changed(self, index: int) -> None:
        self._refresh_problems()
        if index == self._form_row and self._form is not None:
            params = self.pipeline.step(index).params
            if self._form.values() != params:  # undo/redo or an outside change: show it
                self._form.set_values(params)

    def _selection_changed(self, row: int) -> None:
        self._update_actions()
        if row == self._form_row and self._form is not None:
            return
        self._form_row = row if row >= 0 else None
        old = self.form_area.takeWidget()
        if old is not None:
            old.deleteLater()
        self._form = None
        if row < 0 or row >= len(self.pipeline):
            self.params_heading.setText("Parameters")
            self.description_label.setText(
                "Select a step to edit its parameters." if len(self.pipeline) else ""
            )
            return
        step = self.pipeline.step(row)
        cls = technique_classes().get(step.technique)
        if cls is None:
            self.params_heading.setText(f"Step {row + 1}: {step.technique}")
            self.description_label.setText("Unknown technique: remove this step.")
            return
        self.params_heading.setText(f"Step {row + 1}: {cls.title}")
        self.description_label.setText(cls.description)
        holder = QWidget()
        hv = QVBoxLayout(holder)
        hv.setContentsMargins(0, 4, 8, 0)
        form = ParamForm(cls.Params, step.params)
        form.params_edited.connect(self._params_edited)
        hv.addWidget(form)
        hv.addStretch(1)
        self.form_area.setWidget(holder)
        self._form = form

    @property
    def param_form(self) -> ParamForm | None:
        """The form of the selected step (None when nothing is selected)."""
        return self._form

    # ---------------------------------------------------------------------------- view -> document

    def _params_edited(self, params: dict[str, Any]) -> None:
        if self._form_row is not None and self._form_row < len(self.pipeline):
            self.document.set_params(self._form_row, params)

    def _technique_dropped(self, technique_id: str, row: int) -> None:
        if technique_id not in technique_classes():
            self.show_error(f"Unknown technique '{technique_id}'")
            return
        self.document.add_step(technique_id, index=max(0, min(row, len(self.pipeline))))

    def _step_dropped(self, source: int, row: int) -> None:
        if not 0 <= source < len(self.pipeline):
            return
        dst = row if row <= source else row - 1
        dst = max(0, min(dst, len(self.pipeline) - 1))
        if dst != source:
            self.document.move_step(source, dst)

    def select_step(self, index: int) -> None:
        self.list.setCurrentRow(index)

    def remove_selected(self) -> None:
        row = self.list.currentRow()
        if 0 <= row < len(self.pipeline):
            self.document.remove_step(row)

    def _move_selected(self, delta: int) -> None:
        row = self.list.currentRow()
        dst = row + delta
        if 0 <= row < len(self.pipeline) and 0 <= dst < len(self.pipeline):
            self.document.move_step(row, dst)

    # ---------------------------------------------------------------------------- files

    def show_error(self, message: str) -> None:
        """Show (or, with "", hide) the editor's error banner; errors are never raised to the caller."""
        self.last_error = message
        if message:
            self.error_banner.show_message(message)
        else:
            self.error_banner.hide()

    def _error_dismissed(self) -> None:
        self.last_error = ""

    def _start_dir(self) -> str:
        if self.document.recipe_path is not None:
            return str(self.document.recipe_path)
        return str(Path.home())

    def save(self) -> bool:
        """Save to the pipeline's file, asking for one the first time."""
        if self.document.recipe_path is None:
            return self.save_as()
        return self.save_to(self.document.recipe_path)

    def save_as(self) -> bool:
        path, _ = QFileDialog.getSaveFileName(self, "Save pipeline", self._start_dir(), RECIPE_FILTER)
        if not path:
            return False
        if not Path(path).suffix:
            path += ".yaml"
        return self.save_to(path)

    def open_dialog(self) -> bool:
        path, _ = QFileDialog.getOpenFileName(self, "Open pipeline", self._start_dir(), RECIPE_FILTER)
        return self.open_from(path) if path else False

    def save_to(self, path: str | Path) -> bool:
        """Write the recipe YAML (`Recipe.to_yaml()`, what `model-studio run` reads) atomically."""
        path = Path(path)
        try:
            data = self.document.recipe().to_yaml().encode("utf-8")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except (OSError, ValueError) as exc:
            self.show_error(f"Could not save the pipeline to {path}: {exc}")
            return False
        self.document.recipe_path = path
        self.document.undo_stack.setClean()
        self.show_error("")
        self._update_title()
        self.document.status.emit(f"Saved pipeline to {path}")
        self.saved.emit(str(path))
        return True

    def ask_model(self, recipe_model: str, open_model: str) -> str | None:
        """A pipeline names another model than the open one: "recipe" (open its model), "open" (apply it
        to the open model) or None (do not open it). Asked, never decided silently; tests replace this."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Which model?")
        box.setText(f"This pipeline was made for <b>{recipe_model}</b>; <b>{open_model}</b> is open.")
        box.setInformativeText(
            "Apply the pipeline to the open model, or open the pipeline's model? Head and layer names in "
            "the steps are checked against the model you choose."
        )
        keep = box.addButton(f"Use {_short(open_model)}", QMessageBox.ButtonRole.AcceptRole)
        other = box.addButton(f"Open {_short(recipe_model)}", QMessageBox.ButtonRole.ActionRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return "open" if clicked is keep else "recipe" if clicked is other else None

    def open_from(self, path: str | Path) -> bool:
        """Open a recipe file; its model is opened too when it is not the one open now."""
        from studio.errors import StudioError
        from studio.pipeline import load_recipe

        path = Path(path)
        try:
            recipe = load_recipe(path)
        except StudioError as exc:
            self.show_error(f"Could not open the pipeline: {exc.message}")
            return False
        except Exception as exc:  # an unreadable file must not take the window down
            self.show_error(f"Could not open the pipeline {path}: {type(exc).__name__}: {exc}")
            return False
        note = ""
        current = self.document.source
        if current and recipe.model != current:
            choice = self.ask_model(recipe.model, current)
            if choice is None:
                self.document.status.emit(f"Did not open the pipeline {path}")
                return False
            if choice == "open":
                recipe = recipe.model_copy(update={"model": current, "trust": self.pipeline.recipe.trust})
                self.document.status.emit(f"The pipeline now applies to {current}")
            elif not self.document.open_model(recipe.model, trust=recipe.trust):
                note = (
                    f"The pipeline was opened, but its model '{recipe.model}' could not be opened;"
                    f" it now applies to {self.document.source or 'no model'}."
                )
        self.document.load_recipe(recipe, path)
        self.document.undo_stack.setClean()
        self.show_error(note)
        self._update_title()
        self.document.status.emit(f"Opened pipeline {path}")
        self.opened.emit(str(path))
        return True
