"""`model-studio bench --family causal-lm` at toy sizes, the machine limits it is read against, and the
onnxruntime-genai peer's runner on a tiny model its own builder made (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.bench_llm import PEER, REFERENCE, TOY_CONFIG, TOY_NAME, TOY_SKIP, recipe_files, synthetic_llama


def test_machine_limits_at_toy_sizes():
    from studio.evaluation.machine_limits import TOY_SHAPES, toy_machine_limits

    limits = toy_machine_limits(1)
    bw = limits["memory_bandwidth"]
    assert bw["triad_gb_per_s"] > 0 and bw["array_bytes"] == 8 * 1024**2 and bw["threads"] == 1
    gemm = limits["gemm"]
    assert [r["shape"] for r in gemm["shapes"]] == [s[0] for s in TOY_SHAPES]
    assert all(r["fp32_gops"] > 0 and r["int8_gops"] > 0 for r in gemm["shapes"])
    assert gemm["fp32_peak_gops"] == max(r["fp32_gops"] for r in gemm["shapes"])
    assert gemm["int8_peak_gops"] == max(r["int8_gops"] for r in gemm["shapes"])
    assert "MatMulInteger" in gemm["int8_kernel"]
    # the flags are the machine's: each one reported is in /proc/cpuinfo, and AVX2 is reported when present
    cpuinfo = Path("/proc/cpuinfo").read_text()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "flags :")
    present = set(line.split(":", 1)[1].split())
    assert set(limits["cpu_flags"]) <= present
    assert ("avx2" in limits["cpu_flags"]) == ("avx2" in present)


def test_ortgenai_runner_on_a_tiny_model_its_builder_made(tmp_path):
    import torch

    from studio.evaluation.ortgenai_runner import (
        BuilderFailed,
        OrtGenaiLoop,
        build_model,
        thread_overlay,
        weight_bytes,
    )

    hf = synthetic_llama(tmp_path / "hf", TOY_CONFIG)
    try:
        out = build_model(hf, tmp_path / "int4", precision="int4")
    except BuilderFailed as exc:
        pytest.skip(f"the onnxruntime-genai builder does not build a tiny Llama here: {exc}")
    written = (out / "genai_config.json").read_text()
    loop = OrtGenaiLoop(out, threads=1, max_new_tokens=4)  # loads with the overlay below, or raises
    assert (out / "genai_config.json").read_text() == written  # the builder's file is left as it wrote it
    options = json.loads(thread_overlay(1))["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 1
    assert options["session.intra_op.allow_spinning"] == options["session.inter_op.allow_spinning"] == "0"
    prompts = torch.tensor([[5, 17, 300, 42, 9, 11, 250, 7]] * 2)
    tokens, state = loop.generate(prompts, 4)
    assert tokens.shape == (2, 4) and torch.equal(tokens[0], tokens[1])  # the same prompt, the same tokens
    # the first token is the greedy pick from the prompt's last logits (EOS held back, as min_length does)
    logits = loop.logits(prompts[:1])
    assert logits.shape == (1, 8, TOY_CONFIG["vocab_size"])
    last = logits[0, -1].clone()
    last[1] = float("-inf")  # tinylm's tokenizer: EOS is id 1
    assert int(tokens[0, 0]) == int(last.argmax())
    head = TOY_CONFIG["hidden_size"] // TOY_CONFIG["num_attention_heads"]
    per_position = 2 * TOY_CONFIG["num_hidden_layers"] * TOY_CONFIG["num_key_value_heads"] * head * 4
    assert loop.cache_bytes(state) == per_position * (8 + 4) * 2
    assert 0 < weight_bytes(out) < (hf / "model.safetensors").stat().st_size  # 4-bit, smaller than float


def test_bench_causal_lm_toy_prints_the_table_and_writes_every_field(tmp_path, capsys):
    from studio.cli import main

    out = tmp_path / "llm.json"
    code = main(["bench", "--family", "causal-lm", "--toy", "--json", str(out), "--workspace", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["family"] == "causal-lm" and result["toy"] is True
    assert result["new_tokens"] == 4 and result["rounds"] == 1 and result["batch_sizes"] == [1, 8]
    assert result["machine_limits"]["memory_bandwidth"]["triad_gb_per_s"] > 0
    assert "memory bandwidth" in table
    models = {m["model"]: m for m in result["models"]}
    assert "05-torch-int4-gptq" in models[TOY_NAME]["variants"]  # GPTQ runs on the tiny model
    assert list(models) == ["builtin:tinylm", TOY_NAME]
    toy = models[TOY_NAME]
    assert toy["config"]["hidden_size"] == TOY_CONFIG["hidden_size"]
    assert toy["parameters"] < 2_000_000
    p, n = result["prompt_tokens"], result["new_tokens"]
    bandwidth = result["machine_limits"]["memory_bandwidth"]["triad_gb_per_s"]
    for label, m in models.items():
        assert f"{label} (" in table
        rows = m["variants"]
        recipes = [p.stem for p in recipe_files() if p.stem not in TOY_SKIP.get(label, ())]
        assert list(rows) == [*recipes, PEER]
        assert PEER in rows and rows[PEER]["peer"] is True
        for name, row in rows.items():
            if name == PEER and "tpot_ms" not in row:
                assert row["error"]  # the builder failed on this model: the row says why
                continue
            assert "error" not in row, (label, name, row.get("error"))
            for b in ("1", "8"):
                assert row["ttft_ms"][b]["runs"] == 1 and row["tpot_ms"][b]["runs"] == n - 1
                assert row["decode_tokens_per_s"][b] == pytest.approx(
                    int(b) * 1000.0 / row["tpot_ms"][b]["p50"]
                )
                limit = bandwidth * 1e9 / row["weight_bytes_per_token"]
                assert row["bandwidth_share"][b] == pytest.approx(
                    row["decode_tokens_per_s"][b] / int(b) / limit
                )
            assert row["kv_cache_bytes"] > 0 and row["size_bytes"] > 0
            assert (row["perplexity"] is not None) == m["perplexity_measured"]
        fp32 = rows[REFERENCE]
        cfg = m["config"]
        head = cfg["hidden_size"] // cfg["num_attention_heads"]
        kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head * (p + n) * 4
        assert fp32["kv_cache_bytes"] == kv
        # INT4 storage reads fewer bytes per token than float32 (the ONNX one quantizes the tied output layer
        # too, the torch one keeps the embedding table float: most of a toy model's bytes)
        int4 = rows["07-onnx-cache-int4"]["weight_bytes_per_token"]
        assert int4 < 0.5 * fp32["weight_bytes_per_token"]
        assert rows["04-torch-int4-weight-only"]["weight_bytes_per_token"] < fp32["weight_bytes_per_token"]
        # the INT4 kernel limit at the block sizes the INT4 graphs use, and each graph's share of its own
        kernel = m["int4_kernel_limit"]
        assert kernel["linear_layers"] == 5 * cfg["num_hidden_layers"] + 1
        blocks = {r["int4_block_size"] for r in rows.values() if r["int4_block_size"]}
        assert blocks == {32, 128} and set(kernel["blocks"]) == {"32", "128"}  # 07, 08 and the peer; 10
        for row in rows.values():
            if row["int4_block_size"] and "tpot_ms" in row:
                limit = kernel["blocks"][str(row["int4_block_size"])]
                assert row["kernel_share"] == pytest.approx(
                    row["decode_tokens_per_s"]["1"] / limit["tokens_per_s"]
                )
        assert "INT4 kernel limit" in table
        targets = {t["target"]: t for t in m["targets"]}
        assert set(targets) == {"bandwidth", "vs onnxruntime-genai", "perplexity"}
        best = rows[targets["bandwidth"]["variant"]]
        assert best["precision"] == "int4" and not best["peer"]
        assert targets["bandwidth"]["ratio"] == best["bandwidth_share"]["1"]
        assert targets["bandwidth"]["met"] == (best["bandwidth_share"]["1"] >= 0.8)
        if "decode_tokens_per_s" in rows[PEER]:
            speedup = best["decode_tokens_per_s"]["1"] / rows[PEER]["decode_tokens_per_s"]["1"]
            assert targets["vs onnxruntime-genai"]["ratio"] == pytest.approx(speedup)
        for t in m["targets"]:
            assert f"target {t['target']}: {'MET' if t['met'] else 'MISSED'}" in table
    tiny = models["builtin:tinylm"]
    assert tiny["perplexity_measured"] and tiny["variants"][REFERENCE]["perplexity"] > 1
    ppl = {t["target"]: t for t in tiny["targets"]}["perplexity"]
    best = tiny["variants"][ppl["variant"]]
    assert ppl["ratio"] == pytest.approx(best["perplexity"] / tiny["variants"][REFERENCE]["perplexity"])
    assert {t["target"]: t for t in toy["targets"]}["perplexity"]["got"] == "not measured (random weights)"
    # the KV-cache section runs with the causal-lm bench too (its own test below checks its fields)
    assert set(result["kv_cache"]["rows"]) >= {"float16", "turboquant 4", "quanto 4"}
    assert "target KV cache: " in table


def test_bench_kv_cache_toy_prints_the_table_and_writes_every_field(tmp_path, capsys):
    from studio.bench_kv import QUANTIZED, REFERENCE, TOY_CONTEXT
    from studio.cli import main
    from studio.evaluation.kv_quant import DEFAULT_RESIDUAL

    out = tmp_path / "kv.json"
    code = main(["bench", "--family", "kv-cache", "--toy", "--json", str(out), "--workspace", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["family"] == "kv-cache" and result["toy"] is True and "models" not in result
    kv = result["kv_cache"]
    assert kv["model"] == "builtin:tinylm" and kv["max_position_embeddings"] == 512
    assert kv["context"] == TOY_CONTEXT and kv["prompt_tokens"] + kv["new_tokens"] == kv["context"]
    assert kv["perplexity_window"] == kv["context"] and kv["perplexity_tokens"] == 2 * kv["context"]
    names = [REFERENCE, *(f"{m} {b:g}" for m, b in QUANTIZED)]
    assert list(kv["rows"]) == names
    assert {"turboquant 4", "turboquant 3", "turboquant 2.5", "quanto 4"} <= set(names)
    # tinylm runs in float32: the reference is the float cache's elements x 2 bytes, and the table says so
    head = 192 // 6
    elements = 2 * 4 * 2 * head * kv["context"]  # keys and values, 4 layers, 2 KV heads
    assert kv["model_dtype"] == "float32" and kv["float_cache_elements"] == elements
    assert kv["float_cache_bytes"] == elements * 4 and kv["fp16_reference_bytes"] == elements * 2
    assert "elements x 2" in table and "float32" in table
    base = kv["rows"][REFERENCE]
    assert base["cache_bytes"] == elements * 2 and base["fp16_share"] == 1.0
    assert base["perplexity_ratio"] == 1.0 and base["generation_match"] == 1.0
    for name, row in kv["rows"].items():
        assert "error" not in row, (name, row.get("error"))
        for field in ("cache_bytes", "fp16_share", "perplexity", "perplexity_ratio", "generation_match"):
            assert row[field] is not None, (name, field)
        assert row["decode_tokens_per_s"] == pytest.approx(1000.0 / row["tpot_ms"]["p50"])
        assert row["tpot_ms"]["runs"] == kv["new_tokens"] - 1  # one round of the new tokens after the first
        assert row["fp16_share"] == pytest.approx(row["cache_bytes"] / kv["fp16_reference_bytes"])
        assert row["perplexity_ratio"] == pytest.approx(row["perplexity"] / base["perplexity"])
        assert 0.0 <= row["generation_match"] <= 1.0
        assert name in table
    # every quantized cache holds fewer bytes than the float one; TurboQuant 4 fewer than float16's too
    for method, bits in QUANTIZED:
        row = kv["rows"][f"{method} {bits:g}"]
        assert row["method"] == method and row["key_bits"] == bits
        assert row["residual_length"] == DEFAULT_RESIDUAL[method]  # the technique's defaults
        assert row["held_bytes"] == row["cache_bytes"] < kv["float_cache_bytes"]
    assert kv["rows"]["turboquant 4"]["cache_bytes"] < kv["fp16_reference_bytes"]
    tq = [kv["rows"][f"turboquant {b:g}"]["cache_bytes"] for b in (4, 3, 2.5)]
    assert tq == sorted(tq, reverse=True) and len(set(tq)) == 3  # fewer bits, fewer bytes
    target = kv["target"]
    at4 = [r for r in kv["rows"].values() if r["key_bits"] == 4]
    expected = any(r["fp16_share"] <= 0.30 and r["perplexity_ratio"] <= 1.02 for r in at4)
    assert target["met"] == expected
    assert f"target KV cache: {'MET' if target['met'] else 'MISSED'} (need <= 30% of fp16 bytes" in table
    assert "turboquant 2.5:" in target["got"] and "turboquant 3:" in target["got"]


def test_bytes_per_token_leave_out_a_table_only_looked_up_even_through_a_transpose(tmp_path):
    """onnxruntime-genai's builder gathers a tied embedding through Transpose(output weight): that table is
    read one row per token, so only the matrix products' weights count (a wrong count misstates bw share)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from studio.bench_llm import onnx_bytes_per_token

    table = numpy_helper.from_array(np.zeros((4, 10), np.float32), "lm_head.weight")  # [hidden, vocab]
    weight = numpy_helper.from_array(np.zeros((4, 4), np.float32), "proj.weight")
    nodes = [
        helper.make_node("Transpose", ["lm_head.weight"], ["table"], perm=[1, 0]),
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("MatMul", ["embedded", "proj.weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])],
        [table, weight],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert onnx_bytes_per_token(tmp_path / "m.onnx") == 4 * 4 * 4  # proj.weight only
    nodes[2] = helper.make_node("MatMul", ["embedded", "lm_head.weight"], ["logits"])  # tied: read whole
    graph = helper.make_graph(nodes, "g", graph.input, graph.output, [table, weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert onnx_bytes_per_token(tmp_path / "m.onnx") == (4 * 10 + 4 * 4) * 4


def test_the_int4_kernel_limit_multiplies_by_every_linear_weight_of_a_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.evaluation.int4_kernel_limit import int4_decode_limit, linear_shapes

    config = dict(TOY_CONFIG, num_attention_heads=4, num_key_value_heads=1)
    with torch.device("meta"):
        module = LlamaForCausalLM(LlamaConfig(**config))
    linears = [m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)]
    shapes = linear_shapes(module.config.to_dict())
    assert sum(k * n for _, k, n in shapes) == sum(linears)  # q, k, v packed into one: the same weights
    assert len(shapes) == len(linears) - 2 * config["num_hidden_layers"]
    limit = int4_decode_limit(config, threads=1, block_sizes=(32,), repeats=1)
    block = limit["blocks"]["32"]
    # codes at half a byte per weight plus one float32 scale per 32 weights
    assert block["weight_bytes"] == sum(n * (-(-k // 32)) * (16 + 4) for _, k, n in shapes)
    assert block["tokens_per_s"] == pytest.approx(1000.0 / block["ms_per_token"]) and block["gb_per_s"] > 0
