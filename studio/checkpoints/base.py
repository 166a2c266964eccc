"""What every checkpoint format opens into: a `LoadedModel`.

Opening is cheap: it reads headers and configs, not weights. Weights are reached one tensor at a time
through `LoadedModel.tensors()` (so a checkpoint larger than memory can be inspected), and the runnable
torch module is built only when `LoadedModel.module` is first asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput

if TYPE_CHECKING:
    import torch

# How a checkpoint was opened; stable strings that appear in `inspect --json`.
FORMATS = (
    "builtin",
    "hf-folder",
    "safetensors",
    "state-dict",
    "pickled-module",
    "torchscript",
    "exported-program",
    "onnx",
    "openvino",
)


@dataclass(frozen=True)
class TensorRef:
    """One weight tensor, described without loading it; `load()` reads just this tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "int8"
    load: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    # Reads rows [start, stop) of dim 0 alone (a torch tensor or a numpy array); set where the format can.
    load_rows: Callable[[int, int], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def chunks(self, max_elements: int = 1 << 24) -> Iterator[Any]:
        """The tensor as flat pieces of at most about `max_elements`, so a huge tensor never sits whole in memory."""
        if self.load_rows is None or not self.shape:
            yield self.load().reshape(-1)
            return
        row = max(1, self.numel // self.shape[0])
        step = max(1, max_elements // row)
        for start in range(0, self.shape[0], step):
            yield self.load_rows(start, min(start + step, self.shape[0])).reshape(-1)


@dataclass
class LoadedModel:
    """A checkpoint the studio has opened.

    `tensor_source` lists the weights lazily; `module_factory` builds the runnable torch module (None when
    the checkpoint holds weights only, or is ONNX). `family` says how the model is fed and judged.
    """

    source: str
    path: Path
    format: str
    family: str
    tensor_source: Callable[[], Iterator[TensorRef]] = field(repr=False)
    module_factory: Callable[[], Any] | None = field(default=None, repr=False)
    # The transformers PretrainedConfig, built on first use (building it imports torch: seconds).
    config_factory: Callable[[], Any] | None = field(default=None, repr=False)
    architecture: str | None = None
    tokenizer_dir: Path | None = None  # folder with tokenizer files, when the model takes text
    pooling: str | None = None  # feature-extraction: "mean" or "cls"
    normalize: bool = False  # feature-extraction: L2-normalise pooled embeddings
    notes: list[str] = field(default_factory=list)
    # The graph's input names, read once when an ONNX file is opened (None for torch checkpoints).
    input_names: tuple[str, ...] | None = None

    def tensors(self) -> Iterator[TensorRef]:
        return self.tensor_source()

    @property
    def runnable(self) -> bool:
        return self.module_factory is not None

    @cached_property
    def config(self) -> Any | None:
        return self.config_factory() if self.config_factory is not None else None

    @cached_property
    def module(self) -> Any:
        """The torch module (eval mode); raises BadInput when the checkpoint holds weights only."""
        if self.module_factory is None:
            raise BadInput(
                f"this {self.format} checkpoint holds weights only, there is no model to run "
                "(open a Hugging Face folder, TorchScript, ExportedProgram or a trusted pickled module)",
                path=self.path,
            )
        module = self.module_factory()
        if self.format != "exported-program":  # an exported graph keeps the mode it was exported in
            module.eval()
        return module

    @cached_property
    def tokenizer(self) -> Any:
        if self.tokenizer_dir is None:
            raise BadInput(
                "no tokenizer files next to this model: text inputs cannot be made", path=self.path
            )
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(
                str(self.tokenizer_dir), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot load the tokenizer: {exc}", path=self.tokenizer_dir) from exc

    def summary_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": str(self.path),
            "format": self.format,
            "family": self.family,
            "architecture": self.architecture,
        }
