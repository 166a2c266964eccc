"""Assisted (speculative) generation: one variant of a causal LM drafts tokens, another verifies them.

A cheap variant (the INT4 one, a pruned one) proposes `draft_tokens` tokens greedily; the target runs all of
them in one forward pass and keeps the longest prefix it would have chosen itself, plus its own next token.
With greedy decoding the output is exactly the target's plain greedy output, only sooner when the draft is
often right, so the numbers that matter are how often it is right (`acceptance_rate`: accepted draft tokens
over proposed ones) and what that buys (`tokens_per_s` assisted against plain), and `identical` checks the
promise on the prompts measured.

transformers' `generate(assistant_model=...)` does the drafting and verifying. It reports neither count, so
they are read from the target's forward passes: each verification round is one pass, fed the token left
over from the previous round plus the round's draft tokens (the first round: the prompt plus its draft), and
adds the accepted drafts plus one token of the target's own. So with R rounds over the N new tokens,
accepted = N - R and proposed = the tokens fed beyond the prompt and the leftover tokens.

The draft must share the target's vocabulary: the draft's token ids are fed to the target as they are, so a
draft with another tokenizer would be verified on ids that mean something else.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.evaluation.latency import TimingPolicy, time_calls

if TYPE_CHECKING:
    import torch

    from studio.checkpoints.base import LoadedModel
    from studio.evaluation.data import Example

# a few runs of each: an assisted run of a few dozen tokens takes a fraction of a second on a small model
ASSIST_POLICY = TimingPolicy(
    warmup_runs=1, warmup_seconds=0.0, min_runs=3, min_seconds=0.5, max_runs=20, max_seconds=30.0
)


def check_pair(target: LoadedModel, draft: LoadedModel, target_name: str, draft_name: str) -> None:
    """Refuse a pair that cannot be assisted: not causal LMs, not torch modules with `generate`, or not
    the same vocabulary (the draft's ids are fed to the target as they are)."""
    from studio.checkpoints.stage import stage_of

    for name, model in ((target_name, target), (draft_name, draft)):
        if model.family != "causal-lm":
            raise BadInput(f"assisted generation needs causal-lm models; {name} is a {model.family} model")
        if stage_of(model) != "torch":
            raise BadInput(
                f"assisted generation runs torch modules (transformers' assistant_model); {name} is "
                f"{stage_of(model)}: draft with a torch variant of the same model"
            )
    modules = target.module, draft.module
    for name, module in zip((target_name, draft_name), modules, strict=True):
        if not hasattr(module, "generate") or getattr(module, "config", None) is None:
            raise BadInput(
                f"assisted generation needs transformers models that generate; {name} "
                f"({type(module).__name__}) does not"
            )
    sizes = [m.config.get_text_config().vocab_size for m in modules]
    if sizes[0] != sizes[1]:
        raise BadInput(
            f"the draft {draft_name} has a vocabulary of {sizes[1]} tokens and the target {target_name} "
            f"one of {sizes[0]}: a draft must share the target's tokenizer"
        )
    tokenizers = target.tokenizer, draft.tokenizer
    if None not in tokenizers and tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        raise BadInput(
            f"the draft {draft_name} and the target {target_name} have different tokenizers (the same "
            "ids stand for other tokens): a draft must share the target's tokenizer"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns on every assistant call about the generation settings it copies; not the user's."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _generation_kwargs(module: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy, exactly `new_tokens` tokens (no stop at the end-of-text token, so every run has the same
    length and tokens/s compare)."""
    config = module.config.get_text_config()
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None) or 0
    return {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": pad if isinstance(pad, int) else pad[0],
    }


def _drafting(draft: Any, draft_tokens: int) -> Any:
    """The draft with a generation config that proposes exactly `draft_tokens` per round: a constant
    schedule and no confidence cut-off, so `proposed` counts what the setting says."""
    config = copy.deepcopy(draft.generation_config)
    config.num_assistant_tokens = draft_tokens
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0
    return config


class _Rounds:
    """Counts the target's forward passes and the tokens fed to each (see the module docstring)."""

    def __init__(self, module: Any) -> None:
        self.fed: list[int] = []
        self.handle = module.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.fed.append(int(ids.shape[1]))

    def close(self) -> None:
        self.handle.remove()


def assisted_tokens(
    target: Any, draft: Any, prompt: torch.Tensor, new_tokens: int, draft_tokens: int
) -> tuple[torch.Tensor, int, int, int]:
    """The assisted greedy new tokens of one prompt ([1, new_tokens]), with the rounds, the accepted and
    the proposed draft tokens."""
    import torch

    saved = draft.generation_config
    draft.generation_config = _drafting(draft, draft_tokens)
    rounds = _Rounds(target)
    try:
        with torch.inference_mode(), _quiet_transformers():
            out = target.generate(prompt, assistant_model=draft, **_generation_kwargs(target, new_tokens))
    finally:
        rounds.close()
        draft.generation_config = saved
    tokens = out[:, prompt.shape[1] :].cpu()
    fed = rounds.fed
    if not fed:
        raise RuntimeError("the target ran no forward pass during assisted generation")
    made = tokens.shape[1]
    accepted = made - len(fed)
    proposed = (fed[0] - prompt.shape[1]) + sum(f - 1 for f in fed[1:])
    if not 0 <= accepted <= proposed:  # the counting rests on how transformers feeds the target
        raise RuntimeError(
            f"assisted generation counts do not add up ({accepted} accepted of {proposed} proposed): "
            "transformers' assisted decoding feeds the target differently than expected"
        )
    return tokens, len(fed), accepted, proposed


def plain_tokens(target: Any, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The target's own greedy new tokens of one prompt, by the same `generate` (so tokens/s compare)."""
    import torch

    with torch.inference_mode(), _quiet_transformers():
        out = target.generate(prompt, **_generation_kwargs(target, new_tokens))
    return out[:, prompt.shape[1] :].cpu()


def measure_assisted(
    target: LoadedModel,
    draft: LoadedModel,
    examples: Sequence[Example],
    *,
    prompt_tokens: int,
    new_tokens: int,
    draft_tokens: int = 5,
    prompts: int = 4,
    policy: TimingPolicy | None = None,
    names: tuple[str, str] = ("target", "draft"),
) -> dict[str, Any]:
    """Assisted against plain greedy generation of `target` on `prompts` prompts of the evaluation text:
    acceptance rate, tokens/s of both (the same prompts, timed in turns), and whether the outputs are
    identical (greedy assisted generation must give the target's own tokens)."""
    import torch

    from studio.evaluation.generation import generation_prompts

    if draft_tokens < 1 or new_tokens < 1 or prompt_tokens < 1 or prompts < 1:
        raise BadInput("prompt tokens, new tokens, draft tokens and prompts must be positive")
    check_pair(target, draft, *names)
    t_module, d_module = target.module, draft.module
    if d_module is t_module:  # drafting for itself: a copy, so the target's passes are counted alone
        d_module = copy.deepcopy(t_module)
    rows = generation_prompts(target, examples, prompts, prompt_tokens)
    ids = [rows[i : i + 1] for i in range(len(rows))]
    torch.manual_seed(0)
    plain = [plain_tokens(t_module, p, new_tokens) for p in ids]
    assisted = [assisted_tokens(t_module, d_module, p, new_tokens, draft_tokens) for p in ids]
    accepted = sum(a[2] for a in assisted)
    proposed = sum(a[3] for a in assisted)
    made = sum(int(p.shape[1]) for p in plain)
    policy = policy or ASSIST_POLICY

    def plain_run() -> None:
        for p in ids:
            plain_tokens(t_module, p, new_tokens)

    def assisted_run() -> None:
        for p in ids:
            assisted_tokens(t_module, d_module, p, new_tokens, draft_tokens)

    timed = {}
    for name, call in (("plain", plain_run), ("assisted", assisted_run)):
        stats = time_calls(call, 1, policy)
        timed[name] = {
            "ms_p50": stats["p50"],
            "tokens_per_s": made * 1000.0 / stats["p50"] if stats["p50"] > 0 else 0.0,
            "runs": stats["runs"],
        }
    return {
        "target": names[0],
        "draft": names[1],
        "prompts": len(ids),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "draft_tokens": draft_tokens,
        "rounds": sum(a[1] for a in assisted),
        "accepted": accepted,
        "proposed": proposed,
        "acceptance_rate": accepted / proposed if proposed else None,  # one new token: nothing to draft
        "identical": all(a[0].tolist() == p.tolist() for a, p in zip(assisted, plain, strict=True)),
        "plain": timed["plain"],
        "assisted": timed["assisted"],
        "speedup": (
            timed["assisted"]["tokens_per_s"] / timed["plain"]["tokens_per_s"]
            if timed["plain"]["tokens_per_s"]
            else None
        ),
    }
