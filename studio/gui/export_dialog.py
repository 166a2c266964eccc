"""File > Export: copy a variant out of the workspace as an ONNX graph, a TensorRT engine, an OpenVINO IR or a
transformers folder, or write an HTML report of several variants.

A format that cannot apply to the chosen variant is shown disabled with the reason beside it (and as its
tooltip), so the user learns what to change instead of meeting an error after pressing Export. Exporting
copies files and, for transformers folders, loads the copy with plain transformers to prove it works, so
it runs on a pool thread; its outcome (the path, or the error) is shown in the dialog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from studio.gui.document import StudioDocument
from studio.gui.widgets import run_task, work_pool
from studio.variant_rows import label

FORMAT_TITLES = {
    "onnx": "ONNX graph (model.onnx)",
    "tensorrt": "TensorRT engine (.engine)",
    "openvino": "OpenVINO IR (model.xml + model.bin)",
    "hf": "Transformers folder (from_pretrained)",
}
KIND_FOR_FORMAT = {"onnx": "onnx", "tensorrt": "tensorrt", "openvino": "openvino", "hf": "torch"}
HINTS = {
    "onnx": "ONNX export needs an ONNX variant: add export.onnx to the pipeline",
    "tensorrt": "TensorRT export needs a TensorRT variant: add export.onnx and export.tensorrt to the pipeline",
    "openvino": "OpenVINO export needs an OpenVINO variant: add export.onnx and export.openvino to the pipeline",
    "hf": "a transformers folder needs a torch variant (a pipeline without export steps)",
}


def tensorrt_availability() -> tuple[bool, str | None]:
    """The export.tensorrt technique's own answer (the TensorRT package and an NVIDIA GPU)."""
    from studio.techniques.base import get_technique

    return get_technique("export.tensorrt")().availability()


def format_problem(
    row: dict[str, Any] | None, fmt: str, trt: tuple[bool, str | None] | None = None
) -> str | None:
    """Why `fmt` cannot export `row`, or None when it can."""
    return "; ".join(format_problems(row, fmt, trt)) or None


def format_problems(
    row: dict[str, Any] | None, fmt: str, trt: tuple[bool, str | None] | None = None
) -> list[str]:
    """Each reason `fmt` cannot export `row` (the machine, the variant's kind, missing files)."""
    if row is None:
        return ["no variant chosen"]
    reasons = []
    if fmt == "tensorrt":
        ok, why = trt if trt is not None else tensorrt_availability()
        if not ok:
            reasons.append(f"TensorRT is not available here: {why}")
    if row["kind"] == "baseline":
        reasons.append("this is the original model, not a variant: export it from its own files")
    elif row["kind"] != KIND_FOR_FORMAT[fmt]:
        article = "an" if row["kind"][:1] in ("a", "e", "i", "o", "u") else "a"
        reasons.append(f"this is {article} {row['kind']} variant: {HINTS[fmt]}")
    if row.get("missing"):
        reasons.append("the variant's files are gone from the workspace")
    return reasons


class ExportDialog(QDialog):
    """Export one variant (choose which, the format and the target folder) or write a report."""

    exported = Signal(dict)  # export_variant's result
    failed = Signal(str)
    report_written = Signal(str)

    def __init__(
        self,
        document: StudioDocument,
        variant_id: str | None,
        parent: QWidget | None = None,
        report_ids: list[str] | None = None,
    ) -> None:
        super().__init__(parent)
        self.document = document
        self.report_ids = list(report_ids or [])
        self.setWindowTitle("Export variant")
        self.setMinimumWidth(640)
        self._task: Any = None
        self._report_task: Any = None
        self._trt = tensorrt_availability()
        self.rows = [r for r in document.workspace.list()]
        self.result: dict[str, Any] | None = None
        self._build()
        self._fill_variants(variant_id)

    # ---------------------------------------------------------------------------- layout

    def _build(self) -> None:
        self.variant_combo = QComboBox()
        self.variant_combo.setToolTip("The variant to export")
        self.variant_combo.currentIndexChanged.connect(lambda _i: self._on_variant())
        self.variant_info = QLabel("")
        self.variant_info.setWordWrap(True)
        self.variant_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        box = QGroupBox("Format")
        formats = QVBoxLayout(box)
        self.format_group = QButtonGroup(self)
        self.format_buttons: dict[str, QRadioButton] = {}
        self.reason_labels: dict[str, QLabel] = {}
        for fmt, title in FORMAT_TITLES.items():
            button = QRadioButton(title)
            reason = QLabel("")
            reason.setWordWrap(True)
            reason.setEnabled(False)  # drawn in the disabled (grey) text colour
            reason.setContentsMargins(24, 0, 0, 4)  # under the button's text, past its indicator
            self.format_group.addButton(button)
            self.format_buttons[fmt] = button
            self.reason_labels[fmt] = reason
            formats.addWidget(button)
            formats.addWidget(reason)
            button.toggled.connect(lambda _on: self._update_buttons())

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a new (or empty) folder to copy the files into")
        self.folder_edit.textChanged.connect(lambda _t: self._update_buttons())
        self.browse_button = QPushButton("Choose…")
        self.browse_button.clicked.connect(self.choose_folder)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.browse_button)

        form = QFormLayout()
        form.addRow("Variant:", self.variant_combo)
        form.addRow("", self.variant_info)

        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # busy: copying has no useful fraction
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.export_button = QPushButton("Export")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.export)
        self.report_button = QPushButton("Write HTML report…")
        self.report_button.setToolTip(
            "One HTML file with the table and plots of the selected variants (all variants when none is selected)"
        )
        self.report_button.clicked.connect(self.choose_report)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.addButton(self.export_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.report_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.reject)

        folder_box = QGroupBox("Output folder")
        QVBoxLayout(folder_box).addLayout(folder_row)

        layout = QVBoxLayout(self)
        # setMinimumWidth above stops the default constraint from giving the dialog the layout's minimum
        # height, so it could be squashed until the labels overlapped: make that minimum explicit
        layout.setSizeConstraint(QLayout.SizeConstraint.SetMinimumSize)
        layout.addLayout(form)
        layout.addWidget(box)
        layout.addWidget(folder_box)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        layout.addStretch(1)
        layout.addWidget(buttons)

    def _fill_variants(self, variant_id: str | None) -> None:
        self.variant_combo.blockSignals(True)
        for row in reversed(self.rows):  # newest first
            self.variant_combo.addItem(
                f"{label(row)}  ({row['kind'] if row['kind'] != 'baseline' else 'original'})", row["id"]
            )
            self.variant_combo.setItemData(
                self.variant_combo.count() - 1, row["id"], Qt.ItemDataRole.ToolTipRole
            )
        index = self.variant_combo.findData(variant_id) if variant_id else -1
        if index < 0:
            index = next(
                (
                    i
                    for i in range(self.variant_combo.count())
                    if self._row(self.variant_combo.itemData(i))["kind"] != "baseline"
                ),
                0,
            )
        self.variant_combo.setCurrentIndex(index if self.variant_combo.count() else -1)
        self.variant_combo.blockSignals(False)
        self._on_variant()

    # ---------------------------------------------------------------------------- state

    def _row(self, vid: str | None) -> dict[str, Any]:
        return next((r for r in self.rows if r["id"] == vid), {})

    def variant(self) -> dict[str, Any] | None:
        row = self._row(self.variant_combo.currentData())
        return row or None

    def set_variant(self, vid: str) -> bool:
        index = self.variant_combo.findData(vid)
        if index >= 0:
            self.variant_combo.setCurrentIndex(index)
        return index >= 0

    def format_enabled(self, fmt: str) -> bool:
        return self.format_buttons[fmt].isEnabled()

    def format_reason(self, fmt: str) -> str:
        return self.format_buttons[fmt].toolTip() if not self.format_enabled(fmt) else ""

    def selected_format(self) -> str | None:
        return next((f for f, b in self.format_buttons.items() if b.isChecked() and b.isEnabled()), None)

    def set_format(self, fmt: str) -> bool:
        button = self.format_buttons[fmt]
        if not button.isEnabled():
            return False
        button.setChecked(True)
        return True

    def set_output_folder(self, path: str | Path) -> None:
        self.folder_edit.setText(str(path))

    def output_folder(self) -> Path | None:
        text = self.folder_edit.text().strip()
        return Path(text).expanduser() if text else None

    def _on_variant(self) -> None:
        row = self.variant()
        if row is None:
            self.variant_info.setText("The workspace has no variants yet: run a pipeline first.")
        else:
            steps = (
                " → ".join(s["technique"] for s in (row.get("recipe") or {}).get("steps", [])) or "no steps"
            )
            self.variant_info.setText(f"{row['id']} · {row['kind']} · {steps}")
        first_ok = None
        for fmt, button in self.format_buttons.items():
            problems = format_problems(row, fmt, self._trt)
            problem = "; ".join(problems) or None
            button.setEnabled(problem is None)
            button.setToolTip(problem or f"Export as {FORMAT_TITLES[fmt]}")
            self.reason_labels[fmt].setText("\n".join(problems))
            self.reason_labels[fmt].setVisible(problem is not None)
            self.reason_labels[fmt].setToolTip(problem or "")
            if problem is None and first_ok is None:
                first_ok = fmt
        if self.selected_format() is None:
            self.format_group.setExclusive(False)
            for button in self.format_buttons.values():
                button.setChecked(False)
            self.format_group.setExclusive(True)
            if first_ok is not None:
                self.format_buttons[first_ok].setChecked(True)
        self._update_buttons()
        self.adjustSize()

    def _update_buttons(self) -> None:
        busy = self._task is not None
        self.export_button.setEnabled(
            not busy and self.selected_format() is not None and self.output_folder() is not None
        )
        self.report_button.setEnabled(self._report_task is None and bool(self.rows))

    # ---------------------------------------------------------------------------- export

    def choose_folder(self) -> None:
        row = self.variant()
        start = str(Path.home())
        chosen = QFileDialog.getExistingDirectory(self, "Export into folder", start)
        if not chosen:
            return
        path = Path(chosen)
        if path.is_dir() and any(path.iterdir()) and row is not None:
            path = path / f"{row['id']}-{self.selected_format() or 'export'}"  # a new folder inside
        self.set_output_folder(path)

    def export(self) -> Any:
        """Start exporting; the outcome arrives as `exported` or `failed` and is shown in the dialog."""
        from studio.export import export_variant

        row, fmt, out = self.variant(), self.selected_format(), self.output_folder()
        if row is None or fmt is None or out is None:
            self._show_error("Choose a variant, a format and an output folder first.")
            return None
        workspace, vid = self.document.workspace, row["id"]
        self._set_message(f"Exporting {label(row)} as {FORMAT_TITLES[fmt]}…", "")
        self.progress.show()
        self._task = run_task(
            lambda: export_variant(workspace, vid, fmt, out),
            on_done=self._on_done,
            on_error=self._on_error,
            pool=work_pool(),
        )
        self._update_buttons()
        return self._task

    def _on_done(self, token: int, result: dict[str, Any]) -> None:
        if self._task is None or token != self._task.token:
            return
        self._task = None
        self.progress.hide()
        self.result = result
        files = result.get("files", [])
        shown = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
        self._set_message(f"Exported to {result['out']}\n{len(files)} files: {shown}", "color: #2e7d32;")
        self._update_buttons()
        self.document.status.emit(f"Exported {result['id']} to {result['out']}")
        self.exported.emit(result)

    def _on_error(self, token: int, message: str) -> None:
        if self._task is None or token != self._task.token:
            return
        self._task = None
        self.progress.hide()
        self._show_error(f"Export failed: {message}")
        self._update_buttons()
        self.failed.emit(message)

    def _set_message(self, text: str, style: str = "") -> None:
        """Show `text` below the form and grow the dialog to fit it: word-wrapped labels have no minimum
        height, so a longer message in a dialog of the old height drew the labels over each other (the
        TensorRT explanation over itself after an export)."""
        self.message.setText(text)
        self.message.setStyleSheet(style)
        layout = self.layout()
        if layout is not None:
            layout.activate()
            width = self.width()
            needed = layout.totalHeightForWidth(width) if layout.hasHeightForWidth() else -1
            needed = max(needed, layout.totalMinimumSize().height(), self.sizeHint().height())
            if needed > self.height():
                self.resize(width, needed)

    def _show_error(self, text: str) -> None:
        self._set_message(text, "color: #c62828;")

    # ---------------------------------------------------------------------------- report

    def report_rows(self) -> list[dict[str, Any]]:
        chosen = [r for r in self.rows if r["id"] in self.report_ids]
        return chosen or list(self.rows)

    def choose_report(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Write HTML report", "model-studio-report.html", "HTML (*.html)"
        )
        if path:
            self.write_report_to(path)

    def write_report_to(self, path: str | Path) -> Any:
        from studio.report import write_report

        rows = self.report_rows()
        self._set_message(f"Writing the report of {len(rows)} variants…", "")
        self.progress.show()
        self._report_task = run_task(
            lambda: write_report(rows, path),
            on_done=self._on_report,
            on_error=self._on_report_error,
            pool=work_pool(),
        )
        self._update_buttons()
        return self._report_task

    def _on_report(self, token: int, path: Path) -> None:
        if self._report_task is None or token != self._report_task.token:
            return
        self._report_task = None
        self.progress.setVisible(self._task is not None)
        self._set_message(f"Report written to {path}", "color: #2e7d32;")
        self._update_buttons()
        self.report_written.emit(str(path))

    def _on_report_error(self, token: int, message: str) -> None:
        if self._report_task is None or token != self._report_task.token:
            return
        self._report_task = None
        self.progress.setVisible(self._task is not None)
        self._show_error(f"The report failed: {message}")
        self._update_buttons()
        self.failed.emit(message)


def open_export_dialog(
    document: StudioDocument, parent: QWidget | None, variant_id: str | None = None
) -> ExportDialog:
    """File > Export: the dialog for `variant_id`, else the Compare tab's selection, else the newest variant.

    The dialog is window-modal and non-blocking (`open()`); it deletes itself when closed.
    """
    report_ids: list[str] = []
    compare = getattr(parent, "compare_view", None)
    if compare is None and hasattr(parent, "selected_ids"):
        compare = parent
    if compare is not None:
        report_ids = list(compare.selected_ids())
        if variant_id is None:
            variant_id = compare.current_variant_id()
    dialog = ExportDialog(document, variant_id, parent, report_ids=report_ids)
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    dialog.open()
    return dialog
