"""The KV-cache interface of the ONNX graphs export.onnx writes for causal LMs with `with_cache`.

Inputs `input_ids` [batch, sequence], `attention_mask` [batch, past + sequence] and, per layer,
`past_key_values.{i}.key` / `.value` [batch, kv_heads, past_sequence, head_dim]; outputs `logits` (always
output 0, so every runner that reads the first output reads the logits) and `present.{i}.key` / `.value`
[batch, kv_heads, past_sequence + sequence, head_dim]. These are the names ONNX Runtime's transformer
tools and onnxruntime-genai expect. A zero-length past makes the same graph a plain forward pass, which is
how quality and latency runners feed it.

The layout (layers, kv heads, head dim, names) is also stored in the graph's metadata under
`studio.kv_cache`, so what the cache holds is known without running the graph.

Encoder-decoder models exported with the cache are two graphs in one folder instead (`Seq2SeqCacheLayout`
below, recorded under `studio.seq2seq_cache` in model.onnx's metadata).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any

from studio.errors import BadInput

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
LAYOUT_KEY = "studio.kv_cache"
PARTS = ("key", "value")

NO_CACHE_HOW = (
    "export the torch model with export.onnx and `with_cache: true` (past key/values inputs, present "
    "outputs) to generate with ONNX Runtime"
)


def past_names(layers: int) -> list[str]:
    return [f"{PAST_PREFIX}{i}.{part}" for i in range(layers) for part in PARTS]


def present_names(layers: int) -> list[str]:
    return [f"{PRESENT_PREFIX}{i}.{part}" for i in range(layers) for part in PARTS]


def takes_past(input_names: Sequence[str]) -> bool:
    return any(name.startswith(PAST_PREFIX) for name in input_names)


@dataclass(frozen=True)
class CacheLayout:
    """What one position of one sequence holds in the cache: layers x (key, value) x kv_heads x head_dim."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def inputs(self) -> list[str]:
        return past_names(self.layers)

    @property
    def outputs(self) -> list[str]:
        return present_names(self.layers)

    def to_metadata(self) -> str:
        return json.dumps({**asdict(self), "inputs": self.inputs, "outputs": self.outputs}, sort_keys=True)

    @classmethod
    def from_metadata(cls, raw: str) -> CacheLayout:
        data = json.loads(raw)
        return cls(int(data["layers"]), int(data["kv_heads"]), int(data["head_dim"]), str(data["dtype"]))


def empty_past(past_inputs: Sequence[tuple[str, Sequence[Any], str]], batch_size: int) -> dict[str, Any]:
    """Zero-length past tensors for a graph's cache inputs [(name, declared shape, numpy dtype)]: the
    batch axis set, the symbolic past-length axis 0, the fixed axes (kv heads, head dim) as declared."""
    import numpy as np

    feeds: dict[str, Any] = {}
    for name, shape, dtype in past_inputs:
        dims = [batch_size if k == 0 else (d if isinstance(d, int) else 0) for k, d in enumerate(shape)]
        feeds[name] = np.zeros(dims, dtype=dtype)
    return feeds


# ------------------------------------------------------------------------------------------------ seq2seq

SEQ2SEQ_LAYOUT_KEY = "studio.seq2seq_cache"
DECODER_FILE = "decoder_with_past.onnx"
SELF, CROSS = "decoder", "encoder"  # the names optimum and ONNX Runtime's tools give the two caches


def seq2seq_names(prefix: str, layers: int, which: Sequence[str]) -> list[str]:
    return [f"{prefix}{i}.{kind}.{part}" for i in range(layers) for kind in which for part in PARTS]


@dataclass(frozen=True)
class Seq2SeqCacheLayout:
    """The two graphs export.onnx writes for an encoder-decoder model with `with_cache`, in one folder.

    `model.onnx` (inputs `input_ids`, `attention_mask`, `decoder_input_ids`) runs the encoder and the
    decoder over the decoder inputs: output 0 is `logits` (so every runner that reads the first output
    teacher-forces it like the plain export), then per layer `present.{i}.decoder.key/value` (the
    self-attention cache so far) and `present.{i}.encoder.key/value` (the cross-attention cache, computed
    once from the encoder output). `decoder` (decoder_with_past.onnx) takes `decoder_input_ids` (the new
    positions), `encoder_attention_mask` and both caches as `past_key_values.{i}.decoder/encoder.key/value`
    and returns `logits` and the grown `present.{i}.decoder.key/value`: each decode step runs the decoder
    alone, for one position. Every cache tensor is [batch, heads, positions, head_dim]."""

    layers: int
    heads: int
    head_dim: int
    dtype: str = "float32"
    decoder: str = DECODER_FILE

    @property
    def prefill_outputs(self) -> list[str]:
        return seq2seq_names(PRESENT_PREFIX, self.layers, (SELF, CROSS))

    @property
    def decoder_inputs(self) -> list[str]:
        return seq2seq_names(PAST_PREFIX, self.layers, (SELF, CROSS))

    @property
    def decoder_outputs(self) -> list[str]:
        return seq2seq_names(PRESENT_PREFIX, self.layers, (SELF,))

    def to_metadata(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, raw: str) -> Seq2SeqCacheLayout:
        """The layout a graph's metadata records; a damaged record is BadInput, and so is a decoder named
        anywhere but beside the graph (a plain file name: the graph must not lead the loader elsewhere)."""
        try:
            data = json.loads(raw)
            layout = cls(
                int(data["layers"]),
                int(data["heads"]),
                int(data["head_dim"]),
                str(data["dtype"]),
                str(data["decoder"]),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise BadInput(f"the graph's '{SEQ2SEQ_LAYOUT_KEY}' metadata is damaged ({exc})") from exc
        if PurePath(layout.decoder).name != layout.decoder or layout.decoder in ("", ".", ".."):
            raise BadInput(f"the graph names its decoder graph '{layout.decoder}', not a file beside it")
        return layout


def seq2seq_layout(metadata: dict[str, str]) -> Seq2SeqCacheLayout | None:
    """The seq2seq cache a graph's metadata records (None: a graph exported without the cache)."""
    raw = metadata.get(SEQ2SEQ_LAYOUT_KEY)
    return Seq2SeqCacheLayout.from_metadata(raw) if raw else None


def seq2seq_problem(path: Path, metadata: dict[str, str]) -> str | None:
    """Why a seq2seq graph cannot generate by itself on ONNX Runtime, or None when it can: exported
    without the cache, or its decoder graph is not beside it (ONNX passes rewrite model.onnx only)."""
    layout = seq2seq_layout(metadata)
    if layout is None:
        return f"this seq2seq ONNX graph has no decoder cache; {NO_CACHE_HOW}"
    if not (Path(path).parent / layout.decoder).is_file():
        return (
            f"the decoder graph '{layout.decoder}' that export.onnx wrote beside this graph is missing (ONNX "
            "passes after the export rewrite model.onnx only, so measure the export's own variant)"
        )
    return None
