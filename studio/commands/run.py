"""`model-studio run`: a recipe checked here, run in a worker process, its events drawn on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from studio.commands.output import print_json, progress_bar, workspace_path
from studio.errors import BadInput, Cancelled, exit_code_for
from studio.units import human_bytes


class RunDisplay:
    """Prints worker events: a progress bar per step on a terminal, plain lines otherwise."""

    def __init__(self, steps: list[str], quiet: bool) -> None:
        self.steps = steps
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.current: int | None = None
        self.started = time.perf_counter()

    def label(self, step: int | None) -> str:
        if step is None or step < 0:
            return "prepare"
        if step >= len(self.steps):
            return "evaluate"
        return f"{step + 1}/{len(self.steps)} {self.steps[step]}"

    def __call__(self, event: Any) -> None:
        from studio.events import Log, Progress

        if self.quiet:
            return
        if isinstance(event, Progress):
            if self.tty:
                if self.current is not None and self.current != event.step:
                    sys.stderr.write("\n")
                self.current = event.step
                elapsed = time.perf_counter() - self.started
                sys.stderr.write(
                    f"\r{self.label(event.step):<32} [{progress_bar(event.fraction)}] {event.fraction * 100:5.1f}% "
                    f"{elapsed:6.1f}s {event.message[:50]:<50}"
                )
                sys.stderr.flush()
            elif event.fraction in (0.0, 1.0) and event.message:
                print(f"[{self.label(event.step)}] {event.message}", file=sys.stderr)
        elif isinstance(event, Log) and event.level in ("warning", "error"):
            print(f"\n[{self.label(event.step)}] {event.level}: {event.message}", file=sys.stderr)

    def done(self) -> None:
        if self.tty and not self.quiet and self.current is not None:
            sys.stderr.write("\n")


def cmd_run(args: argparse.Namespace) -> int:
    from studio.events import Done, Error
    from studio.pipeline import load_recipe, plan
    from studio.worker import WorkerClient

    recipe = load_recipe(args.recipe)
    try:
        planned = plan(recipe, path=args.recipe, trust=args.trust and not args.dry_run)
    except BadInput as exc:
        if args.dry_run and args.trust:  # the usual "--trust" hint would mislead here
            raise BadInput(
                f"{exc.problem} (a dry run never loads code, even with --trust)", path=exc.path
            ) from exc
        raise
    from studio.recipe_check import check_recipe

    # Names of heads and layers are checked against this model before a worker starts (the run
    # failed only after loading and calibrating otherwise).
    problems = check_recipe(recipe, planned.model)
    if problems:
        raise BadInput(problems[0].message, path=args.recipe)
    steps = [p.technique.id for p in planned.steps]
    if args.dry_run:
        if args.json:
            print_json({"valid": True, "steps": steps, "final_kind": planned.final_kind})
        else:
            print(
                f"{args.recipe}: valid; {len(steps)} steps ({' -> '.join(steps) or 'none'}), "
                f"result is a {planned.final_kind} model"
            )
        return 0
    ws = workspace_path(args)
    client = WorkerClient(
        recipe.model_dump(mode="json"), ws.root, recipe_path=str(args.recipe), trust=args.trust
    )
    display = RunDisplay(steps, quiet=False)
    result = None
    error = None
    try:
        for event in client.events():
            display(event)
            if isinstance(event, Done):
                result = event.result
            elif isinstance(event, Error):
                error = event
    except KeyboardInterrupt:
        client.cancel()
        display.done()
        print("model-studio: cancelled; nothing was saved", file=sys.stderr)
        return Cancelled.exit_code
    display.done()
    if error is not None:
        where = f"{display.label(error.step)}: " if error.step is not None else ""
        print(f"model-studio: error: {where}{error.message}", file=sys.stderr)
        if error.detail and (args.debug or error.kind in ("crash", "internal")):
            print(error.detail, file=sys.stderr)
        return exit_code_for(error.kind)
    assert result is not None
    if args.json:
        print_json(result)
    else:
        print_run_summary(result)
    return 0


def print_run_summary(result: dict[str, Any]) -> None:
    base = result["baseline"]
    rows = [("original", base)] + [(v["id"], v) for v in result["variants"]]
    print(f"{'variant':<26} {'kind':<9} {'size':>10} {'b1 p50':>10} {'bN p50':>10} {'quality':<40}")
    for name, row in rows:
        m = row["metrics"]
        lat = m.get("latency_ms", {})
        keys = sorted(lat, key=int)
        b1 = f"{lat[keys[0]]['p50']:.2f} ms" if keys else "-"
        bn = f"{lat[keys[-1]]['p50']:.2f} ms" if len(keys) > 1 else "-"
        q = m.get("quality", {})
        qtext = ", ".join(f"{k} {v:.4f}" for k, v in q.items() if isinstance(v, float)) or "reference"
        print(
            f"{name:<26} {row['kind']:<9} {human_bytes(m.get('size_bytes', 0)):>10} {b1:>10} {bn:>10} {qtext:<40}"
        )
    for v in result["variants"]:
        print(f"\nsaved {v['id']}: {v['artifact']}")
