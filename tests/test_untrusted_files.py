"""Files someone else made: nothing in them runs, and every broken one is refused cleanly.

Each hostile input is built here: a real ExportedProgram saved by torch with one member rewritten to carry
a pickle (or a string torch would evaluate) whose payload creates a marker file; a pickled module named by
a recipe with `trust: true`; safetensors headers, ONNX graphs and configs that are malformed. Every case
asserts the marker never appears and that the CLI answers exit code 2 with one line. Where torch itself
would run the payload, a control proves it (so the file really is hostile and the test can fail).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from studio.cli import main
from studio.errors import BadInput


class Payload:
    """Unpickling this creates `marker`: the stand-in for any code a hostile file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("model-studio: error:"), captured.err
    return lines[0]


# ------------------------------------------------------------------------------------------ .pt2 archives


@pytest.fixture(scope="module")
def plain_pt2(tmp_path_factory) -> Path:
    """A small real ExportedProgram with a parameter, a buffer, a tensor constant and a dynamic batch."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)
            self.register_buffer("scale", torch.full((3,), 2.0))
            self.offset = torch.tensor([1.0, 2.0, 3.0])  # a tensor constant (lifted by export)

        def forward(self, x):
            return self.linear(x) * self.scale + self.offset

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


def _torch_save(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rewrite(src: Path, dst: Path, changes: dict[str, bytes | str]) -> Path:
    """Copy the archive with members replaced or added (names relative to its top folder)."""
    changes = dict(changes)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            tail = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, changes.pop(tail, None) or zin.read(info))
        for tail, data in changes.items():
            zout.writestr(f"{root}/{tail}", data)
    return dst


def _member_json(path: Path, tail: str):
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/", 1)[0]
        return json.loads(z.read(f"{root}/{tail}"))


WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
GRAPH = "models/model.json"


def _hostile_pt2(kind: str, plain: Path, folder: Path) -> tuple[Path, Path]:
    """(archive, marker): `plain` with the one part torch loads unsafely for `kind` made to run a payload."""
    marker = folder / f"ran-{kind}"
    payload = Payload(marker)
    if kind == "sample-inputs":  # torch retries torch.load(weights_only=False) when the safe load fails
        changes = {"data/sample_inputs/model.pt": _torch_save(payload)}
    elif kind == "pickled-weight":  # use_pickle weights are torch.load(weights_only=False)
        config = _member_json(plain, WEIGHTS)
        entry = config["config"]["linear.bias"]
        entry["use_pickle"] = True
        changes = {WEIGHTS: json.dumps(config), "data/weights/" + entry["path_name"]: _torch_save(payload)}
    elif kind == "pickled-constant":  # so are use_pickle tensor constants
        config = _member_json(plain, CONSTANTS)
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        changes = {
            CONSTANTS: json.dumps(config),
            "data/constants/" + entry["path_name"]: _torch_save(payload),
        }
    elif kind == "opaque-constant":  # opaque objects go through pickle.loads
        config = _member_json(plain, CONSTANTS)
        name = next(iter(config["config"]))
        config["config"][name] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
        changes = {CONSTANTS: json.dumps(config), "data/constants/opaque_obj_0": pickle.dumps(payload)}
    elif kind == "guards-code":  # compiled into the module's guard function, run on every call
        graph = _member_json(plain, GRAPH)
        graph["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]
        changes = {GRAPH: json.dumps(graph)}
    elif kind == "symbolic-shape":  # handed to sympy.sympify, which evaluates it
        graph = _member_json(plain, GRAPH)
        size = graph["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"__import__('pathlib').Path({str(marker)!r}).touch()"
        changes = {GRAPH: json.dumps(graph)}
    elif kind == "node-name":  # names are pasted into the forward's Python source, which torch executes
        evil = f"x=__import__('pathlib').Path({str(marker)!r}).touch()"

        def rename(value):
            if isinstance(value, dict):
                return {(evil if k == "x" else k): rename(v) for k, v in value.items()}
            if isinstance(value, list):
                return [rename(v) for v in value]
            return evil if value == "x" else value

        changes = {GRAPH: json.dumps(rename(_member_json(plain, GRAPH)))}
    else:
        raise AssertionError(kind)
    return _rewrite(plain, folder / f"{kind}.pt2", changes), marker


PT2_CASES = (
    "sample-inputs",
    "pickled-weight",
    "pickled-constant",
    "opaque-constant",
    "guards-code",
    "symbolic-shape",
    "node-name",
)


@pytest.mark.parametrize("kind", PT2_CASES)
def test_hostile_pt2_runs_nothing_on_any_path(plain_pt2, tmp_path, capsys, kind):
    import torch

    from studio.checkpoints import open_checkpoint

    archive, marker = _hostile_pt2(kind, plain_pt2, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodel: {archive}\ntrust: true\nsteps: []\n")

    line = one_error_line(capsys, ["inspect", str(archive)])
    assert str(archive) in line and "--trust" in line
    assert one_error_line(capsys, ["run", str(recipe), "--dry-run"])
    assert "never loads code" in one_error_line(capsys, ["run", str(recipe), "--dry-run", "--trust"])
    with pytest.raises(BadInput, match="--trust"):  # what the GUI's open calls; "--trust" makes it ask
        open_checkpoint(str(archive))
    assert not marker.exists()

    # control: torch's own loader runs the payload (loading, building the module, or calling it)
    with contextlib.suppress(Exception):  # the payload's return value then breaks the program: it already ran
        torch.export.load(str(archive)).module()(torch.randn(2, 4))
    assert marker.exists()


def test_trust_from_the_person_uses_torch_loader(plain_pt2, tmp_path, capsys):
    """`--trust` is the person's say: then the archive goes to torch's loader, payload and all."""
    archive, marker = _hostile_pt2("sample-inputs", plain_pt2, tmp_path)
    main(["inspect", str(archive), "--trust"])
    capsys.readouterr()
    assert marker.exists()


def test_plain_pt2_opens_and_runs_like_torch_loads_it(plain_pt2):
    import torch

    from studio.checkpoints import open_checkpoint

    model = open_checkpoint(plain_pt2)
    assert model.format == "exported-program" and model.runnable
    x = torch.randn(5, 4)  # another batch size: the dynamic dim survived
    expected = torch.export.load(str(plain_pt2)).module()(x)
    assert torch.equal(model.module(x), expected)
    names = {t.name for t in model.tensors()}
    assert {"linear.weight", "linear.bias", "scale"} <= names


def test_pt2_with_compiled_code_or_foreign_call_is_refused(plain_pt2, tmp_path, capsys):
    aoti = _rewrite(plain_pt2, tmp_path / "aoti.pt2", {"data/aotinductor/model/model.so": b"\x7fELF"})
    assert "compiled code" in one_error_line(capsys, ["inspect", str(aoti)])
    graph = _member_json(plain_pt2, GRAPH)
    graph["graph_module"]["graph"]["nodes"][-1]["target"] = "torch.save"  # resolvable, but not an operator
    foreign = _rewrite(plain_pt2, tmp_path / "foreign.pt2", {GRAPH: json.dumps(graph)})
    assert str(foreign) in one_error_line(capsys, ["inspect", str(foreign)])


def test_damaged_pt2_members_are_one_line(plain_pt2, tmp_path, capsys):
    config = _member_json(plain_pt2, WEIGHTS)
    entry = config["config"]["linear.weight"]
    entry["tensor_meta"]["sizes"] = [{"as_int": 300}, {"as_int": 4}]  # more than the member holds
    short = _rewrite(plain_pt2, tmp_path / "short.pt2", {WEIGHTS: json.dumps(config)})
    assert "truncated or damaged" in one_error_line(capsys, ["inspect", str(short)])
    entry["tensor_meta"]["sizes"] = [{"as_int": -3}, {"as_int": 4}]
    negative = _rewrite(plain_pt2, tmp_path / "negative.pt2", {WEIGHTS: json.dumps(config)})
    assert "bad size" in one_error_line(capsys, ["inspect", str(negative)])
    broken = _rewrite(plain_pt2, tmp_path / "broken.pt2", {GRAPH: "{not json"})
    assert "not valid JSON" in one_error_line(capsys, ["inspect", str(broken)])


def test_studio_saves_torch_variants_that_open_without_trust(tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.checkpoints.pt2_archive import audit
    from studio.techniques.torch_io import save_torch_variant

    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    files = save_torch_variant(module, [], tmp_path / "variant", None, (torch.randn(2, 4),))
    assert [f.name for f in files] == ["model.pt2"]
    audit(files[0])  # no pickled part, no guard code
    reopened = open_checkpoint(tmp_path / "variant")
    x = torch.randn(3, 4)
    assert torch.allclose(reopened.module(x), module(x))


# ------------------------------------------------------------------------------ trust comes from a person


@pytest.fixture
def pickled_module(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "ran-pickled-module"
    path = tmp_path / "module.pt"
    path.write_bytes(_torch_save(Payload(marker)))  # what a "whole module" pickle can do on load
    return path, marker


def test_recipe_trust_does_not_unpickle(pickled_module, tmp_path, capsys):
    from studio.pipeline import parse_recipe, plan
    from studio.worker import run_job

    path, marker = pickled_module
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodel: {path}\ntrust: true\nsteps: []\n")
    assert "--trust" in one_error_line(capsys, ["run", str(recipe), "--dry-run"])
    assert "never loads code" in one_error_line(capsys, ["run", str(recipe), "--dry-run", "--trust"])
    parsed = parse_recipe({"version": 1, "model": str(path), "trust": True, "steps": []})
    with pytest.raises(BadInput, match="--trust"):
        plan(parsed)
    out = io.StringIO()  # the worker honours the job's trust (set by the CLI / GUI), not the recipe's
    assert run_job({"recipe": parsed.model_dump(mode="json"), "workspace": str(tmp_path / "ws")}, out) == 2
    assert json.loads(out.getvalue().splitlines()[-1])["kind"] == "bad-input"
    assert not marker.exists()


def test_trust_reaches_the_worker_only_from_the_caller(tmp_path):
    import torch

    from studio.pipeline import parse_recipe, plan
    from studio.worker import WorkerClient

    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    recipe = parse_recipe({"version": 1, "model": str(path), "steps": []})
    assert plan(recipe, trust=True).model.format == "pickled-module"  # the person said so
    data = {**recipe.model_dump(mode="json"), "trust": True}
    assert WorkerClient(data, tmp_path, trust=True).job["trust"] is True
    assert WorkerClient(data, tmp_path, extra={"trust": True}).job["trust"] is False


def test_workspace_row_recipe_does_not_grant_trust(pickled_module):
    from studio.compare import open_row

    path, marker = pickled_module
    row = {
        "id": "base",
        "kind": "baseline",
        "model": str(path),
        "artifact": str(path),
        "recipe": {"trust": True},
    }
    with pytest.raises(BadInput, match="--trust"):
        open_row(row)
    assert not marker.exists()


def test_memory_probe_job_without_trust_does_not_unpickle(pickled_module):
    from studio.evaluation.memprobe import probe

    path, marker = pickled_module
    with pytest.raises(BadInput, match="--trust"):
        probe({"kind": "torch", "target": str(path), "batch_size": 1, "sequence_length": 8, "trust": "yes"})
    assert not marker.exists()


# ---------------------------------------------------------------------------------- safetensors headers


def _safetensors(path: Path, header: dict, data: bytes, *, raw_header: bytes | None = None) -> Path:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


F32 = "F32"
SAFETENSORS_CASES = {
    "reversed offsets": ({"a": {"dtype": F32, "shape": [4], "data_offsets": [16, 0]}}, 16),
    "overlapping": (
        {
            "a": {"dtype": F32, "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": F32, "shape": [4], "data_offsets": [8, 24]},
        },
        24,
    ),
    "gap": (
        {
            "a": {"dtype": F32, "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": F32, "shape": [2], "data_offsets": [16, 24]},
        },
        24,
    ),
    "negative offset": ({"a": {"dtype": F32, "shape": [4], "data_offsets": [-16, 0]}}, 16),
    "negative shape": ({"a": {"dtype": F32, "shape": [-4], "data_offsets": [0, 16]}}, 16),
    "size not dtype x shape": ({"a": {"dtype": F32, "shape": [3], "data_offsets": [0, 16]}}, 16),
    "shape overflows": ({"a": {"dtype": F32, "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, 16),
    "float shape": ({"a": {"dtype": F32, "shape": [4.0], "data_offsets": [0, 16]}}, 16),
    "unknown dtype": ({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, 16),
    "metadata not strings": (
        {"__metadata__": {"k": 1}, "a": {"dtype": F32, "shape": [4], "data_offsets": [0, 16]}},
        16,
    ),
    "nested too deep": (
        {"a": {"dtype": F32, "shape": [4], "data_offsets": [0, 16], "x": json.loads("[" * 300 + "]" * 300)}},
        16,
    ),
    "nested past the parser": (None, 16),  # raw header below: deeper than Python's JSON recursion
    "bytes not covered": ({"a": {"dtype": F32, "shape": [2], "data_offsets": [0, 8]}}, 16),
    "first tensor not at 0": ({"a": {"dtype": F32, "shape": [2], "data_offsets": [8, 16]}}, 16),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_header_the_library_refuses_is_refused(tmp_path, capsys, case):
    from safetensors import safe_open

    header, nbytes = SAFETENSORS_CASES[case]
    raw = b"{" * 5000 + b"}" * 5000 if header is None else None
    path = _safetensors(tmp_path / "w.safetensors", header or {}, bytes(range(nbytes)), raw_header=raw)
    with pytest.raises(Exception), safe_open(str(path), framework="numpy"):  # noqa: B017 - the library refuses it too
        pass
    assert "not a valid safetensors file" in one_error_line(capsys, ["inspect", str(path)])


def test_safetensors_library_accepted_header_still_opens(tmp_path):
    from studio.checkpoints import open_checkpoint

    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "U16", "shape": [2], "data_offsets": [8, 12]},
        "a": {"dtype": F32, "shape": [2], "data_offsets": [0, 8]},  # listed out of order: allowed
        "empty": {"dtype": F32, "shape": [0], "data_offsets": [12, 12]},
    }
    path = _safetensors(tmp_path / "w.safetensors", header, bytes(12))
    shapes = {t.name: t.shape for t in open_checkpoint(path).tensors()}
    assert shapes == {"a": (2,), "b": (2,), "empty": (0,)}


# ------------------------------------------------------------------------------------ ONNX graphs


def _onnx(folder: Path, *, dims=(4,), raw: bytes | None = None, external: dict | None = None, props=None):
    """A one-node graph (Y = X + W) with initializer W, written with onnx's own helpers."""
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(dims))
    if external is not None:
        weight.data_location = TensorProto.EXTERNAL
        for key, value in external.items():
            weight.external_data.add(key=key, value=str(value))
    else:
        weight.raw_data = raw if raw is not None else bytes(16)
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (props or {}).items():
        model.metadata_props.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_onnx_external_data_outside_missing_or_short(tmp_path, capsys):
    (tmp_path / "secret.bin").write_bytes(bytes(64))
    outside = _onnx(tmp_path / "a", external={"location": "../secret.bin", "length": 16})
    assert "outside the model's folder" in one_error_line(capsys, ["inspect", str(outside)])
    absolute = _onnx(tmp_path / "b", external={"location": str(tmp_path / "secret.bin"), "length": 16})
    assert "names external data" in one_error_line(capsys, ["inspect", str(absolute)])
    missing = _onnx(tmp_path / "c", external={"location": "w.bin", "length": 16})
    assert "missing" in one_error_line(capsys, ["inspect", str(missing)])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w.bin").write_bytes(bytes(10))
    short = _onnx(tmp_path / "d", external={"location": "w.bin", "length": 16})
    assert "too short" in one_error_line(capsys, ["inspect", str(short)])
    wrong = _onnx(tmp_path / "d", external={"location": "w.bin", "length": 8})
    assert "external data is 8 bytes" in one_error_line(capsys, ["inspect", str(wrong)])


def test_onnx_bad_dims_and_sizes(tmp_path, capsys):
    negative = _onnx(tmp_path / "a", dims=(-4,))
    assert "negative dimension" in one_error_line(capsys, ["inspect", str(negative)])
    huge = _onnx(tmp_path / "b", dims=(2**40, 2**40))
    assert "impossibly large" in one_error_line(capsys, ["inspect", str(huge)])
    short = _onnx(tmp_path / "c", raw=bytes(10))
    assert "holds 10 bytes" in one_error_line(capsys, ["inspect", str(short)])


@pytest.mark.parametrize(
    "props, expected",
    [
        ({"studio.weight_names": "{not json"}, "not valid JSON"),
        ({"studio.weight_names": '{"W": "linear.weight"}'}, "malformed entry"),
        ({"studio.weight_names": '{"W": {"parts": [["q", "yes"]], "axis": 0}}'}, "malformed entry"),
        ({"studio.config": "[1, 2]"}, "not a JSON object"),
        ({"studio.config": '{"model_type": "bert", "hidden_size": 8, "num_attention_heads": 0}'}, "positive"),
        ({"studio.family": "teleportation"}, "unknown family"),
        ({"studio.pooling": "max"}, "expected mean or cls"),
    ],
)
def test_onnx_malformed_studio_metadata(tmp_path, capsys, props, expected):
    path = _onnx(tmp_path / "m", props=props)
    assert expected in one_error_line(capsys, ["inspect", str(path)])


# ----------------------------------------------------------------------------------------- HF configs


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
        ({"num_attention_heads": 5}, "not a multiple of 'num_attention_heads'"),
        ({"hidden_size": -384}, "'hidden_size' must be a positive integer"),
        ({"num_hidden_layers": "six"}, "'num_hidden_layers' must be a non-negative integer"),
    ],
)
def test_config_with_impossible_sizes(tmp_path, capsys, changes, expected):
    from tests.conftest import minilm_dir

    config = json.loads((minilm_dir() / "config.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    (folder / "model.safetensors").symlink_to(minilm_dir() / "model.safetensors")
    assert expected in one_error_line(capsys, ["inspect", str(folder)])


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_safetensors_index_cannot_point_outside_the_folder(tmp_path, capsys, shard):
    from tests.conftest import minilm_dir

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((minilm_dir() / "config.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    assert "outside the folder" in one_error_line(capsys, ["inspect", str(folder)])
