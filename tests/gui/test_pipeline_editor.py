"""The pipeline editor and its parameter form, driven like a user would (drops, keys, typing) offscreen.

Drops are real QDropEvents carrying the editor's MIME data, sent to the pipeline's viewport; the one real
mouse drag lives in test_real_drag.py (it needs an X server).
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QPoint, QPointF, QSettings, Qt
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QCheckBox, QComboBox, QLineEdit

from studio.gui.document import StudioDocument
from studio.gui.param_form import FloatSpin, IntSpin, ParamForm
from studio.gui.pipeline_editor import PipelineEditor
from studio.gui.pipeline_palette import CATEGORY_TITLES, ID_ROLE, technique_mime
from studio.gui.pipeline_steps import PROBLEM_ROLE
from studio.pipeline import Recipe, load_recipe, parse_recipe
from studio.resources import resource
from studio.techniques.base import registry
from studio.variants import Workspace

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_settings(tmp_path):
    QCoreApplication.setOrganizationName("model-studio-tests")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))


@pytest.fixture
def document(tmp_path):
    return StudioDocument(workspace=Workspace(tmp_path / "ws"))


@pytest.fixture
def editor(qtbot, document):
    widget = PipelineEditor(document)
    qtbot.addWidget(widget)
    widget.resize(1280, 760)
    widget.show()
    qtbot.waitExposed(widget)
    return widget


def ids(document) -> list[str]:
    return [s.technique for s in document.pipeline.steps()]


def drop(editor: PipelineEditor, mime, pos: QPoint) -> bool:
    """Deliver a drag the way Qt does (enter, move, drop) to the pipeline's viewport; True if accepted."""
    target = editor.list.viewport()
    actions = Qt.DropAction.CopyAction | Qt.DropAction.MoveAction
    args = (pos, actions, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    for event in (QDragEnterEvent(*args), QDragMoveEvent(*args)):
        QApplication.sendEvent(target, event)
        if not event.isAccepted():
            return False
    event = QDropEvent(QPointF(pos), *args[1:])
    QApplication.sendEvent(target, event)
    return event.isAccepted()


def below_last(editor: PipelineEditor) -> QPoint:
    view = editor.list
    if view.count() == 0:
        return QPoint(20, 20)
    rect = view.visualItemRect(view.item(view.count() - 1))
    return QPoint(rect.center().x(), rect.bottom() + 10)


def top_of(editor: PipelineEditor, row: int) -> QPoint:
    rect = editor.list.visualItemRect(editor.list.item(row))
    return QPoint(rect.center().x(), rect.top() + 3)


# ------------------------------------------------------------------------------------------------ palette


def test_palette_lists_every_technique_by_category(editor):
    techniques = registry()
    palette = editor.palette_view
    items = palette.items_by_id()
    assert set(items) == set(techniques)
    for tid, cls in techniques.items():
        item = items[tid]
        assert item.text(0) == cls.title
        assert item.text(1) == tid
        assert item.parent().text(0) == CATEGORY_TITLES[cls.category]
        ok, reason = cls().availability()
        enabled = bool(item.flags() & Qt.ItemFlag.ItemIsEnabled)
        assert enabled == ok, tid
        if ok:
            assert item.flags() & Qt.ItemFlag.ItemIsDragEnabled
            assert cls.description[:40] in item.toolTip(0)
        else:
            assert reason and reason in item.toolTip(0)
    # categories appear once each, in the palette's order
    headers = [palette.topLevelItem(i).text(0) for i in range(palette.topLevelItemCount())]
    assert len(headers) == len(set(headers)) == len({c.category for c in techniques.values()})


def test_tensorrt_is_disabled_with_its_reason(editor):
    item = editor.palette_view.items_by_id()["export.tensorrt"]
    ok, reason = registry()["export.tensorrt"]().availability()
    if ok:
        pytest.skip("TensorRT is available on this machine")
    assert not item.flags() & Qt.ItemFlag.ItemIsEnabled
    assert "Not available here" in item.toolTip(0) and reason in item.toolTip(0)


def test_double_click_appends_and_filter_hides(qtbot, editor, document):
    palette = editor.palette_view
    item = palette.items_by_id()["export.onnx"]
    rect = palette.visualItemRect(item)
    QTest.mouseClick(
        palette.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, rect.center()
    )
    QTest.mouseDClick(
        palette.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, rect.center()
    )
    assert ids(document) == ["export.onnx"]
    QTest.keyClicks(editor.filter_edit, "magnitude")
    visible = [tid for tid, it in palette.items_by_id().items() if not it.isHidden()]
    assert visible == ["prune.magnitude"]


def test_double_click_puts_a_block_where_its_stage_fits(editor, document):
    document.pipeline.load(load_recipe(resource("recipes", "starter", "onnx-int8.yaml")))
    editor.pipeline.reset.emit()
    palette = editor.palette_view
    for tid in ("prune.magnitude", "onnx.half"):
        rect = palette.visualItemRect(palette.items_by_id()[tid])
        for click in (QTest.mouseClick, QTest.mouseDClick):  # a real double-click starts with a click
            click(
                palette.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, rect.center()
            )
    # the torch block before the export (the last place a torch step can run), the ONNX one at the end
    assert ids(document) == [
        "prune.magnitude",
        "export.onnx",
        "onnx.optimize",
        "onnx.quantize_dynamic",
        "onnx.half",
    ]
    assert editor.problems() == {} and "Ready to run" in editor.problems_label.text()
    assert editor.list.currentRow() == 4


def test_insertion_index_rule(document):
    pipeline = document.pipeline
    assert pipeline.insertion_index("prune.heads") == 0  # empty: the only place
    for tid in ("precision.half", "export.onnx", "onnx.optimize"):
        document.add_step(tid)
    assert pipeline.insertion_index("prune.heads") == 1  # after the torch step, before the export
    assert pipeline.insertion_index("onnx.quantize_dynamic") == 3
    assert pipeline.insertion_index("export.onnx") == 1  # a second export: no place runs, near the first
    assert pipeline.insertion_index("onnx.optimize", start_kind="onnx") == 3
    assert pipeline.insertion_index("no.such.block") == 3


# ------------------------------------------------------------------------------------------------ drag and drop


def test_dropping_techniques_adds_steps_where_dropped(editor, document):
    assert drop(editor, technique_mime("prune.magnitude"), QPoint(30, 30))
    assert ids(document) == ["prune.magnitude"]
    assert drop(editor, technique_mime("export.onnx"), below_last(editor))
    assert ids(document) == ["prune.magnitude", "export.onnx"]
    assert drop(editor, technique_mime("prune.heads"), top_of(editor, 0))  # above the first step
    assert ids(document) == ["prune.heads", "prune.magnitude", "export.onnx"]
    assert editor.list.currentRow() == 0  # the new step is selected, its form shown
    assert editor.param_form is not None and "fraction" in [s.name for s in editor.param_form.specs]
    # the list shows index, title, id and stage kinds
    item = editor.list.item(2)
    assert item.text() == "3. Export to ONNX  (export.onnx, torch -> onnx)"
    # an unknown id is refused with a message, nothing added
    drop(editor, technique_mime("no.such.block"), below_last(editor))
    assert len(document.pipeline) == 3 and "no.such.block" in editor.last_error


def test_dropping_a_step_moves_it_and_undo_moves_it_back(editor, document):
    for tid in ("prune.magnitude", "prune.heads", "export.onnx"):
        document.add_step(tid)
    assert drop(editor, editor.list.step_mime(0), below_last(editor))  # first -> last
    assert ids(document) == ["prune.heads", "export.onnx", "prune.magnitude"]
    assert editor.list.currentRow() == 2
    assert drop(editor, editor.list.step_mime(2), top_of(editor, 1))  # last -> middle
    assert ids(document) == ["prune.heads", "prune.magnitude", "export.onnx"]
    drop(editor, editor.list.step_mime(1), top_of(editor, 1))  # onto itself: no command
    assert document.undo_stack.count() == 5
    document.undo_stack.undo()
    assert ids(document) == ["prune.heads", "export.onnx", "prune.magnitude"]
    document.undo_stack.undo()
    assert ids(document) == ["prune.magnitude", "prune.heads", "export.onnx"]


def test_delete_key_and_button_remove_steps(qtbot, editor, document):
    for tid in ("prune.magnitude", "prune.heads", "export.onnx"):
        document.add_step(tid)
    editor.select_step(1)
    editor.list.setFocus()
    QTest.keyClick(editor.list, Qt.Key.Key_Delete)
    assert ids(document) == ["prune.magnitude", "export.onnx"]
    assert editor.list.currentRow() == 1
    editor.remove_action.trigger()
    assert ids(document) == ["prune.magnitude"]
    document.undo_stack.undo()
    document.undo_stack.undo()
    assert ids(document) == ["prune.magnitude", "prune.heads", "export.onnx"]


def test_undo_and_redo_restore_every_edit(editor, document):
    def state():
        return [(s.technique, s.params) for s in document.pipeline.steps()]

    edits = (
        lambda: document.add_step("prune.magnitude"),
        lambda: document.add_step("export.onnx"),
        lambda: document.move_step(1, 0),
        lambda: document.set_params(1, {"sparsity": 0.3}),
        lambda: document.remove_step(0),
    )
    states = [state()]
    for edit in edits:
        edit()
        states.append(state())
    for expected in reversed(states[:-1]):
        editor.undo_action.trigger()  # the editor's own Undo/Redo actions
        assert state() == expected
        assert editor.list.count() == len(expected)
    assert not editor.undo_action.isEnabled()
    for expected in states[1:]:
        editor.redo_action.trigger()
        assert state() == expected
        assert [editor.list.item(i).data(ID_ROLE) for i in range(editor.list.count())] == [
            t for t, _ in expected
        ]


# ------------------------------------------------------------------------------------------------ parameters


def type_into(widget, text: str) -> None:
    line = widget.lineEdit() if hasattr(widget, "lineEdit") else widget
    line.setFocus()
    line.selectAll()
    QTest.keyClicks(line, text)


def test_spin_box_edit_goes_through_the_document_and_merges(editor, document):
    document.add_step("prune.magnitude")
    form = editor.param_form
    spin = form.editor("sparsity")
    assert isinstance(spin, FloatSpin) and spin.value() == 0.5
    assert spin.minimum() == 0.0 and spin.maximum() == 1.0  # from the schema (ge=0, lt=1)
    before = document.undo_stack.count()
    type_into(spin, "0.25")
    assert document.pipeline.step(0).params == {"sparsity": 0.25}
    assert document.undo_stack.count() == before + 1  # keystrokes merged into one command
    iterations = form.editor("iterations")
    assert isinstance(iterations, IntSpin)
    iterations.stepUp()
    assert document.pipeline.step(0).params == {"sparsity": 0.25, "iterations": 2}
    document.undo_stack.undo()
    assert document.pipeline.step(0).params == {"sparsity": 0.25}
    assert editor.param_form.editor("iterations").value() == 1  # the form follows undo
    document.undo_stack.undo()
    assert document.pipeline.step(0).params == {}
    assert editor.param_form.editor("sparsity").value() == 0.5
    document.undo_stack.redo()
    assert editor.param_form.editor("sparsity").value() == 0.25


def test_invalid_input_shows_an_error_and_is_not_committed(editor, document):
    document.add_step("prune.magnitude", {"sparsity": 0.3})
    form = editor.param_form
    type_into(form.editor("sparsity"), "1.5")
    assert "less than 1" in form.field_error("sparsity")
    assert not form.is_valid()
    assert document.pipeline.step(0).params == {"sparsity": 0.3}
    type_into(form.editor("sparsity"), "0.4")
    assert form.field_error("sparsity") == "" and form.is_valid()
    assert document.pipeline.step(0).params == {"sparsity": 0.4}


def test_form_widgets_follow_the_schema(qtbot):
    techniques = registry()
    kinds = {"bool": QCheckBox, "int": IntSpin, "float": FloatSpin, "enum": QComboBox}
    for cls in techniques.values():
        form = ParamForm(cls.Params, {})
        qtbot.addWidget(form)
        for spec in form.specs:
            widget = form.editor(spec.name)
            assert isinstance(widget, kinds.get(spec.kind, QLineEdit)), (cls.id, spec.name)
            assert widget.toolTip() == spec.description
    magnitude = ParamForm(techniques["prune.magnitude"].Params, {})
    qtbot.addWidget(magnitude)
    assert magnitude.editor("exclude").text().startswith("*embed*, ")  # list[str]: comma-separated
    assert [magnitude.editor("scope").itemText(i) for i in range(2)] == ["global", "layer"]


def test_optional_and_dict_fields(qtbot):
    form = ParamForm(registry()["prune.heads"].Params, {})
    qtbot.addWidget(form)
    edits = []
    form.params_edited.connect(edits.append)
    assert "exactly one" in form.error()  # nothing chosen yet: the model's own rule
    fraction = form.unset_box("fraction")
    assert fraction is not None and not fraction.isChecked() and not form.editor("fraction").isEnabled()
    fraction.setChecked(True)
    assert edits[-1] == {"fraction": 0.5}
    heads = form.editor("heads")
    heads.setText("{0: [1, 2]")  # broken YAML
    assert "YAML" in form.field_error("heads") and len(edits) == 1
    heads.setText("[" * 5000 + "]" * 5000)  # nested thousands deep: an error under the field, no crash
    assert "nested" in form.field_error("heads") and len(edits) == 1
    heads.setText("{0: [1, 2], 3: [0]}")
    assert "exactly one" in form.error() and len(edits) == 1  # fraction and heads both set
    fraction.setChecked(False)
    assert edits[-1] == {"fraction": None, "heads": {0: [1, 2], 3: [0]}}
    form.set_values({"count": 3})  # from the document: shown, not emitted
    assert form.unset_box("count").isChecked() and form.editor("count").value() == 3
    assert len(edits) == 2 and form.is_valid()


# ------------------------------------------------------------------------------------------------ problems


def test_a_torch_step_after_export_is_marked_at_once(editor, document):
    document.add_step("export.onnx")
    document.add_step("prune.magnitude")
    item = editor.list.item(1)
    problem = item.data(PROBLEM_ROLE)
    assert "needs a torch model" in problem and "export.onnx" in problem
    assert item.toolTip() == problem
    assert not item.icon().isNull()
    assert problem in editor.problems_label.text()
    assert editor.list.item(0).data(PROBLEM_ROLE) is None
    document.move_step(1, 0)  # fixed by moving it first
    assert all(editor.list.item(i).data(PROBLEM_ROLE) is None for i in range(2))
    assert "Ready to run" in editor.problems_label.text()
    document.set_params(0, {"sparsity": 2.0})  # a bad parameter is a problem too
    assert "sparsity" in editor.list.item(0).data(PROBLEM_ROLE)
    document.undo_stack.undo()
    document.undo_stack.undo()
    assert editor.list.item(1).data(PROBLEM_ROLE)
    assert editor.list.item(1).data(ID_ROLE) == "prune.magnitude"


# ------------------------------------------------------------------------------------------------ files


def test_save_writes_the_recipe_yaml_and_open_reads_it_back(editor, document, tmp_path):
    document.add_step("prune.heads", {"fraction": 0.25})
    document.add_step("export.onnx")
    document.add_step("onnx.quantize_dynamic", {"per_channel": True})
    path = tmp_path / "recipes" / "pipeline.yaml"
    path.parent.mkdir()
    assert editor.save_to(path)
    assert path.read_bytes() == document.recipe().to_yaml().encode("utf-8")
    assert load_recipe(path) == document.recipe()
    assert [p.name for p in path.parent.iterdir()] == ["pipeline.yaml"]  # no temp file left behind
    assert document.undo_stack.isClean() and "pipeline.yaml" in editor.pipeline_heading.text()

    document.remove_step(0)
    document.add_step("distill")
    assert editor.open_from(path)
    assert ids(document) == ["prune.heads", "export.onnx", "onnx.quantize_dynamic"]
    assert document.pipeline.step(2).params == {"per_channel": True}
    assert editor.list.count() == 3 and editor.last_error == ""
    assert document.recipe_path == path
    document.undo_stack.undo()  # opening is undoable too
    assert ids(document) == ["export.onnx", "onnx.quantize_dynamic", "distill"]


def test_opening_a_bad_file_shows_an_error(editor, document, tmp_path):
    document.add_step("export.onnx")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [technique: {\n  - : ]\n")
    assert not editor.open_from(bad)
    assert "not valid YAML" in editor.last_error
    assert editor.error_banner.isVisibleTo(editor)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    assert not editor.open_from(binary)
    assert "UTF-8" in editor.last_error
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        "version: 1\nsteps:\n  - technique: prune.magnitude\n    params: {sparsity: 0.5}\nfoo: 1\n"
    )
    assert not editor.open_from(wrong)
    assert "foo" in editor.last_error
    assert not editor.open_from(tmp_path / "missing.yaml")
    assert ids(document) == ["export.onnx"]  # nothing changed
    assert not editor.save_to(tmp_path / "no-such-dir" / "x.yaml")
    assert "Could not save" in editor.last_error


def test_open_recipe_keeps_data_and_evaluate(editor, document, tmp_path):
    recipe = Recipe.model_validate(
        {"steps": [{"technique": "prune.magnitude"}], "evaluate": {"latency": False, "sequence_length": 32}}
    )
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert editor.open_from(path)
    assert document.recipe().evaluate.sequence_length == 32
    assert editor.save_to(path)
    assert load_recipe(path) == recipe


# ------------------------------------------------------------------------------------------------ the open model


def heads_recipe(tmp_path, mapping, model="builtin:minilm"):
    path = tmp_path / "heads.yaml"
    data = {
        "version": 1,
        "model": model,
        "steps": [{"technique": "prune.heads", "params": {"heads": mapping}}],
    }
    path.write_text(parse_recipe(data).to_yaml())
    return path


def test_heads_the_open_model_lacks_are_shown_before_running(qtbot, editor, document, gpt2, tmp_path):
    """Heads chosen on MiniLM (12 per block) do not exist in the small GPT-2 (4 per block)."""
    path = heads_recipe(tmp_path, {0: [7], 3: [1]})
    assert editor.open_from(path)  # no model open yet: nothing to ask
    with qtbot.waitSignal(editor.model_checked, timeout=120000):
        assert document.open_model(str(gpt2))
        assert editor.checking_model and "Checking the pipeline" in editor.problems_label.text()
    problem = editor.list.item(0).data(PROBLEM_ROLE)
    assert "step 1 (prune.heads): field 'heads'" in problem
    assert "block 0 (transformer.h.0.attn) has 4 heads (0-3), no head 7" in problem
    assert "Ready to run" not in editor.problems_label.text() and problem in editor.problems_label.text()
    document.set_params(0, {"heads": {0: [1], 1: [3]}})  # heads this model has: fine again
    assert editor.problems() == {}
    assert "Ready to run on " + str(gpt2) in editor.problems_label.text()


def test_a_pipeline_for_another_model_asks_which_model(qtbot, editor, document, gpt2, tmp_path):
    with qtbot.waitSignal(editor.model_checked, timeout=120000):
        assert document.open_model(str(gpt2))
    path = heads_recipe(tmp_path, {0: [7]})  # made for MiniLM
    asked = []
    editor.ask_model = lambda recipe_model, open_model: asked.append((recipe_model, open_model))  # cancel
    assert not editor.open_from(path)
    assert asked == [("builtin:minilm", str(gpt2))] and len(document.pipeline) == 0

    editor.ask_model = lambda *_: "open"  # keep the open model: the pipeline now applies to it
    assert editor.open_from(path)
    assert document.source == str(gpt2) and document.recipe().model == str(gpt2)
    assert "no head 7" in editor.problems()[0]  # and is checked against it

    editor.ask_model = lambda *_: "recipe"  # open the pipeline's model instead
    with qtbot.waitSignal(editor.model_checked, timeout=120000):
        assert editor.open_from(path)
    assert document.source == "builtin:minilm" and editor.problems() == {}


def test_palette_names_are_not_cut(editor):
    palette = editor.palette_view
    fm = palette.fontMetrics()
    for tid, item in palette.items_by_id().items():
        for column in (0, 1):
            needed = fm.horizontalAdvance(item.text(column))
            assert needed <= palette.columnWidth(column) - 4, (
                tid,
                column,
                needed,
                palette.columnWidth(column),
            )


def test_recipe_settings_change_only_through_setters_that_emit(qtbot, editor, document, tmp_path):
    """The data / evaluate settings and the model are part of what is saved and run: a change goes through
    a setter that tells the views, and what it set is what the saved recipe holds."""
    from studio.pipeline import DataSpec, EvaluateSpec

    pipeline = document.pipeline
    with pytest.raises(AttributeError):
        pipeline.recipe = Recipe()  # no silent writes from outside
    data = pipeline.recipe.data.model_copy(update={"evaluation_examples": 24})
    with qtbot.waitSignal(pipeline.settings_changed, timeout=1000):
        pipeline.set_data(data)
    evaluate = pipeline.recipe.evaluate.model_copy(update={"sequence_length": 48})
    with qtbot.waitSignal(pipeline.settings_changed, timeout=1000):
        pipeline.set_evaluate(evaluate)
    with qtbot.waitSignal(pipeline.settings_changed, timeout=1000):
        pipeline.set_model(str(tmp_path / "model"), True)
    assert isinstance(pipeline.recipe.data, DataSpec) and isinstance(pipeline.recipe.evaluate, EvaluateSpec)
    with qtbot.assertNotEmitted(pipeline.settings_changed):
        pipeline.set_data(data.model_copy())  # the same values again: nothing changed, nothing to tell

    document.add_step("precision.half")
    path = tmp_path / "settings.yaml"
    assert editor.save_to(path)
    saved = load_recipe(path)
    assert saved.data.evaluation_examples == 24
    assert saved.evaluate.sequence_length == 48
    assert (saved.model, saved.trust) == (str(tmp_path / "model"), True)
    assert [s.technique for s in saved.steps] == ["precision.half"]


def test_opening_a_model_sets_the_recipes_model_through_the_setter(qtbot, document):
    document.pipeline.set_model("elsewhere", False)
    with qtbot.waitSignal(document.pipeline.settings_changed, timeout=1000):
        assert document.open_model("builtin:minilm")
    assert document.pipeline.recipe.model == "builtin:minilm"
    assert document.pipeline.to_recipe().model == "builtin:minilm"
