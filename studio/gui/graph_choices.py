"""What the Graph tab can show: the open model and its variants in the workspace, or any checkpoint
chosen through `set_variant`/`set_diff`, named by a choice key ("source:<checkpoint>" or "row:<variant
id>"), and the opening of the checkpoint a key names. `ChoicesMixin` is one part of `GraphView`.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QComboBox

from studio.gui.document import StudioDocument
from studio.variant_rows import label as row_label
from studio.variant_rows import model_names


def open_choice(key: str, document: StudioDocument) -> Any:
    """The checkpoint a choice key names: "source:<checkpoint>" (the document's own open model when it is
    that one) or "row:<variant id>" of the workspace."""
    kind, _, ref = key.partition(":")
    if kind == "source":
        if document.model is not None and ref == document.source:
            return document.model
        from studio.checkpoints import open_checkpoint

        return open_checkpoint(ref, trust=document.trusted and ref == document.source)
    from studio.compare import open_row

    return open_row(document.workspace.get(ref), trust=False)


class ChoicesMixin:
    """The variant and diff menus of `GraphView`."""

    document: StudioDocument
    variant_combo: QComboBox
    diff_combo: QComboBox
    pane_combo: QComboBox
    _extra_choices: dict[str, str]

    def choices(self) -> list[tuple[str, str]]:
        """(name, key) of every graph there is to show: the open model, its variants in the workspace, and
        any checkpoint chosen through `set_variant`/`set_diff`."""
        out: list[tuple[str, str]] = []
        source = self.document.source
        if self.document.model is not None and source:
            out.append((f"original {model_names([source])[source]}", f"source:{source}"))
            try:
                rows = self.document.workspace.list()
            except Exception:  # a workspace that cannot be listed still leaves the open model to show
                rows = []
            for row in rows:
                if row.get("model") == source and row["kind"] != "baseline" and not row.get("missing"):
                    out.append((f"{row_label(row)} ({row['kind']})", f"row:{row['id']}"))
        known = {k for _, k in out}
        out += [(name, key) for key, name in self._extra_choices.items() if key not in known]
        return out

    def refresh_choices(self) -> None:
        choices = self.choices()
        for combo, first in (
            (self.variant_combo, None),
            (self.diff_combo, ("no diff", "")),
            (self.pane_combo, ("add a pane…", "")),
        ):
            kept = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            if first is not None:
                combo.addItem(*first)
            for name, key in choices:
                combo.addItem(name, key)
            index = combo.findData(kept) if kept is not None else -1
            combo.setCurrentIndex(max(0, index))
            combo.blockSignals(False)

    def _add_choice(self, key: str) -> None:
        if key not in {k for _, k in self.choices()}:
            ref = key.partition(":")[2]
            self._extra_choices[key] = model_names([ref])[ref] if key.startswith("source:") else ref
            self.refresh_choices()
