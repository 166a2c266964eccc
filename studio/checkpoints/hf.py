"""Hugging Face model folders (config.json + weights), opened offline and without remote code."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.errors import BadInput

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "source.spm",
    "sentencepiece.bpe.model",
)


def read_raw_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"config.json is not valid JSON ({exc})", path=cfg_file) from exc
    if not isinstance(raw, dict):
        raise BadInput("config.json is not a JSON object", path=cfg_file)
    if "model_type" not in raw:
        raise BadInput("config.json has no 'model_type': cannot tell the architecture", path=cfg_file)
    check_dimensions(raw, cfg_file)
    return raw


# Sizes that code divides by or allocates from; where one is present it must be a positive integer.
_POSITIVE = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "n_embd", "n_head", "d_model", "num_heads",
    "encoder_attention_heads", "decoder_attention_heads", "intermediate_size", "vocab_size", "head_dim",
    "d_kv",
)  # fmt: skip
_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")
_SPLITS = (("hidden_size", "num_attention_heads"), ("n_embd", "n_head"))  # the head size is their quotient


def check_dimensions(raw: dict[str, Any], cfg_file: Path) -> None:
    """A config with zero heads (or a hidden size the heads do not divide) opens as BadInput here instead
    of a ZeroDivisionError deep inside transformers or the head-importance code."""
    for key in _POSITIVE:
        value = raw.get(key)
        if value is not None and not (type(value) is int and 0 < value < 1 << 31):
            raise BadInput(f"config.json: '{key}' must be a positive integer, not {value!r}", path=cfg_file)
    for key in _COUNTS:
        value = raw.get(key)
        if value is not None and not (type(value) is int and 0 <= value < 1 << 16):
            raise BadInput(
                f"config.json: '{key}' must be a non-negative integer, not {value!r}", path=cfg_file
            )
    if "head_dim" not in raw:
        for hidden, heads in _SPLITS:
            if raw.get(hidden) is not None and raw.get(heads) is not None and raw[hidden] % raw[heads]:
                raise BadInput(
                    f"config.json: '{hidden}' {raw[hidden]} is not a multiple of '{heads}' {raw[heads]}",
                    path=cfg_file,
                )


def read_config(path: Path) -> Any:
    """The transformers config of a folder; unknown model types and broken JSON become BadInput."""
    cfg_file = path / "config.json"
    raw = read_raw_config(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise BadInput(
            f"unknown architecture: model_type '{raw.get('model_type')}' is not one transformers knows "
            "(remote code is never run)",
            path=cfg_file,
        ) from exc


def architecture_name(config: Any, path: Path) -> str:  # config: a PretrainedConfig or the raw dict
    """The transformers class named by config.architectures (AutoModel when none is named), checked
    against transformers' export list without importing the modeling code (that import takes seconds)."""
    import transformers

    archs = list(
        (config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None))
        or []
    )
    if not archs:
        return "AutoModel"
    name = archs[0]
    if name not in getattr(transformers, "__all__", ()) or not name[:1].isupper():
        raise BadInput(
            f"unknown architecture '{name}' in config.json: transformers {transformers.__version__} has no such "
            "class (remote code is never run)",
            path=path / "config.json",
        )
    return name


_IMPORT_LOCK = threading.Lock()


def model_class(config: Any, path: Path) -> Any:
    """The transformers model class config.json names (Any: it is looked up by name at run time)."""
    import transformers

    name = architecture_name(config, path)
    with _IMPORT_LOCK:  # transformers' lazy module import is not thread-safe (GUI work runs on threads)
        cls = getattr(transformers, name)
    if not hasattr(cls, "from_pretrained"):
        raise BadInput(f"'{cls.__name__}' in config.json is not a model class", path=path / "config.json")
    return cls


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BadInput("the safetensors index is not valid", path=index) from exc
        if not isinstance(mapping, dict):
            raise BadInput("the safetensors index has no weight_map table", path=index)
        shards = list(dict.fromkeys(mapping.values()))
        for name in shards:  # a shard is a file of this folder: an index cannot point at files elsewhere
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise BadInput(
                    f"the safetensors index names a shard outside the folder ({name!r})", path=index
                )
        return [path / f for f in shards]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins and (path / "model.pt").is_file():  # a studio variant holding quantized tensors
        return [path / "model.pt"]
    return bins


def iter_weights(files: list[Path]) -> Iterator[TensorRef]:
    from studio.checkpoints.safetensors_files import iter_safetensors
    from studio.checkpoints.torch_files import iter_state_dict_file

    for f in files:
        if f.suffix == ".safetensors":
            yield from iter_safetensors([f])
        else:
            yield from iter_state_dict_file(f)


def sentence_transformers_pooling(path: Path) -> tuple[str | None, bool]:
    """Pooling mode and normalisation from a sentence-transformers folder (modules.json), if it is one."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None, False
    try:
        modules = json.loads(modules_file.read_text())
    except json.JSONDecodeError:
        return None, False
    pooling, normalize = None, False
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            cfg_file = path / m.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def load_pretrained(cls: Any, path: Path) -> Any:
    """Instantiate the model offline; failures name the folder instead of a transformers traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BadInput(f"cannot load the model: {exc}", path=path) from exc


def open_hf_folder(path: Path, *, source: str, format: str) -> LoadedModel:
    from types import SimpleNamespace

    from studio.checkpoints.recognise import family_from_architecture

    raw = read_raw_config(path)
    arch = architecture_name(raw, path)
    if arch == "AutoModel":
        read_config(path)  # no class named: transformers must at least know the model type
    files = weight_files(path)
    if not files:
        raise BadInput("no weights in the folder (no *.safetensors or pytorch_model.bin)", path=path)
    for f in files:
        if not f.is_file():
            raise BadInput("a weight file named by the index is missing", path=f)
        if f.suffix == ".safetensors":
            from studio.checkpoints.safetensors_files import check_safetensors

            check_safetensors(f)

    family = family_from_architecture(arch, SimpleNamespace(**raw))
    pooling, normalize = sentence_transformers_pooling(path)
    if family == "feature-extraction" and pooling is None:
        pooling = "mean"
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)

    def build() -> Any:
        from studio.checkpoints.variant_folder import TRANSFORMS_KEY, build_variant_module

        config = model.config
        cls = model_class(config, path)
        if getattr(config, TRANSFORMS_KEY, None):
            return build_variant_module(cls, path, config)
        return load_pretrained(cls, path)

    model = LoadedModel(
        source=source,
        path=path,
        format=format,
        family=family,
        tensor_source=lambda: iter_weights(files),
        module_factory=build,
        config_factory=lambda: read_config(path),
        architecture=arch,
        tokenizer_dir=path if has_tokenizer else None,
        pooling=pooling,
        normalize=normalize,
    )
    return model
