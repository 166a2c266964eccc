"""The graph's per-node values and a structural diff as tables, written as CSV or JSON, and per-node
values read back from a JSON file: what `model-studio graph --csv` / `diff --csv` write and the Graph tab
exports and loads as an overlay.

Files are written atomically (a temporary file in the same folder, renamed over the target), so a
spreadsheet or script watching the file never reads half a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from studio.errors import BadInput
from studio.inspection.graph import Graph
from studio.safe_files import MB, check_structure, make_parent_folder, read_text

NODE_COLUMNS = ("name", "op", "group", "precision", "time_share", "error")
DIFF_COLUMNS = (
    "kind",
    "name",
    "side",
    "mark",
    "change",
    "op_a",
    "op_b",
    "matched",
    "cosine",
    "relative_error",
)
MAX_VALUES_FILE = 64 * MB


def node_rows(
    graph: Graph, shares: Mapping[str, float] | None = None, errors: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Every node as `graph --json` lists it, with its time share (None without a profile; 0 for a node
    the profiler did not see) and error (the largest layer error of the modules whose weights it reads)."""
    shares, errors = shares or {}, errors or {}
    rows = []
    for n in graph.nodes:
        own = [errors[m] for m in n.modules() if m in errors] or (
            [errors[n.name]] if n.name in errors else []
        )
        row = n.to_dict()
        row.update(time_share=shares.get(n.name, 0.0 if shares else None), error=max(own) if own else None)
        rows.append(row)
    return rows


def onto_graph(values: Mapping[str, float], graph: Graph) -> tuple[dict[str, float], float]:
    """Per-node values with the names the graph does not have put on the node they were made from:
    ONNX Runtime fuses some nodes when it loads a graph and profiles the fused kernel under the old node's
    name plus a suffix (`.../self/MatMul/MatMulScaleFusion/`), so it is given to `.../self/MatMul`. The
    values that match no node (`BiasGelu_token_7`) are summed into the second result."""
    names = {n.name for n in graph.nodes}
    placed: dict[str, float] = {}
    unplaced = 0.0
    for name, value in values.items():
        target = name
        while target and target not in names:
            target = target.rstrip("/").rpartition("/")[0] if "/" in target.rstrip("/") else ""
        if target:
            placed[target] = placed.get(target, 0.0) + value
        else:
            unplaced += value
    return placed, unplaced


def diff_marks(structure: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Node name -> "removed" / "changed" in A, and -> "added" / "changed" in B, from `graph_diff`; in a
    torch against ONNX diff the ONNX side's nodes no torch module stands for are "plumbing"."""
    a = {name: "removed" for name in structure["removed"]}
    b = {name: "added" for name in structure["added"]}
    plumbing = structure.get("plumbing") or []
    side = a if structure.get("plumbing_side") == "A" else b
    side.update({name: "plumbing" for name in plumbing})
    for c in structure["changed"]:
        b[c["b"]] = "changed"
        for name in c["a"]:
            a[name] = "changed"
    return a, b


def diff_rows(
    structure: Mapping[str, Any] | None, layers: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """One row per layer compared (kind "layer") and per node the structural diff marks (kind "node")."""
    rows: list[dict[str, Any]] = [
        {
            "kind": "layer",
            "name": x["name"],
            "cosine": x.get("cosine"),
            "relative_error": x.get("relative_error"),
        }
        for x in layers
    ]
    if structure is None:
        return rows
    for name in structure["added"]:
        rows.append({"kind": "node", "name": name, "side": "B", "mark": "added"})
    for name in structure["removed"]:
        rows.append({"kind": "node", "name": name, "side": "A", "mark": "removed"})
    for name in structure.get("plumbing") or []:
        rows.append(
            {"kind": "node", "name": name, "side": structure.get("plumbing_side"), "mark": "plumbing"}
        )
    for c in structure["changed"]:
        rows.append(
            {
                "kind": "node",
                "name": c["b"],
                "side": "B",
                "mark": "changed",
                "change": c["change"],
                "op_a": c["op_a"],
                "op_b": c["op_b"],
                "matched": " ".join(c["a"]),
            }
        )
    return rows


def table_text(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV (these columns, lists joined by spaces) for a `.csv` path, else a JSON list of the rows whole."""
    if path.suffix.lower() != ".csv":
        return json.dumps(list(rows), indent=1) + "\n"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, (list, tuple)):
                value = " ".join(str(v) for v in value)
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return out.getvalue()


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write the rows (see `table_text`) to `path` atomically; BadInput when the place cannot be written."""
    path = Path(path).expanduser()
    make_parent_folder(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("x", encoding="utf-8", newline="") as fh:
            fh.write(table_text(path, rows, columns))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"cannot write the table ({exc.strerror or exc})", path=path) from exc
    return path


def read_node_values(path: str | Path) -> dict[str, float]:
    """Per-node values from a JSON file `{node name: number}` (any measure a user computed elsewhere);
    BadInput naming the first entry that is not a finite number."""
    text = read_text(path, "values file", MAX_VALUES_FILE)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"the values file is not JSON ({exc.msg}, line {exc.lineno})", path=path) from exc
    check_structure(data, "values file", path, max_depth=2, max_nodes=2_000_000)
    if not isinstance(data, dict):
        raise BadInput("the values file must hold one JSON object: {node name: number}", path=path)
    out = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"the value of {name!r} is not a finite number: {value!r}", path=path)
        out[str(name)] = float(value)
    return out
