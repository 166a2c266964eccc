"""Time the torch graph build: module hooks (the fallback, and what the studio did before) against
torch.export, for MiniLM and a synthetic 32-layer Llama (random weights, narrow layers).

    python scripts/bench_torch_graph.py [--repeats 3] [--layers 32]

Prints one line per model and builder: the first build (torch.export's first call in a process also
pays its one-time set-up), the median of the repeats after it, nodes, edges and the collapsed view's
boxes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def timed(build: Any, repeats: int) -> tuple[float, float, Any]:
    started = time.perf_counter()
    graph = build()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        build()
        times.append(time.perf_counter() - started)
    return first, statistics.median(times) if times else first, graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="layers of the synthetic Llama (default 32)")
    args = parser.parse_args()

    from studio.bench_llm import synthetic_llama
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.families import family_for
    from studio.inspection.graph_layout import layout_graph
    from studio.inspection.torch_graph import exported_graph, hooked_graph

    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "vocab_size": 4096,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        }
        llama = synthetic_llama(Path(tmp) / "llama", config)
        for label, ref in (("MiniLM", "builtin:minilm"), (f"Llama {args.layers} layers", str(llama))):
            model = open_checkpoint(ref)
            batch = family_for(model).batch(model, load_examples("builtin:sentences", 2), 16)
            for builder, build in (("module hooks", hooked_graph), ("torch.export", exported_graph)):
                first, median, graph = timed(lambda b=build, m=model, x=batch: b(m, x), args.repeats)
                boxes = len(layout_graph(graph).boxes)
                print(
                    f"{label:<18} {builder:<13} first {first:6.2f} s  median {median:6.2f} s  "
                    f"{len(graph.nodes):5d} nodes {len(graph.edges()):5d} edges {boxes:4d} boxes"
                )


if __name__ == "__main__":
    main()
