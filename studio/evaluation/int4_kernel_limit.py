"""How fast ONNX Runtime's INT4 kernel can decode a Llama, with nothing else in the way.

Every INT4 ONNX variant of the LLM bench, the studio's and onnxruntime-genai's own, runs its linear layers
through the same kernel: `MatMulNBits` (MLAS, int8 compute on the activations at accuracy level 4). In a
decode step at batch 1 those layers are almost all the time (an ONNX Runtime profile of the 0.5B model's
decode: MatMulNBits 89% of the node time). So a graph whose decode step ran *only* its linear layers, on
the same kernel and threads, bounds the tokens/s any such variant can reach; and the bound at one block
size against another says what a graph choice (blocks of 128 instead of 32) can buy at best, whatever the
bytes say: on a CPU where the kernel is limited by arithmetic rather than memory, fewer bytes barely help.

The graph: one MatMulNBits node per linear layer of the model's config (q, k and v packed as the builder
packs them, o, gate, up, down per layer, and the output layer), each with its own random 4-bit weights and
float32 scales (symmetric, no zero points, as both the studio's pass and the builder write them), every one
fed an input of its own width at M = 1 and run in one session call, sequentially, so the Python call cost is
paid once per token as in a real step. Best of `repeats` calls after a warm-up (prepacking).
"""

from __future__ import annotations

from typing import Any

from studio.evaluation.machine_limits import best_seconds


def linear_shapes(config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, K, N) of every weight a Llama decode step multiplies by: per layer qkv, o, gate, up, down,
    then the output layer."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    ffn = int(config["intermediate_size"])
    layer = [
        ("qkv", hidden, (heads + 2 * kv_heads) * head_dim),
        ("o", heads * head_dim, hidden),
        ("gate", hidden, ffn),
        ("up", hidden, ffn),
        ("down", ffn, hidden),
    ]
    shapes = [(f"{i}.{name}", k, n) for i in range(int(config["num_hidden_layers"])) for name, k, n in layer]
    return [*shapes, ("lm_head", hidden, int(config["vocab_size"]))]


def _graph(shapes: list[tuple[str, int, int]], block_size: int, accuracy_level: int) -> Any:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    widths = sorted({k for _, k, _ in shapes})
    inputs = [helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, [1, k]) for k in widths]
    nodes, outputs, weights = [], [], []
    for name, k, n in shapes:
        blocks = -(-k // block_size)
        packed = rng.integers(0, 256, size=(n, blocks, block_size // 2), dtype=np.uint8)
        scales = (rng.random(n * blocks, dtype=np.float32) + 0.5) * 0.01
        weights += [
            numpy_helper.from_array(packed, f"{name}.B"),
            numpy_helper.from_array(scales, f"{name}.s"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [f"a{k}", f"{name}.B", f"{name}.s"],
                [f"{name}.y"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block_size,
                accuracy_level=accuracy_level,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "int4_linears", inputs, outputs, initializer=weights)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = min(model.ir_version, 9)
    return model, {f"a{k}": rng.standard_normal((1, k)).astype(np.float32) for k in widths}


def int4_decode_limit(
    config: dict[str, Any],
    threads: int,
    block_sizes: tuple[int, ...] = (32, 128),
    *,
    accuracy_level: int = 4,
    repeats: int = 20,
) -> dict[str, Any]:
    """Per block size: milliseconds of the model's linear layers alone at M = 1 on ONNX Runtime's
    MatMulNBits, the tokens/s that bounds, and the weight bytes it read (its GB/s beside the bandwidth)."""
    import onnxruntime as ort

    shapes = linear_shapes(config)
    out: dict[str, Any] = {
        "kernel": f"onnxruntime MatMulNBits, 4 bits, accuracy level {accuracy_level}, symmetric, M = 1",
        "threads": threads,
        "linear_layers": len(shapes),
        "blocks": {},
    }
    for block in block_sizes:
        model, feed = _graph(shapes, block, accuracy_level)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            options.add_session_config_entry(key, "0")  # as every session the benches time
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        weight_bytes = sum(len(init.raw_data) for init in model.graph.initializer)  # codes + scales
        del model

        def step(session: Any = session, feed: dict[str, Any] = feed) -> Any:
            return session.run(None, feed)

        seconds = best_seconds(step, repeats)
        out["blocks"][str(block)] = {
            "ms_per_token": seconds * 1000.0,
            "tokens_per_s": 1.0 / seconds,
            "weight_bytes": weight_bytes,
            "gb_per_s": weight_bytes / seconds / 1e9,
        }
        del session
    return out


def block_size_of(graph_path: Any) -> int | None:
    """The block size of a graph's MatMulNBits nodes (the first one's), or None without any."""
    from studio.checkpoints.onnx_graph import load_onnx_graph

    for node in load_onnx_graph(graph_path).graph.node:
        if node.op_type == "MatMulNBits":
            return next((int(a.i) for a in node.attribute if a.name == "block_size"), None)
    return None


def kernel_limit(config: dict[str, Any], blocks: set[int], threads: int, repeats: int) -> dict[str, Any]:
    """`int4_decode_limit` at the block sizes a bench's INT4 graphs use: {} without such graphs, an `error`
    if it cannot run (the bench's rows keep their numbers)."""
    if not blocks:
        return {}
    try:
        return int4_decode_limit(config, threads, tuple(sorted(blocks)), repeats=repeats)
    except Exception as exc:  # e.g. a config without a Llama's fields
        return {"error": f"{type(exc).__name__}: {exc}"}


def kernel_lines(m: dict[str, Any]) -> list[str]:
    """The INT4 kernel limit under a model's table, and each INT4 graph's decode as a share of it."""
    kernel = m.get("int4_kernel_limit") or {}
    if kernel.get("error"):
        return [f"  INT4 kernel limit: not measured ({kernel['error'][:100]})"]
    if not kernel.get("blocks"):
        return []
    limits = ", ".join(
        f"blocks of {b}: {v['ms_per_token']:.2f} ms = {v['tokens_per_s']:.1f} tok/s ({v['gb_per_s']:.1f} GB/s)"
        for b, v in kernel["blocks"].items()
    )
    shares = ", ".join(
        f"{name} {row['kernel_share'] * 100:.0f}%"
        for name, row in m["variants"].items()
        if row.get("kernel_share") is not None
    )
    return [
        f"  INT4 kernel limit (the linear layers alone on {kernel['kernel']}, b1): {limits}",
        f"  decode b1 as a share of its block size's kernel limit: {shares or '-'}",
    ]
