"""The `model-studio` command: the parser and the dispatch. The verbs (studio/commands/) are thin: they
call the core and print.

Errors a user can fix (`StudioError`) print one line to stderr and exit with their code (2 for bad input);
a traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from studio.commands.generate import cmd_assist
from studio.commands.graph import cmd_diagnose, cmd_diff, cmd_graph
from studio.commands.inspect import cmd_inspect, cmd_techniques
from studio.commands.measure import cmd_bench, cmd_screenshots, cmd_search, cmd_sensitivity
from studio.commands.run import cmd_run
from studio.commands.variants import cmd_compare, cmd_export, cmd_report, cmd_variants
from studio.errors import Cancelled, StudioError
from studio.export import FORMATS as EXPORT_FORMATS
from studio.inspection.heads import METHODS as HEAD_METHODS
from studio.sensitivity import MODES as SENSITIVITY_MODES
from studio.sensitivity import SCHEMES as SENSITIVITY_SCHEMES

# Trust is the person's say on the command line; no file (recipe, workspace, checkpoint) can grant it.
TRUST_HELP = "allow loading a checkpoint whose file runs code (a pickled module, a .pt2 with pickled parts)"
WORKSPACE_HELP = "workspace folder (default: $MODEL_STUDIO_HOME or the user data dir)"

Handler = Callable[[argparse.Namespace], int]


def flag_parents() -> tuple[argparse.ArgumentParser, ...]:
    """Options several verbs take, declared once: --workspace, --trust, and a recipe verb's --trust."""
    workspace = argparse.ArgumentParser(add_help=False)
    workspace.add_argument("--workspace", help=WORKSPACE_HELP)
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust", action="store_true", help=TRUST_HELP)
    recipe_trust = argparse.ArgumentParser(add_help=False)  # the verbs that read a recipe
    recipe_trust.add_argument(
        "--trust", action="store_true", help=TRUST_HELP + "; a recipe's own trust: is ignored"
    )
    return workspace, trust, recipe_trust


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-studio",
        description="Open a model checkpoint, look inside, build and run optimization pipelines, compare variants. "
        "Without a verb, opens the desktop app.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument(
        "--open", metavar="PATH", help="the app: open this checkpoint instead of builtin:minilm"
    )
    parser.add_argument("--workspace", help="the app: " + WORKSPACE_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    ws, trust, recipe_trust = flag_parents()

    p = sub.add_parser(
        "inspect", help="weight statistics and attention-head importance of a checkpoint", parents=[trust]
    )
    p.add_argument(
        "path", help="builtin:minilm, a Hugging Face folder, .safetensors, .pt/.pth/.bin, .pt2 or .onnx"
    )
    p.add_argument("--json", action="store_true", help="print the documented JSON instead of tables")
    p.add_argument("--bins", type=int, default=128, help="histogram bins per tensor (default 128)")
    p.add_argument("--heads", action="store_true", help="also compute attention-head importance")
    p.add_argument("--heads-method", choices=HEAD_METHODS, default="gradient")
    p.add_argument(
        "--data", default="builtin:sentences", help="examples: builtin:sentences or .txt/.jsonl/.csv"
    )
    p.add_argument(
        "--max-examples", type=int, default=64, help="examples used for head importance (default 64)"
    )
    p.add_argument("--sequence-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default 16)")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("techniques", help="list the technique blocks and their parameters")
    p.add_argument("--json", action="store_true", help="print the documented JSON")
    p.set_defaults(handler=cmd_techniques)

    p = sub.add_parser(
        "run",
        help="run a recipe (YAML pipeline) in a worker process and save the variant",
        parents=[recipe_trust, ws],
    )
    p.add_argument("recipe", help="the recipe file")
    p.add_argument("--json", action="store_true", help="print the result JSON")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe only (never loads code)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "variants", help="list the variants of the workspace, or remove some (variants rm ID)", parents=[ws]
    )
    p.add_argument("action", nargs="?", choices=("list", "rm"), default="list")
    p.add_argument("ids", nargs="*", help="variant ids (for rm); a unique prefix is enough")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_variants)

    p = sub.add_parser(
        "compare", help="compare two variants: metrics, significance, weights, examples", parents=[ws]
    )
    p.add_argument("a", help="variant id (or baseline id)")
    p.add_argument("b", help="variant id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-weights", action="store_true", help="skip per-layer weight differences")
    p.add_argument("--examples", type=int, default=32, help="examples run to find disagreements (0: skip)")
    p.add_argument("--data", help="examples to compare on (default: the recipe's evaluation data)")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "export",
        help="copy a variant out of the workspace as ONNX, TensorRT or a transformers folder",
        parents=[ws],
    )
    p.add_argument("variant")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("report", help="write a self-contained HTML report of variants", parents=[ws])
    p.add_argument("ids", nargs="*", help="variant ids (default: all)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "bench",
        help="time the usual recipes and the studio's own on builtin:minilm (or causal LMs), side by side",
        parents=[ws],
    )
    p.add_argument(
        "--family",
        choices=["encoder", "causal-lm", "kv-cache"],
        default="encoder",
        help="encoder: builtin:minilm (default); causal-lm: builtin:tinylm and a 0.5B-class Llama, decoding "
        "(and the KV-cache section); kv-cache: only that section, tinylm's cache quantized at its full context",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 32 (encoder), 1 8 (causal-lm)")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64, help="causal-lm: prompt length (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="causal-lm: tokens generated (default 32)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 12; causal-lm: 3)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--examples", type=int, default=64, help="sentences for fidelity (default 64)")
    p.add_argument("--only", nargs="+", help="recipe name fragments to include (default: all)")
    p.add_argument(
        "--recipes",
        nargs="+",
        metavar="FILE",
        help="encoder: also time these recipe files beside the bench's (e.g. resources/recipes/executorch/*.yaml)",
    )
    p.add_argument(
        "--toy",
        action="store_true",
        help="tiny sizes for tests: machine limits on small arrays; causal-lm: a tiny synthetic Llama, "
        "4 new tokens, 1 round",
    )
    p.add_argument(
        "--search",
        type=int,
        nargs="?",
        const=4,
        metavar="TRIALS",
        help="encoder: first run TRIALS trials (default 4) of resources/recipes/search/minilm-bench.yaml in "
        "the workspace, then time its best recipe as `searched-best` beside the others",
    )
    p.add_argument("--out", help="JSON results file (default: <workspace>/bench/bench-<time>.json)")
    p.add_argument(
        "--json",
        nargs="?",
        const=True,
        metavar="FILE",
        help="alone: print the results as JSON instead of the table; with FILE: write them there",
    )
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser(
        "sensitivity",
        help="per-layer quantization sensitivity: which layers lose fidelity when quantized",
        description="Per-layer quantization sensitivity. --json prints: model, family, scheme, scheme_title, "
        "mode, objective, examples, sequence_length, fidelity_all, fidelity_none, seconds, settings, "
        "exclusion_parameter, bits_per_weight (the weight schemes, every layer quantized, scales counted; "
        "null for onnx-int8 and kv-bits) and layers (each: layer, module, kind, parameters, bits_per_weight, "
        "fidelity_alone, fidelity_without, fidelity_loss, recovered); with --target, mixed_precision; with "
        "--budget-bits, budget (budget, excluded, bits_per_weight, bits_per_weight_all_quantized, "
        "estimated_fidelity, method).",
        parents=[trust],
    )
    p.add_argument("model", help="builtin:minilm, a Hugging Face folder or an .onnx file")
    p.add_argument(
        "--scheme",
        choices=tuple(SENSITIVITY_SCHEMES),
        default="onnx-int8",
        help="onnx-int8: onnx.quantize_dynamic of the fused graph; torch-int8: quantize.dynamic_int8; "
        "int4: quantize.weight_only with 4 bits; int4-gptq, int4-awq: quantize.gptq / quantize.awq with 4 "
        "bits, each layer alone, calibrated on the examples; kv-bits: a causal LM's KV cache, one decoder "
        "layer at a time (kv_cache.quantize at --bits) (default onnx-int8)",
    )
    p.add_argument(
        "--mode",
        choices=SENSITIVITY_MODES,
        default="both",
        help="quantize one layer at a time, all but one, or both (default both)",
    )
    p.add_argument("--per-tensor", action="store_true", help="int8 schemes: one weight scale per layer")
    p.add_argument(
        "--group-size", type=int, help="int4, int4-gptq, int4-awq: input columns per scale (default 128)"
    )
    p.add_argument(
        "--budget-bits",
        type=float,
        metavar="BITS",
        help="weight schemes: also list the layers to keep float so that the average bits per weight "
        "(scales counted, float layers at their float bits) stays at most BITS (e.g. 4.5) with the most "
        "fidelity; at most 16, at least the scheme's own bits",
    )
    p.add_argument(
        "--bits", type=float, default=4, help="kv-bits: bits per key and value coordinate (default 4)"
    )
    p.add_argument(
        "--kv-method",
        choices=("turboquant", "quanto"),
        default="turboquant",
        help="kv-bits: the cache quantizer (default turboquant)",
    )
    p.add_argument(
        "--target", type=float, help="also list the layers to keep float to reach this fidelity (e.g. 0.995)"
    )
    p.add_argument(
        "--data", default="builtin:sentences", help="examples: builtin:sentences or .txt/.jsonl/.csv"
    )
    p.add_argument("--max-examples", type=int, default=32, help="examples measured on (default 32)")
    p.add_argument("--sequence-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_sensitivity)

    p = sub.add_parser(
        "search",
        help="search a recipe's `search:` space for the best variants on this machine (Optuna)",
        parents=[recipe_trust, ws],
    )
    p.add_argument("recipe", help="a recipe file with a search: section")
    p.add_argument("--trials", type=int, help="trials in the study (default: the recipe's search.trials)")
    p.add_argument("--json", action="store_true", help="print the result JSON")
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="trials at a time (default: 2 from 4 cores up, else 1; with --ray: as many as the cluster "
        "fits); their timings still run one at a time",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the trials as tasks of a Ray cluster: HOST:PORT of its head, auto (the cluster this "
        "machine belongs to) or local (a private one on this machine); the workspace must be on a file "
        "system every node sees at the same path (docs/search.md)",
    )
    p.add_argument(
        "--ray-cpus-per-trial",
        type=int,
        metavar="N",
        help="CPUs Ray reserves for each trial (default: all of the smallest node's: one trial per node)",
    )
    p.set_defaults(handler=cmd_search)

    add_graph_verbs(sub, ws, trust)

    p = sub.add_parser("screenshots", help="render each main view offscreen to PNG files", parents=[ws])
    p.add_argument("dir", help="output folder")
    p.set_defaults(handler=cmd_screenshots)
    return parser


def add_graph_verbs(sub: Any, ws: argparse.ArgumentParser, trust: argparse.ArgumentParser) -> None:
    """`graph`, `diff` and `diagnose`: each takes variant ids (of --workspace) or checkpoint paths."""
    ref = "a variant id (a unique prefix is enough) or a checkpoint path / builtin:minilm"

    def data_flags(p: argparse.ArgumentParser, examples: int) -> None:
        p.add_argument("--json", action="store_true", help="print the documented JSON")
        p.add_argument(
            "--data", default="builtin:sentences", help="examples: builtin:sentences or .txt/.jsonl/.csv"
        )
        p.add_argument("--examples", type=int, default=examples, help=f"examples run (default {examples})")
        p.add_argument("--sequence-length", type=int, default=32, help="tokens per example (default 32)")

    def table_flags(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--csv", metavar="FILE", help=f"also write {what} as a CSV file")
        p.add_argument("--json-file", metavar="FILE", help=f"also write {what} as a JSON file")

    p = sub.add_parser(
        "graph",
        help="the computation graph of a variant: time share and precision per node",
        parents=[ws, trust],
    )
    p.add_argument("variant", help=ref)
    p.add_argument("--against", help="also the layer-wise error against this model (" + ref + ")")
    p.add_argument("--no-profile", action="store_true", help="skip the run-time profile")
    p.add_argument("--top", type=int, default=25, help="nodes listed without --json (default 25)")
    data_flags(p, 4)
    table_flags(p, "one row per node (name, op, group, precision, time_share, error)")
    p.set_defaults(handler=cmd_graph)

    p = sub.add_parser(
        "diff", help="layer-wise error of B against A and the first layer where it jumps", parents=[ws, trust]
    )
    p.add_argument("a", help="the reference: " + ref)
    p.add_argument("b", help="the model compared with it: " + ref)
    p.add_argument("more", nargs="*", metavar="C", help="more models, each compared with A as B is")
    data_flags(p, 4)
    table_flags(p, "one row per layer compared and per node added, removed or changed")
    p.set_defaults(handler=cmd_diff)

    p = sub.add_parser(
        "diagnose",
        help="why a variant is not faster: ranked causes with their cost and fix",
        parents=[ws, trust],
    )
    p.add_argument("variant", help=ref)
    p.add_argument("--against", help="also find the layer where the error against this model jumps")
    p.add_argument("--threads", type=int, help="CPU threads for the profile (default: the library's)")
    data_flags(p, 4)
    p.set_defaults(handler=cmd_diagnose)

    p = sub.add_parser(
        "assist",
        help="assisted generation: a draft variant proposes tokens, the target verifies (acceptance, tokens/s)",
        parents=[ws, trust],
    )
    p.add_argument("target", help="the model that generates: " + ref)
    p.add_argument("--draft", required=True, help="the model that drafts: " + ref + ", or 'self'")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--draft-tokens", type=int, default=5, help="tokens drafted per round (default 5)")
    p.add_argument("--prompts", type=int, default=4, help="prompts from the data (default 4)")
    p.add_argument(
        "--data", default="builtin:sentences", help="prompt text: builtin:sentences or .txt/.jsonl/.csv"
    )
    p.add_argument("--json", action="store_true", help="print the documented JSON")
    p.set_defaults(handler=cmd_assist)


def open_path_argument(raw: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`model-studio PATH` opens the app on PATH (what a file manager runs for the .desktop entry's `%f`):
    a first argument that is no verb but an existing file or folder, or a builtin model, means `--open PATH`."""
    verbs = {v for a in parser._actions if isinstance(a, argparse._SubParsersAction) for v in a.choices}
    first = raw[0] if raw else ""
    is_path = first.startswith("builtin:") or (bool(first) and Path(first).expanduser().exists())
    if is_path and first not in verbs and not first.startswith("-"):
        return ["--open", first, *raw[1:]]
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["__worker__"]:  # the frozen bundle's worker (studio.jobs.worker_command)
        from studio.worker import main as worker_main

        return worker_main()
    if raw[:1] == ["__memprobe__"]:  # the frozen bundle's memory probe (studio.evaluation.memprobe)
        from studio.evaluation.memprobe import main as memprobe_main

        return memprobe_main()
    parser = build_parser()
    args = parser.parse_args(open_path_argument(raw, parser))
    handler: Handler | None = getattr(args, "handler", None)
    # The built-in techniques register how their structure records are replayed, which reopening a saved
    # variant folder needs (studio.checkpoints.variant_folder) whatever the verb.
    import studio.techniques  # noqa: F401

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
        return Cancelled.exit_code
    except BrokenPipeError:  # output piped into `head` and friends
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        from studio.errors import disk_full_error

        full = disk_full_error(exc, "output files")
        if full is None or args.debug:
            raise
        print(f"model-studio: error: {full.message}", file=sys.stderr)
        return full.exit_code


if __name__ == "__main__":
    sys.exit(main())
