"""kv_cache.quantize: the quantized caches (quanto-style and TurboQuant), their bytes, and generation with them.

The quantizers are checked against the numbers of the TurboQuant paper (arXiv 2504.19874: distortion of
unit vectors about 0.36, 0.117, 0.03, 0.009 at 1-4 bits, inner products unbiased with the QJL sketch), the
cache on builtin:tinylm and on a small random Llama with 128-wide heads (the width of real models).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from studio.errors import BadInput

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def unit_vectors(n, d, seed=0):
    import torch

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def spec(**kw):
    from studio.evaluation.kv_quant import KVCacheSpec

    base = {"method": "turboquant", "bits": 4.0, "value_bits": 4.0}
    return KVCacheSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def tinylm():
    from studio.checkpoints import open_checkpoint

    return open_checkpoint("builtin:tinylm")


def kv_variant(model, **params):
    """A private copy of tinylm's module with the technique applied (its weights are shared, not changed)."""
    import copy

    from studio.techniques.base import RunContext, initial_state
    from studio.techniques.kv_cache import KVCacheQuantize

    state = initial_state(model)
    state.module = copy.copy(state.module)
    p = KVCacheQuantize.Params(**params)
    KVCacheQuantize().check(p, model)
    return KVCacheQuantize().run(state, p, RunContext(original=model, workdir=None))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ quantizers


def test_codes_pack_into_exactly_bits_per_code_and_unpack_unchanged():
    import torch

    from studio.evaluation.kv_quant import pack_codes, unpack_codes

    for bits in (1, 2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (2, 3, 32))
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == 32 * bits // 8
        assert torch.equal(unpack_codes(packed, bits, 32), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_codebook_has_the_optimal_gaussian_distortion(bits):
    from studio.evaluation.kv_quant import gaussian_mse, lloyd_max_gaussian

    centroids, bounds = lloyd_max_gaussian(bits)
    assert len(centroids) == 1 << bits and len(bounds) == len(centroids) - 1
    assert list(centroids) == sorted(centroids) and centroids[0] == pytest.approx(-centroids[-1])
    assert gaussian_mse(bits) == pytest.approx(PAPER_MSE[bits], rel=0.25)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turboquant_distortion_of_unit_vectors_is_near_the_paper(bits):
    from studio.evaluation.kv_quant import TurboQuantizer

    x = unit_vectors(4000, 128)
    q = TurboQuantizer(bits, 128, qjl=False)
    mse = float(((x - q.dequantize(q.quantize(x), 128)) ** 2).sum(-1).mean())
    assert mse == pytest.approx(PAPER_MSE[bits], rel=0.25)


def test_a_half_bit_lies_between_its_two_neighbours():
    from studio.evaluation.kv_quant import TurboQuantizer

    x = unit_vectors(2000, 64, seed=1)

    def mse(b):
        q = TurboQuantizer(b, 64, qjl=False)
        return float(((x - q.dequantize(q.quantize(x), 64)) ** 2).sum(-1).mean())

    assert mse(3.0) < mse(2.5) < mse(2.0)


def test_a_head_width_that_is_not_a_power_of_two_gets_an_orthogonal_rotation():
    import torch

    from studio.evaluation.kv_quant import rotation

    for d in (32, 48):
        r = rotation(d, 0)
        assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_keys_give_unbiased_inner_products_and_codes_alone_do_not(bits):
    import torch

    from studio.evaluation.kv_quant import TurboQuantizer

    n, d = 20000, 64
    x = unit_vectors(n, d, seed=2)
    y = x + 0.5 * unit_vectors(n, d, seed=3)  # queries correlated with the keys, as attention's are
    true = (x * y).sum(-1)

    def relative_bias(q):
        est = (q.dequantize(q.quantize(x), d) * y).sum(-1)
        err = est - true
        return float(err.mean() / true.mean()), float(err.std() / math.sqrt(n) / true.mean())

    bias, stderr = relative_bias(TurboQuantizer(bits, d, qjl=True))
    assert abs(bias) < max(4 * stderr, 0.004)
    # the same bits spent on codes only shrink every inner product (the bias the sketch removes)
    mse_bias, _ = relative_bias(TurboQuantizer(bits, d, qjl=False))
    assert mse_bias < -0.5 * PAPER_MSE[bits]
    assert torch.isfinite(torch.tensor(bias))


def test_quanto_keys_per_channel_and_values_per_token_reconstruct_within_half_a_step():
    import torch

    from studio.evaluation.kv_quant import ChannelQuantizer, TokenQuantizer

    x = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(4))
    x[..., 5] *= 20  # an outlier channel, as keys have: per-channel scales keep the others fine
    keys = ChannelQuantizer(4, 32)
    p = keys.quantize(x)
    assert p["scale"].shape == (1, 2, 2, 32)  # one scale per channel per 32-token block
    step = p["scale"].float().repeat_interleave(32, dim=-2)
    assert ((keys.dequantize(p, 32) - x).abs() <= step / 2 + 1e-2).all()
    values = TokenQuantizer(2, 16, 32)
    p = values.quantize(x)
    assert p["scale"].shape == (1, 2, 64, 2)  # one scale per token per 16 channels
    step = p["scale"].float().repeat_interleave(16, dim=-1)
    assert ((values.dequantize(p, 32) - x).abs() <= step / 2 + 1e-2).all()


# ------------------------------------------------------------------------------------------------ the cache


def fill(config, cache_spec, tokens, seed=0):
    """A quantized cache of one random model's decoder after `tokens` positions (prefill + 1 decode step)."""
    import torch
    from transformers import LlamaForCausalLM

    from studio.evaluation.kv_quant import quantized_cache

    torch.manual_seed(seed)
    module = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    cache = quantized_cache(config, cache_spec)
    with torch.inference_mode():
        module(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        module(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    return cache


@pytest.fixture(scope="module")
def wide_heads():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=4096,
    )


# quanto's keys share a scale over a block of tokens, so up to a block more than the window stays float
@pytest.mark.parametrize("method, window", [("quanto", 0), ("turboquant", 0), ("turboquant", 16)])
def test_a_4_bit_cache_holds_at_most_30_percent_of_float16_bytes(wide_heads, method, window):
    from studio.evaluation.kv_quant import held_bytes

    tokens = 1024
    cache = fill(wide_heads, spec(method=method, group_size=64, residual_length=window), tokens)
    assert cache.get_seq_length() == tokens
    fp16 = 2 * wide_heads.num_hidden_layers * 2 * wide_heads.num_key_value_heads * tokens * 128
    assert held_bytes(cache) <= 0.30 * fp16
    assert held_bytes(cache) > 0.20 * fp16  # 4 bits and their scales/norms are really held


def test_bytes_are_the_packed_layout_plus_the_float_window(tinylm):
    from studio.evaluation.kv_quant import held_bytes

    config = tinylm.module.config
    d, heads_layers = config.head_dim, config.num_key_value_heads * config.num_hidden_layers
    # per head vector: keys 3-bit codes + 1-bit sketch + float16 norm and residual norm; values 4-bit
    # codes + float16 norm
    quantized = (3 * d // 8 + d // 8 + 2 + 2) + (4 * d // 8 + 2)
    float32 = 2 * 4 * d
    for window in (0, 16, 64):
        held = held_bytes(fill(config, spec(residual_length=window), 256))
        assert held == heads_layers * ((256 - window) * quantized + window * float32)
    sizes = {b: held_bytes(fill(config, spec(bits=b, value_bits=b), 256)) for b in (2, 2.5, 3, 4)}
    assert sizes[2] < sizes[2.5] < sizes[3] < sizes[4]


def test_the_default_4_bit_turboquant_cache_of_tinylm_at_its_full_context_is_within_30_percent(tinylm):
    """The issue's bound on the studio's own model: a head width of 32 leaves little room for the float16
    norms (6 bytes per token and head beside 32 bytes of codes), so TurboQuant keeps no float window by
    default (quanto, whose key scales span a block of tokens, keeps 16)."""
    from studio.evaluation.kv_quant import held_bytes

    config = tinylm.module.config
    assert spec().residual_length == 0
    assert spec(method="quanto").residual_length == 16
    tokens = config.max_position_embeddings
    fp16 = 2 * config.num_hidden_layers * 2 * config.num_key_value_heads * tokens * config.head_dim
    assert 0.25 * fp16 < held_bytes(fill(config, spec(), tokens)) <= 0.30 * fp16
    assert held_bytes(fill(config, spec(residual_length=16), tokens)) > 0.30 * fp16  # why the default is 0


def test_attention_through_the_cache_sees_the_residual_window_exactly(tinylm):
    """Inside the float window nothing is quantized: logits match the plain cache's for those steps."""
    import torch

    from studio.evaluation.kv_quant import decode_logits

    module = tinylm.module
    ids = torch.randint(3, 4096, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        full = module(input_ids=ids).logits
    window = decode_logits(module, ids, spec(residual_length=32))
    assert torch.allclose(window, full, atol=1e-4)
    quantized = decode_logits(module, ids, spec(residual_length=0, bits=2, value_bits=2))
    assert not torch.allclose(quantized, full, atol=1e-2)


# ------------------------------------------------------------------------------------------------ the technique


def test_tinylm_generates_with_the_4_bit_cache_close_to_float(tinylm):
    from studio.evaluation.data import load_examples
    from studio.evaluation.generation import GreedyLoop, cache_bytes, generation_prompts, greedy_tokens
    from studio.evaluation.kv_quant import is_quantized_cache
    from studio.evaluation.quality import generation_match

    # these prompts are short (48 + 24 tokens): a 16-token float window is a third of what is attended to,
    # and without one TurboQuant 4's greedy tokens match float's on about half of them
    state = kv_variant(tinylm, method="turboquant", bits=4, residual_length=16)
    assert state.transforms[-1]["technique"] == "kv_cache.quantize"
    assert tinylm.module.config is not state.module.config  # the original keeps its plain cache
    examples = load_examples("builtin:sentences", 8)
    prompts = generation_prompts(tinylm, examples, 4, 48)
    base = greedy_tokens(tinylm.module, "causal-lm", prompts, 24)
    var = greedy_tokens(state.module, "causal-lm", prompts, 24)
    assert generation_match(base, var) >= 0.6
    _, plain = GreedyLoop(tinylm.module, "causal-lm").generate(prompts[:1], 24)
    _, quantized = GreedyLoop(state.module, "causal-lm").generate(prompts[:1], 24)
    assert is_quantized_cache(quantized["cache"]) and not is_quantized_cache(plain["cache"])
    assert cache_bytes(quantized["cache"]) < 0.5 * cache_bytes(plain["cache"])
    two_bit = kv_variant(tinylm, method="quanto", bits=2, residual_length=0, group_size=16)
    assert generation_match(base, greedy_tokens(two_bit.module, "causal-lm", prompts, 24)) < 1.0


def test_a_saved_variant_reopens_with_its_cache_choice(tinylm, tmp_path):
    from studio.checkpoints.variant_folder import TRANSFORMS_KEY, build_variant_module
    from studio.evaluation.kv_quant import kv_spec_of

    state = kv_variant(tinylm, method="quanto", bits=4, value_bits=2)
    config = state.module.config
    setattr(config, TRANSFORMS_KEY, state.transforms)
    state.module.save_pretrained(tmp_path)
    from transformers import AutoConfig

    reopened = build_variant_module(type(state.module), tmp_path, AutoConfig.from_pretrained(tmp_path))
    assert kv_spec_of(reopened) == kv_spec_of(state.module)
    assert kv_spec_of(reopened).value_bits == 2


@pytest.mark.parametrize(
    "params, words",
    [
        ({"method": "quanto", "bits": 3}, "bits 3 is not supported by quanto"),
        ({"method": "turboquant", "bits": 5}, "bits 5 is not supported by turboquant"),
        ({"method": "turboquant", "bits": 4, "value_bits": 0.5}, "value_bits 0.5"),
    ],
)
def test_bits_outside_the_supported_set_are_refused(params, words):
    from pydantic import ValidationError

    from studio.techniques.kv_cache import KVCacheQuantize

    with pytest.raises(ValidationError, match=words):
        KVCacheQuantize.Params(**params)


def as_model(like, module):
    """`like` (a causal-LM checkpoint) with another architecture's module and config."""
    import dataclasses

    return dataclasses.replace(like, module_factory=lambda: module, config_factory=lambda: module.config)


def test_a_model_without_attention_or_not_a_causal_lm_is_refused(tinylm, bert_classifier):
    from transformers import MambaConfig, MambaForCausalLM, MistralConfig, MistralForCausalLM

    from studio.checkpoints import open_checkpoint
    from studio.techniques.kv_cache import KVCacheQuantize

    tech, p = KVCacheQuantize(), KVCacheQuantize.Params()
    with pytest.raises(BadInput, match="does not apply to text-classification"):
        tech.check(p, open_checkpoint(str(bert_classifier)))
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2))
    with pytest.raises(BadInput, match="needs a model with attention"):
        tech.check(p, as_model(tinylm, mamba))
    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2}
    sliding = MistralForCausalLM(MistralConfig(**small, num_attention_heads=2, sliding_window=8))
    with pytest.raises(BadInput, match="full-attention layers only; this model has sliding_attention"):
        tech.check(p, as_model(tinylm, sliding))
    tech.check(p, tinylm)


def test_cli_refuses_unsupported_bits_with_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: builtin:tinylm\nsteps:\n"
        "  - technique: kv_cache.quantize\n    params: {method: quanto, bits: 3}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "studio", "run", str(recipe), "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "bits 3 is not supported by quanto" in proc.stderr + proc.stdout
    assert not (tmp_path / "ws" / "variants").exists() or not any((tmp_path / "ws" / "variants").iterdir())
