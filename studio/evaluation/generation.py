"""Generation speed of causal LMs and seq2seq models: TTFT, TPOT, tokens/s, KV-cache bytes, peak memory.

One forward pass at a fixed length says little about a generative model: users wait for the first token
(prefill, TTFT) and then for every next one (decode, TPOT), and the KV cache is what grows with context.
So prefill and decode are timed separately, by our own greedy loop over `model(...)` with
`past_key_values` (not `generate()`, whose logits processors, stopping criteria and bookkeeping would be
timed too). The same prompts, built from the evaluation data, are used for the baseline and every variant.

- TTFT: one prefill of the prompts plus the argmax of the last position (a fresh cache per call), timed
  by `latency.time_calls` (warm-up, then enough runs for a stable median, bootstrap CI of the median).
- TPOT: every decode step (one new token for each sequence of the batch, cache included) of complete
  greedy runs, repeated under the same policy; decode tokens/s = batch / TPOT p50.
- kv_cache_bytes: the bytes the cache tensors hold after prompt + new tokens at batch 1 (the last new
  token is fed too, so the cache covers exactly prompt_tokens + new_tokens positions).
- peak_memory_mb: on CUDA the allocator's peak during the largest batch's generation; on the CPU the
  resident-memory growth of this process during it (memory freed by earlier work and reused is not
  counted, so it is a lower bound; the number is comparable between variants of the same run).

Two options of `evaluate.generation` say how a torch variant generates, so a user sees what the KV cache
and fused attention buy: `attention` (eager, sdpa: PyTorch's scaled_dot_product_attention, flash:
FlashAttention 2, which needs CUDA and the flash-attn package) and `cache` (dynamic: grows by one position
per token; static: preallocated for prompt + new tokens, as torch.compile wants it; none: every new token
recomputes the whole sequence, and nothing is cached: kv_cache_bytes 0). They are recorded in the
metrics (`attention`: the implementation that ran, `cache`) when a recipe sets either.

ONNX graphs are measured when they take past key/values (export.onnx with `with_cache`), by the same
timing over `OnnxGreedyLoop` (studio/evaluation/onnx_generation.py), the cache bytes read from the
`present.*` arrays ONNX Runtime returns; a graph without the cache says how to export one. A seq2seq
export with the cache (model.onnx + decoder_with_past.onnx) runs through `OnnxSeq2SeqLoop`: TTFT is the
encoder plus the start token, TPOT one decoder step, and its cache bytes are the self- and cross-attention
arrays it holds, as torch's EncoderDecoderCache counts both.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.evaluation.data import Example, timing_examples
from studio.evaluation.generation_options import CACHES, set_attention, static_cache
from studio.evaluation.latency import TimingPolicy, summarise, time_calls

if TYPE_CHECKING:
    import torch

    from studio.checkpoints.base import LoadedModel
    from studio.evaluation.onnx_generation import OnnxGreedyLoop, OnnxSeq2SeqLoop
    from studio.evaluation.ortgenai_runner import OrtGenaiLoop

NO_CACHE_EXPORT = (
    "generation metrics need a graph exported with past key/values inputs (a cache-enabled export: "
    "export.onnx with `with_cache: true`); this graph has none, so every new token would recompute the "
    "whole prompt: not measured"
)


# ------------------------------------------------------------------------------------------------ prompts


def generation_prompts(
    model: LoadedModel, examples: Sequence[Example], batch_size: int, prompt_tokens: int
) -> torch.Tensor:
    """`batch_size` prompts of exactly `prompt_tokens` token ids from the evaluation text.

    Each prompt is real text long enough to fill the length, truncated to it; a tokenizer that still
    gives fewer tokens has its ids repeated, so no prompt needs padding (whose positions a hand-written
    cache loop would have to shift) and every variant sees the same ids.
    """
    import torch

    tok = model.tokenizer
    if tok is None:
        raise BadInput("generation metrics need the model's tokenizer, and it has none", path=model.path)
    rows = []
    for example in timing_examples(examples, batch_size, prompt_tokens):
        ids = list(tok(example.text, truncation=True, max_length=prompt_tokens)["input_ids"])
        if not ids:
            raise BadInput("the tokenizer gives no tokens for the evaluation text", path=model.path)
        while len(ids) < prompt_tokens:
            ids += ids[: prompt_tokens - len(ids)]
        rows.append(ids[:prompt_tokens])
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ the loop


def cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """The key and value tensors a transformers cache holds (DynamicCache: `layers[i].keys/values`;
    EncoderDecoderCache: its self-attention and cross-attention caches)."""
    for inner in ("self_attention_cache", "cross_attention_cache"):
        if hasattr(cache, inner):
            yield from cache_tensors(getattr(cache, inner))
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:
                yield t


def cache_bytes(cache: Any) -> int:
    if isinstance(cache, list):  # an ONNX loop's cache: the arrays ONNX Runtime returned
        from studio.evaluation.onnx_generation import array_bytes

        return array_bytes(cache)
    from studio.evaluation.kv_quant import held_bytes, is_quantized_cache

    if is_quantized_cache(cache):  # codes, scales, norms and sketch bits besides the float window
        return held_bytes(cache)
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


class GreedyLoop:
    """Greedy decoding of one torch module with a KV cache: `prefill` then `step`, one token at a time.

    `attention` (a key of generation_options.ATTENTION, None: the module's own) is set on the module
    until `restore()`; `cache` is "dynamic", "static" (then `max_len`, the positions it is allocated for,
    is needed) or "none" (each step runs the whole sequence again)."""

    def __init__(
        self,
        module: Any,
        family: str,
        *,
        attention: str | None = None,
        cache: str = "dynamic",
        max_len: int | None = None,
    ) -> None:
        import torch

        self.module = module
        self.seq2seq = family == "seq2seq"
        self.cache_kind = cache
        self.max_len = max_len
        config = getattr(module, "config", None)
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if config is None or "past_key_values" not in params:
            raise BadInput(
                "generation metrics need a transformers model that takes past_key_values; this variant's "
                f"module ({type(module).__name__}) does not"
            )
        self.config = config
        tensors = [*module.parameters(), *module.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        start = getattr(config, "decoder_start_token_id", None)
        self.start = start if start is not None else getattr(config, "pad_token_id", 0) or 0
        self._check_cache_option()
        self.previous_attention = getattr(config, "_attn_implementation", None)
        if attention is not None:
            set_attention(module, attention, self.device)

    @property
    def attention(self) -> str | None:
        """The attention implementation the module runs with now (transformers' name)."""
        return getattr(self.config, "_attn_implementation", None)

    def restore(self) -> None:
        """Give the module back the attention implementation it had before this loop."""
        if self.previous_attention is not None and self.attention != self.previous_attention:
            self.module.set_attn_implementation(self.previous_attention)

    def _check_cache_option(self) -> None:
        from studio.evaluation.kv_quant import kv_spec_of

        if self.cache_kind not in CACHES:
            raise BadInput(f"unknown cache '{self.cache_kind}' (expected one of: {', '.join(CACHES)})")
        if self.cache_kind != "dynamic" and kv_spec_of(self.module) is not None:
            raise BadInput(
                f"cache '{self.cache_kind}' does not apply to a kv_cache.quantize variant: it generates with "
                "its own quantized cache"
            )
        if self.cache_kind == "static":
            if self.seq2seq:
                raise BadInput("cache 'static' is measured for causal-lm models only, not seq2seq ones")
            if not self.max_len:
                raise BadInput("cache 'static' needs the number of positions to allocate")
            static_cache(self.config, self.max_len)

    def _cache(self) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        from studio.evaluation.kv_quant import kv_spec_of, quantized_cache

        if self.cache_kind == "none":
            return None
        if self.cache_kind == "static":
            return static_cache(self.config, self.max_len or 0)
        spec = kv_spec_of(self.module)  # a kv_cache.quantize variant generates with its quantized cache
        if spec is not None and not self.seq2seq:
            return quantized_cache(self.config, spec)
        if self.seq2seq:
            return EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        return DynamicCache(config=self.config)

    def prefill(self, prompts: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The first new token of each prompt, and the state (cache, encoder outputs) decoding goes on from."""
        import torch

        ids = prompts.to(self.device)
        cache = self._cache()
        state: dict[str, Any] = {"cache": cache}
        if self.seq2seq:
            state["encoder_outputs"] = self.module.get_encoder()(input_ids=ids)
            start = torch.full((len(ids), 1), self.start, dtype=torch.long, device=self.device)
            state["decoded"] = start
            out = self._decoder(state, start)
        else:
            state["ids"] = ids
            out = self.module(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
        return out.logits[:, -1].argmax(-1), state

    def _decoder(self, state: dict[str, Any], new: torch.Tensor) -> Any:
        """One seq2seq decoder pass: the new positions with the cache, or every decoded one without it."""
        cache = state["cache"]
        return self.module(
            encoder_outputs=state["encoder_outputs"],
            decoder_input_ids=new if cache is not None else state["decoded"],
            past_key_values=cache,
            use_cache=cache is not None,
        )

    def step(self, token: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Feed one token per sequence; the next greedy token."""
        import torch

        cache = state["cache"]
        if self.seq2seq:
            if cache is None:
                state["decoded"] = torch.cat([state["decoded"], token[:, None]], dim=1)
            out = self._decoder(state, token[:, None])
        elif cache is None:  # no cache: the whole sequence so far, every time
            state["ids"] = torch.cat([state["ids"], token[:, None]], dim=1)
            out = self.module(input_ids=state["ids"], use_cache=False)
        else:
            out = self.module(input_ids=token[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Greedy new tokens [batch, new_tokens]; the returned state's cache covers prompt + new tokens
        (the last token is fed too, so what it holds is the cache at that context length)."""
        import torch

        with torch.inference_mode():
            tokens, state = greedy_run(self, prompts, new_tokens)
        return tokens.cpu(), state


def greedy_run(
    loop: GreedyLoop | OnnxGreedyLoop | OnnxSeq2SeqLoop | OrtGenaiLoop, prompts: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Prefill, then steps until `new_tokens` tokens; the last token is fed too, so the state's cache
    covers prompt + new tokens. Shared by the torch and the ONNX Runtime loop."""
    import torch

    token, state = loop.prefill(prompts)
    out = [token]
    for _ in range(new_tokens - 1):
        token = loop.step(token, state)
        out.append(token)
    loop.step(token, state)
    return torch.stack(out, dim=1), state


def greedy_tokens(
    module: Any, family: str, prompts: torch.Tensor, new_tokens: int, kind: str = "torch"
) -> torch.Tensor:
    """The greedy new tokens of `module` (an ONNX file with kind "onnx") after each prompt ([batch,
    new_tokens]). A graph marked for onnxruntime-genai's Generator is decoded by the studio's loop here: the
    Generator holds the end token back until its length is reached, so its tokens would differ from the
    original's wherever that stops, and the comparison would measure the runtime's rule, not the variant."""
    return greedy_loop(kind, module, family, generator=False).generate(prompts, new_tokens)[0]


def greedy_loop(
    kind: str,
    target: Any,
    family: str,
    spec: Any = None,
    *,
    max_new_tokens: int | None = None,
    generator: bool = True,
) -> GreedyLoop | OnnxGreedyLoop | OnnxSeq2SeqLoop | OrtGenaiLoop:
    """The greedy loop of a runnable: a torch module, or an ONNX graph with a KV cache (any other kind, or
    a graph without the cache, raises BadInput saying why); a graph runtime.onnxruntime_genai marked runs in
    onnxruntime-genai's Generator. `spec` (GenerationSpec) gives a torch loop its attention and cache
    options; its new_tokens (or `max_new_tokens`) size the Generator's buffers; `generator=False` keeps the
    studio's loop for a marked graph too."""
    if kind == "torch":
        if spec is None:
            return GreedyLoop(target, family)
        return GreedyLoop(
            target,
            family,
            attention=getattr(spec, "attention", None),
            cache=getattr(spec, "cache", "dynamic"),
            max_len=spec.prompt_tokens + spec.new_tokens,
        )
    if kind != "onnx":
        raise BadInput(f"generation metrics are measured for torch and ONNX variants only, not {kind}")
    reason = _onnx_reason(target, family)
    if reason:
        raise BadInput(reason)
    import torch

    from studio.evaluation.onnx_generation import OnnxGreedyLoop, OnnxSeq2SeqLoop

    if family == "seq2seq":
        return OnnxSeq2SeqLoop(target, threads=torch.get_num_threads())
    settings = genai_runtime(target) if generator else None
    if settings is not None:
        from studio.evaluation.ortgenai_runner import OrtGenaiLoop

        threads = settings.get("intra_op_threads") or torch.get_num_threads()
        new = getattr(spec, "new_tokens", None) or max_new_tokens
        return OrtGenaiLoop(Path(target).parent, threads=int(threads), max_new_tokens=new)
    return OnnxGreedyLoop(target, threads=torch.get_num_threads())


def genai_runtime(path: Any) -> dict[str, Any] | None:
    """The onnxruntime-genai settings a causal LM graph carries (runtime.onnxruntime_genai), or None; a
    marked graph onnxruntime-genai cannot load (or cannot be run: not installed) is BadInput saying why."""
    from studio.checkpoints.onnx_graph import read_metadata
    from studio.evaluation.openvino_runner import installed
    from studio.evaluation.ort_settings import recorded
    from studio.evaluation.ortgenai_runner import RUNTIME_KEY, genai_problem

    metadata = read_metadata(Path(path))
    if RUNTIME_KEY not in metadata:
        return None
    settings = recorded(metadata, RUNTIME_KEY)
    problem = genai_problem(Path(path)) or (
        None if installed("onnxruntime_genai") else "onnxruntime-genai is not installed"
    )
    if problem:
        raise BadInput(f"runtime.onnxruntime_genai: {problem}", path=Path(path))
    return settings


# ------------------------------------------------------------------------------------------------ timing


def _decode_samples(
    loop: GreedyLoop | OnnxGreedyLoop | OnnxSeq2SeqLoop | OrtGenaiLoop,
    prompts: Any,
    new_tokens: int,
    policy: TimingPolicy,
) -> list[float]:
    """Milliseconds of every decode step of complete greedy runs: one warm-up run, then runs until the
    policy has enough steps and time (a run is never cut short, so late steps count as often as early)."""
    import torch

    steps = max(new_tokens - 1, 1)  # with one new token, one step is still timed (and not reported twice)
    samples: list[float] = []
    with torch.inference_mode():
        for warm in (True, False):
            began = time.perf_counter()
            while True:
                token, state = loop.prefill(prompts)
                loop.sync()
                for _ in range(steps):
                    t0 = time.perf_counter()
                    token = loop.step(token, state)
                    loop.sync()
                    if not warm:
                        samples.append((time.perf_counter() - t0) * 1000.0)
                elapsed = time.perf_counter() - began
                if warm:
                    if elapsed >= policy.warmup_seconds:
                        break
                    continue
                if len(samples) >= policy.max_runs * steps or elapsed >= policy.max_seconds:
                    break
                if len(samples) >= policy.min_runs and elapsed >= policy.min_seconds:
                    break
    return samples


def _percentiles(stats: dict[str, Any]) -> dict[str, Any]:
    """The latency summary without the per-call throughput (meaningless for a token step)."""
    return {k: v for k, v in stats.items() if k != "throughput_per_s"}


def _peak_memory_mb(
    loop: GreedyLoop | OnnxGreedyLoop | OnnxSeq2SeqLoop | OrtGenaiLoop, prompts: Any, new_tokens: int
) -> float:
    import torch

    if loop.device.type == "cuda":
        torch.cuda.synchronize(loop.device)
        before = torch.cuda.memory_allocated(loop.device)
        torch.cuda.reset_peak_memory_stats(loop.device)
        loop.generate(prompts, new_tokens)
        torch.cuda.synchronize(loop.device)
        return round((torch.cuda.max_memory_allocated(loop.device) - before) / 1e6, 2)
    from studio.evaluation.memprobe import PeakRSS

    with PeakRSS() as mem:
        loop.generate(prompts, new_tokens)
    return round(max(0.0, mem.delta_mb), 2)


def measure_generation(
    kind: str,
    target: Any,
    model: LoadedModel,
    examples: Sequence[Example],
    spec: Any,
    *,
    policy: TimingPolicy | None = None,
    log: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """The `generation` metrics of one runnable (a torch module, or an ONNX file) for `spec`
    (GenerationSpec: prompt_tokens, new_tokens, batch_sizes, attention, cache); `log(level, message)`
    reports progress."""
    log = log or (lambda level, message: None)
    out: dict[str, Any] = {"prompt_tokens": spec.prompt_tokens, "new_tokens": spec.new_tokens}
    policy = policy or TimingPolicy()
    try:
        loop = greedy_loop(kind, target, model.family if model is not None else "causal-lm", spec)
    except BadInput as exc:  # the variant is built already: say why, rather than lose the whole run
        out["unavailable"] = exc.problem
        log("warning", out["unavailable"])
        return out
    try:
        out.update(_timed(loop, model, examples, spec, policy, log))
        if options_set(spec):  # read before the module gets its own attention back
            out.update(_options_used(loop, log))
    finally:
        if isinstance(loop, GreedyLoop):
            loop.restore()
    return out


def options_set(spec: Any) -> bool:
    """Whether a recipe chose the attention or the cache (then the metrics record what ran)."""
    return getattr(spec, "attention", None) is not None or getattr(spec, "cache", "dynamic") != "dynamic"


def _options_used(
    loop: GreedyLoop | OnnxGreedyLoop | OnnxSeq2SeqLoop | OrtGenaiLoop, log: Callable[[str, str], None]
) -> dict[str, Any]:
    if isinstance(loop, GreedyLoop):
        return {"attention": loop.attention, "cache": loop.cache_kind}
    log("warning", "the attention and cache options apply to torch variants; an ONNX graph runs its own")
    return {"attention": "onnxruntime", "cache": "dynamic"}


def _timed(
    loop: GreedyLoop | OnnxGreedyLoop | OnnxSeq2SeqLoop | OrtGenaiLoop,
    model: LoadedModel,
    examples: Sequence[Example],
    spec: Any,
    policy: TimingPolicy,
    log: Callable[[str, str], None],
) -> dict[str, Any]:
    """TTFT and TPOT per batch size, then the cache bytes and peak memory (the body of measure_generation)."""
    import torch

    out: dict[str, Any] = {}
    torch.manual_seed(0)  # greedy decoding is deterministic; the seed keeps anything random fixed too
    p, n = spec.prompt_tokens, spec.new_tokens
    for b in spec.batch_sizes:
        prompts = generation_prompts(model, examples, b, p)

        def first_token(prompts: Any = prompts) -> None:
            with torch.inference_mode():
                loop.prefill(prompts)

        ttft = time_calls(first_token, b, policy, loop.sync)
        tpot = summarise(_decode_samples(loop, prompts, n, policy), b)
        out[str(b)] = {
            "ttft_ms": _percentiles(ttft),
            "tpot_ms": _percentiles(tpot),
            "decode_tokens_per_s": b * 1000.0 / tpot["p50"] if tpot["p50"] > 0 else 0.0,
            "prefill_tokens_per_s": b * p * 1000.0 / ttft["p50"] if ttft["p50"] > 0 else 0.0,
        }
        log(
            "info",
            f"generation batch {b}: TTFT p50 {ttft['p50']:.2f} ms, TPOT p50 {tpot['p50']:.2f} ms "
            f"({out[str(b)]['decode_tokens_per_s']:.0f} tokens/s)",
        )
    _, state = loop.generate(generation_prompts(model, examples, 1, p), n)
    if hasattr(loop, "cache_bytes"):  # onnxruntime-genai's Generator holds its own cache
        out["kv_cache_bytes"] = loop.cache_bytes(state)
    else:
        out["kv_cache_bytes"] = cache_bytes(state["cache"]) if state["cache"] is not None else 0
    out["kv_cache_bytes_per_token"] = out["kv_cache_bytes"] / (p + n)
    largest = max(spec.batch_sizes)
    out["peak_memory_mb"] = _peak_memory_mb(loop, generation_prompts(model, examples, largest, p), n)
    return out


def _onnx_reason(path: Any, family: str) -> str | None:
    """Why an ONNX graph cannot be measured, or None when it can: a causal LM graph with a KV cache, or a
    seq2seq graph whose metadata names the decoder-with-cache graph export.onnx wrote beside it."""
    from studio.checkpoints.onnx_graph import load_onnx_graph, metadata_of
    from studio.evaluation.onnx_cache import seq2seq_layout, seq2seq_problem, takes_past

    graph = load_onnx_graph(path)
    if family == "seq2seq":
        if seq2seq_layout(metadata_of(graph)) is None:
            return NO_CACHE_EXPORT
        return seq2seq_problem(path, metadata_of(graph))
    if not takes_past([i.name for i in graph.graph.input]):
        return NO_CACHE_EXPORT
    if family != "causal-lm":
        return (
            f"generating with an ONNX cache is implemented for causal-lm graphs, not {family} ones: "
            "not measured"
        )
    return None


def onnx_generates(path: Any, family: str) -> bool:
    """Whether an ONNX graph generates by itself (exported with its cache), so a greedy loop can run it."""
    return _onnx_reason(path, family) is None


# ------------------------------------------------------------------------------------------------ seq2seq


def translations(loop: Any, model: LoadedModel, examples: Sequence[Example], spec: Any) -> list[str]:
    """Each example's source greedy-decoded by `loop` (a seq2seq loop) alone, cut at the first end token
    and decoded to text: the generated outputs BLEU and chrF score (studio/evaluation/quality.py)."""
    import torch

    tok = model.tokenizer
    if tok is None:
        raise BadInput("scoring translations needs the model's tokenizer, and it has none", path=model.path)
    eos = getattr(model.config, "eos_token_id", None)
    texts = []
    with torch.inference_mode():
        for example in examples:
            ids = tok(example.text, truncation=True, max_length=spec.prompt_tokens, return_tensors="pt")
            tokens = loop.generate(ids["input_ids"], spec.new_tokens)[0][0].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            texts.append(tok.decode(tokens, skip_special_tokens=True).strip())
    return texts
