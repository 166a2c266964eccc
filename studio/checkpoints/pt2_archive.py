"""ExportedProgram `.pt2` archives read without running anything from the file.

`torch.export.load` is not safe on a file from someone else: it retries `torch.load(weights_only=False)` on
the sample inputs when the safe load fails, unpickles weights and constants marked `use_pickle`, calls
`pickle.loads` on opaque constants, loads compiled AOTInductor libraries, hands the graph's symbolic shape
strings to `sympy.sympify` (which evaluates them) and compiles the `guards_code` strings into a function
that runs on every call. So the studio reads the archive's members itself: tensors from their raw bytes,
sample inputs with `torch.load(weights_only=True)`, the graph as JSON checked before torch deserializes it,
and it refuses (naming the member) anything that would need code from the file. Only a person's explicit
trust (`--trust`, the GUI's confirmation) sends a file to `torch.export.load` instead.
"""

from __future__ import annotations

import ast
import io
import json
import operator
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.errors import BadInput

TRUST_HINT = "open it with --trust only if you trust its source"

# Members whose presence means native or pickled code would be loaded.
_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_LEGACY_PICKLES = ("data/weights/model.pt", "data/constants/model.pt")

# The serialized ScalarType codes (torch/_export/serde/schema.py) -> torch dtype names.
_SCALAR_TYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    9: "complex32",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
    28: "uint16",
    29: "float8_e4m3fn",
    30: "float8_e5m2",
    31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz",
    33: "float8_e8m0fnu",
    34: "uint32",
    35: "uint64",
}

# The calls a symbolic shape may make: sympy's own constructors as `srepr` writes them, and the functions
# torch's deserializer adds (torch.utils._sympy.functions). Anything else is refused before sympify sees it.
_SYMPY_CALLS = frozenset(
    {
        "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
        "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
        "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
        "Piecewise", "ExprCondPair", "IntInfinity", "NegativeIntInfinity", "Infinity", "NegativeInfinity",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
        "ToFloat", "Identity",
    }
)  # fmt: skip
_SYMPY_STRING_TAKERS = frozenset({"Symbol", "Float"})  # a name / a decimal: neither is evaluated
_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.Tuple, ast.BinOp,
    ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


class Pt2Archive:
    """The members of one `.pt2` zip, named without the archive's top folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise BadInput(f"broken zip archive ({exc})", path=path) from exc
        roots = {n.split("/", 1)[0] for n in self._zip.namelist()}
        if len(roots) != 1 or any("/" not in n for n in self._zip.namelist()):
            self._zip.close()
            raise BadInput("not an ExportedProgram archive (members are not under one folder)", path=path)
        self.root = roots.pop()
        self.members = {n.split("/", 1)[1]: n for n in self._zip.namelist()}

    def __enter__(self) -> Pt2Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    def refuse(self, member: str, problem: str) -> BadInput:
        return BadInput(f"member '{member}' {problem}", path=self.path)

    def read(self, member: str) -> bytes:
        if member not in self.members:
            raise self.refuse(member, "is missing: a damaged or incomplete ExportedProgram archive")
        try:
            return self._zip.read(self.members[member])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:  # CRC errors, truncated members
            raise self.refuse(member, f"cannot be read ({exc})") from exc

    def read_json(self, member: str) -> Any:
        try:
            return json.loads(self.read(member))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise self.refuse(member, f"is not valid JSON ({type(exc).__name__})") from exc


def audit(path: Path) -> None:
    """Raise BadInput naming the first member that could only be loaded by running code from the file.
    Cheap (reads configs, not weights): the studio runs it on every `.pt2` it writes, too."""
    with Pt2Archive(path) as archive:
        _audit_members(archive)
        _audit_payloads(archive, "data/weights/model_weights_config.json", weights=True)
        _audit_payloads(archive, "data/constants/model_constants_config.json", weights=False)
        _audit_graph(archive, archive.read_json("models/model.json"))
        _load_sample_inputs(archive)


def read_exported_program(path: Path) -> Any:
    """The ExportedProgram in `path`, rebuilt without unpickling or evaluating anything from the file."""
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    with Pt2Archive(path) as archive:
        _audit_members(archive)
        graph_bytes = archive.read("models/model.json")
        try:
            graph = json.loads(graph_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise archive.refuse("models/model.json", f"is not valid JSON ({type(exc).__name__})") from exc
        _audit_graph(archive, graph)
        example_inputs = _load_sample_inputs(archive)
        state_dict = _load_payloads(archive, "data/weights/model_weights_config.json", weights=True)
        constants = _load_payloads(archive, "data/constants/model_constants_config.json", weights=False)
    artifact = SerializedArtifact(graph_bytes, state_dict, constants, example_inputs)  # type: ignore[arg-type]
    try:
        program = deserialize(artifact)
    except Exception as exc:  # torch's deserializer raises many types on a damaged graph
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"damaged ExportedProgram archive ({first})", path=path) from exc
    _check_graph_calls(program, path)
    return program


def _audit_members(archive: Pt2Archive) -> None:
    if "archive_format" not in archive.members or "archive_version" not in archive.members:
        raise BadInput(
            f"an ExportedProgram archive of an older or unknown layout; {TRUST_HINT}", path=archive.path
        )
    fmt = archive.read("archive_format").decode("utf-8", "replace").strip()
    version = archive.read("archive_version").decode("utf-8", "replace").strip()
    if fmt != "pt2" or version != "0":
        raise BadInput(
            f"ExportedProgram archive format '{fmt}' version '{version}' is not one this studio reads "
            f"safely (pt2, version 0); {TRUST_HINT}",
            path=archive.path,
        )
    if "byteorder" in archive.members and archive.read("byteorder").strip() not in (b"", b"little"):
        raise archive.refuse("byteorder", "says big-endian: not supported")
    for member in sorted(archive.members):
        if member.startswith(_CODE_DIRS):
            raise archive.refuse(member, f"holds compiled code, which loading would run; {TRUST_HINT}")
        if member in _LEGACY_PICKLES:
            raise archive.refuse(
                member, f"is an old-format pickle that only an unsafe unpickler loads; {TRUST_HINT}"
            )
    if "models/model.json" not in archive.members:
        raise BadInput("not an ExportedProgram archive (no models/model.json)", path=archive.path)


def _load_sample_inputs(archive: Pt2Archive) -> tuple[Any, ...] | None:
    import torch

    member = "data/sample_inputs/model.pt"
    if member not in archive.members:
        return None
    data = archive.read(member)
    if not data:
        return None
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler raises many types on pickled objects
        raise archive.refuse(
            member,
            f"holds pickled Python objects, not plain tensors; unpickling them could run code; {TRUST_HINT}",
        ) from exc
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
        raise archive.refuse(member, "is not an (args, kwargs) pair of example inputs")
    return value


def _payload_entries(archive: Pt2Archive, config_member: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if config_member not in archive.members:
        raise archive.refuse(config_member, "is missing: a damaged or incomplete ExportedProgram archive")
    config = archive.read_json(config_member)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise archive.refuse(config_member, "has no 'config' table")
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            raise archive.refuse(config_member, f"has a bad entry for '{fqn}'")
        if not _ATTRIBUTE_PATH.match(fqn) or not _ATTRIBUTE_PATH.match(entry["path_name"]):
            raise archive.refuse(config_member, f"names a tensor {fqn!r} that is not a plain attribute path")
        yield fqn, entry


def _audit_payloads(archive: Pt2Archive, config_member: str, *, weights: bool) -> None:
    folder = config_member.rsplit("/", 1)[0] + "/"
    for _fqn, entry in _payload_entries(archive, config_member):
        member = folder + entry["path_name"]
        if entry.get("use_pickle"):
            raise archive.refuse(member, f"is stored as a pickle, which loading would unpickle; {TRUST_HINT}")
        if not weights and not entry["path_name"].startswith("tensor_"):
            raise archive.refuse(member, f"is a pickled Python object, not a tensor; {TRUST_HINT}")
        if member not in archive.members:
            raise archive.refuse(member, "is missing: a damaged or incomplete ExportedProgram archive")


def _load_payloads(archive: Pt2Archive, config_member: str, *, weights: bool) -> dict[str, Any]:
    """Tensors rebuilt from raw bytes and their recorded layout; members shared by several names stay shared."""
    import torch

    _audit_payloads(archive, config_member, weights=weights)
    folder = config_member.rsplit("/", 1)[0] + "/"
    storages: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for fqn, entry in _payload_entries(archive, config_member):
        member = folder + entry["path_name"]
        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict):
            raise archive.refuse(config_member, f"has no tensor layout for '{fqn}'")
        dtype_name = _SCALAR_TYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        if dtype_name is None or not hasattr(torch, dtype_name):
            raise archive.refuse(
                config_member, f"has an unknown dtype code {meta.get('dtype')!r} for '{fqn}'"
            )
        dtype = getattr(torch, dtype_name)
        sizes = _ints(archive, config_member, fqn, meta.get("sizes"))
        strides = _ints(archive, config_member, fqn, meta.get("strides"))
        offset = _ints(archive, config_member, fqn, [meta.get("storage_offset")])[0]
        if len(strides) != len(sizes):
            raise archive.refuse(
                config_member, f"gives '{fqn}' {len(sizes)} sizes but {len(strides)} strides"
            )
        if member not in storages:
            data = archive.read(member)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(data) % itemsize:
                raise archive.refuse(
                    member, f"is {len(data)} bytes, not a whole number of {dtype_name} values"
                )
            storages[member] = (
                torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            )
        flat = storages[member]
        if flat.dtype != dtype:
            raise archive.refuse(config_member, f"reads '{member}' with two different dtypes")
        numel = 1
        for s in sizes:
            numel *= s
        extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) + 1 if numel else 0
        if numel and extent > flat.numel():
            if flat.numel() == 0:  # torch writes an all-zero tensor as an empty member
                flat = torch.zeros(numel, dtype=dtype)
                offset, strides = 0, _contiguous_strides(sizes)
            else:
                raise archive.refuse(
                    member,
                    f"holds {flat.numel()} values but '{fqn}' needs {extent}: truncated or damaged",
                )
        tensor = torch.as_strided(flat, sizes, strides, offset) if numel else torch.zeros(sizes, dtype=dtype)
        if weights and entry.get("is_param"):
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(meta.get("requires_grad")))
        out[fqn] = tensor
    return out


def _contiguous_strides(sizes: list[int]) -> list[int]:
    strides, step = [], 1
    for s in reversed(sizes):
        strides.append(step)
        step *= max(s, 1)
    return strides[::-1]


def _ints(archive: Pt2Archive, member: str, fqn: str, values: Any) -> list[int]:
    """Static sizes / strides / offsets (`{"as_int": n}`), each a non-negative int of sane size."""
    if not isinstance(values, list):
        raise archive.refuse(member, f"has no sizes/strides for '{fqn}'")
    out = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) else None
        if type(n) is not int or not 0 <= n < 1 << 48:
            raise archive.refuse(member, f"has a bad size, stride or offset {v!r} for '{fqn}'")
        out.append(n)
    return out


# Names torch pastes into the Python source it generates and executes (the module's forward, its guard
# function): node and argument names, forward argument names, attribute paths and constant string inputs.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATTRIBUTE_PATH = re.compile(r"(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?\Z")
_IDENTIFIER_KEYS = frozenset({"name", "as_name"})
_IDENTIFIER_LISTS = frozenset({"forward_arg_names", "field_names"})
_NAMED_TABLES = frozenset(
    {"tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values", "custom_obj_values"}
)
_PATH_KEYS = frozenset(
    {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "user_input_name", "fqn"}
)
_FREE_TEXT = frozenset({"metadata", "expr_str", "in_spec", "out_spec", "stack_trace", "target"})


def _bad_name(node: Any, depth: int = 0) -> str | None:
    """The first name in the graph JSON that is not a plain identifier (or attribute path), else None."""
    if depth > 200:
        raise RecursionError
    if isinstance(node, list):
        for value in node:
            if (found := _bad_name(value, depth + 1)) is not None:
                return found
        return None
    if not isinstance(node, dict):
        return None
    for key, value in node.items():
        if key in _FREE_TEXT:
            continue
        if (
            key in _IDENTIFIER_KEYS
            and value is not None
            and not (isinstance(value, str) and _IDENTIFIER.match(value))
        ):
            return repr(value)
        if key in _IDENTIFIER_LISTS and isinstance(value, list):
            bad = [v for v in value if not (isinstance(v, str) and _IDENTIFIER.match(v))]
            if bad:
                return repr(bad[0])
        if key in _PATH_KEYS and not (isinstance(value, str) and _ATTRIBUTE_PATH.match(value)):
            return repr(value)
        if key in _NAMED_TABLES or key == "range_constraints":
            bad = [k for k in (value if isinstance(value, dict) else {}) if not _IDENTIFIER.match(k)]
            if bad:
                return repr(bad[0])
        if key == "as_string" and not (isinstance(value, str) and _plain_literal(value, limit=1000)):
            return repr(value)
        if (found := _bad_name(value, depth + 1)) is not None:
            return found
    return None


def _audit_graph(archive: Pt2Archive, graph: Any) -> None:
    """The graph strings torch would evaluate: guards (compiled into Python), symbolic shapes (sympify) and
    the names it writes into the Python source of the module it builds."""
    member = "models/model.json"
    if not isinstance(graph, dict) or not isinstance(graph.get("graph_module"), dict):
        raise archive.refuse(member, "is not an ExportedProgram graph")
    if graph.get("guards_code"):
        raise archive.refuse(member, f"carries guard code, which torch would compile and run; {TRUST_HINT}")
    try:
        texts = list(_expression_strings(graph))
        bad_name = _bad_name(graph)
    except RecursionError as exc:
        raise archive.refuse(member, "is nested too deeply") from exc
    if bad_name is not None:
        shown = bad_name if len(bad_name) <= 60 else bad_name[:57] + "..."
        raise archive.refuse(
            member,
            f"has a name that is not a plain identifier ({shown}), which torch would run as code; {TRUST_HINT}",
        )
    for text in texts:
        if not _safe_sympy_expression(text):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise archive.refuse(
                member, f"has a symbolic shape that is not a plain expression ({shown!r}); {TRUST_HINT}"
            )


def _expression_strings(node: Any, depth: int = 0) -> Iterator[str]:
    if depth > 200:
        raise RecursionError
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr_str":
                yield value if isinstance(value, str) else repr(value)
            else:
                yield from _expression_strings(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            yield from _expression_strings(value, depth + 1)


def _safe_sympy_expression(text: str) -> bool:
    """True when `text` is arithmetic on symbols and numbers through sympy's own constructors only: no
    attribute, subscript or lambda, no call but the allow-listed ones, and a string only as the name of a
    Symbol or the digits of a Float."""
    if len(text) > 10_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    strings_allowed = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _SYMPY_STRING_TAKERS
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _plain_literal(arg.value)
    }
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Name) and (node.id.startswith("_") or not node.id.isidentifier()):
            return False
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
        ):
            return False
        if isinstance(node, ast.keyword) and not (
            node.arg is not None
            and isinstance(node.value, ast.Constant)
            and type(node.value.value) in (bool, int)
        ):
            return False
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in strings_allowed:
                return False
            if not isinstance(node.value, (int, float, bool, str)):
                return False
    return True


def _plain_literal(text: str, limit: int = 100) -> bool:
    """No quote, backslash or line break: nothing that could end the literal torch writes it into."""
    return len(text) <= limit and all(c.isalnum() or c in "_.-+ :/,=" for c in text)


_SYMBOLIC_OPS = frozenset(
    {
        operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt, operator.neg,
        operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
        operator.pow, operator.truediv, operator.and_, operator.or_, operator.lshift, operator.rshift,
        operator.getitem,
    }
)  # fmt: skip


def _check_graph_calls(program: Any, path: Path) -> None:
    """Every call in the graph must be a registered operator: torch's deserializer also accepts any callable
    it can reach by name under `torch`, `math` or `operator` (torch.load, torch.hub.load, ...)."""
    import math

    import torch

    allowed = _SYMBOLIC_OPS | {
        math.trunc,
        torch.sym_not,
        torch.sym_int,
        torch.sym_float,
        torch.sym_ite,
        torch.sym_max,
        torch.sym_min,
        torch.sym_sqrt,
    }
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
                continue
            if target in allowed:
                continue
            name = getattr(target, "__qualname__", None) or repr(target)
            raise BadInput(
                f"the ExportedProgram graph calls '{name}', which is not a tensor operator; {TRUST_HINT}",
                path=path,
            )
