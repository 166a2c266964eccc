"""Write a synthetic sharded safetensors checkpoint (default 2.2 GB) for measuring `inspect` on big models.

    python scripts/make_big_safetensors.py OUT_DIR [--gb 2.2] [--shard-gb 0.5]

Tensors are written one at a time (never the whole checkpoint in memory); the folder has no config.json,
so it opens as a weights-only safetensors folder, like a shard set whose architecture the studio does not know.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--gb", type=float, default=2.2, help="total size in GB (default 2.2)")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="shard size in GB (default 0.5)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    hidden, total, shard, shard_bytes, index = 2048, 0, {}, 0, {}
    n_shards, layer = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, n_shards
        if shard:
            name = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(args.out / name))
            index.update({k: name for k in shard})
            n_shards += 1
            shard, shard_bytes = {}, 0

    while total < args.gb * 1e9:
        for part, shape in (
            ("attn.qkv", (3 * hidden, hidden)),
            ("attn.out", (hidden, hidden)),
            ("mlp.up", (4 * hidden, hidden)),
            ("mlp.down", (hidden, 4 * hidden)),
        ):
            t = torch.randn(shape, generator=gen) * 0.02
            if layer % 3 == 0:
                t = t.to(torch.bfloat16)
            name = f"layers.{layer}.{part}.weight"
            shard[name] = t
            nbytes = t.numel() * t.element_size()
            shard_bytes += nbytes
            total += nbytes
            if shard_bytes >= args.shard_gb * 1e9:
                flush()
        layer += 1
    flush()
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    print(f"wrote {total / 1e9:.2f} GB in {n_shards} shards, {len(index)} tensors, to {args.out}")


if __name__ == "__main__":
    main()
