"""PyTorch files: state dicts (`torch.load(weights_only=True)`), pickled modules (only when trusted),
TorchScript archives and ExportedProgram `.pt2` archives (read by `pt2_archive` without unpickling, or by
torch's own loader when trusted).

The kind of a zip archive is told from its member names before anything is unpickled.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.checkpoints.pt2_archive import read_exported_program
from studio.errors import BadInput


def archive_kind(path: Path) -> str:
    """'torchscript', 'exported-program', 'torch-zip' or 'legacy' (a pre-1.6 pickle stream or not torch)."""
    if not zipfile.is_zipfile(path):
        return "legacy"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInput(f"broken zip archive ({exc})", path=path) from exc
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "exported-program"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "torch-zip"
    raise BadInput("a zip file, but not a PyTorch checkpoint (no data.pkl inside)", path=path)


def _flatten_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Tensors of a (possibly nested) checkpoint dict, e.g. {'state_dict': {...}, 'epoch': 3}."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def _strip_common_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    for wrapper in ("state_dict.", "model_state_dict.", "model."):
        if tensors and all(k.startswith(wrapper) for k in tensors):
            return {k[len(wrapper) :]: v for k, v in tensors.items()}
    return tensors


def load_weights_only(path: Path) -> Any:
    import torch

    kind = archive_kind(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices about files we are about to refuse anyway
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise BadInput(
                "the file holds pickled Python objects (for example a whole module); unpickling them would "
                "run code from the file, so it was not loaded. Open it with --trust only if you trust its source",
                path=path,
            ) from exc
        raise BadInput(f"not a PyTorch checkpoint ({text.splitlines()[0]})", path=path) from exc
    except Exception as exc:  # the weights-only unpickler raises many types on foreign or damaged files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"not a PyTorch checkpoint or it is damaged ({first})", path=path) from exc


def _tensor_refs(tensors: dict[str, Any]) -> Iterator[TensorRef]:
    for name, t in tensors.items():
        yield TensorRef(
            name=name,
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            load=t.detach,
        )


def iter_state_dict_file(path: Path) -> Iterator[TensorRef]:
    """Weights of a state-dict file; memory-mapped so only touched tensors are paged in."""
    yield from _tensor_refs(_strip_common_prefix(_flatten_tensors(load_weights_only(path))))


def _module_tensors(module: Any) -> dict[str, Any]:
    return dict(module.state_dict())


def open_torch_file(path: Path, *, source: str, trust: bool) -> LoadedModel:
    import torch

    from studio.checkpoints.recognise import family_from_module, family_from_tensor_names

    kind = archive_kind(path)
    if kind == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise BadInput(f"damaged TorchScript archive ({str(exc).splitlines()[0]})", path=path) from exc
        return LoadedModel(
            source=source,
            path=path,
            format="torchscript",
            family=family_from_module(module),
            tensor_source=lambda: _tensor_refs(_module_tensors(module)),
            module_factory=lambda: module,
            architecture=getattr(module, "original_name", None),
        )
    if kind == "exported-program":
        program = _load_trusted_program(path) if trust else read_exported_program(path)
        try:
            module = program.module()
        except Exception as exc:  # unlifting a damaged graph raises many types
            raise BadInput(f"damaged ExportedProgram archive ({_first_line(exc)})", path=path) from exc
        return LoadedModel(
            source=source,
            path=path,
            format="exported-program",
            family=family_from_module(module),
            tensor_source=lambda: _tensor_refs(dict(program.state_dict)),
            module_factory=lambda: module,
            architecture="ExportedProgram",
            notes=[f"example inputs: {_describe_inputs(program)}"],
        )

    try:
        obj = load_weights_only(path)
    except BadInput:
        if not trust:
            raise
        obj = _load_trusted(path)
    if isinstance(obj, torch.nn.Module):
        module = obj
        return LoadedModel(
            source=source,
            path=path,
            format="pickled-module",
            family=family_from_module(module),
            tensor_source=lambda: _tensor_refs(_module_tensors(module)),
            module_factory=lambda: module,
            architecture=type(module).__name__,
            notes=["a pickled whole module, loaded because it was trusted"],
        )
    tensors = _strip_common_prefix(_flatten_tensors(obj))
    if not tensors:
        raise BadInput("the checkpoint holds no tensors", path=path)
    return LoadedModel(
        source=source,
        path=path,
        format="state-dict",
        family=family_from_tensor_names(list(tensors)),
        tensor_source=lambda: _tensor_refs(tensors),
        notes=["a state dict: weights only"],
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _load_trusted_program(path: Path) -> Any:
    """torch's own loader, which unpickles parts of the archive: only for a file the person trusts."""
    import torch

    try:
        return torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for damaged archives
        raise BadInput(f"damaged ExportedProgram archive ({_first_line(exc)})", path=path) from exc


def _load_trusted(path: Path) -> Any:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling trusted code can raise anything
        raise BadInput(f"cannot load the trusted pickle ({type(exc).__name__}: {exc})", path=path) from exc


def _describe_inputs(program: Any) -> str:
    try:
        args, _kwargs = program.example_inputs
    except (AttributeError, TypeError, ValueError):
        return "unknown"
    parts = [f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args if hasattr(a, "shape")]
    return ", ".join(parts) or "none"
