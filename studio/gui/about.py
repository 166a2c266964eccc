"""Help > About and Help > Keyboard shortcuts: what is installed, which accelerators are seen, the keys.

The versions come from package metadata and the GPU from `nvidia-smi` when torch is not loaded yet, so
opening the About box imports nothing heavy.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
import sys

from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QVBoxLayout, QWidget

from studio.gui.widgets import fill_table, make_table

SHORTCUTS = [
    ("Ctrl+O", "Open a checkpoint file"),
    ("Ctrl+Shift+O", "Open a checkpoint folder"),
    ("Ctrl+S", "Save the pipeline"),
    ("Ctrl+R", "Run the pipeline"),
    ("Esc / Ctrl+.", "Cancel the running work"),
    ("Ctrl+Z / Ctrl+Shift+Z", "Undo / redo pipeline edits"),
    ("Ctrl+1 … Ctrl+5", "Switch tabs"),
    ("Ctrl+F", "Filter the layer tree"),
    ("Ctrl+Shift+P", "Open a pipeline (recipe)"),
    ("Ctrl+Shift+S", "Save the pipeline as…"),
    ("Ctrl+E", "Export a variant"),
    ("Ctrl+H", "Compute head importance"),
    ("F1", "This list of shortcuts"),
    ("Ctrl+Q", "Quit"),
]


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _cuda_gpu() -> str:
    """The CUDA GPU's name without importing torch when it is not loaded yet (nvidia-smi instead)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            return "none (torch sees no CUDA device)"
        except Exception as exc:  # a broken driver must not break the About box
            return f"none ({type(exc).__name__})"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=3
        )
    except (OSError, subprocess.SubprocessError):
        return "none (nvidia-smi failed)"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return ", ".join(names) if out.returncode == 0 and names else "none"


def environment_info() -> list[tuple[str, str]]:
    """Versions and accelerators, read from package metadata so that showing them imports nothing heavy."""
    from PySide6.QtCore import qVersion

    tensorrt = importlib.util.find_spec("tensorrt") is not None
    ort = sys.modules.get("onnxruntime")
    providers = ", ".join(ort.get_available_providers()) if ort is not None else "(loaded on first ONNX use)"
    return [
        ("Model Studio", _dist_version("model-studio")),
        ("Python", platform.python_version()),
        ("PyTorch (torch)", _dist_version("torch")),
        ("ONNX Runtime", _dist_version("onnxruntime", "onnxruntime-gpu")),
        ("Transformers", _dist_version("transformers")),
        ("ONNX", _dist_version("onnx")),
        ("torchao", _dist_version("torchao")),
        ("Qt", qVersion()),
        ("PySide6", _dist_version("PySide6-Essentials", "PySide6")),
        ("pyqtgraph", _dist_version("pyqtgraph")),
        ("CUDA GPU", _cuda_gpu()),
        (
            "TensorRT",
            f"importable ({_dist_version('tensorrt', 'tensorrt-cu12', 'tensorrt-cu13')})"
            if tensorrt
            else "not importable (install the tensorrt extra on a machine with an NVIDIA GPU)",
        ),
        ("ONNX Runtime providers", providers),
        ("Platform", f"{platform.system()} {platform.release()} ({platform.machine()})"),
    ]


class AboutDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About Model Studio")
        self.info = environment_info()
        header = QLabel(
            "<h3>Model Studio</h3>See inside a model checkpoint, build an optimization pipeline by hand, "
            "run it, and compare the variants."
        )
        header.setWordWrap(True)
        self.table = make_table(["Component", "Version / status"])
        fill_table(self.table, self.info, align_right_from=99)
        self.table.resizeColumnToContents(0)
        keys = make_table(["Shortcut", "Action"])
        fill_table(keys, SHORTCUTS, align_right_from=99)
        keys.resizeColumnToContents(0)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        copy = buttons.addButton("Copy versions", QDialogButtonBox.ButtonRole.ActionRole)
        copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.text()))
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(header)
        layout.addWidget(self.table, 3)
        layout.addWidget(QLabel("<b>Keyboard shortcuts</b>"))
        layout.addWidget(keys, 2)
        layout.addWidget(buttons)
        self.resize(760, 700)

    def text(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.info)


class ShortcutsDialog(QDialog):
    """Help > Keyboard Shortcuts: the same table as in About, on its own where people look for it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        self.table = make_table(["Shortcut", "Action"])
        fill_table(self.table, SHORTCUTS, align_right_from=99)
        self.table.resizeColumnToContents(0)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(buttons)
        self.resize(520, 380)
