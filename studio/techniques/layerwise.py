"""Block-by-block calibration of a transformer, shared by the calibrated weight quantizers (GPTQ, AWQ).

Those methods need the inputs each Linear layer sees on calibration text *after* the layers before it were
quantized, and a model larger than memory in float32 must still quantize. So the model runs only once, up
to its first decoder block (a pre-hook records that block's inputs and stops the pass); from then on each
block runs alone on the recorded inputs, is quantized, and its outputs become the next block's inputs.
Only one block's activations (windows x tokens x width) are held at a time.

Calibration text becomes fixed windows of token ids: the examples are tokenized, joined into one stream and
cut into windows of the sequence length, so no window needs padding (whose positions would pollute the
statistics) and every token counts once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput


@dataclasses.dataclass
class BlockCall:
    """One window's call of a block: its positional and keyword arguments (hidden states first)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def hidden(self) -> Any:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: Any) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})


class _Captured(Exception):
    """Raised by the first block's pre-hook: the rest of the model is not needed for this window."""


def decoder_blocks(root: Any, contains: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """(name, ModuleList) of the model's repeated blocks: the longest ModuleList of modules of one class
    that hold layers `contains` accepts (Llama's `model.layers`, GPT-2's `transformer.h`); None if none."""
    import torch

    best: tuple[str, Any] | None = None
    for name, module in root.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(contains(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def calibration_windows(
    model: LoadedModel, examples: Sequence[Any], window: int, needed_tokens: int, technique: str
) -> list[Any]:
    """Token-id windows [1, <= window] cut from the calibration text, at least `needed_tokens` in all."""
    import torch

    tok = model.tokenizer
    if tok is None:
        raise BadInput(f"{technique} calibrates on text and the model has no tokenizer", path=model.path)
    stream: list[int] = []
    for example in examples:
        # verbose=False: the stream is cut into windows below, so an example longer than the model's
        # context is expected, not the mistake the tokenizer would warn about
        stream += list(tok(example.text, verbose=False)["input_ids"])
    if len(stream) < needed_tokens:
        raise BadInput(
            f"{technique} needs at least {needed_tokens} calibration tokens and the calibration data gives "
            f"{len(stream)} ({len(examples)} examples): use more or longer calibration examples"
        )
    return [torch.tensor([stream[i : i + window]], dtype=torch.long) for i in range(0, len(stream), window)]


def capture_first_block(root: Any, first_block: Any, windows: Sequence[Any]) -> list[BlockCall]:
    """The arguments the first block receives for each window (the model runs only up to it)."""
    import inspect

    import torch

    calls: list[BlockCall] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        calls.append(
            BlockCall(tuple(args), {**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs)
        )
        raise _Captured

    accepts = inspect.signature(root.forward).parameters
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in windows:
                extra = {"use_cache": False} if "use_cache" in accepts else {}
                try:
                    root(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
                except _Captured:
                    continue
    finally:
        handle.remove()
    if len(calls) != len(windows):
        raise BadInput("the model's forward pass did not reach its first decoder block")
    return calls


def whole_model_calls(root: Any, windows: Sequence[Any]) -> list[BlockCall]:
    """Calls of the whole model, for models without repeated blocks (it is then its own single block)."""
    import inspect

    import torch

    accepts = inspect.signature(root.forward).parameters
    extra = {"use_cache": False} if "use_cache" in accepts else {}
    return [
        BlockCall((), {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}) for ids in windows
    ]


def run_block(block: Any, calls: Sequence[BlockCall]) -> list[BlockCall]:
    """The next block's calls: each window's output hidden states in place of its input."""
    import torch

    out = []
    with torch.no_grad():
        for call in calls:
            y = block(*call.args, **call.kwargs)
            out.append(call.with_hidden(y[0] if isinstance(y, tuple) else y))
    return out


def feed_inputs(block: Any, layer: Any, calls: Sequence[BlockCall], sink: Callable[[Any], None]) -> None:
    """Pass `sink` the input `layer` receives in each window; each window's pass through the block stops
    there (the layers after it are not needed for these statistics)."""
    import torch

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        sink(args[0])
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for call in calls:
                try:
                    block(*call.args, **call.kwargs)
                except _Captured:
                    continue
    finally:
        handle.remove()


def shared_input_groups(block: Any, names: Sequence[str], call: BlockCall) -> list[list[str]]:
    """The block's layers (`names`, relative to the block) grouped by the tensor they read, in the order
        the forward pass reaches them: q/k/v read one normalized input, gate/up another. A group's layers share
        one set of input statistics, and each group is quantized after the groups before it. A layer the pass
    never calls is in no group."""
    import torch

    order: list[tuple[str, int]] = []
    keep: list[Any] = []  # the inputs stay alive so their ids cannot be reused within the pass

    def recorder(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            keep.append(args[0])
            order.append((name, id(args[0])))

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad():
            block(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, key in order:
        if name not in groups.setdefault(key, []):
            groups[key].append(name)
    return list(groups.values())  # a layer the block never calls is in no group
