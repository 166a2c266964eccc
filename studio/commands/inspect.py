"""`model-studio inspect` (weight statistics, head importance) and `model-studio techniques` (the blocks)."""

from __future__ import annotations

import argparse
from typing import Any

from studio.commands.output import ProgressLine, format_number, print_json
from studio.errors import BadInput
from studio.units import human_bytes


def cmd_inspect(args: argparse.Namespace) -> int:
    from studio.checkpoints import open_checkpoint
    from studio.inspection import stats
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
        bar = ProgressLine(f"head importance ({args.heads_method})", enabled=None if not args.json else False)
        heads = compute_head_importance(
            model,
            examples,
            method=args.heads_method,
            sequence_length=args.sequence_length,
            batch_size=args.batch_size,
            progress=bar,
        )
        bar.done()

    dominant = max(summary.params_by_dtype, key=lambda d: summary.params_by_dtype[d], default=None)
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
        print_json(out)
        return 0

    print(f"{model.source}")
    print(f"  format        {model.format}")
    print(f"  family        {model.family}")
    print(f"  architecture  {model.architecture or '-'}")
    print(f"  parameters    {summary.parameters:,} in {summary.tensors} tensors")
    by_dtype = ", ".join(f"{k} {human_bytes(v)}" for k, v in summary.bytes_by_dtype.items())
    print(f"  weights       {human_bytes(summary.bytes)} ({by_dtype})")
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
            f"{s.name[-name_w:]:<{name_w}} {shape:<18} {s.dtype:<9} {s.params:>11,} {format_number(s.mean):>10} "
            f"{format_number(s.std):>9} {format_number(s.min):>9} {format_number(s.max):>9} {s.sparsity * 100:>6.2f}% {s.outliers * 100:>6.3f}%"
        )
    rate = summary.bytes / summary.seconds / 1e9 if summary.seconds else 0.0
    sampled = sum(1 for s in layers if s.sample_size is not None)
    print(
        f"\n{summary.tensors} tensors, {summary.parameters:,} parameters, statistics in {summary.seconds:.2f}s"
        f" ({rate:.2f} GB/s)"
        + (
            f"; histograms of the {sampled} tensors over {stats.SAMPLE_ABOVE:,} values from a strided sample"
            if sampled
            else ""
        )
    )
    if heads is not None:
        print_heads(heads)
    return 0


def print_heads(heads: Any) -> None:
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


def cmd_techniques(args: argparse.Namespace) -> int:
    from studio.techniques.base import registry

    items = [cls.describe() for _, cls in sorted(registry().items())]
    if args.json:
        print_json(items, indent=2)
        return 0
    for t in items:
        mark = "" if t["available"] else f"  [unavailable: {t['reason']}]"
        print(f"{t['id']:<24} {t['input_kind']:>8} -> {t['output_kind']:<8} {t['title']}{mark}")
        for name, prop in t["params"].get("properties", {}).items():
            default = f" (default {prop['default']!r})" if "default" in prop else ""
            print(f"    {name:<22} {prop.get('description', '')}{default}")
    return 0
