"""`model-studio assist`: assisted (speculative) generation of one variant drafted by another, against its
plain greedy generation: acceptance rate, tokens/s of both, and whether the outputs are identical."""

from __future__ import annotations

import argparse
import sys

from studio.commands.graph import open_model
from studio.commands.output import format_number, print_json


def cmd_assist(args: argparse.Namespace) -> int:
    from studio.evaluation.assisted import measure_assisted
    from studio.evaluation.data import load_examples

    target_name, target = open_model(args, args.target)
    if args.draft == "self":  # opened again: its own module, drafting with the same weights
        draft_name, draft = f"{target_name} (self)", open_model(args, args.target)[1]
    else:
        draft_name, draft = open_model(args, args.draft)
    result = measure_assisted(
        target,
        draft,
        load_examples(args.data, max(args.prompts, 1)),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        draft_tokens=args.draft_tokens,
        prompts=args.prompts,
        names=(target_name, draft_name),
    )
    if args.json:
        print_json(result, indent=2)
        return 0
    rate = result["acceptance_rate"]
    print(f"target {result['target']}, drafted by {result['draft']}")
    print(
        f"{result['prompts']} prompts of {result['prompt_tokens']} tokens, "
        f"{result['new_tokens']} new tokens, {result['draft_tokens']} draft tokens per round"
    )
    print(
        f"acceptance rate   {format_number(rate * 100 if rate is not None else None, '.1f')}% "
        f"({result['accepted']} of {result['proposed']} draft tokens, {result['rounds']} rounds)"
    )
    for name in ("plain", "assisted"):
        print(f"{name + ' tokens/s':<18}{result[name]['tokens_per_s']:.1f}")
    print(f"speedup           {format_number(result['speedup'], '.2f')}x")
    print(f"identical output  {'yes' if result['identical'] else 'NO'}")
    if not result["identical"]:
        print("assisted greedy output differs from the target's own greedy output", file=sys.stderr)
    return 0
