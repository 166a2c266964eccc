"""Running an ExecuTorch program (`.pte`) with ExecuTorch's Python runtime, and fitting batches to it.

A `.pte` written by export.executorch has static shapes: every input was fixed at export to
(batch, sequence length) for text or (batch, channels, height, width) for images, and the program refuses
any other shape. `program.json` beside it records those shapes. The runner serves any batch that fits:
rows go through the program `batch` at a time (the last group filled up by repeating its last row, whose
answer is dropped), and a text batch shorter than the program's sequence is padded on the right with
masked positions, which change no real token's output, and the output is cut back to the batch's length.
A longer sequence, an image of another size or a text batch without an attention mask cannot be fitted
without changing the answer: those are refused, naming the program's shape and how to re-export.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput, Unavailable
from studio.families import Batch, family_for

if TYPE_CHECKING:
    import torch

    from studio.checkpoints.base import LoadedModel

NO_RUNTIME = (
    "ExecuTorch's Python runtime is not installed (pip install executorch==1.5.1): "
    "a .pte program cannot run here"
)
PROGRAM_FILE = "program.json"  # the shapes and names export.executorch fixed, beside model.pte
PADDED_FAMILIES = ("feature-extraction", "causal-lm")  # outputs with a sequence axis to cut back


def executorch_availability() -> tuple[bool, str | None]:
    """(True, None), or (False, why not) when the executorch package is missing."""
    try:
        found = importlib.util.find_spec("executorch") is not None
    except (ImportError, ValueError):
        found = False
    return (True, None) if found else (False, NO_RUNTIME)


def require_runtime() -> Any:
    """ExecuTorch's `Runtime`, or Unavailable naming what to install."""
    ok, reason = executorch_availability()
    if not ok:
        raise Unavailable(reason or NO_RUNTIME)
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:  # the package is there but its runtime or the native extension is not
        raise Unavailable(f"{NO_RUNTIME} (import executorch.runtime failed: {exc})") from exc
    return Runtime


def program_runtime(pte: Path) -> Any:
    """ExecuTorch's `Runtime` for running the program `pte`, or BadInput (exit 2) when it is missing here:
    the person asked to run a file this installation cannot run, so the message names the program, what is
    missing and what to install, as for any other input the studio cannot use."""
    try:
        return require_runtime()
    except Unavailable as exc:
        raise BadInput(f"this ExecuTorch program cannot run here: {exc.problem}", path=pte) from exc


def read_program_facts(pte: Path) -> dict[str, Any]:
    """The facts export.executorch recorded for `pte` (input names and shapes, the output, the family)."""
    path = Path(pte).with_name(PROGRAM_FILE)
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"no readable {PROGRAM_FILE} beside the program ({exc}): it records the shapes fixed at "
            "export; export the model again with export.executorch",
            path=pte,
        ) from exc
    if not isinstance(facts, dict) or not isinstance(facts.get("inputs"), list):
        raise BadInput(f"{PROGRAM_FILE} does not list the program's inputs", path=path)
    return facts


def program_feeds(batch: Batch, facts: dict[str, Any]) -> list[list[torch.Tensor]]:
    """The batch as a list of program calls, each a list of tensors in the program's input order and of
    exactly the recorded shapes (see the module docstring for what fits and what is refused)."""
    import torch

    inputs = facts["inputs"]
    given = dict(batch.inputs)
    if len(inputs) == 1 and len(given) == 1 and inputs[0]["name"] not in given:
        given = {inputs[0]["name"]: next(iter(given.values()))}  # images: "x" / "pixel_values"
    missing = [i["name"] for i in inputs if i["name"] not in given]
    if missing:
        raise BadInput(
            f"the program takes inputs {', '.join(missing)} that the data does not give "
            f"(it gives {', '.join(batch.inputs) or 'nothing'})"
        )
    rows = len(next(iter(given.values())))
    per_call = int(inputs[0]["shape"][0])
    fitted = []
    for spec in inputs:
        name, shape = spec["name"], [int(s) for s in spec["shape"]]
        tensor = given[name]
        if list(tensor.shape[1:]) != shape[1:]:
            tensor = _pad_sequence(name, tensor, shape, given, facts)
        fitted.append(tensor.to(getattr(torch, spec.get("dtype", "float32"))).contiguous())
    calls = []
    for start in range(0, rows, per_call):
        group = []
        for tensor in fitted:
            part = tensor[start : start + per_call]
            if len(part) < per_call:  # the last group: repeat its last row, whose answer is dropped
                part = torch.cat([part, part[-1:].expand(per_call - len(part), *part.shape[1:])])
            group.append(part.contiguous())
        calls.append(group)
    return calls


def _pad_sequence(
    name: str, tensor: torch.Tensor, shape: list[int], given: dict[str, torch.Tensor], facts: dict[str, Any]
) -> torch.Tensor:
    import torch

    fixed = f"the program was exported for inputs of shape {shape[1:]} per row (fixed at export)"
    if tensor.dim() != 2 or len(shape) != 2:
        raise BadInput(
            f"input '{name}' has shape {list(tensor.shape[1:])} per row but {fixed}: "
            "export again with export.executorch at this shape"
        )
    length, target = int(tensor.shape[1]), shape[1]
    if length > target:
        raise BadInput(
            f"input '{name}' has {length} tokens per row but {fixed}: export again with "
            f"export.executorch's sequence_length >= {length}, or evaluate at sequence_length <= {target}"
        )
    if "attention_mask" not in given:
        raise BadInput(
            f"input '{name}' has {length} tokens per row but {fixed}, and without an attention mask "
            "padding would change the answer: export at this sequence length"
        )
    fill = int(facts.get("pad_token_id") or 0) if name == "input_ids" else 0
    pad = torch.full((tensor.shape[0], target - length), fill, dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)


class ExecuTorchRunner:
    """Runs a `.pte` on a family batch: `runner(batch) -> family.from_primary(output 0, batch)`."""

    def __init__(self, pte: str | Path, model: LoadedModel) -> None:
        self.path = Path(pte)
        runtime = program_runtime(self.path)
        self.facts = read_program_facts(self.path)
        self.family = family_for(model)
        try:
            program = runtime.get().load_program(str(self.path))
            self.method = program.load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise BadInput(f"ExecuTorch cannot load the program: {exc}", path=self.path) from exc
        self._program = program  # the method needs its program alive

    def __call__(self, batch: Batch) -> torch.Tensor:
        import torch

        rows = len(next(iter(batch.inputs.values())))
        outputs = []
        for call in program_feeds(batch, self.facts):
            try:
                (primary, *_rest) = self.method.execute(call)
            except RuntimeError as exc:
                raise BadInput(f"ExecuTorch failed to run the program: {exc}", path=self.path) from exc
            outputs.append(primary.clone())  # the runtime reuses its output buffer on the next call
        primary = torch.cat(outputs)[:rows]
        if self.family.name in PADDED_FAMILIES and primary.dim() >= 2:
            length = int(batch.inputs["input_ids"].shape[1]) if "input_ids" in batch.inputs else None
            if length is not None:
                primary = primary[:, :length]
        return self.family.from_primary(primary.float(), batch)
