"""A form generated from a technique's pydantic Params class.

The JSON schema decides the editor of each field (bool: check box, int/float: spin boxes bounded by the
schema, Literal/enum: combo box, list of scalars: comma-separated text, anything else: YAML/JSON text);
an optional field (None allowed) gets an "unset" state. Every keystroke validates the whole params dict
with the pydantic model: errors are shown next to their field and nothing invalid leaves the form. A
valid dict is emitted as `params_edited`, which the pipeline editor turns into an undoable
`document.set_params`.

Only the fields the step already had, or that the user touched, are emitted ("explicit" fields), so a saved
recipe keeps just what the user chose and defaults stay defaults.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.errors import BadInput
from studio.safe_files import check_structure

INT_LIMIT = 2_000_000_000  # QSpinBox holds a C int
ERROR_STYLE = "color: #d32f2f;"


class _ParseError(ValueError):
    """Text in an editor that cannot become a value (shown as that field's error)."""


# ------------------------------------------------------------------------------------------------ schema


@dataclass
class FieldSpec:
    name: str
    title: str
    description: str
    kind: str  # bool | int | float | enum | list | text | yaml
    schema: dict[str, Any]  # the (resolved, non-null) schema of the value
    optional: bool  # None is a valid value: the editor has an "unset" state
    required: bool
    default: Any


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = {
            **defs.get(schema["$ref"].rsplit("/", 1)[-1], {}),
            **{k: v for k, v in schema.items() if k != "$ref"},
        }
    if "allOf" in schema and len(schema["allOf"]) == 1:
        inner = _resolve(schema["allOf"][0], defs)
        schema = {**inner, **{k: v for k, v in schema.items() if k != "allOf"}}
    return schema


def _kind(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "enum"
    if "const" in schema:
        return "enum"
    kind = schema.get("type")
    if kind == "boolean":
        return "bool"
    if kind == "integer":
        return "int"
    if kind == "number":
        return "float"
    if kind == "string":
        return "text"
    if kind == "array":
        items = schema.get("items", {})
        if (
            isinstance(items, dict)
            and items.get("type") in ("string", "integer", "number")
            and "enum" not in items
        ):
            return "list"
    return "yaml"


def field_specs(params_cls: type[BaseModel]) -> list[FieldSpec]:
    """One spec per field of the Params class, in declaration order."""
    schema = params_cls.model_json_schema()
    defs = schema.get("$defs", {})
    props = schema.get("properties", {})
    specs = []
    for name, info in params_cls.model_fields.items():
        alias = info.alias or name
        prop = _resolve(dict(props.get(alias, {})), defs)
        optional = False
        value_schema = prop
        if "anyOf" in prop:
            options = [_resolve(o, defs) for o in prop["anyOf"]]
            non_null = [o for o in options if o.get("type") != "null"]
            optional = len(non_null) < len(options)
            value_schema = non_null[0] if len(non_null) == 1 else {"anyOf": non_null}
        elif prop.get("type") == "null":
            optional = True
        kind = _kind(value_schema)
        if "const" in value_schema:
            value_schema = {**value_schema, "enum": [value_schema["const"]]}
        default = info.get_default(call_default_factory=True)
        required = default is PydanticUndefined
        if required:
            default = None
        specs.append(
            FieldSpec(
                name=name,
                title=prop.get("title") or name.replace("_", " ").capitalize(),
                description=info.description or prop.get("description", ""),
                kind=kind,
                schema=value_schema,
                optional=optional or default is None,
                required=required,
                default=default,
            )
        )
    return specs


def _bounds(schema: dict[str, Any], integer: bool) -> tuple[float, float]:
    """The spin range: inclusive bounds as given, exclusive bounds included too (the form then reports
    "should be greater than ..." rather than silently refusing a keystroke)."""
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if integer:
        lo = -INT_LIMIT if lo is None else max(-INT_LIMIT, math.ceil(lo))
        hi = INT_LIMIT if hi is None else min(INT_LIMIT, math.floor(hi))
    else:
        lo = -1e12 if lo is None else float(lo)
        hi = 1e12 if hi is None else float(hi)
    return lo, hi


def _neutral(schema: dict[str, Any], integer: bool) -> float:
    """A valid value to show for an unset number: the middle of a bounded float range, else the lowest."""
    lo = schema.get("minimum")
    xlo = schema.get("exclusiveMinimum")
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if lo is None and xlo is not None:
        lo = math.floor(xlo) + 1 if integer else None
    if not integer and lo is None and xlo is not None:
        return (xlo + hi) / 2 if hi is not None else xlo + 1.0
    if not integer and lo is not None and hi is not None:
        return (lo + hi) / 2
    if lo is not None:
        return lo
    return 0 if hi is None or hi >= 0 else hi


def _format_yaml(value: Any) -> str:
    if value is None:
        return ""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    return text


def _format_number(value: float) -> str:
    return format(value, ".10g")


# ------------------------------------------------------------------------------------------------ spin boxes


class IntSpin(QSpinBox):
    """A spin box that lets any integer be typed: out-of-range text is 'intermediate', so the form can
    say why it is wrong while the value itself stays at the last valid one."""

    def validate(self, text: str, pos: int) -> object:
        body = text.strip()
        if body in ("", "-", "+"):
            return QValidator.State.Intermediate, text, pos
        try:
            value = int(body)
        except ValueError:
            return QValidator.State.Invalid, text, pos
        ok = self.minimum() <= value <= self.maximum()
        return (QValidator.State.Acceptable if ok else QValidator.State.Intermediate), text, pos


class FloatSpin(QDoubleSpinBox):
    """A double spin box showing compact numbers (0.5, 5e-05) and accepting any typed float."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setDecimals(12)  # QDoubleSpinBox rounds values to `decimals`; keep small learning rates intact

    def textFromValue(self, value: float) -> str:
        return _format_number(value)

    def valueFromText(self, text: str) -> float:
        try:
            return float(text.strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> object:
        body = text.strip()
        if body in ("", "-", "+", ".", "-.", "+.") or body.lower().endswith(("e", "e-", "e+")):
            return QValidator.State.Intermediate, text, pos
        try:
            value = float(body)
        except ValueError:
            return QValidator.State.Invalid, text, pos
        if not math.isfinite(value):
            return QValidator.State.Intermediate, text, pos
        ok = self.minimum() <= value <= self.maximum()
        return (QValidator.State.Acceptable if ok else QValidator.State.Intermediate), text, pos


# ------------------------------------------------------------------------------------------------ form


class _FieldEditor:
    """The widgets of one field: its editor, the optional "set" switch and the error label."""

    def __init__(self, spec: FieldSpec, on_edit: Any, on_finish: Any) -> None:
        self.spec = spec
        self.on_edit = on_edit
        self.on_finish = on_finish
        self.container = QWidget()
        outer = QVBoxLayout(self.container)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        outer.addLayout(row)
        self.set_box: QCheckBox | None = None
        tip = spec.description
        self.widget = self._make_editor()
        self.widget.setToolTip(tip)
        self.widget.setObjectName(f"param-{spec.name}")
        if spec.optional and spec.kind in ("int", "float", "enum"):
            self.set_box = QCheckBox()
            self.set_box.setToolTip("Unchecked: leave this parameter unset (None)")
            self.set_box.setObjectName(f"param-{spec.name}-set")
            self.set_box.toggled.connect(self._set_toggled)
            row.addWidget(self.set_box)
        row.addWidget(self.widget, 1)
        self.error = QLabel()
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.setWordWrap(True)
        self.error.setObjectName(f"param-{spec.name}-error")
        self.error.hide()
        outer.addWidget(self.error)

    # -------------------------------------------------------------------- editors

    def _make_editor(self) -> QWidget:
        spec = self.spec
        if spec.kind == "bool":
            box = QCheckBox()
            box.setTristate(spec.optional)
            box.stateChanged.connect(lambda _s: self.on_edit(self))
            return box
        if spec.kind == "int":
            spin = IntSpin()
            lo, hi = _bounds(spec.schema, integer=True)
            spin.setRange(int(lo), int(hi))
            spin.setKeyboardTracking(True)
            spin.setAccelerated(True)
            # arrows update the text with its signals blocked: follow the value as well as the text
            spin.valueChanged.connect(lambda _v: self.on_edit(self))
            spin.lineEdit().textChanged.connect(lambda _t: self.on_edit(self))
            spin.editingFinished.connect(lambda: self.on_finish(self))
            spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            return spin
        if spec.kind == "float":
            spin = FloatSpin()
            lo, hi = _bounds(spec.schema, integer=False)
            spin.setRange(lo, hi)
            if hi - lo <= 1.0:
                spin.setSingleStep(0.05)
            else:
                spin.setStepType(QAbstractSpinBox.StepType.AdaptiveDecimalStepType)
                ref = abs(spec.default) if isinstance(spec.default, (int, float)) and spec.default else 1.0
                spin.setSingleStep(10 ** math.floor(math.log10(ref)))
            spin.valueChanged.connect(lambda _v: self.on_edit(self))
            spin.lineEdit().textChanged.connect(lambda _t: self.on_edit(self))
            spin.editingFinished.connect(lambda: self.on_finish(self))
            spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            return spin
        if spec.kind == "enum":
            combo = QComboBox()
            for value in spec.schema["enum"]:
                combo.addItem(str(value), value)
            combo.currentIndexChanged.connect(lambda _i: self.on_edit(self))
            return combo
        edit = QLineEdit()
        if spec.kind == "list":
            edit.setPlaceholderText(
                "unset (comma-separated values)" if spec.optional else "comma-separated values"
            )
        elif spec.kind == "yaml":
            edit.setPlaceholderText("unset (YAML or JSON)" if spec.optional else "YAML or JSON")
        elif spec.optional:
            edit.setPlaceholderText("unset")
        edit.textChanged.connect(lambda _t: self.on_edit(self))
        return edit

    def _set_toggled(self, checked: bool) -> None:
        self.widget.setEnabled(checked)
        self.on_edit(self)

    # -------------------------------------------------------------------- values

    def show(self, value: Any) -> None:
        """Display a value (no validation: the caller blocks the edit callback)."""
        spec, w = self.spec, self.widget
        unset = value is None and spec.optional
        if self.set_box is not None:
            self.set_box.setChecked(not unset)
            w.setEnabled(not unset)
        if spec.kind == "bool":
            assert isinstance(w, QCheckBox)
            state = (
                Qt.CheckState.PartiallyChecked
                if unset
                else (Qt.CheckState.Checked if value else Qt.CheckState.Unchecked)
            )
            w.setCheckState(state)
        elif spec.kind in ("int", "float"):
            assert isinstance(w, (IntSpin, FloatSpin))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                w.setValue(value)  # type: ignore[arg-type]
                w.lineEdit().setText(w.textFromValue(w.value()))
                if value != w.value():  # out of the spin range (a recipe typed by hand): show it as typed
                    w.lineEdit().setText(_format_number(value) if spec.kind == "float" else str(int(value)))
            elif value is None:  # unset: park the spin on a valid value for when it is switched on
                w.setValue(_neutral(spec.schema, spec.kind == "int"))  # type: ignore[arg-type]
                w.lineEdit().setText(w.textFromValue(w.value()))
            else:
                w.lineEdit().setText(str(value))
        elif spec.kind == "enum":
            assert isinstance(w, QComboBox)
            index = next((i for i in range(w.count()) if w.itemData(i) == value), -1)
            if index < 0 and value is not None:
                w.addItem(str(value), value)  # keep a value the schema does not list: validation says why
                index = w.count() - 1
            w.setCurrentIndex(max(index, 0) if not unset else max(w.currentIndex(), 0))
        else:
            assert isinstance(w, QLineEdit)
            if value is None:
                text = ""
            elif spec.kind == "list" and isinstance(value, (list, tuple)):
                text = ", ".join(str(v) for v in value)
            elif spec.kind == "text" and isinstance(value, str):
                text = value
            else:
                text = _format_yaml(value)
            w.setText(text)

    def read(self) -> Any:
        """The value the editor holds now; raises _ParseError for text that is no value at all."""
        spec, w = self.spec, self.widget
        if self.set_box is not None and not self.set_box.isChecked():
            return None
        if spec.kind == "bool":
            assert isinstance(w, QCheckBox)
            state = w.checkState()
            if state == Qt.CheckState.PartiallyChecked:
                return None
            return state == Qt.CheckState.Checked
        if spec.kind in ("int", "float"):
            assert isinstance(w, (IntSpin, FloatSpin))
            text = w.lineEdit().text().strip()
            try:
                return int(text) if spec.kind == "int" else float(text)
            except ValueError:
                raise _ParseError("enter a number") from None
        if spec.kind == "enum":
            assert isinstance(w, QComboBox)
            return w.currentData()
        assert isinstance(w, QLineEdit)
        text = w.text().strip()
        if spec.kind == "text":
            return None if (text == "" and spec.optional) else w.text()
        if text == "" and spec.optional:
            return None
        if spec.kind == "list":
            parts = [p.strip() for p in text.split(",") if p.strip()]
            item_type = spec.schema.get("items", {}).get("type")
            out: list[Any] = []
            for p in parts:
                try:
                    out.append(int(p) if item_type == "integer" else float(p) if item_type == "number" else p)
                except ValueError:
                    raise _ParseError(f"'{p}' is not a number") from None
            return out
        try:
            value = yaml.safe_load(text) if text else None
            # a typed value is one parameter: bound its nesting and size as a recipe's are bounded
            check_structure(value, "value", None, max_depth=32, max_nodes=100_000)
            return value
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise _ParseError(f"not valid YAML/JSON: {problem}") from None
        except RecursionError:
            raise _ParseError("nested too deeply") from None
        except BadInput as exc:
            raise _ParseError(exc.problem) from None

    def set_error(self, message: str) -> None:
        self.error.setText(message)
        self.error.setVisible(bool(message))
        self.widget.setStyleSheet("border: 1px solid #d32f2f;" if message else "")


class ParamForm(QWidget):
    """Editors for one Params class; emits `params_edited(dict)` with each valid edit."""

    params_edited = Signal(dict)  # the explicit params, valid against the Params class
    validity_changed = Signal(bool)

    def __init__(
        self, params_cls: type[BaseModel], values: dict[str, Any] | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.params_cls = params_cls
        self.specs = field_specs(params_cls)
        self._editors: dict[str, _FieldEditor] = {}
        self._explicit: set[str] = set()
        self._loading = False
        self._valid = True
        self._last: dict[str, Any] = {}
        self._extra: dict[str, Any] = {}  # keys the Params class does not know (validation names them)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.form = QFormLayout()
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        layout.addLayout(self.form)
        for spec in self.specs:
            editor = _FieldEditor(spec, self._edited, self._finished)
            label = QLabel(spec.title + ("" if not spec.required else " *"))
            label.setToolTip(spec.description)
            label.setBuddy(editor.widget)
            self.form.addRow(label, editor.container)
            self._editors[spec.name] = editor
        if not self.specs:
            none = QLabel("This technique has no parameters.")
            none.setEnabled(False)
            self.form.addRow(none)
        self.error_label = QLabel()
        self.error_label.setObjectName("param-form-error")
        self.error_label.setStyleSheet(ERROR_STYLE)
        self.error_label.setWordWrap(True)
        self.error_label.hide()
        layout.addWidget(self.error_label)
        self.set_values(values or {})

    # ---------------------------------------------------------------------------- public

    def _labels(self) -> list[QWidget]:
        out = []
        for row in range(self.form.rowCount()):
            item = self.form.itemAt(row, QFormLayout.ItemRole.LabelRole)
            if item is not None and item.widget() is not None:
                out.append(item.widget())
        return out

    def label_width(self) -> int:
        return max((label.sizeHint().width() for label in self._labels()), default=0)

    def set_label_width(self, width: int) -> None:
        """Align the fields of forms shown one above the other."""
        for label in self._labels():
            label.setMinimumWidth(width)
            if isinstance(label, QLabel):
                label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def editor(self, name: str) -> QWidget:
        """The editing widget of a field (tests and keyboard focus use it)."""
        return self._editors[name].widget

    def unset_box(self, name: str) -> QCheckBox | None:
        return self._editors[name].set_box

    def field_error(self, name: str) -> str:
        return self._editors[name].error.text()

    def error(self) -> str:
        """Every current problem, or "" when the form is valid."""
        parts = [f"{e.spec.title}: {e.error.text()}" for e in self._editors.values() if e.error.text()]
        if self.error_label.text():
            parts.append(self.error_label.text())
        return "; ".join(parts)

    def is_valid(self) -> bool:
        return self._valid

    def values(self) -> dict[str, Any]:
        """The last valid explicit params (what the document holds after an edit)."""
        return copy.deepcopy(self._last)

    def set_values(self, values: dict[str, Any]) -> None:
        """Show params from the document (opening a step, undo): no signal is emitted."""
        self._loading = True
        try:
            known = {s.name for s in self.specs}
            self._explicit = {k for k in values if k in known}
            self._extra = {k: v for k, v in values.items() if k not in known}
            for spec in self.specs:
                self._editors[spec.name].show(copy.deepcopy(values.get(spec.name, spec.default)))
        finally:
            self._loading = False
        self._last = copy.deepcopy(dict(values))
        self._validate(emit=False)

    # ---------------------------------------------------------------------------- validation

    def _edited(self, editor: _FieldEditor) -> None:
        if self._loading:
            return
        self._explicit.add(editor.spec.name)
        self._validate(emit=True)

    def _finished(self, editor: _FieldEditor) -> None:
        """Leaving a spin box with a wrong number puts back the last valid one (what the document holds)."""
        if not editor.error.text():
            return
        name = editor.spec.name
        self._loading = True
        try:
            editor.show(copy.deepcopy(self._last.get(name, editor.spec.default)))
        finally:
            self._loading = False
        if name not in self._last:
            self._explicit.discard(name)
        self._validate(emit=False)

    def _validate(self, emit: bool) -> None:
        errors: dict[str, str] = {}
        data: dict[str, Any] = dict(self._extra)
        for spec in self.specs:
            if spec.name not in self._explicit and not spec.required:
                continue
            try:
                data[spec.name] = self._editors[spec.name].read()
            except _ParseError as exc:
                errors[spec.name] = str(exc)
        general: list[str] = []
        if not errors:
            try:
                self.params_cls.model_validate(data)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = err.get("loc") or ()
                    name = str(loc[0]) if loc else ""
                    msg = err["msg"]
                    if err["type"] == "extra_forbidden":
                        general.append(f"unknown parameter '{name}'")
                    elif name in self._editors:
                        detail = ".".join(str(p) for p in loc[1:])
                        errors.setdefault(name, f"{detail}: {msg}" if detail else msg)
                    else:
                        general.append(msg.removeprefix("Value error, "))
        for name, editor in self._editors.items():
            editor.set_error(errors.get(name, "").removeprefix("Value error, "))
        self.error_label.setText("; ".join(general))
        self.error_label.setVisible(bool(general))
        valid = not errors and not general
        if valid != self._valid:
            self._valid = valid
            self.validity_changed.emit(valid)
        if valid and emit and data != self._last:
            self._last = copy.deepcopy(data)
            self.params_edited.emit(copy.deepcopy(data))
