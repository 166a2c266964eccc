"""The `model-studio` command: thin verbs that parse, call the core, and print.

Errors a user can fix (`StudioError`) print one line to stderr and exit with their code (2 for bad input);
a traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from studio.errors import BadInput, StudioError

Handler = Callable[[argparse.Namespace], int]


class Progress:
    """A one-line progress display on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def __call__(self, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(max(0.0, min(1.0, fraction)) * width)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.perf_counter() - self.started
        sys.stderr.write(f"\r{self.label} [{bar}] {fraction * 100:5.1f}% {elapsed:6.1f}s {message[:60]:<60}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# ------------------------------------------------------------------------------------------------ inspect


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_inspect(args: argparse.Namespace) -> int:
    from studio.checkpoints import open_checkpoint
    from studio.inspection.stats import ModelSummary, iter_weight_stats

    model = open_checkpoint(args.path, trust=args.trust)
    if args.bins < 1:
        raise BadInput(f"--bins must be at least 1, got {args.bins}")
    summary = ModelSummary()
    layers = list(iter_weight_stats(model, bins=args.bins, summary=summary))
    heads = None
    if args.heads:
        from studio.evaluation.data import load_examples
        from studio.inspection.heads import compute_head_importance

        examples = load_examples(args.data, args.max_examples)
        bar = Progress(f"head importance ({args.heads_method})", enabled=None if not args.json else False)
        heads = compute_head_importance(
            model,
            examples,
            method=args.heads_method,
            sequence_length=args.sequence_length,
            batch_size=args.batch_size,
            progress=bar,
        )
        bar.done()

    dominant = max(summary.params_by_dtype, key=summary.params_by_dtype.get, default=None)
    info = {
        **model.summary_dict(),
        "parameters": summary.parameters,
        "dtype": dominant,
        **{k: v for k, v in summary.to_dict().items() if k != "parameters"},
        "pooling": model.pooling,
        "notes": model.notes,
    }
    if args.json:
        out: dict[str, Any] = {"model": info, "layers": [s.to_dict() for s in layers]}
        if heads is not None:
            out["heads"] = heads.to_dict()
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0

    print(f"{model.source}")
    print(f"  format        {model.format}")
    print(f"  family        {model.family}")
    print(f"  architecture  {model.architecture or '-'}")
    print(f"  parameters    {summary.parameters:,} in {summary.tensors} tensors")
    by_dtype = ", ".join(f"{k} {_human_bytes(v)}" for k, v in summary.bytes_by_dtype.items())
    print(f"  weights       {_human_bytes(summary.bytes)} ({by_dtype})")
    for note in model.notes:
        print(f"  note          {note}")
    print()
    name_w = min(64, max((len(s.name) for s in layers), default=4))
    header = f"{'tensor':<{name_w}} {'shape':<18} {'dtype':<9} {'params':>11} {'mean':>10} {'std':>9} "
    header += f"{'min':>9} {'max':>9} {'zeros':>7} {'outl.':>7}"
    print(header)
    for s in layers:
        shape = "x".join(str(d) for d in s.shape) or "scalar"
        print(
            f"{s.name[-name_w:]:<{name_w}} {shape:<18} {s.dtype:<9} {s.params:>11,} {_fmt(s.mean):>10} "
            f"{_fmt(s.std):>9} {_fmt(s.min):>9} {_fmt(s.max):>9} {s.sparsity * 100:>6.2f}% {s.outliers * 100:>6.3f}%"
        )
    print(
        f"\n{summary.tensors} tensors, {summary.parameters:,} parameters, statistics in {summary.seconds:.2f}s"
    )
    if heads is not None:
        _print_heads(heads)
    return 0


def _print_heads(heads: Any) -> None:
    print(f"\nattention-head importance: method {heads.method}")
    print(f"  objective: {heads.objective}")
    print(f"  {heads.examples} examples at sequence length {heads.sequence_length}, {heads.seconds:.1f}s")
    print("  normalised per layer (L2); higher = more important")
    print(f"  {'block':<40} " + " ".join(f"{h:>5}" for h in range(heads.heads)))
    for block, row in zip(heads.blocks, heads.importance, strict=True):
        cells = " ".join("    -" if v is None else f"{v:5.2f}" for v in row)
        print(f"  {block['name'][-40:]:<40} {cells}")
    kinds = sorted({b["kind"] for b in heads.blocks})
    print(f"  covered: {len(heads.blocks)} blocks ({', '.join(kinds)})")
    if heads.skipped_blocks:
        print(f"  not covered (cross-attention): {len(heads.skipped_blocks)} blocks")
    least = heads.ranked()[:5]
    print("  least important: " + ", ".join(f"layer {i} head {j} ({v:.2f})" for i, j, v in least))


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-studio",
        description="Open a model checkpoint, look inside, build and run optimization pipelines, compare variants. "
        "Without a verb, opens the desktop app.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("inspect", help="weight statistics and attention-head importance of a checkpoint")
    p.add_argument(
        "path", help="builtin:minilm, a Hugging Face folder, .safetensors, .pt/.pth/.bin, .pt2 or .onnx"
    )
    p.add_argument("--json", action="store_true", help="print the documented JSON instead of tables")
    p.add_argument(
        "--trust", action="store_true", help="allow unpickling a whole module (runs code from the file)"
    )
    p.add_argument("--bins", type=int, default=128, help="histogram bins per tensor (default 128)")
    p.add_argument("--heads", action="store_true", help="also compute attention-head importance")
    p.add_argument("--heads-method", choices=("gradient", "ablation"), default="gradient")
    p.add_argument(
        "--data", default="builtin:sentences", help="examples: builtin:sentences or .txt/.jsonl/.csv"
    )
    p.add_argument(
        "--max-examples", type=int, default=64, help="examples used for head importance (default 64)"
    )
    p.add_argument("--sequence-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default 16)")
    p.set_defaults(handler=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    try:
        if handler is None:
            from studio.gui_entry import launch

            return launch(args)
        return handler(args)
    except StudioError as exc:
        if args.debug:
            raise
        print(f"model-studio: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("model-studio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
