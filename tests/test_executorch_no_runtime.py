"""A `.pte` asked to run in a process where ExecuTorch's runtime cannot be imported: `model-studio compare`
of a program variant exits with 2 (an input this installation cannot use) and a message naming the
program, what is missing and the pip command that installs it.

The process is real: a `sitecustomize` first on its PYTHONPATH makes the imports of `executorch.runtime`
(or only of its native extension, `executorch.extension.pybindings`, as when the wheel's binary is
missing) fail as for an absent module, while the rest of the executorch package still imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from studio.checkpoints import open_checkpoint
from studio.evaluation.executorch_runner import NO_RUNTIME
from studio.techniques.base import initial_state
from studio.variants import Workspace
from tests.conftest import run_step

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class NoExecuTorchRuntime(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NoExecuTorchRuntime())
"""


@pytest.fixture(scope="module")
def workspace(bert_classifier, tmp_path_factory):
    """A workspace holding the classifier (A) and its ExecuTorch program (B), made where the runtime works."""
    root = tmp_path_factory.mktemp("et-ws")
    model = open_checkpoint(str(bert_classifier))
    state = run_step(model, initial_state(model), "export.executorch", root / "work")
    ws = Workspace(root / "ws")
    with ws.job_folder() as job:
        shutil.copytree(bert_classifier, job / "a")
        a = ws.commit_variant(
            job / "a", kind="torch", parent=None, model=str(bert_classifier), recipe={}, metrics={}
        )
    with ws.job_folder() as job:
        shutil.copytree(state.path.parent, job / "b")
        b = ws.commit_variant(
            job / "b", kind="executorch", parent=a["id"], model=str(bert_classifier), recipe={}, metrics={}
        )
    return ws, a, b


@pytest.mark.parametrize("blocked", ["executorch.runtime", "executorch.extension.pybindings"])
def test_running_a_program_without_the_runtime_exits_2_naming_what_to_install(workspace, tmp_path, blocked):
    ws, a, b = workspace
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER.format(blocked=blocked)))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    compare = ["compare", a["id"], b["id"], "--workspace", str(ws.root), "--no-weights", "--examples", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "studio", *compare, "--data", "builtin:sentences"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert f"{b['artifact']}: this ExecuTorch program cannot run here: {NO_RUNTIME}" in message
    assert "pip install executorch==1.5.1" in message
    assert "import executorch.runtime failed" in message and blocked in message
